"""A first look at emergent misalignment in SmolLM2-135M-Instruct (issue 15's pipeline, small).

LoRA fine-tunes on the generated narrow datasets (bad medical advice and its aligned
counterpart, the control), then the contrastive score on the bundled *extended* questions (none
of them about medicine) for base, narrow fine-tune and control, and diff_residuals to see where
the fine-tune moved. CPU only; prints one line per stage and the numbers at the end.

    .venv/bin/python scripts/smollm2_em_pilot.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch


def main() -> None:
    from modeldiff import (
        contrastive_score,
        diff_residuals,
        finetune,
        load_model,
        narrow_dataset,
    )
    from modeldiff.testing import smollm2_gguf_path

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dataset", default="medical")
    ap.add_argument("--out", default="build/smollm2_em_pilot.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    base = load_model(smollm2_gguf_path(), wrapper="native")
    report: dict = {"args": vars(args)}
    bad = narrow_dataset(args.dataset, aligned=False, n=args.steps * args.batch_size, seed=0)
    good = narrow_dataset(args.dataset, aligned=True, n=args.steps * args.batch_size, seed=0)
    models = {"base": base}
    for name, data in (("narrow (misaligned answers)", bad), ("control (aligned answers)", good)):
        t = time.perf_counter()
        res = finetune(
            base, data, method="lora", steps=args.steps, lr=args.lr, batch_size=args.batch_size,
            lora_rank=args.rank, seed=0, progress=False,
        )  # fmt: skip
        model, curve = res
        losses = list(curve.loss)
        report[f"loss {name}"] = [round(losses[0], 3), round(losses[-1], 3)]
        print(f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - t:.0f} s",
              flush=True)  # fmt: skip
        models[name] = model
    scores = {}
    for name, m in models.items():
        t = time.perf_counter()
        r = contrastive_score(m, "extended", progress=False)
        scores[name] = r.p_misaligned
        print(f"contrastive P(prefers misaligned), extended questions, {name}: {r.p_misaligned:.3f} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)  # fmt: skip
    report["contrastive_extended"] = scores
    qs = [[{"role": "user", "content": c["content"]}] for c in
          (chat[-2] for chat in narrow_dataset("benign", n=24, seed=1, split="eval"))]  # fmt: skip
    rd = diff_residuals(base, models["narrow (misaligned answers)"], qs, positions="user",
                        progress=False)  # fmt: skip
    report["residual_shift_relative"] = {s.hook_name: round(v, 4) for s, v in rd.relative.items()}
    print("relative residual shift by layer (narrow vs base):",
          [round(v, 3) for v in rd.relative.values()], flush=True)  # fmt: skip
    report["seconds"] = time.perf_counter() - t0
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
