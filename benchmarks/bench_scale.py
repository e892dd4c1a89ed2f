"""Scaling diff_latents: one process vs two (torchrun, gloo, CPU), and the activation cache.

Prints (see benchmarks/README.md, section "Scale"):

1. wall time of ``diff_latents`` in one process (all threads) and on two gloo ranks (one thread
   each, ``torchrun --nproc-per-node 2``), with each process's peak RSS; the two results are
   checked bit for bit;
2. the activation cache: a plain diff, the same diff writing the cache, and a diff with another
   SAE reading it (no forward pass), with the cache's size and write/read throughput.

Run: ``.venv/bin/python benchmarks/bench_scale.py`` (``--quick`` for a short version).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

N_LAYERS, D_MODEL, D_VOCAB, SITE_LAYER = 6, 256, 4096, 3
D_SAE, K = 4096, 32
BATCH = 16


def build(n_prompts: int, seed_sae: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from modeldiff.testing import make_tokenizer

    tok = make_tokenizer(vocab_size=D_VOCAB)
    models = []
    for seed in (0, 1):
        cfg = HookedTransformerConfig(
            n_layers=N_LAYERS,
            d_model=D_MODEL,
            n_heads=8,
            d_head=D_MODEL // 8,
            d_mlp=4 * D_MODEL,
            n_ctx=256,
            d_vocab=len(tok),
            act_fn="gelu",
            normalization_type="LN",
            seed=seed,
            default_prepend_bos=False,
        )
        models.append(HookedTransformer(cfg, tokenizer=tok, move_to_device=False).eval())
    torch.manual_seed(seed_sae)
    cfg = TopKSAEConfig(d_in=D_MODEL, d_sae=D_SAE, k=K)
    cfg.metadata.hook_name = f"blocks.{SITE_LAYER}.hook_resid_post"
    sae = TopKSAE(cfg)
    words = [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "was",
        "for",
        "on",
        "that",
        "with",
        "as",
        "by",
        "at",
        "from",
        "his",
        "her",
        "it",
        "an",
    ]
    g = torch.Generator().manual_seed(0)
    prompts = [
        " ".join(words[int(i)] for i in torch.randint(len(words), (int(n),), generator=g))
        for n in torch.randint(48, 96, (n_prompts,), generator=g)
    ]
    return models[0], models[1], sae, prompts


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(out: str, n_prompts: int, distributed: bool) -> None:
    """One diff; rank 0 (or the single process) writes its timing and statistics."""
    from safetensors.torch import save_file

    from modeldiff import diff_latents

    base, tuned, sae, prompts = build(n_prompts)
    t0 = time.perf_counter()
    d = diff_latents(
        base, tuned, sae, prompts, positions="all", batch_size=BATCH, progress=False,
        n_permutations=1000, distributed=distributed,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    rank = int(os.environ.get("RANK", 0))
    info = {"wall_s": wall, "rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(info, f)
    if d is not None:
        tensors = {f"col.{c}": d.column(c) for c in d.columns}
        for name, st in zip(("base", "finetuned"), d.stats):
            tensors.update({f"{name}.{k}": v for k, v in st.state_dict().items()})
        save_file(tensors, out)
    if distributed:
        import torch.distributed as dist

        dist.destroy_process_group()


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def compare_processes(n_prompts: int, tmp: str) -> None:
    from safetensors.torch import load_file

    ncpu = os.cpu_count() or 1
    runs = {}  # name -> (output file, process wall time, ranks)
    for threads in sorted({1, ncpu}):
        out = os.path.join(tmp, f"one{threads}.st")
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, __file__, "--worker", out, "--prompts", str(n_prompts)],
            env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True,
        )  # fmt: skip
        runs[f"1 process, {threads} thread(s)"] = (out, time.perf_counter() - t0, 1)
    out = os.path.join(tmp, "two.st")
    t0 = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
         "--master-addr=127.0.0.1", f"--master-port={_port()}", __file__, "--worker", out,
         "--prompts", str(n_prompts), "--distributed"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
    )  # fmt: skip
    runs["2 gloo ranks, 1 thread each"] = (out, time.perf_counter() - t0, 2)
    print(f"\n## one process vs two gloo ranks ({n_prompts} prompts, batch {BATCH})")
    print(
        "| run | diff_latents wall s | process wall s (incl. start-up) | peak RSS MB per process |"
    )
    print("|---|---|---|---|")
    for name, (path, wall, n) in runs.items():
        info = [_read_json(f"{path}.rank{r}.json") for r in range(n)]
        rss = " / ".join(f"{r['rss_mb']:.0f}" for r in info)
        print(f"| {name} | {info[0]['wall_s']:.2f} | {wall:.1f} | {rss} |")
    a, b = load_file(runs["1 process, 1 thread(s)"][0]), load_file(out)
    same = a.keys() == b.keys() and all(
        torch.equal(a[k].isnan(), b[k].isnan())
        and torch.equal(a[k].nan_to_num(), b[k].nan_to_num())
        for k in a
    )
    print(f"2 ranks bit-identical to 1 process at the same thread count: {same}")


def compare_cache(n_prompts: int, tmp: str) -> None:
    from modeldiff import diff_latents
    from modeldiff.cache import ActivationCache

    base, tuned, sae, prompts = build(n_prompts)
    sae2 = build(1, seed_sae=1)[2]
    kw = {"positions": "all", "batch_size": BATCH, "progress": False, "uncertainty": None}
    folder = os.path.join(tmp, "acts")
    times = {}
    for name, s, extra in (
        ("plain (no cache)", sae, {}),
        ("writing the cache", sae, {"cache": folder}),
        ("reading it, another SAE", sae2, {"cache": folder}),
        ("plain, that other SAE", sae2, {}),
    ):
        t0 = time.perf_counter()
        d = diff_latents(base, tuned, s, prompts, **kw, **extra)
        times[name] = time.perf_counter() - t0
    del d
    c = ActivationCache(folder)
    mb = c.nbytes / 2**20
    n_tok = c.manifest["n_tokens"]
    print(f"\n## activation cache ({n_prompts} prompts, {n_tok} tokens, {mb:.0f} MiB, "
          f"{c.manifest['dtype']})")  # fmt: skip
    print("| run | wall s | tokens/s | MiB/s of cache |")
    print("|---|---|---|---|")
    for name, t in times.items():
        rate = "-" if name.startswith("plain") else f"{mb / t:.0f}"
        print(f"| {name} | {t:.2f} | {n_tok / t:.0f} | {rate} |")
    shutil.rmtree(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker")
    ap.add_argument("--distributed", action="store_true")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.prompts, args.distributed)
        return
    n = 48 if args.quick else args.prompts
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        compare_processes(n, tmp)
        compare_cache(n, tmp)


if __name__ == "__main__":
    main()
