"""Prompt-level uncertainty for a diff: paired bootstrap intervals, sign-flip and paired-t tests,
Benjamini–Hochberg q-values.

The same prompts go through both models, so prompts are the resampling unit (tokens of one prompt
are not independent), and every statistic is the token-weighted Δ mean the ranking uses.

Example:
    >>> import torch
    >>> benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03], dtype=torch.float64)).tolist()
    [0.03, 0.04, 0.04]
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._native import kernel
from .errors import ArgumentError, MissingDependencyError

__all__ = ["PairedAnalysis", "PairedResult", "benjamini_hochberg", "paired_uncertainty"]


# -- paired uncertainty over prompts -------------------------------------------------------------


def benjamini_hochberg(p: Float[Tensor, " m"]) -> Float[Tensor, " m"]:
    """Benjamini–Hochberg q-values (false discovery rate) for p-values ``p``, in their order.

    Example:
        >>> import torch
        >>> q = benjamini_hochberg(torch.tensor([0.01, 0.04, 0.03, 0.5], dtype=torch.float64))
        >>> [round(x, 4) for x in q.tolist()]
        [0.04, 0.0533, 0.0533, 0.5]
    """
    p = torch.as_tensor(p, dtype=torch.float64)
    m = p.numel()
    if m == 0:
        return p.clone()
    order = torch.argsort(p)
    ranked = p[order] * m / torch.arange(1, m + 1, dtype=torch.float64)
    # q_(i) = min over j >= i of p_(j) m / j
    ranked = torch.flip(torch.cummin(torch.flip(ranked, [0]), 0).values, [0]).clamp(max=1.0)
    q = torch.empty_like(p)
    q[order] = ranked
    return q


@dataclass(frozen=True)
class PairedResult:
    """Prompt-level uncertainty for a set of latents (see :func:`paired_uncertainty`).

    One entry per latent in each tensor.

    Example:
        >>> import torch
        >>> d = torch.tensor([[1.0, 0.1], [2.0, -0.2], [1.5, 0.05], [1.2, 0.0], [0.9, -0.1], [1.1, 0.2]])
        >>> r = paired_uncertainty(d, torch.tensor([2, 2, 3, 2, 2, 3]), n_bootstrap=200)
        >>> r.method, r.p_floor, r.p_value.tolist()
        ('sign-flip permutation (exact, 6 prompts)', 0.03125, [0.03125, 1.0])
        >>> bool(r.ci_low[0] > 0), bool(r.ci_low[1] < 0 < r.ci_high[1])
        (True, True)
    """

    ci_low: Float[Tensor, " k"]
    ci_high: Float[Tensor, " k"]
    p_value: Float[Tensor, " k"]
    method: str
    #: the smallest p-value the test can give (2 / 2^P exact, 1 / (1 + n) Monte Carlo, 0 for t):
    #: a p-value at it is a bound, "p <= p_floor", not an estimate
    p_floor: float = 0.0


def paired_uncertainty(
    diff_sums: Float[Tensor, "n_prompts k"],
    counts: Int[Tensor, " n_prompts"],
    *,
    test: str = "permutation",
    n_bootstrap: int = 1000,
    n_permutations: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    chunk: int = 4096,
) -> PairedResult:
    """Bootstrap CIs and paired p-values for the token-weighted mean difference of each column.

    ``diff_sums[p, j]`` is (fine-tuned − base) summed over prompt ``p``'s selected tokens for latent
    ``j``; ``counts[p]`` is that prompt's token count. The statistic is ``Σ_p D_pj / Σ_p n_p``,
    the same Δ mean the ranking uses. Prompts are the resampling unit (tokens of one prompt are not
    independent).

    - CI: percentile bootstrap over prompts (ratio of resampled sums).
    - ``test="permutation"``: sign-flip test (under no effect, swapping base and fine-tuned within a
      prompt flips ``D_p``'s sign); exact over all ``2^P`` flips when that is at most
      ``n_permutations``, otherwise Monte Carlo with ``p = (1 + hits) / (1 + draws)``. A Monte
      Carlo column stops drawing once it has 100 hits (sequential Monte Carlo, Besag & Clifford
      1991): its p-value is then about 100 / draws, at least ~0.01 for the default 10,000 draws,
      and more draws would only refine a large p; columns with fewer hits see every draw, so
      every p-value below ~0.01 is exactly the full run's.
    - ``test="t"``: paired t-test on per-prompt mean differences (needs scipy; gives small p-values
      when there are few prompts and many latents to correct for).

    Memory stays within ~2 MB per working matrix whatever the number of prompts. To test many
    column chunks over the same prompts, build one :class:`PairedAnalysis` and call it per chunk:
    it draws once, and gives each column the same result as this function.

    Example:
        >>> import torch
        >>> d = torch.tensor([[1.0], [1.2], [0.9], [1.1], [1.0], [0.8]])
        >>> r = paired_uncertainty(d, torch.ones(6, dtype=torch.long), n_bootstrap=200)
        >>> bool(r.ci_low[0] > 0.8 and r.ci_high[0] < 1.2), float(r.p_value[0])
        (True, 0.03125)
    """
    return PairedAnalysis(
        counts,
        test=test,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        confidence=confidence,
        seed=seed,
        chunk=chunk,
    )(diff_sums)


class PairedAnalysis:
    """:func:`paired_uncertainty` for fixed prompts, applied to any number of column chunks.

    The random draws (bootstrap weights, sign flips) depend only on the prompts' token counts, the
    seed and the draw counts, so they are made once here, held compactly (bits for the signs,
    small integers for the weights), and reused by every call: a diff over thousands of latents
    tests them chunk by chunk, with memory bounded by the chunk, without drawing again per chunk.
    ``PairedAnalysis(counts, **options)(d)`` equals ``paired_uncertainty(d, counts, **options)``
    for every ``d``, and the result for a column does not depend on the chunk it comes in.

    Example:
        >>> import torch
        >>> d = torch.tensor([[1.0, 0.1], [2.0, -0.2], [1.5, 0.05], [1.2, 0.0], [0.9, -0.1]])
        >>> run = PairedAnalysis(torch.ones(5, dtype=torch.long), n_bootstrap=200)
        >>> whole, parts = run(d), [run(d[:, :1]), run(d[:, 1:])]
        >>> whole.p_value.tolist() == [parts[0].p_value.item(), parts[1].p_value.item()]
        True
    """

    def __init__(
        self,
        counts: Int[Tensor, " n_prompts"],
        *,
        test: str = "permutation",
        n_bootstrap: int = 1000,
        n_permutations: int = 10_000,
        confidence: float = 0.95,
        seed: int = 0,
        chunk: int = 4096,
    ) -> None:
        n = torch.as_tensor(counts, dtype=torch.float64)
        if n.ndim != 1:
            raise ArgumentError(f"counts must be one number per prompt, got shape {tuple(n.shape)}")
        self.keep = n > 0
        self.n_rows = int(n.shape[0])
        self.n = n[self.keep]
        n_p = self.n_p = int(self.n.shape[0])
        if n_p == 0:
            raise ArgumentError("no prompt contributed any token; nothing to test")
        if not 0 < confidence < 1:
            raise ArgumentError(f"confidence must lie in (0, 1), got {confidence}")
        if test not in ("permutation", "t"):
            raise ArgumentError(f"unknown test {test!r}; choose 'permutation' or 't'")
        if test == "t" and n_p < 2:
            raise ArgumentError("a paired t-test needs at least 2 prompts")
        self.test, self.confidence, self.seed, self.chunk = test, confidence, seed, chunk
        self.n_bootstrap = n_bootstrap
        self.total = self.n.sum()
        # Random draws come in fixed blocks of rows, each from its own seeded generator. A block
        # is drawn and used in pieces of at most _WORK_ELEMENTS entries (a generator's stream does
        # not depend on how its draws are split), so every working matrix stays within ~2 MB
        # however many prompts there are.
        self.block = max(1, min(1024, 2**20 // n_p))
        self.piece = max(1, min(self.block, _WORK_ELEMENTS // n_p))
        # bootstrap: how often each prompt is drawn, per draw (small integers), and each draw's
        # token total; held when compact enough (~16 MB: ~8,000 prompts at 1,000 draws)
        self._boot: list[tuple[int, Tensor, Tensor]] | None = None
        small = torch.int16 if n_p < 2**15 else torch.int32  # a multiplicity is at most n_p
        if n_bootstrap * n_p * small.itemsize <= _HOLD_BYTES:
            self._boot = [(s, w.T.to(small).contiguous(), den) for s, w, den in self._boot_draws()]
        # the held weights as one block, for the bootstrap kernel (made on its first use)
        self._w16: tuple[Tensor, Tensor] | None = None
        self.exact = 2**n_p <= n_permutations
        self.n_draws = 2**n_p if self.exact else n_permutations
        # The first Monte Carlo block is checked every _FIRST_SLICE rows (see __call__): it is cut
        # in pieces whose ends fall on every check point.
        if self.piece >= _FIRST_SLICE:
            self.first_piece = self.piece // _FIRST_SLICE * _FIRST_SLICE
        else:
            self.first_piece = max(x for x in range(1, self.piece + 1) if _FIRST_SLICE % x == 0)
        # sign flips: packed bits, held when compact enough (~16 MB: ~13,000 prompts at 10,000)
        self._signs: dict[int, list[tuple[int, np.ndarray]]] | None = None
        if test == "permutation" and not self.exact and self.n_draws * -(-n_p // 8) <= _HOLD_BYTES:
            self._signs = {
                b: [(s, np.packbits(bits.numpy(), axis=1)) for s, bits in self._sign_draws(b)]
                for b in range(-(-self.n_draws // self.block))
            }

    # -- the draws ---------------------------------------------------------------------------------
    @staticmethod
    def _pieces(rows: int, size: int) -> list[tuple[int, int]]:
        return [(s, min(size, rows - s)) for s in range(0, rows, size)]

    def _boot_draws(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        # each bootstrap draw's prompt multiplicities, [rows, n_p] float64 per piece, and its tokens
        n_p, block = self.n_p, self.block
        for b in range(-(-self.n_bootstrap // block)):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            for s, r in self._pieces(min(block, self.n_bootstrap - b * block), self.piece):
                draws = torch.randint(0, n_p, (r, n_p), generator=g)
                w = torch.zeros(r, n_p, dtype=torch.float64).scatter_add_(
                    1, draws, torch.ones(r, n_p, dtype=torch.float64)
                )
                yield b * block + s, w, w @ self.n

    def _boot_weights(self) -> Iterator[tuple[int, Tensor, Tensor]]:
        # [n_p, rows] float64 weights per piece, from the held draws or drawn again
        if self._boot is None:
            for s, w, den in self._boot_draws():
                yield s, w.T.contiguous(), den
        else:
            for s, wt, den in self._boot:
                yield s, wt.to(torch.float64), den

    def _sign_draws(self, b: int) -> Iterator[tuple[int, Tensor]]:
        # block b's sign bits (1 = flip), uint8 [rows, n_p] in pieces, each with its first row's
        # offset in the block
        n_p, start = self.n_p, b * self.block
        rows = min(self.block, self.n_draws - start)
        g = (
            None
            if self.exact
            else torch.Generator().manual_seed(self.seed * 1_000_003 + 500_000 + b)
        )
        size = self.first_piece if b == 0 and not self.exact else self.piece
        for s, r in self._pieces(rows, size):
            if self.exact:
                bits = torch.arange(start + s, start + s + r).unsqueeze(1) >> torch.arange(n_p)
                yield s, (bits & 1).to(torch.uint8)
            else:
                yield s, torch.randint(0, 2, (r, n_p), generator=g, dtype=torch.uint8)

    def _sign_rows(self, b: int, dtype: torch.dtype) -> Iterator[tuple[int, Tensor]]:
        # block b's sign rows (+1 keep, -1 flip) in `dtype`, in pieces, with their offsets
        if self._signs is None:
            for s, bits in self._sign_draws(b):
                yield s, bits.to(dtype).mul_(-2.0).add_(1.0)
        else:  # one table lookup per byte of held bits: 8 signs at once
            table = _SIGN_TABLES[dtype]
            for s, packed in self._signs[b]:
                rows = table.take(packed, axis=0).reshape(len(packed), -1)  # (fast; [] is not)
                yield s, torch.from_numpy(rows[:, : self.n_p])

    # -- the bootstrap interval -----------------------------------------------------------------
    def _sorted_tails(self, d: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
        # every replicate of a block of columns, then the tails of each row, sorted
        k = d.shape[1]
        # bootstrap replicates of up to ~8 MB at a time ([cols, n_bootstrap]; fewer, larger sorts
        # measured ~10% faster than ~2 MB ones), whatever the number of prompts
        cols = max(1, min(self.chunk, 2**20 // max(self.n_bootstrap, self.block)))
        lo, hi = torch.empty(k, dtype=torch.float64), torch.empty(k, dtype=torch.float64)
        for j in range(0, k, cols):
            # one row per column, so the draws of a column are contiguous; copied (a small block)
            # so that the product reads it row-major: 3x faster than through a transposed view
            dj = d[:, j : j + cols].T.contiguous()
            reps = torch.empty(dj.shape[0], self.n_bootstrap, dtype=torch.float64)
            for start, wt, den in self._boot_weights():
                torch.div(dj @ wt, den, out=reps[:, start : start + len(den)])
            lo[j : j + cols], hi[j : j + cols] = _tail_quantiles(reps, alpha)
            del reps
        return lo, hi

    def _native_tails(self, d: Tensor, alpha: float) -> tuple[Tensor, Tensor] | None:
        """The interval from the compiled kernel (``_csrc/boot_tails.c``), which selects the four
        order statistics of each column's replicates instead of writing and sorting them all; the
        same quantiles as :func:`_tail_quantiles` (the replicates' sums may round differently in
        the last bit). ``None`` where it does not run (no kernel, weights not held, not CPU)."""
        fn = kernel("boot_tails") if self.n_p <= _KERNEL_MAX_PROMPTS else None
        if fn is None or self._boot is None or d.device.type != "cpu":
            return None
        if self._boot[0][1].dtype != torch.int16:
            return None  # (multiplicities past int16's range: 32,768 prompts or more)
        n_b, n_p, k = self.n_bootstrap, self.n_p, d.shape[1]
        if self._w16 is None:  # the held pieces as one [prompts, draws] block (2 bytes each)
            self._w16 = (
                torch.cat([wt for _, wt, _ in self._boot], 1).contiguous(),
                torch.cat([den for _, _, den in self._boot]).contiguous(),
            )
        w, den = self._w16
        pos_lo, pos_hi = alpha * (n_b - 1), (1 - alpha) * (n_b - 1)
        a0, b0 = math.floor(pos_lo), math.floor(pos_hi)
        a1 = min(a0 + 1, n_b - 1)
        m_lo, m_hi = a1 + 1, n_b - b0  # the a1 + 1 smallest, the n_b - b0 largest
        # thresholds that a little over m values are expected to pass, m + 2 sqrt(m) + 8
        # (normal approximation; any value gives the exact order statistics, a good one makes
        # them cheap: fewer values to select from, rarely too few)
        z_lo = NormalDist().inv_cdf(min(0.5, (m_lo + 2 * math.sqrt(m_lo) + 8) / n_b))
        z_hi = -NormalDist().inv_cdf(min(0.5, (m_hi + 2 * math.sqrt(m_hi) + 8) / n_b))
        dc = d.contiguous()
        out = torch.empty(k, 4, dtype=torch.float64)
        codes: list[int] = []

        def select(c0: int, c1: int) -> None:
            code = fn(
                w.data_ptr(), n_b, n_p, dc.data_ptr(), dc.stride(0), den.data_ptr(),
                c0, c1, m_lo, m_hi, z_lo, z_hi, out[c0:].data_ptr(),
            )  # fmt: skip
            codes.append(code)

        _column_ranges(select, k, n_b * n_p)
        if any(codes):
            return None
        s_a0 = out[:, 0] if a1 == a0 + 1 else out[:, 1]
        lo = s_a0 + (pos_lo - a0) * (out[:, 1] - s_a0)
        hi = out[:, 2] + (pos_hi - b0) * (out[:, 3] - out[:, 2])
        bad = (lo.isnan() | hi.isnan()).nonzero().flatten()
        if len(bad):  # a NaN replicate: sorted as the PyTorch path sorts it
            lo[bad], hi[bad] = self._sorted_tails(d[:, bad], alpha)
        return lo, hi

    # -- one chunk of columns ----------------------------------------------------------------------
    def __call__(self, diff_sums: Float[Tensor, "n_prompts k"]) -> PairedResult:
        d = torch.as_tensor(diff_sums, dtype=torch.float64)
        if d.ndim != 2 or d.shape[0] != self.n_rows:
            raise ArgumentError(
                f"counts must have one entry per prompt ({d.shape[0] if d.ndim else 0}), got "
                f"({self.n_rows},)"
            )
        if not bool(self.keep.all()):
            d = d[self.keep]
        n_p, k = self.n_p, int(d.shape[1])
        total, n = self.total, self.n
        obs = d.sum(0) / total
        alpha = (1 - self.confidence) / 2
        tails = self._native_tails(d, alpha)
        lo, hi = tails if tails is not None else self._sorted_tails(d, alpha)

        if self.test == "t":
            try:
                from scipy.special import stdtr
            except ImportError as e:  # pragma: no cover - scipy ships with sae-lens' dependencies
                raise MissingDependencyError("test='t' needs scipy: pip install scipy") from e

            per = d / n.unsqueeze(1)
            mean = per.mean(0)
            sd = per.std(0)
            t = mean / (sd / math.sqrt(n_p))
            p_np = 2 * stdtr(n_p - 1, -t.abs().numpy())
            p = torch.as_tensor(p_np, dtype=torch.float64)
            p = torch.where(sd > 0, p, torch.where(mean == 0, 1.0, 0.0))
            return PairedResult(lo, hi, p, f"paired t ({n_p} prompts)", 0.0)

        exact, n_draws, block, piece = self.exact, self.n_draws, self.block, self.piece
        hits = torch.zeros(k, dtype=torch.float64)
        draws = torch.zeros(k, dtype=torch.float64)  # draws each column has seen
        live = torch.ones(k, dtype=torch.bool)
        # |signs @ d| / total >= |obs| (1 - 1e-9), with the division moved to the threshold side
        thresh = obs.abs() * (1 - 1e-9) * total
        # columns in groups whose [draws, group] block stays in cache (~2 MB)
        group = max(1, min(self.chunk, 2**18 // piece))
        fast: _Float32Hits | None = None
        # with the compiled count every block runs in float32; on the PyTorch path the first
        # block, where most columns are null and stop early, stays in float64
        kernel_sized = self.n_p <= _KERNEL_MAX_PROMPTS and d.device.type == "cpu"
        sign_kernel = kernel("sign_hits") if kernel_sized and _FLOAT32_FLIPS else None
        native = sign_kernel is not None
        for b in range(-(-n_draws // block)):
            # Monte Carlo: a column stops once it has _STOP_HITS hits (sequential Monte Carlo,
            # Besag & Clifford 1991): its p-value is then at least ~_STOP_HITS / n_permutations, far
            # from significance, and more draws would only refine a large p. Columns that keep
            # few hits, the ones that matter, see every draw. Each column's result depends on its
            # own hits only, so it does not depend on how columns are chunked. The first block is
            # read in slices of _FIRST_SLICE rows with a stop check after each, so the many null
            # columns stop after a few hundred draws rather than a whole block; later blocks are
            # checked once at their end (the check points depend on the block, not on the pieces).
            first = b == 0 and not exact
            cols_live = torch.arange(k) if exact else live.nonzero().flatten()
            if len(cols_live) == 0:
                break
            # after the first block the columns still live are mostly significant: float32
            # products with a float64 check near the threshold (_Float32Hits)
            now: _Float32Hits | None = None
            if (b > 0 or native) and _FLOAT32_FLIPS:
                now = fast = _Float32Hits(d, thresh, sign_kernel) if fast is None else fast
            dtype = torch.float64 if now is None else torch.float32
            for s, signs in self._sign_rows(b, dtype):
                for s0 in range(0, len(signs), _FIRST_SLICE if first else len(signs)):
                    part = signs[s0 : s0 + _FIRST_SLICE] if first else signs
                    if now is not None:
                        now.select(cols_live)  # (nothing to do while the live set is the same)
                        found = now(part, 2 * group)
                    else:
                        found = _hits(part, d[:, cols_live], thresh[cols_live], group)
                    hits[cols_live] += found
                    draws[cols_live] += part.shape[0]
                    if first and (s + s0 + len(part)) % _FIRST_SLICE == 0:
                        live &= hits < _STOP_HITS
                        cols_live = live.nonzero().flatten()
                        if len(cols_live) == 0:
                            break
                if len(cols_live) == 0:
                    break
            if not exact:
                live &= hits < _STOP_HITS
            if not bool(live.any()):
                break
        p = hits / n_draws if exact else (hits + 1) / (draws + 1)
        floor = min(1.0, 2.0 / n_draws) if exact else 1.0 / (n_draws + 1)
        method = f"sign-flip permutation ({'exact' if exact else n_draws}, {n_p} prompts)"
        return PairedResult(ci_low=lo, ci_high=hi, p_value=p, method=method, p_floor=floor)


# the 8 signs (+1 for a 0 bit, -1 for a 1 bit, most significant bit first, as np.packbits packs)
# of every byte value
_SIGN_TABLES = {
    dt: (1.0 - 2.0 * np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1)).astype(npdt)
    for dt, npdt in ((torch.float32, np.float32), (torch.float64, np.float64))
}


def _hits(rows: Tensor, d: Tensor, thresh: Tensor, group: int) -> Tensor:
    """Per column of ``d``, how many sign rows give ``|rows @ d| >= thresh`` (float64)."""
    ones = torch.ones(1, rows.shape[0], dtype=torch.float64)
    found = torch.empty(d.shape[1], dtype=torch.float64)
    flag = torch.empty(rows.shape[0], min(group, d.shape[1]), dtype=torch.float64)
    for j in range(0, d.shape[1], group):
        sl = slice(j, j + group)
        # hit where |signs @ d| >= thresh, written as 1.0 / 0.0 straight into a float buffer (on CPU
        # a comparison into a bool tensor, then a cast, costs three times as much); a
        # matrix-vector product counts the hits per column
        y = (rows @ d[:, sl]).abs_()
        f = flag[:, : y.shape[1]]
        torch.ge(y, thresh[sl], out=f)
        found[sl] = (ones @ f).reshape(-1)
    return found


class _Float32Hits:
    """:func:`_hits` for the columns of ``d`` chosen by :meth:`select`, with the same counts, from
    float32 arithmetic: a draw whose float32 ``|rows @ d|`` is farther from ``thresh`` than float32
    rounding (in any summation order) can reach is decided by it; a column with any draw inside
    that band is recomputed in float64, so every count is the float64 one.

    The counting runs in the compiled kernel ``fn`` (``_csrc/sign_hits.c``: no ``[draws, columns]``
    matrix, column ranges on parallel threads) when the caller passes it, else as a PyTorch float32
    product (15-30% faster than float64 in the benchmarks). The error bands are made once per call,
    the float32 copy once per set of live columns, not per piece of draws."""

    def __init__(self, d: Tensor, thresh: Tensor, fn: Any | None = None) -> None:
        n_p = d.shape[0]
        self.d, self.thresh = d, thresh
        # |fl32(s . fl32(d)) - s . d| <= (n_p + 2) u sum|d| (u = 2^-24); the margin doubles it and
        # covers the threshold's own rounding
        band = 2 * (n_p + 4) * 2.0**-24 * (d.abs().sum(0) + thresh)
        inf = torch.tensor(float("inf"))
        self.hi_all = torch.nextafter((thresh + band).float(), inf)
        self.lo_all = torch.nextafter((thresh - band).float(), -inf)
        self.d32_all = d.float()
        # a column beyond float32's range (or with a non-finite band) is counted in float64
        self.wide = ~(self.d32_all.isfinite().all(0) & self.hi_all.isfinite())
        self.kernel = fn  # the compiled count, if the caller runs it (CPU tensors only)
        self.cols = torch.arange(0)

    def select(self, cols: Tensor) -> None:
        """Work on columns ``cols`` from now on (their float32 copy is made here, once)."""
        if len(cols) != len(self.cols) or not torch.equal(cols, self.cols):
            self.cols = cols
            self.d32 = self.d32_all[:, cols]  # (contiguous: one row per prompt)
            self.hi, self.lo = self.hi_all[cols], self.lo_all[cols]
            self.wide_live = self.wide[cols]

    def __call__(self, rows32: Tensor, group: int) -> Tensor:
        if self.kernel is not None:
            return self._native(rows32, group)
        k = len(self.cols)
        rows64 = None
        ones = torch.ones(1, rows32.shape[0], dtype=torch.float32)
        found = torch.empty(k, dtype=torch.float64)
        flag = torch.empty(rows32.shape[0], min(group, k), dtype=torch.float32)
        for j in range(0, k, group):
            sl = slice(j, j + group)
            y = (rows32 @ self.d32[:, sl]).abs_()
            f = flag[:, : y.shape[1]]
            sure = ones @ torch.ge(y, self.hi[sl], out=f)
            maybe = ones @ torch.ge(y, self.lo[sl], out=f)
            found[sl] = sure.reshape(-1).double()
            unsure = ((maybe > sure).reshape(-1) | self.wide_live[sl]).nonzero().flatten()
            if len(unsure):
                idx = unsure + j
                col = self.cols[idx]
                rows64 = rows32.double() if rows64 is None else rows64  # +-1: exact
                found[idx] = _hits(rows64, self.d[:, col], self.thresh[col], group)
        return found

    def _native(self, rows32: Tensor, group: int) -> Tensor:
        k = len(self.cols)
        rows = rows32 if rows32.stride(1) == 1 else rows32.contiguous()
        sure = torch.zeros(k, dtype=torch.int64)
        maybe = torch.zeros(k, dtype=torch.int64)
        fn, d32, lo, hi = self.kernel, self.d32, self.lo, self.hi

        def count(c0: int, c1: int) -> None:
            fn(
                rows.data_ptr(), rows.shape[0], rows.shape[1], rows.stride(0),
                d32.data_ptr(), d32.stride(0), c0, c1,
                lo.data_ptr(), hi.data_ptr(), sure.data_ptr(), maybe.data_ptr(),
            )  # fmt: skip

        _column_ranges(count, k, rows.shape[0] * rows.shape[1])
        found = sure.double()
        unsure = ((maybe > sure) | self.wide_live).nonzero().flatten()
        if len(unsure):
            col = self.cols[unsure]
            found[unsure] = _hits(rows32.double(), self.d[:, col], self.thresh[col], group)
        return found


def _column_ranges(fn: Any, k: int, work_per_column: int) -> None:
    """``fn(c0, c1)`` over ``[0, k)`` cut into ranges run on torch's CPU thread count (the compiled
    kernels release the GIL), each range a multiple of 32 columns; one call when the work is too
    small to share."""
    n_threads = max(1, min(torch.get_num_threads(), k // 64, k * work_per_column // 2**20))
    if n_threads == 1:
        fn(0, k)
        return
    bounds = [0] + [k * t // n_threads // 32 * 32 for t in range(1, n_threads)] + [k]
    list(_pool(n_threads).map(lambda t: fn(bounds[t], bounds[t + 1]), range(n_threads)))


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(n_threads: int) -> ThreadPoolExecutor:
    # one pool per process and size (a pool made before a fork has no threads in the child)
    key = (os.getpid(), n_threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(n_threads, thread_name_prefix="modeldiff")
    return _POOLS[key]


# The compiled uncertainty kernels run for up to this many prompts: measured faster than the PyTorch
# paths up to 64-96 prompts (2x at 28 for the sign flips), level at ~128, slower beyond (2.5x at
# 895: PyTorch's blocked matrix products keep their operands in cache, the kernels do not), where
# the step's cost is also spread over many more tokens.
_KERNEL_MAX_PROMPTS = 80
# A Monte Carlo sign-flip column stops drawing after this many hits (see paired_uncertainty); the
# first block of draws is read in slices of _FIRST_SLICE rows, with a stop check after each.
_STOP_HITS = 100
# Held random draws (compact: sign bits, int16 bootstrap multiplicities) up to this size each.
_HOLD_BYTES = 16 * 2**20
# Entries (float64: 8 bytes each) per working matrix of the bootstrap and the sign flips: ~2 MB.
_WORK_ELEMENTS = 2**18
_FIRST_SLICE = 128
# After the first block of draws, sign flips run in float32 with a float64 check near the threshold
# (see _Float32Hits); False runs every draw in float64 (the same counts, for tests).
_FLOAT32_FLIPS = True


def _tail_quantiles(rows: Float[Tensor, "k n"], alpha: float) -> tuple[Tensor, Tensor]:
    """``torch.quantile(rows, [alpha, 1 - alpha], dim=1)`` (linear interpolation; one row of draws
    per column), equal to the last bit. ``rows`` is sorted in place (it is scratch space).

    On CPU the rows are sorted by numpy (a vectorised quicksort) on as many threads as torch uses:
    about 2x faster than reading the two tails with ``torch.topk`` and 3x faster than
    ``torch.sort``, measured on 4,096 rows of 1,000 bootstrap draws."""
    n = rows.shape[1]
    if rows.device.type == "cpu" and rows.is_contiguous():
        a = rows.numpy()
        n_threads = max(1, min(torch.get_num_threads(), rows.shape[0] // 64))
        bounds = [rows.shape[0] * t // n_threads for t in range(n_threads + 1)]
        slices = [a[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        if n_threads == 1:
            a.sort(axis=1)
        else:  # numpy releases the GIL while it sorts
            list(_pool(n_threads).map(lambda s: s.sort(axis=1), slices))
        ordered = rows
    else:
        ordered = rows.sort(dim=1).values

    def quantile(pos: float) -> Tensor:
        lo = math.floor(pos)
        hi = min(lo + 1, n - 1)
        return ordered[:, lo] + (pos - lo) * (ordered[:, hi] - ordered[:, lo])

    return quantile(alpha * (n - 1)), quantile((1 - alpha) * (n - 1))
