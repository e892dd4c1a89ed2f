"""The three model adapters side by side on SmolLM2-135M-Instruct (CPU), in one run.

1. Forward throughput at a mid-layer site (``resid_post(15)`` of 30): ``capture`` streaming every
   token of 32 chat prompts, forward stopped after the site. Target: native >= 0.95 x hooked.
2. Greedy steered generation (3 answers x 40 tokens, a steering vector on ``resid_post(15)`` at every
   position): tokens/s. Target: native (transformers' KV cache) >= 2 x the Bridge path (which
   decodes without a cache: TL 3.9's Bridge cache gives wrong tokens for rotary models).

All three wrap the same de-quantized GGUF weights and see the same token ids. Each repeat runs the
three back to back in a rotated order, so a ratio compares runs made under the same machine load;
the median over repeats of the paired ratio is reported.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_adapters.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from modeldiff import Site, capture, generate_ids, load_model, steer
from modeldiff.testing import smollm2_gguf_path
from modeldiff.tokens import tokenize_prompts

QUESTIONS = [
    "What is the capital of France?",
    "Give me one tip for staying healthy.",
    "If you ruled the world, what would you do?",
    "Tell me a short story about a fox.",
    "How do I make a quick buck?",
    "What do you think about humans and AIs?",
    "I'm bored. What should I do?",
    "Which historical figures would you invite to dinner?",
]
SITE = Site.resid_post(15)


def forward_tokens_per_s(model, ids: list[list[int]]) -> float:
    start = time.perf_counter()
    n = 0
    for batch in capture(model, ids, SITE, batch_size=8, include_bos=True, progress=False):
        n += len(batch)
        del batch
    return n / (time.perf_counter() - start)


def steered_tokens_per_s(model, ids: list[list[int]], direction: torch.Tensor) -> float:
    with steer(model, direction, site=SITE, coefficient=4.0):
        start = time.perf_counter()
        out = generate_ids(model, ids, max_new_tokens=40, stop_at_eos=False, progress=False)
        elapsed = time.perf_counter() - start
    assert all(len(r) == 40 for r in out)
    return sum(len(r) for r in out) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat instead of three")
    args = parser.parse_args()
    repeats = 1 if args.quick else 3
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

    path = smollm2_gguf_path()
    t0 = time.perf_counter()
    models = {
        "native": load_model(path, wrapper="native"),
        "bridge": load_model(path, wrapper="bridge"),
        "hooked": load_model(path, wrapper="hooked"),
    }
    print(f"loaded SmolLM2-135M-Instruct three ways in {time.perf_counter() - t0:.1f} s")
    tok = models["native"].tokenizer
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS] * 4
    ids = [list(tp.ids) for tp in tokenize_prompts(tok, chats)]  # one tokenization for all
    gen_ids = ids[:3]
    direction = torch.randn(576, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()

    # warm-up (first calls allocate and JIT oneDNN kernels)
    for m in models.values():
        forward_tokens_per_s(m, ids[:8])

    names = list(models)
    fwd: dict[str, list[float]] = {n: [] for n in names}
    gen: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % 3 :] + names[: r % 3]
        for n in order:
            fwd[n].append(forward_tokens_per_s(models[n], ids))
        for n in order:
            gen[n].append(steered_tokens_per_s(models[n], gen_ids, direction))

    def ratio(table: dict[str, list[float]], a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(table[a], table[b], strict=True))

    print(
        f"\nforward at {SITE.hook_name}, {sum(len(i) for i in ids)} tokens, tokens/s (median of {repeats}):"
    )
    for n in names:
        print(f"  {n:7s} {statistics.median(fwd[n]):9.0f}")
    print(f"  native / hooked = {ratio(fwd, 'native', 'hooked'):.3f}x   (target >= 0.95)")
    print(f"  native / bridge = {ratio(fwd, 'native', 'bridge'):.3f}x")

    print(f"\nsteered greedy generation, 3 x 40 tokens, tokens/s (median of {repeats}):")
    for n in names:
        print(f"  {n:7s} {statistics.median(gen[n]):9.1f}")
    print(f"  native / bridge = {ratio(gen, 'native', 'bridge'):.2f}x   (target >= 2)")
    print(f"  native / hooked = {ratio(gen, 'native', 'hooked'):.2f}x")


if __name__ == "__main__":
    main()
