"""Streaming statistics and paired tests, checked against naive computations."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from modeldiff import stats as stats_mod
from modeldiff.stats import (
    LatentStats,
    SiteStats,
    VectorStats,
    benjamini_hochberg,
    paired_uncertainty,
)


def _random_batch(n_tok: int, d: int, n_prompts: int, *, density: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    acts = torch.rand(n_tok, d, generator=g) * (torch.rand(n_tok, d, generator=g) < density)
    prompt = torch.sort(torch.randint(0, n_prompts, (n_tok,), generator=g)).values
    # positions unique within a prompt, increasing
    pos = torch.zeros(n_tok, dtype=torch.long)
    for p in prompt.unique():
        m = prompt == p
        pos[m] = torch.arange(int(m.sum())) + 1
    return acts, prompt, pos


def _naive(acts, prompt, pos, n_prompts):
    a = acts.double()
    d = a.shape[1]
    mx, loc_p, loc_pos = [], [], []
    for j in range(d):
        col = a[:, j]
        m = float(col.max())
        if m <= 0:
            mx.append(0.0)
            loc_p.append(-1)
            loc_pos.append(-1)
            continue
        hits = [(int(prompt[i]), int(pos[i])) for i in range(len(col)) if col[i] == m]
        p, q = min(hits)
        mx.append(m)
        loc_p.append(p)
        loc_pos.append(q)
    per = torch.zeros(n_prompts, d, dtype=torch.float64).index_add_(0, prompt, a)
    return {
        "count": a.shape[0],
        "sum": a.sum(0),
        "sumsq": (a * a).sum(0),
        "fire": (a > 0).sum(0),
        "max": torch.tensor(mx, dtype=torch.float64),
        "max_prompt": torch.tensor(loc_p),
        "max_position": torch.tensor(loc_pos),
        "per_prompt": per,
        "prompt_count": torch.bincount(prompt, minlength=n_prompts),
    }


def _assert_matches(s: LatentStats, ref: dict, n_prompts: int) -> None:
    assert s.count == ref["count"]
    torch.testing.assert_close(s.sum, ref["sum"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s.sumsq, ref["sumsq"], rtol=1e-12, atol=1e-12)
    assert torch.equal(s.fire, ref["fire"])
    assert torch.equal(s.max, ref["max"])
    assert torch.equal(s.max_prompt, ref["max_prompt"])
    assert torch.equal(s.max_position, ref["max_position"])
    torch.testing.assert_close(
        s.prompt_sums(n_prompts=n_prompts), ref["per_prompt"], rtol=1e-12, atol=1e-12
    )
    assert torch.equal(s.prompt_count[:n_prompts], ref["prompt_count"][: s.n_prompts])


@pytest.mark.parametrize("density", [0.01, 0.04, 0.6])  # sparse (2 ways) and dense paths
def test_latent_stats_match_naive(density):
    acts, prompt, pos = _random_batch(300, 40, 7, density=density, seed=1)
    s = LatentStats(40)
    for i in range(0, 300, 64):
        s.update(acts[i : i + 64], prompt_index=prompt[i : i + 64], position=pos[i : i + 64])
    _assert_matches(s, _naive(acts, prompt, pos, 7), 7)
    # subset of latents from prompt_sums
    idx = torch.tensor([3, 0, 39])
    torch.testing.assert_close(
        s.prompt_sums(idx, n_prompts=7), _naive(acts, prompt, pos, 7)["per_prompt"][:, idx]
    )


def test_dense_and_sparse_paths_agree(monkeypatch):
    acts, prompt, pos = _random_batch(200, 30, 5, density=0.03, seed=2)
    acts[5, 7] = acts[100, 7] = 9.0  # a tie: the earlier (prompt, position) must win in both paths
    sparse = LatentStats(30)
    sparse.update(acts, prompt_index=prompt, position=pos)
    monkeypatch.setattr(stats_mod, "_SPARSE_FRACTION", -1.0)  # force the dense path
    dense = LatentStats(30)
    dense.update(acts, prompt_index=prompt, position=pos)
    for k, v in sparse.state_dict().items():
        torch.testing.assert_close(v, dense.state_dict()[k], rtol=1e-13, atol=1e-13, msg=k)
    assert sparse.max_location(7) == (int(prompt[5]), int(pos[5]))


def test_unsorted_rows_still_pick_earliest_max():
    s = LatentStats(1)
    acts = torch.tensor([[2.0], [2.0], [1.0]])
    s.update(acts, prompt_index=torch.tensor([3, 1, 0]), position=torch.tensor([0, 5, 0]))
    assert s.max_location(0) == (1, 5)


def test_never_fired_latent_has_no_location():
    s = LatentStats(2)
    s.update(torch.tensor([[0.0, 1.0]]), prompt_index=torch.tensor([0]), position=torch.tensor([0]))
    assert s.max_location(0) == (-1, -1) and s.max_location(1) == (0, 0)
    assert s.max[0] == 0 and s.fire[0] == 0


@settings(max_examples=25, deadline=None)
@given(
    n_shards=st.integers(1, 4),
    batch=st.integers(1, 50),
    density=st.sampled_from([0.02, 0.5]),
    seed=st.integers(0, 1000),
)
def test_merge_of_shards_equals_one_run(n_shards, batch, density, seed):
    acts, prompt, pos = _random_batch(120, 16, 6, density=density, seed=seed)
    one = LatentStats(16)
    one.update(acts, prompt_index=prompt, position=pos)
    # shards: interleaved rows (so one prompt's tokens may sit in several shards), small batches
    shards = []
    for k in range(n_shards):
        sh = LatentStats(16)
        rows = torch.arange(k, 120, n_shards)
        for i in range(0, len(rows), batch):
            r = rows[i : i + batch]
            sh.update(acts[r], prompt_index=prompt[r], position=pos[r])
        shards.append(sh)
    merged = shards[0]
    for sh in shards[1:]:
        merged.merge(sh)
    a, b = one.state_dict(), merged.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12, msg=k)


def test_state_dict_round_trip_through_safetensors(tmp_path):
    acts, prompt, pos = _random_batch(80, 12, 4, density=0.3, seed=3)
    s = SiteStats(12, 5)
    s.update(acts, torch.randn(80, 5), prompt_index=prompt, position=pos)
    save_file(s.state_dict(), tmp_path / "s.safetensors")
    back = SiteStats.from_state_dict(load_file(tmp_path / "s.safetensors"))
    for k, v in s.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    # and it keeps accumulating identically
    s.update(acts[:10], torch.ones(10, 5), prompt_index=prompt[:10], position=pos[:10] + 100)
    back.update(acts[:10], torch.ones(10, 5), prompt_index=prompt[:10], position=pos[:10] + 100)
    for k, v in s.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_bad_shapes_are_named():
    s = LatentStats(4)
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        s.update(torch.zeros(3, 5), prompt_index=torch.zeros(3), position=torch.zeros(3))
    with pytest.raises(ValueError, match="one entry per row"):
        s.update(torch.zeros(3, 4), prompt_index=torch.zeros(2), position=torch.zeros(3))
    with pytest.raises(ValueError, match="same d_sae"):
        s.merge(LatentStats(5))
    with pytest.raises(ValueError, match="track_prompts=True"):
        LatentStats(4, track_prompts=False).prompt_sums()


def test_vector_stats_mean_and_norm():
    x = torch.randn(50, 6, dtype=torch.float64)
    v, w = VectorStats(6), VectorStats(6)
    v.update(x[:20])
    w.update(x[20:])
    v.merge(w)
    torch.testing.assert_close(v.mean, x.mean(0))
    assert v.mean_norm == pytest.approx(float(x.norm(dim=1).mean()), rel=1e-12)


# -- paired maths -----------------------------------------------------------------------------


def test_no_difference_gives_p_one_and_zero_ci():
    r = paired_uncertainty(torch.zeros(9, 3), torch.full((9,), 4), n_bootstrap=100)
    assert torch.equal(r.p_value, torch.ones(3, dtype=torch.float64))
    assert torch.equal(r.ci_low, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(r.ci_high, torch.zeros(3, dtype=torch.float64))


def test_exact_sign_flip_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(8, 4, generator=g, dtype=torch.float64) + torch.tensor([0.0, 0.3, 1.0, -2.0])
    n = torch.randint(1, 5, (8,), generator=g)
    r = paired_uncertainty(d, n, n_bootstrap=50)
    assert "exact" in r.method
    obs = d.sum(0).abs()
    hits = torch.zeros(4)
    for signs in itertools.product([1.0, -1.0], repeat=8):
        t = (torch.tensor(signs, dtype=torch.float64) @ d).abs()
        hits += (t >= obs * (1 - 1e-9)).double()
    torch.testing.assert_close(r.p_value, hits.double() / 256)


def test_monte_carlo_sign_flip_is_calibrated_under_null():
    g = torch.Generator().manual_seed(1)
    d = torch.randn(30, 400, generator=g, dtype=torch.float64)  # symmetric around 0: null is true
    r = paired_uncertainty(d, torch.ones(30), n_permutations=999, n_bootstrap=10)
    assert "999" in r.method
    frac = float((r.p_value < 0.05).double().mean())
    assert 0.02 < frac < 0.09  # about 5% false positives
    assert float(r.p_value.min()) >= 1 / 1000


def test_bootstrap_ci_brackets_the_estimate_and_shrinks():
    g = torch.Generator().manual_seed(2)
    small = torch.randn(10, 1, generator=g, dtype=torch.float64) + 1
    big = torch.randn(200, 1, generator=g, dtype=torch.float64) + 1
    rs = paired_uncertainty(small, torch.ones(10), n_bootstrap=2000)
    rb = paired_uncertainty(big, torch.ones(200), n_bootstrap=2000, n_permutations=500)
    for r, d in ((rs, small), (rb, big)):
        assert r.ci_low[0] < d.mean() < r.ci_high[0]
    assert (rb.ci_high - rb.ci_low)[0] < (rs.ci_high - rs.ci_low)[0] / 2


def test_paired_t_matches_scipy():
    from scipy import stats as sst

    g = torch.Generator().manual_seed(3)
    base = torch.rand(12, 5, generator=g, dtype=torch.float64)
    ft = base + torch.randn(12, 5, generator=g, dtype=torch.float64) * 0.3 + 0.1
    n = torch.full((12,), 3)
    r = paired_uncertainty((ft - base) * 3, n, test="t", n_bootstrap=10)
    want = sst.ttest_rel(ft.numpy(), base.numpy(), axis=0).pvalue
    torch.testing.assert_close(r.p_value, torch.as_tensor(want), rtol=1e-9, atol=1e-12)


def test_benjamini_hochberg_matches_statsmodels():
    from statsmodels.stats.multitest import multipletests

    g = torch.Generator().manual_seed(4)
    p = torch.rand(200, generator=g, dtype=torch.float64) ** 3
    want = multipletests(p.numpy(), method="fdr_bh")[1]
    torch.testing.assert_close(benjamini_hochberg(p), torch.as_tensor(want), rtol=1e-12, atol=0)


def test_paired_uncertainty_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per prompt"):
        paired_uncertainty(torch.zeros(3, 2), torch.ones(4))
    with pytest.raises(ValueError, match="unknown test"):
        paired_uncertainty(torch.zeros(3, 2), torch.ones(3), test="z")
    with pytest.raises(ValueError, match="no prompt contributed"):
        paired_uncertainty(torch.zeros(3, 2), torch.zeros(3))


def test_prompt_counts_grow_in_place_without_exposing_spare_capacity():
    """Prompt counts live in a geometrically grown buffer; n_prompts, prompt_count and the saved
    state must still end exactly at the largest prompt index seen."""
    s = LatentStats(4)
    total = torch.zeros(0, dtype=torch.int64)
    for i, n_rows in enumerate([1, 2, 1, 5, 1, 3]):
        prompt = torch.full((n_rows,), 2 * i + 1)
        s.update(torch.ones(n_rows, 4), prompt_index=prompt, position=torch.arange(n_rows))
        total = torch.cat([total, torch.zeros(2 * i + 2 - len(total), dtype=torch.int64)])
        total[2 * i + 1] += n_rows
        assert s.n_prompts == 2 * i + 2
        assert torch.equal(s.prompt_count, total)
        assert torch.equal(s.state_dict()["prompt_count"], total)
    assert s.copy().n_prompts == s.n_prompts
    max_before = s.max
    s.update(torch.full((1, 4), 9.0), prompt_index=torch.tensor([0]), position=torch.tensor([7]))
    assert s.max is max_before and bool((s.max == 9.0).all())  # folded in place


def test_every_statistic_is_a_stat_that_rebuilds_from_its_state_dict():
    from modeldiff.stats import Stat, stat_from_state_dict

    acts, x = torch.rand(6, 5), torch.randn(6, 3)
    pi, pos = torch.tensor([0, 0, 1, 1, 2, 2]), torch.arange(6)
    site = SiteStats(5, 3)
    site.update(acts, x, prompt_index=pi, position=pos)
    for stat in (site, site.latents, site.resid):
        assert isinstance(stat, Stat)
        again = stat_from_state_dict(stat.state_dict())
        assert type(again) is type(stat)
        for k, v in stat.state_dict().items():
            assert torch.equal(again.state_dict()[k], v), k
    old = {k: v for k, v in site.state_dict().items() if k != "stat.kind"}
    with pytest.raises(ValueError, match=r"no 'stat.kind' entry.*SiteStats.from_state_dict"):
        stat_from_state_dict(old)
    assert SiteStats.from_state_dict(old).latents.count == 6  # files from before the tags load


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 80),
    st.integers(1, 4),
    st.floats(0.0, 0.5),
    st.booleans(),
)
def test_tail_quantiles_equal_torch_quantile(n, k, alpha, ties):
    """The bootstrap interval reads the two tails with topk instead of sorting every column; it
    must equal torch.quantile's linear interpolation, ties and tiny draw counts included."""
    from modeldiff.uncertainty import _tail_quantiles

    x = torch.randn(n, k, generator=torch.Generator().manual_seed(n * 31 + k), dtype=torch.float64)
    if ties:
        x = x.round()
    lo, hi = _tail_quantiles(x.T.contiguous(), alpha)  # one row of draws per column
    ref = torch.quantile(x, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=0)
    torch.testing.assert_close(lo, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(hi, ref[1], rtol=0, atol=1e-12)


def test_dense_path_keeps_the_earliest_max_under_ties(monkeypatch):
    """The dense path finds each column's first maximal row without max(0)'s indices."""
    monkeypatch.setattr(stats_mod, "_SPARSE_FRACTION", -1.0)  # force the dense path
    acts = torch.tensor([[0.0, 2.0, 1.0], [3.0, 2.0, 0.0], [3.0, 1.0, 0.0]])
    st_ = LatentStats(3)
    st_.update(acts, prompt_index=torch.tensor([0, 1, 2]), position=torch.tensor([5, 6, 7]))
    assert [st_.max_location(j) for j in range(3)] == [(1, 6), (0, 5), (0, 5)]
    assert st_.fire.tolist() == [2, 3, 1]
    torch.testing.assert_close(st_.sumsq, torch.tensor([18.0, 9.0, 1.0], dtype=torch.float64))


def test_monte_carlo_columns_stop_only_when_their_p_is_large(monkeypatch):
    """Sequential Monte Carlo: a column stops after 100 hits; the ones with few hits (small p, the
    ones that matter) keep every draw and equal a run without stopping, bit for bit."""
    from modeldiff import uncertainty as unc

    g = torch.Generator().manual_seed(3)
    n_p = 40  # 2^40 flips: Monte Carlo
    null = torch.randn(n_p, 6, generator=g, dtype=torch.float64)
    strong = torch.randn(n_p, 3, generator=g, dtype=torch.float64) * 0.3 + 1.0
    d = torch.cat([null, strong], 1)
    counts = torch.ones(n_p, dtype=torch.long)
    seq = unc.paired_uncertainty(d, counts, n_bootstrap=10, n_permutations=5000)
    monkeypatch.setattr(unc, "_STOP_HITS", 10**9)
    full = unc.paired_uncertainty(d, counts, n_bootstrap=10, n_permutations=5000)
    assert torch.equal(seq.p_value[6:], full.p_value[6:])  # the strong columns: identical
    assert float(full.p_value[6:].max()) < 0.01
    stopped = seq.p_value[:6] != full.p_value[:6]
    assert bool(stopped.any())  # some null columns stopped early...
    assert float(seq.p_value[:6][stopped].min()) > 0.01  # ...and only with a large p
    # their estimate stays close to the full run's (100 hits: ~10% relative error)
    torch.testing.assert_close(seq.p_value[:6], full.p_value[:6], rtol=0.35, atol=0.0)


def test_tail_quantiles_on_threads_and_off_cpu_paths_equal_torch_quantile():
    """Many rows are sorted by numpy on several threads; a non-contiguous input takes torch.sort.
    Both must equal torch.quantile (ties included)."""
    from modeldiff.uncertainty import _tail_quantiles

    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 700, generator=g, dtype=torch.float64)  # draws x columns
    x[:, ::3] = x[:, ::3].round()
    ref = torch.quantile(x, torch.tensor([0.025, 0.975], dtype=torch.float64), dim=0)
    for rows in (x.T.contiguous(), x.T):  # threaded numpy path, then the torch.sort fallback
        lo, hi = _tail_quantiles(rows.clone() if rows.is_contiguous() else rows, 0.025)
        torch.testing.assert_close(lo, ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(hi, ref[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("shuffled", [False, True])
def test_sparse_coo_input_gives_the_dense_statistics(shuffled):
    """A TopK SAE's latents come as a sparse COO tensor (explicit zeros possible, rows possibly out
    of location order); every statistic must equal the one from the same activations given dense."""
    g = torch.Generator().manual_seed(7)
    n, d = 90, 24
    dense, _, _ = _random_batch(n, d, 9, density=0.1, seed=7)
    dense[10, 3] = dense[50, 3] = 9.0  # a tie for one maximum: the earlier location must win
    prompt, pos = torch.arange(n) // 10, torch.arange(n) % 10
    rows, cols = dense.nonzero(as_tuple=True)
    zeros = (torch.arange(0, n, 7), torch.zeros(len(range(0, n, 7)), dtype=torch.long))
    zeros = (zeros[0][dense[zeros] == 0], zeros[1][dense[zeros] == 0])  # explicit zero entries
    idx = torch.stack([torch.cat([rows, zeros[0]]), torch.cat([cols, zeros[1]])])
    val = torch.cat([dense[rows, cols], torch.zeros(len(zeros[0]))])
    if shuffled:  # rows not in location order: the sparse path renumbers instead of moving rows
        perm = torch.randperm(n, generator=g)
        dense, prompt, pos = dense[perm], prompt[perm], pos[perm]
        new_row = torch.empty_like(perm)
        new_row[perm] = torch.arange(n)
        idx = torch.stack([new_row[idx[0]], idx[1]])
    coo = torch.sparse_coo_tensor(idx, val, (n, d), check_invariants=True)
    a, b = LatentStats(d), LatentStats(d)
    a.update(dense, prompt_index=prompt, position=pos)
    b.update(coo, prompt_index=prompt, position=pos)
    _assert_matches(b, _naive(dense, prompt, pos, 9), 9)
    assert b.max_location(3) == (1, 0)
    for key, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[key], v, rtol=1e-12, atol=0, msg=key)


def spy_rechecks(monkeypatch) -> list[int]:
    """The number of columns of each float64 sign-flip count (_hits), as the run goes."""
    from modeldiff import uncertainty as unc

    rechecked: list[int] = []
    real = unc._hits

    def spy(rows, dd, t, group):
        rechecked.append(dd.shape[1])
        return real(rows, dd, t, group)

    monkeypatch.setattr(unc, "_hits", spy)
    return rechecked


def test_float32_sign_flips_give_the_float64_counts(monkeypatch):
    """Sign flips run in float32 (after the first block on the PyTorch path, in every block with
    the compiled kernel) and recheck in float64 any column with a draw near the threshold; every
    p-value must equal the all-float64 run's, ties included (a latent that fired in one prompt
    ties on every draw; one that fired equally in eight prompts ties exactly whenever those eight
    signs agree, p ~ 2^-7, so it stays live and is rechecked). tests/test_uncertainty_kernels.py
    compares the kernel with both PyTorch paths."""
    from modeldiff import uncertainty as unc

    g = torch.Generator().manual_seed(11)
    n_p = 40
    strong = torch.randn(n_p, 30, generator=g, dtype=torch.float64) * 0.3 + 1.0
    weak = torch.randn(n_p, 30, generator=g, dtype=torch.float64) * 1.0 + 0.45
    single = torch.zeros(n_p, 5, dtype=torch.float64)
    single[3] = torch.arange(1, 6, dtype=torch.float64)  # fired in one prompt: every draw ties
    eight = torch.zeros(n_p, 2, dtype=torch.float64)
    eight[:8, 0], eight[8:16, 1] = 1.0, 0.1  # 0.1 is not exact in float32 or float64
    d = torch.cat([strong, weak, single, eight], 1)
    counts = torch.randint(1, 6, (n_p,), generator=g)
    rechecked = spy_rechecks(monkeypatch)
    fast = unc.paired_uncertainty(d, counts, n_bootstrap=10, n_permutations=6000)
    # float64 rechecks after the first block did happen (the PyTorch path also counts the first
    # block's slices with _hits)
    first_block = 0 if unc.kernel("sign_hits") else len(range(0, 1024, unc._FIRST_SLICE))
    assert len(rechecked) > first_block
    monkeypatch.setattr(unc, "_FLOAT32_FLIPS", False)
    slow = unc.paired_uncertainty(d, counts, n_bootstrap=10, n_permutations=6000)
    assert torch.equal(fast.p_value, slow.p_value)
    assert float(slow.p_value[:30].max()) < 0.01 and bool((slow.p_value[60:65] == 1.0).all())
    torch.testing.assert_close(
        slow.p_value[65:], torch.full((2,), 2.0**-7).double(), rtol=0.3, atol=0
    )


def _paired_data(n_p: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n_p, k, generator=g, dtype=torch.float64)
    d += torch.linspace(-0.25, 0.5, k, dtype=torch.float64)  # null to strongly shifted columns
    d[:, 0] = 0.0  # never fired
    d[:, 1] = 0.0
    d[5, 1] = 2.0  # fired in one prompt: every draw ties
    counts = torch.randint(1, 40, (n_p,), generator=g)
    counts[3] = 0  # a prompt without tokens
    return d, counts


@pytest.mark.parametrize("n_p", [9, 40, 700])  # exact; Monte Carlo; pieces shorter than a block
def test_paired_analysis_gives_each_column_the_same_result_in_any_chunk(n_p):
    """One PairedAnalysis draws once and is applied chunk by chunk (as diff_latents does): every
    column's p-value equals paired_uncertainty's on the whole matrix, bit for bit, and its CI to
    the last bits (the bootstrap's matrix product may block differently)."""
    from modeldiff.uncertainty import PairedAnalysis

    d, counts = _paired_data(n_p, 23)
    whole = paired_uncertainty(d, counts, n_bootstrap=300, n_permutations=3000)
    run = PairedAnalysis(counts, n_bootstrap=300, n_permutations=3000)
    parts = [run(d[:, j : j + 5]) for j in range(0, 23, 5)]
    assert torch.equal(torch.cat([r.p_value for r in parts]), whole.p_value)
    for name in ("ci_low", "ci_high"):
        got = torch.cat([getattr(r, name) for r in parts])
        torch.testing.assert_close(got, getattr(whole, name), rtol=1e-12, atol=1e-15)
    assert {r.method for r in parts} == {whole.method} and parts[0].p_floor == whole.p_floor
    assert float(whole.p_value[-1]) < 0.01 and float(whole.p_value[1]) == 1.0  # the data spans
    with pytest.raises(ValueError, match="one entry per prompt"):
        run(d[:-1])


def test_paired_draws_do_not_depend_on_the_working_pieces_or_on_holding_them(monkeypatch):
    """The draws come in seeded blocks, used in pieces of a fixed working size and held as packed
    bits when small: pieces that do not divide the stop-check slice, no holding at all, and one
    piece per block must all give the same p-values (the same draws, the same stop points) and
    the same intervals."""
    from modeldiff import uncertainty as unc

    d, counts = _paired_data(300, 12, seed=4)
    kw = {"n_bootstrap": 400, "n_permutations": 5000}
    ref = unc.paired_uncertainty(d, counts, **kw)  # 300 prompts: a block of 1024 rows, one piece
    assert unc.PairedAnalysis(counts, **kw)._signs is not None  # held as bits by default
    runs = []
    for work, hold in ((37 * 299, 16 * 2**20), (299 * 299, 0), (37 * 299, 0)):
        monkeypatch.setattr(unc, "_WORK_ELEMENTS", work)  # pieces of 37 or 299 rows
        monkeypatch.setattr(unc, "_HOLD_BYTES", hold)  # 0: drawn again on every call
        a = unc.PairedAnalysis(counts, **kw)
        assert a.piece == work // 299 and (a._signs is None) == (hold == 0)
        runs.append(a(d))
    for r in runs:
        assert torch.equal(r.p_value, ref.p_value)
        torch.testing.assert_close(r.ci_low, ref.ci_low, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(r.ci_high, ref.ci_high, rtol=1e-12, atol=1e-15)
    stopped = (ref.p_value > 0.02) & (ref.p_value < 1)
    assert bool(stopped.any())  # some columns stopped early: the stop points were exercised


@pytest.mark.parametrize("test", ["permutation", "t"])
def test_a_diff_where_no_latent_fired_tests_nothing(test):
    """No latent fired in either model: nothing is drawn or refused (a single prompt would be
    refused by the t-test); every latent gets CI [0, 0] and p = 1."""
    from modeldiff.diff import LatentDiff
    from modeldiff.sites import Site
    from modeldiff.stats import SiteStats

    stats = []
    for _ in range(2):
        s = SiteStats(5, 3)
        s.update(
            torch.zeros(4, 5),
            torch.randn(4, 3),
            prompt_index=torch.zeros(4, dtype=torch.long),  # one prompt
            position=torch.arange(4),
        )
        stats.append(s)
    d = LatentDiff.from_stats(*stats, site=Site.resid_post(0), test=test)
    assert d.meta["test"] == "none tested (no latent fired)"
    assert d.column("p_value").tolist() == [1.0] * 5
    assert d.column("ci_low").tolist() == [0.0] * 5 == d.column("ci_high").tolist()
