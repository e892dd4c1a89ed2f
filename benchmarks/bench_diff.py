"""diff_latents throughput and memory, measured side by side in one run.

Prints three comparisons (see benchmarks/README.md, section "diff_latents"):

1. throughput of ``diff_latents`` (streaming statistics only, and with the paired uncertainty)
   against the *floor*: both forwards stopped right after the site plus the SAE encode, nothing else
   (target: >= 0.90x);
2. against the *naive sae-lens path*: a full forward of ``HookedSAETransformer`` with
   ``run_with_cache_with_saes`` on both models, then the mean of the cached latents (target: >= 2x at
   a mid layer);
3. peak memory (max RSS of a fresh process, median of 3 per size) at 10k, 50k and 200k tokens
   (target: growth < 5% from 10k to 200k), on the throughput model; ``--memory-model small`` runs
   the fragmentation stress case, ``--limit-heap-too`` adds runs with ``limit_heap_growth()``.

Run: ``.venv/bin/python benchmarks/bench_diff.py`` (on 2 CPU cores: about 5 minutes of throughput,
then about 15 of memory; ``--memory-only`` skips the first).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# Proportioned like SmolLM2-135M (30 layers, d_model 576, MLP 1536, vocab 49152), scaled down: the
# unembedding is about a quarter of the full forward's cost, as there. The naive path pays for it
# (logits), the truncated forward does not, so the vocabulary size matters for the ratio.
N_LAYERS, D_MODEL, D_MLP, D_VOCAB, N_CTX = 12, 256, 1024, 16384, 256
SITE_LAYER = 5  # resid_post(5): after 6 of 12 blocks, the middle
D_SAE, K = 4096, 32
PROMPT_LEN = (96, 128)
BATCH = 16
MEMORY_CONFIG = {
    "n_layers": 2,
    "d_model": 128,
    "d_mlp": 512,
    "d_vocab": 0,
    "site_layer": 0,
    "d_sae": 2048,
    "k": 16,
}
MEMORY_BATCH = 32
# The configuration of the issue's own independent benchmark: a random GPT-2-sized model (d_model
# 512, 6 layers, GPT-2's vocabulary of 50,257), the site after the middle block, 64 prompts of 128
# tokens, diff_latents' default batch size (8).
ISSUE_CONFIG = {"n_layers": 6, "d_model": 512, "d_mlp": 2048, "d_vocab": 50257, "site_layer": 2}
ISSUE_PROMPTS, ISSUE_PROMPT_LEN, ISSUE_BATCH = 64, 128, 8


def build(
    seed: int = 0,
    *,
    n_layers: int = N_LAYERS,
    d_model: int = D_MODEL,
    d_mlp: int = D_MLP,
    d_vocab: int = D_VOCAB,
    site_layer: int = SITE_LAYER,
    d_sae: int = D_SAE,
    k: int = K,
    sae_kind: str = "topk",
):
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from modeldiff.sites import Site
    from modeldiff.testing import make_tokenizer

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=8,
        d_head=d_model // 8,
        d_mlp=d_mlp,
        n_ctx=N_CTX,
        d_vocab=max(d_vocab, len(tok)),  # ids beyond the tokenizer's are simply never used
        act_fn="gelu",
        normalization_type="LN",
        seed=seed,
        default_prepend_bos=False,
    )
    base = HookedTransformer(cfg, tokenizer=tok, move_to_device=False).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # a "fine-tune": small changes everywhere
    site = Site.resid_post(site_layer)
    if sae_kind == "topk":
        sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=d_sae, k=k))
    else:  # a dense standard ReLU SAE: about half of its latents fire on a token
        sae = StandardSAE(StandardSAEConfig(d_in=d_model, d_sae=d_sae))
        with torch.no_grad():
            sae.b_enc.fill_(0.0)
    sae.cfg.metadata.hook_name = site.hook_name
    return tok, base, tuned, sae, site


def make_prompts(
    n_tokens: int, seed: int = 1, lengths: tuple[int, int] = PROMPT_LEN
) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out, total = [], 0
    while total < n_tokens:
        n = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        out.append(torch.randint(4, 470, (n,), generator=g).tolist())
        total += n
    return out


def floor_pass(models, sae, site, prompts, batch: int = BATCH, encode=None) -> None:
    """Both forwards stopped after the site, the SAE encode and a running sum of the latents (the
    issue's definition of the floor): nothing else. ``encode`` replaces ``sae.encode`` (the stricter
    floor uses modeldiff's own cheapest exact encode, ``encode_sparse``)."""
    encode = sae.encode if encode is None else encode
    from modeldiff._hooks import run_until
    from modeldiff.capture import plan_batches
    from modeldiff.tokens import pad_batch

    batches = plan_batches([len(p) for p in prompts], batch, sort_by_length=True)
    totals = [torch.zeros(sae.cfg.d_sae) for _ in models]
    with torch.inference_mode():
        for idx in batches:
            toks, mask, _ = pad_batch([prompts[i] for i in idx], pad=3, side="right")
            keep = mask.bool()
            for m, total in zip(models, totals):
                got = {}

                def grab(x, hook, got=got, keep=keep):
                    got["x"] = x[keep]

                run_until(
                    m,
                    toks,
                    hooks=[(site.hook_name, grab)],
                    stop_at=site.hook_name,
                    attention_mask=mask,
                )
                z = encode(got["x"])
                total += torch.sparse.sum(z, 0).to_dense() if z.is_sparse else z.sum(0)


def naive_pass(hsts, sae, site, prompts, batch: int = BATCH) -> list[torch.Tensor]:
    """Full forward with run_with_cache_with_saes on both models, then the mean latent activation."""
    from modeldiff.capture import plan_batches
    from modeldiff.tokens import pad_batch

    batches = plan_batches([len(p) for p in prompts], batch, sort_by_length=True)
    means = []
    with torch.inference_mode():
        for h in hsts:
            total, count = torch.zeros(sae.cfg.d_sae, dtype=torch.float64), 0
            for idx in batches:
                toks, mask, _ = pad_batch([prompts[i] for i in idx], pad=3, side="right")
                _, cache = h.run_with_cache_with_saes(toks, saes=[sae], attention_mask=mask)
                acts = cache[f"{site.hook_name}.hook_sae_acts_post"][mask.bool()]
                total += acts.double().sum(0)
                count += acts.shape[0]
            means.append(total / count)
    return means


def throughput(
    n_tokens: int, repeats: int, vocab: int, sae_kind: str = "topk", model: str = "bench"
) -> dict:
    from sae_lens import HookedSAETransformer

    from modeldiff.diff import diff_latents
    from modeldiff.saes import encode_sparse

    if model == "issue":
        tok, base, tuned, sae, site = build(**ISSUE_CONFIG, sae_kind=sae_kind)
        prompts = make_prompts(ISSUE_PROMPTS * ISSUE_PROMPT_LEN, lengths=(ISSUE_PROMPT_LEN,) * 2)
        batch = ISSUE_BATCH
    else:
        tok, base, tuned, sae, site = build(d_vocab=vocab, sae_kind=sae_kind)
        prompts = make_prompts(n_tokens)
        batch = BATCH
    n_tok = sum(len(p) for p in prompts)
    hsts = []
    for m in (base, tuned):
        h = HookedSAETransformer(m.cfg, tokenizer=tok, move_to_device=False)
        h.load_state_dict(m.state_dict())
        hsts.append(h.eval())

    def ours_stream():
        return diff_latents(
            base,
            tuned,
            sae,
            prompts,
            positions="all",
            batch_size=batch,
            uncertainty=None,
            progress=False,
        )

    def ours_full():
        return diff_latents(
            base, tuned, sae, prompts, positions="all", batch_size=batch, progress=False
        )

    runs = {
        "floor": lambda: floor_pass((base, tuned), sae, site, prompts, batch),
        "floor_own_encode": lambda: floor_pass(
            (base, tuned), sae, site, prompts, batch, lambda x: encode_sparse(sae, x)
        ),
        "ours_stream": ours_stream,
        "ours_full": ours_full,
        "naive": lambda: naive_pass(hsts, sae, site, prompts, batch),
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    ours_stream()  # warm-up (allocator, first-call overheads)
    names = list(runs)
    for rep in range(repeats):
        # Interleaved and rotated, so drift in machine load hits every variant alike. On a shared
        # machine the process CPU time (all torch threads) is the steadier measure of work done.
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            runs[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    best = {k: min(v) for k, v in wall.items()}
    best_cpu = {k: min(v) for k, v in cpu.items()}
    # the same ratios from each repeat's own runs (one rotation, minutes apart at most), medianed:
    # steadier than best-of-N when the machine's speed drifts between repeats
    paired = {
        (num, den): statistics.median(cpu[num][i] / cpu[den][i] for i in range(repeats))
        for num in runs
        for den in runs
    }
    # sanity: our means equal the naive path's
    d = ours_stream()
    nb, nf = naive_pass(hsts, sae, site, prompts, batch)
    err = max(float((d.mean_base - nb).abs().max()), float((d.mean_finetuned - nf).abs().max()))
    return {
        "active": float(d.column("freq_base").mean()),
        "tokens": n_tok,
        "prompts": len(prompts),
        "batch": batch,
        "seconds": best,
        "cpu_seconds": best_cpu,
        "paired_cpu": paired,
        "max_abs_err_vs_naive": err,
    }


def uncertainty_share(n_tokens: int, vocab: int, sae_kind: str, repeats: int = 2) -> dict:
    """The paired uncertainty's cost in a default diff_latents run, two ways.

    1. Whole runs: a default run and one with ``uncertainty=None``, interleaved ``repeats`` times;
       the median CPU time of each, and the share of the difference (which also holds the
       per-prompt sums kept while streaming; on this shared machine single runs of ~50 s wander by
       several seconds, hence the repeats).
    2. The paired step alone, its fixed cost: ``LatentDiff.from_stats`` on the statistics of one
       run, with the default uncertainty and with none (median of 3 each).
    """
    from modeldiff.diff import LatentDiff, collect_site_stats, diff_latents

    _, base, tuned, sae, site = build(d_vocab=vocab, sae_kind=sae_kind)
    prompts = make_prompts(n_tokens)
    kw = {"positions": "all", "batch_size": BATCH, "progress": False}
    diff_latents(base, tuned, sae, prompts[:8], **kw)  # warm-up
    cpu: dict[str, list[float]] = {"stream": [], "full": []}
    for _ in range(repeats):
        for name, extra in (("stream", {"uncertainty": None}), ("full", {})):
            c0 = time.process_time()
            diff_latents(base, tuned, sae, prompts, **kw, **extra)
            cpu[name].append(time.process_time() - c0)
    stats = [collect_site_stats(m, sae, prompts, site=site, **kw) for m in (base, tuned)]
    step: dict[str, list[float]] = {"none": [], "all": []}
    for _ in range(3):
        for name, unc in (("none", None), ("all", "all")):
            c0 = time.process_time()
            LatentDiff.from_stats(*stats, site=site, sae=sae, uncertainty=unc)
            step[name].append(time.process_time() - c0)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    paired = statistics.median(step["all"]) - statistics.median(step["none"])
    return {
        "tokens": sum(len(p) for p in prompts),
        "prompts": len(prompts),
        **med,
        "share": (med["full"] - med["stream"]) / med["full"],
        "paired_step": paired,
        "paired_share": paired / med["full"],
    }


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(
    n_tokens: int, uncertainty: str | None = "all", limit_heap: bool = False, model: str = "bench"
) -> None:
    """Peak memory of one diff_latents run in a fresh process (VmHWM: exact, per process image)."""
    from modeldiff.diff import diff_latents
    from modeldiff.memory import limit_heap_growth

    if limit_heap and not limit_heap_growth():
        raise SystemExit("limit_heap_growth needs glibc")

    # "bench": the throughput model and batch size. "small": a 2-layer d_model-128 model whose
    # per-batch transient memory (attention patterns, encoder outputs) is large against the
    # process, the stress case for allocator fragmentation.
    if model == "bench":
        _, base, tuned, sae, _ = build()
        batch = BATCH
    else:
        _, base, tuned, sae, _ = build(**MEMORY_CONFIG)
        batch = MEMORY_BATCH
    prompts = make_prompts(n_tokens)
    # touch the code paths once on a few prompts so lazy imports count in the baseline
    diff_latents(base, tuned, sae, prompts[:4], positions="all", progress=False)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS high-water mark, so VmHWM below is this run's peak
    rss_before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    d = diff_latents(
        base,
        tuned,
        sae,
        prompts,
        positions="all",
        batch_size=batch,
        uncertainty=uncertainty,
        progress=False,
    )
    secs = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    entries = (
        d.stats[0].latents.n_prompt_entries + d.stats[1].latents.n_prompt_entries
        if uncertainty is not None
        else 0
    )
    print(
        json.dumps(
            {
                "tokens": int(d.meta["n_tokens"]),
                "prompts": len(prompts),
                "batches": -(-len(prompts) // batch),
                "peak_rss_mb": peak,
                "rss_before_run_mb": rss_before,
                "run_working_set_mb": peak - rss_before,
                "per_prompt_entries": entries,
                "per_prompt_mb": entries * 16 / 2**20,
                "seconds": secs,
            }
        )
    )


def memory_table(args: argparse.Namespace) -> None:
    """Fresh processes per (configuration, size, repeat); medians and ranges of the peak RSS."""
    import statistics

    sizes = [int(x) for x in args.memory_sizes.split(",")]
    configs = [
        ("uncertainty=None,  default allocator  ", ["--no-uncertainty"]),
        ("uncertainty='all', default allocator  ", []),
    ]
    if args.limit_heap_too:
        configs += [
            ("uncertainty=None,  limit_heap_growth()", ["--no-uncertainty", "--limit-heap"]),
            ("uncertainty='all', limit_heap_growth()", ["--limit-heap"]),
        ]
    desc = MEMORY_CONFIG if args.memory_model == "small" else "the throughput model, batch 16"
    print(
        f"\n[memory] model {args.memory_model!r} ({desc}); fresh process per run, "
        f"{args.memory_repeats} runs per size; peak RSS median [min-max]"
    )
    for label, extra in configs:
        rows: dict[int, list[dict]] = {}
        for _ in range(args.memory_repeats):  # sizes interleaved, so drift hits all alike
            for n in sizes:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--memory-child",
                        str(n),
                        "--memory-model",
                        args.memory_model,
                        *extra,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                rows.setdefault(n, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {n: statistics.median(r["peak_rss_mb"] for r in rows[n]) for n in sizes}
        pp = {n: statistics.median(r["per_prompt_mb"] for r in rows[n]) for n in sizes}
        cells = "  ".join(
            f"{rows[n][0]['tokens'] // 1000}k tok/{rows[n][0]['batches']} batches: {med[n]:.0f} "
            f"[{min(r['peak_rss_mb'] for r in rows[n]):.0f}-"
            f"{max(r['peak_rss_mb'] for r in rows[n]):.0f}]"
            for n in sizes
        )
        lo, hi = sizes[0], sizes[-1]
        growth = med[hi] / med[lo] - 1
        # The per-prompt sums are the O(n_prompts * k) the paired analysis needs by design.
        own = (med[hi] - pp[hi] + pp[lo]) / med[lo] - 1
        secs = statistics.median(r["seconds"] for r in rows[hi])
        print(
            f"  {label}: {cells} MB; growth {100 * growth:+.1f}%, without the per-prompt sums "
            f"({pp[hi]:.1f} MB at {hi // 1000}k) {100 * own:+.1f}% (target < 5%); "
            f"{secs:.1f} s at {hi // 1000}k"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory-child", type=int, default=None)
    ap.add_argument("--no-uncertainty", action="store_true", help="memory child: uncertainty=None")
    ap.add_argument(
        "--limit-heap", action="store_true", help="memory child: call limit_heap_growth() first"
    )
    ap.add_argument("--memory-only", action="store_true", help="skip the throughput comparison")
    ap.add_argument("--tokens", type=int, default=3_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--memory-sizes", default="10000,50000,200000")
    ap.add_argument("--memory-repeats", type=int, default=3)
    ap.add_argument(
        "--memory-model",
        choices=("bench", "small"),
        default="bench",
        help="bench: the throughput model; small: the fragmentation stress case",
    )
    ap.add_argument(
        "--limit-heap-too", action="store_true", help="also measure with limit_heap_growth()"
    )
    ap.add_argument("--vocab", type=int, default=D_VOCAB, help="d_vocab of the throughput model")
    ap.add_argument(
        "--sae",
        choices=("topk", "relu", "both"),
        default="both",
        help="the SAE of the throughput run: TopK k32 (sparse), a dense standard ReLU SAE, or both",
    )
    ap.add_argument("--throughput-only", action="store_true", help="skip the memory table")
    ap.add_argument(
        "--model",
        choices=("bench", "issue"),
        default="bench",
        help="throughput model: ours (12 x d256, vocab 16k, ~3k tokens, batch 16) or the issue's "
        "(6 x d512, vocab 50,257, 64 x 128 tokens, batch 8)",
    )
    ap.add_argument(
        "--uncertainty-tokens",
        type=int,
        default=0,
        help="only measure the paired uncertainty's share of a default diff_latents run at this "
        "many tokens (the issue's 100k), on the SAEs of --sae",
    )
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.memory_child is not None:
        memory_child(
            args.memory_child,
            None if args.no_uncertainty else "all",
            limit_heap=args.limit_heap,
            model=args.memory_model,
        )
        return

    if args.model == "issue":
        c = ISSUE_CONFIG
        print(
            f"model (the issue's): HookedTransformer {c['n_layers']} layers, d_model "
            f"{c['d_model']}, d_mlp {c['d_mlp']}, d_vocab {c['d_vocab']}; site "
            f"resid_post({c['site_layer']}); SAE d_sae {D_SAE}; batch {ISSUE_BATCH}; "
            f"torch threads {torch.get_num_threads()}"
        )
    else:
        print(
            f"model: HookedTransformer {N_LAYERS} layers, d_model {D_MODEL}, d_mlp {D_MLP}, "
            f"d_vocab {args.vocab}; site resid_post({SITE_LAYER}); "
            f"SAE d_sae {D_SAE} (TopK k {K}); batch {BATCH}; threads {torch.get_num_threads()}"
        )
    from modeldiff._native import native_status

    print(f"compiled kernels (dense statistics, sign flips, bootstrap tails): {native_status()}")
    kinds = ("topk", "relu") if args.sae == "both" else (args.sae,)
    if args.uncertainty_tokens:
        for kind in kinds:
            r = uncertainty_share(args.uncertainty_tokens, args.vocab, kind, args.repeats)
            print(
                f"\n[uncertainty's share, {kind} SAE, {r['tokens']} tokens x 2 models, "
                f"{r['prompts']} prompts] defaults {r['full']:.1f} cpu-s, uncertainty=None "
                f"{r['stream']:.1f} cpu-s (medians of {args.repeats}, interleaved): the "
                f"uncertainty costs {r['share']:.1%} of the default run; its paired step alone "
                f"(LatentDiff.from_stats with and without it) {r['paired_step']:.1f} cpu-s, "
                f"{r['paired_share']:.1%} (target <= 10%)"
            )
        return
    for kind in () if args.memory_only else kinds:
        r = throughput(args.tokens, args.repeats, args.vocab, kind, args.model)
        s = r["seconds"]
        print(
            f"\n[throughput, {kind} SAE, default settings of diff_latents except positions='all'; "
            f"{r['active']:.0%} of latents fire per token] {r['tokens']} tokens x 2 models, "
            f"{r['prompts']} prompts, batch {r['batch']} (best of {args.repeats})"
        )
        c = r["cpu_seconds"]
        for k in ("floor", "floor_own_encode", "ours_stream", "ours_full", "naive"):
            print(
                f"  {k:12s} wall {s[k]:7.2f} s ({2 * r['tokens'] / s[k]:7.0f} tok/s)   "
                f"cpu {c[k]:7.2f} s ({2 * r['tokens'] / c[k]:7.0f} tok/cpu-s)"
            )
        for label, num, den, target in (
            ("ours (stats only) / floor", "floor", "ours_stream", ""),
            ("ours (defaults) / floor", "floor", "ours_full", "  (target >= 0.90)"),
            ("ours (defaults) / floor_own_encode", "floor_own_encode", "ours_full", ""),
            ("ours (stats only) vs naive", "naive", "ours_stream", ""),
            ("ours (defaults) vs naive", "naive", "ours_full", "  (target >= 2)"),
        ):
            med = r["paired_cpu"][(num, den)]
            print(
                f"  {label:36s} cpu {c[num] / c[den]:.3f}x   wall {s[num] / s[den]:.3f}x   "
                f"median of per-repeat cpu ratios {med:.3f}x{target}"
            )
        print(f"  max |mean ours - mean naive| = {r['max_abs_err_vs_naive']:.2e}")
    if args.throughput_only:
        return

    # glibc raises its mmap threshold after large frees; large tensors then come from a heap whose
    # free space fragments, so the peak RSS of one run depends on the allocator's history (several
    # percent from run to run). Hence medians of fresh processes; limit_heap_growth() (opt-in)
    # fixes the threshold so large blocks are returned when freed.
    memory_table(args)


if __name__ == "__main__":
    main()
