"""The compiled kernels: the dense statistics equal the PyTorch path and a naive computation (the
sign-flip counts are tested in tests/test_stats.py); their build (cached, atomic, safe to fail) and
their switches."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_stats import _assert_matches, _naive

from modeldiff import _native
from modeldiff import stats as stats_mod
from modeldiff.stats import LatentStats

needs_cc = pytest.mark.skipif(
    _native._compiler() is None, reason="no C compiler on this machine: the kernel cannot be built"
)


@pytest.fixture
def fresh_library():
    """A clean slate for the kernels' per-process cache, restored afterwards."""
    _native.kernels.cache_clear()
    yield _native.kernels
    _native.kernels.cache_clear()


def _both_paths(acts, prompt, pos, monkeypatch, d):
    native = LatentStats(d)
    native.update(acts, prompt_index=prompt, position=pos)
    with monkeypatch.context() as m:
        m.setattr(stats_mod, "kernel", lambda name: None)
        plain = LatentStats(d)
        plain.update(acts, prompt_index=prompt, position=pos)
    return native, plain


def _assert_same(native: LatentStats, plain: LatentStats) -> None:
    a, b = native.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-13, msg=k, equal_nan=True)
        else:
            assert torch.equal(a[k], b[k]), k


@needs_cc
def test_kernel_is_built_and_used_here():
    assert _native.native_status() == {"enabled": True, "reason": ""}
    calls = []
    real = stats_mod.LatentStats._native_parts

    def spy(self, *args):
        calls.append(1)
        return real(self, *args)

    acts = torch.relu(torch.randn(64, 32))
    s = LatentStats(32)
    stats_mod.LatentStats._native_parts = spy
    try:
        s.update(acts, prompt_index=torch.zeros(64, dtype=torch.long), position=torch.arange(64))
    finally:
        stats_mod.LatentStats._native_parts = real
    assert calls == [1]


@needs_cc
@pytest.mark.parametrize("signed", [False, True])
def test_kernel_matches_naive_and_torch_with_ties_across_row_groups(monkeypatch, signed):
    # prompts of 1, 2, 3, 5, 7 and 9 tokens: segments that are not multiples of the kernel's
    # four-row groups, so remainder rows and group boundaries both hold maxima
    lengths = [1, 2, 3, 5, 7, 9]
    prompt = torch.cat([torch.full((n,), p) for p, n in enumerate(lengths)])
    pos = torch.cat([torch.arange(n) * 3 + 1 for n in lengths])
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(len(prompt), 24, generator=g)
    acts = acts if signed else torch.relu(acts)
    for col, rows in {0: (1, 2), 1: (0, 3), 2: (4, 11), 3: (5, 6, 7), 4: (26, 25)}.items():
        acts[list(rows), col] = 50.0  # ties: within a group, across groups, across prompts
    acts[:, 5] = 0.0  # never fires
    acts[:, 6] = -1.0  # negative everywhere: no maximum, no location
    acts[3, 7] = float("inf")
    native, plain = _both_paths(acts, prompt, pos, monkeypatch, 24)
    _assert_same(native, plain)
    _assert_matches(native, _naive(acts, prompt, pos, len(lengths)), len(lengths))
    assert native.max_location(2) == (2, 4)  # row 4 = prompt 2's second token, position 4


@needs_cc
def test_nan_batch_takes_the_torch_path(monkeypatch):
    acts = torch.relu(torch.randn(12, 8))
    acts[2, 3] = float("nan")
    acts[5, 3] = 7.0
    prompt, pos = torch.zeros(12, dtype=torch.long), torch.arange(12)
    native, plain = _both_paths(acts, prompt, pos, monkeypatch, 8)
    _assert_same(native, plain)
    assert torch.isnan(native.sum[3])


@needs_cc
@settings(max_examples=30, deadline=None)
@given(
    n_tok=st.integers(1, 40),
    d=st.integers(1, 20),
    n_prompts=st.integers(1, 6),
    levels=st.integers(2, 5),
    seed=st.integers(0, 10_000),
)
def test_kernel_equals_torch_path_on_random_batches(n_tok, d, n_prompts, levels, seed):
    # few distinct values, so ties are everywhere
    g = torch.Generator().manual_seed(seed)
    acts = torch.randint(-1, levels, (n_tok, d), generator=g).float()
    prompt = torch.sort(torch.randint(0, n_prompts, (n_tok,), generator=g)).values
    pos = torch.randperm(n_tok, generator=g)  # rows out of location order: update() sorts them
    with pytest.MonkeyPatch.context() as mp:
        native, plain = _both_paths(acts, prompt, pos, mp, d)
    _assert_same(native, plain)


