"""The compiled kernels of the paired uncertainty (``_csrc/sign_hits.c``, ``_csrc/boot_tails.c``):
the same intervals and p-values as the PyTorch paths, and each kernel against an independent
computation."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.test_stats import spy_rechecks

from modeldiff import _native
from modeldiff import uncertainty as unc
from modeldiff.uncertainty import PairedAnalysis

needs_sign_kernel = pytest.mark.skipif(
    _native.kernel("sign_hits") is None,
    reason=f"the sign-flip kernel is not in use here ({_native.native_status()['reason']})",
)
needs_boot_kernel = pytest.mark.skipif(
    _native.kernel("boot_tails") is None,
    reason=f"the bootstrap kernel is not in use here ({_native.native_status()['reason']})",
)


def _sorted_run(monkeypatch, counts, d, **options):
    """PairedAnalysis with both uncertainty kernels switched off (the PyTorch paths)."""
    with monkeypatch.context() as m:
        m.setattr(unc, "kernel", lambda name: None)
        return PairedAnalysis(counts, **options)(d)


def _reference_interval(d, counts, run, confidence):
    """Every bootstrap replicate from the held multiplicities, then torch.quantile."""
    w = torch.cat([wt for _, wt, _ in run._boot], 1).double()  # [prompts, draws]
    den = torch.cat([den for _, _, den in run._boot])
    reps = (d[counts > 0].T @ w) / den  # [columns, draws]
    alpha = (1 - confidence) / 2
    q = torch.quantile(reps, torch.tensor([alpha, 1 - alpha], dtype=torch.float64), dim=1)
    return q[0], q[1]


@needs_boot_kernel
@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.998])
def test_bootstrap_kernel_interval_equals_torch_quantile(confidence):
    g = torch.Generator().manual_seed(1)
    n_p, k = 40, 300  # columns on two threads, with a remainder
    d = torch.randn(n_p, k, generator=g, dtype=torch.float64) + torch.linspace(-1, 2, k)
    counts = torch.randint(1, 30, (n_p,), generator=g)
    counts[7] = 0  # a prompt without tokens
    run = PairedAnalysis(counts, n_bootstrap=1000, confidence=confidence)
    got = run(d)
    lo, hi = _reference_interval(d, counts, run, confidence)
    torch.testing.assert_close(got.ci_low, lo, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.ci_high, hi, rtol=1e-12, atol=1e-14)


@needs_boot_kernel
@pytest.mark.parametrize("n_bootstrap", [1, 2, 7, 1000])
def test_bootstrap_kernel_is_exact_on_ties_and_lumpy_columns(monkeypatch, n_bootstrap):
    """Integer data (every replicate's sum is exact in any order): the kernel's interval equals
    the sorting path's bit for bit, on columns whose replicates tie everywhere (fired in one prompt,
    constant, never fired) and on lumpy or skewed ones where the normal-approximation threshold
    catches too few replicates and the selection runs over all of them."""
    g = torch.Generator().manual_seed(2)
    n_p = 30
    d = torch.randint(0, 3, (n_p, 70), generator=g).double()
    d[:, 0] = 0.0  # never fired
    d[:, 1] = 0.0
    d[4, 1] = 5.0  # fired in one prompt
    d[:, 2] = 1.0  # constant
    d[:, 3] = 0.0
    d[:3, 3] = 1000.0  # three huge prompts: replicates in a few far-apart lumps
    d[:, 4] = torch.where(torch.arange(n_p) == 9, 1e6, 1.0)  # one outlier prompt: skewed
    counts = torch.randint(1, 9, (n_p,), generator=g)
    got = PairedAnalysis(counts, n_bootstrap=n_bootstrap)(d)
    ref = _sorted_run(monkeypatch, counts, d, n_bootstrap=n_bootstrap)
    assert torch.equal(got.ci_low, ref.ci_low) and torch.equal(got.ci_high, ref.ci_high)
    assert torch.equal(got.p_value, ref.p_value)
    assert float(got.ci_low[0]) == float(got.ci_high[0]) == 0.0


@needs_boot_kernel
def test_bootstrap_kernel_leaves_a_nan_column_to_the_sorting_path(monkeypatch):
    d = torch.randn(12, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    d[0, 5], d[1, 5] = float("inf"), float("-inf")  # inf - inf: NaN replicates
    counts = torch.ones(12, dtype=torch.long)
    got = PairedAnalysis(counts, n_bootstrap=200)(d)
    ref = _sorted_run(monkeypatch, counts, d, n_bootstrap=200)
    torch.testing.assert_close(got.ci_low, ref.ci_low, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.ci_high, ref.ci_high, rtol=0, atol=0, equal_nan=True)
    assert bool(got.ci_low[5].isnan()) or bool(got.ci_high[5].isnan())


@needs_sign_kernel
@pytest.mark.parametrize("n_p", [11, 40])  # exact (2^11 <= 3000 draws) and Monte Carlo
def test_sign_flip_kernel_gives_the_pytorch_p_values(monkeypatch, n_p):
    """Same p-values as the PyTorch float32 and float64 paths, with ties that force float64
    rechecks and columns that stop early, over column counts with a remainder and two threads."""
    g = torch.Generator().manual_seed(4)
    k = 150
    d = torch.randn(n_p, k, generator=g, dtype=torch.float64) + torch.linspace(-0.3, 3.0, k)
    d[:, :3] = 0.0
    d[2, 1] = 1.5  # fired in one prompt: every draw ties
    d[:8, 2] = 0.1  # eight equal prompts: ties whenever their signs agree
    counts = torch.randint(1, 9, (n_p,), generator=g)
    rechecked = spy_rechecks(monkeypatch)
    fast = PairedAnalysis(counts, n_bootstrap=10, n_permutations=3000)(d)
    assert rechecked  # the ties were too close to call in float32, and were recounted
    plain = _sorted_run(monkeypatch, counts, d, n_bootstrap=10, n_permutations=3000)
    monkeypatch.setattr(unc, "_FLOAT32_FLIPS", False)
    slow = PairedAnalysis(counts, n_bootstrap=10, n_permutations=3000)(d)
    assert torch.equal(fast.p_value, plain.p_value) and torch.equal(fast.p_value, slow.p_value)
    assert float(fast.p_value[0]) == 1.0 and float(fast.p_value[-1]) < 0.01


def _kernel_counts(signs: np.ndarray, d: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    fn = _native.kernel("sign_hits")
    k = d.shape[1]
    sure = np.zeros(k, dtype=np.int64)
    maybe = np.zeros(k, dtype=np.int64)
    ptr = ctypes.c_void_p
    fn(
        ptr(signs.ctypes.data), signs.shape[0], d.shape[0], signs.strides[0] // 4,
        ptr(d.ctypes.data), d.strides[0] // 4, 0, k,
        ptr(lo.ctypes.data), ptr(hi.ctypes.data), ptr(sure.ctypes.data), ptr(maybe.ctypes.data),
    )  # fmt: skip
    return sure, maybe


@needs_sign_kernel
@settings(max_examples=40, deadline=None)
@given(
    n_draws=st.integers(1, 40),
    n_p=st.integers(1, 45),
    k=st.integers(1, 100),
    pad=st.integers(0, 3),
    seed=st.integers(0, 10_000),
)
def test_sign_flip_kernel_counts_equal_an_exact_count(n_draws, n_p, k, pad, seed):
    """Small integers sum exactly in float32 in any order, so the kernel's two counts must equal
    an exact count for every shape: draw and column remainders of its blocks, and sign rows with
    a stride (as the held bits are unpacked)."""
    rng = np.random.default_rng(seed)
    wide = rng.choice([-1.0, 1.0], size=(n_draws, n_p + pad)).astype(np.float32)
    signs = wide[:, :n_p]  # rows with a stride of n_p + pad
    d = rng.integers(-3, 4, size=(n_p, k)).astype(np.float32)
    stat = np.abs(signs.astype(np.float64) @ d.astype(np.float64))  # exact
    hi = (rng.integers(0, 3 * n_p + 2, size=k) + 0.5).astype(np.float32)
    lo = (hi - rng.integers(0, 3, size=k)).astype(np.float32)  # at a whole number, sometimes
    sure, maybe = _kernel_counts(signs, d, lo, hi)
    assert np.array_equal(sure, (stat >= hi).sum(0))
    assert np.array_equal(maybe, (stat >= lo).sum(0))


@needs_sign_kernel
@needs_boot_kernel
def test_kernels_run_up_to_their_prompt_count_and_pytorch_beyond(monkeypatch):
    """Past _KERNEL_MAX_PROMPTS prompts the PyTorch paths run (measured faster there); the choice
    never changes a number: p-values bit for bit, intervals to the replicates' rounding."""
    g = torch.Generator().manual_seed(7)
    d = torch.randn(30, 90, generator=g, dtype=torch.float64) + torch.linspace(-0.5, 1.5, 90)
    counts = torch.randint(1, 9, (30,), generator=g)
    used: list[str] = []
    real = unc.kernel

    def spy(name):
        fn = real(name)
        if fn is None:
            return None
        return lambda *args: (used.append(name), fn(*args))[1]

    monkeypatch.setattr(unc, "kernel", spy)
    with_kernels = PairedAnalysis(counts, n_bootstrap=300, n_permutations=2000)(d)
    assert {"sign_hits", "boot_tails"} <= set(used)
    used.clear()
    monkeypatch.setattr(unc, "_KERNEL_MAX_PROMPTS", 29)
    without = PairedAnalysis(counts, n_bootstrap=300, n_permutations=2000)(d)
    assert used == []
    assert torch.equal(with_kernels.p_value, without.p_value)
    torch.testing.assert_close(with_kernels.ci_low, without.ci_low, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(with_kernels.ci_high, without.ci_high, rtol=1e-12, atol=1e-14)