@needs_cc
def test_build_is_cached_and_leaves_no_temporaries(tmp_path, monkeypatch, fresh_library):
    monkeypatch.setenv("MODELDIFF_CACHE", str(tmp_path))
    assert fresh_library() is not None
    built = sorted(p.name for p in (tmp_path / "native").iterdir())
    assert len(built) == 1 and built[0].startswith("kernels-") and not built[0].startswith(".")
    stamp = (tmp_path / "native" / built[0]).stat().st_mtime_ns
    fresh_library.cache_clear()
    assert fresh_library() is not None  # loaded from the cache, not rebuilt
    assert (tmp_path / "native" / built[0]).stat().st_mtime_ns == stamp


def test_failing_compiler_falls_back_cleanly(tmp_path, monkeypatch, fresh_library):
    false = shutil.which("false")
    if false is None:  # pragma: no cover - coreutils everywhere we test
        pytest.skip("no `false` executable to stand in for a broken compiler")
    monkeypatch.setenv("MODELDIFF_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", false)
    assert fresh_library() is None
    status = _native.native_status()
    assert status["enabled"] is False and status["reason"].startswith("build failed")
    assert list((tmp_path / "native").iterdir()) == []  # nothing half-written
    s = LatentStats(4)  # and the statistics still work, on the PyTorch path
    s.update(
        torch.ones(3, 4), prompt_index=torch.zeros(3, dtype=torch.long), position=torch.arange(3)
    )
    assert s.fire.tolist() == [3, 3, 3, 3]


def test_switches_off_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv("MODELDIFF_NATIVE", "0")
    assert fresh_library() is None
    assert "MODELDIFF_NATIVE=0" in _native.native_status()["reason"]
    monkeypatch.setenv("MODELDIFF_NATIVE", "1")
    monkeypatch.setenv("CC", "no-such-compiler-xyz")
    fresh_library.cache_clear()
    assert fresh_library() is None
    assert "no C compiler" in _native.native_status()["reason"]


@needs_cc
@pytest.mark.parametrize(
    "layout",
    [
        "prompts out of order",  # as capture yields a batch: longest prompt first
        "a prompt in two runs",  # not whole prompts: the rows are sorted first
        "a run out of location order",
    ],
)
def test_kernel_reads_prompts_where_they_lie(monkeypatch, layout):
    """Rows that hold each prompt in one run, in location order, but the prompts in another order
    are read in place (the kernel gets each prompt's row range, in prompt order); any other layout
    is sorted first. Every layout gives the naive statistics, earliest maxima included."""
    g = torch.Generator().manual_seed(6)
    lengths = {3: 5, 0: 2, 2: 7, 1: 4}  # prompt -> tokens, in batch order
    prompt = torch.cat([torch.full((n,), p) for p, n in lengths.items()])
    pos = torch.cat([torch.arange(n) + 2 for n in lengths.values()])
    if layout == "a prompt in two runs":
        prompt = torch.cat([prompt, torch.full((2,), 3)])
        pos = torch.cat([pos, torch.tensor([20, 21])])
    n = len(prompt)
    acts = torch.randint(-1, 3, (n, 40), generator=g).float()  # ties everywhere
    if layout == "a run out of location order":
        pos[:5] = pos[:5].flip(0)
    calls: list[tuple[list[int], list[int]]] = []
    real = stats_mod.LatentStats._native_parts

    def spy(self, fn, a32, key, lo, hi):
        calls.append((lo.tolist(), hi.tolist()))
        return real(self, fn, a32, key, lo, hi)

    monkeypatch.setattr(stats_mod.LatentStats, "_native_parts", spy)
    monkeypatch.setattr(stats_mod, "_SPARSE_FRACTION", -1.0)  # the dense path
    s = LatentStats(40)
    s.update(acts, prompt_index=prompt, position=pos)
    _assert_matches(s, _naive(acts, prompt, pos, 4), 4)
    in_place = calls == [([5, 14, 7, 0], [7, 18, 14, 5])]
    assert in_place == (layout == "prompts out of order")
    assert len(calls) == 1  # one pass of the kernel either way
