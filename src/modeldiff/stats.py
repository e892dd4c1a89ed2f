"""Mergeable running statistics for SAE latents and residual vectors (the paired-test maths lives in
:mod:`modeldiff.uncertainty`).

Every statistic here has the same four methods: ``update`` (fold in one batch), ``merge`` (fold in
another statistic of the same kind, e.g. a shard computed on another machine), ``state_dict`` (a flat
``dict[str, Tensor]`` that safetensors can write) and ``load_state_dict``. Nothing keeps activations:
sums are float64, so a run over millions of tokens loses no precision and the order of batches only
changes the last bits.

Per-prompt sums (needed for the paired, prompt-level uncertainty) are held *sparsely*: one
``(prompt, latent, sum)`` triple for every latent that fired at least once in that prompt. Memory is
``O(d_sae + n_prompts · k)`` where ``k`` is the number of distinct latents a prompt fires, bounded
by ``min(d_sae, tokens_per_prompt · L0)``. Latents that never fire in a prompt cost nothing, and the
sums are exact (a latent absent from a prompt summed to zero there).

Example:
    >>> import torch
    >>> s = LatentStats(4)
    >>> acts = torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    >>> s.update(acts, prompt_index=torch.tensor([0, 0]), position=torch.tensor([0, 1]))
    >>> s.mean.tolist(), s.freq.tolist()
    ([0.0, 2.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.5])
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._native import kernel
from .errors import ArgumentError

__all__ = [
    "STAT_KINDS",
    "LatentStats",
    "Stat",
    "register_stat",
    "stat_from_state_dict",
    "PairedResult",
    "SiteStats",
    "VectorStats",
    "benjamini_hochberg",
    "paired_uncertainty",
]

KIND_KEY = "stat.kind"


def _kind(name: str) -> Tensor:
    """A class name as a uint8 tensor (state dicts hold tensors only)."""
    return torch.tensor(list(name.encode()), dtype=torch.uint8)


_POS_BITS = 32  # a max location is stored as one int64 key: prompt << 32 | position
_NO_LOC = -1
# Below this fraction of non-zero activations the sparse update path is cheaper than the dense one.
_SPARSE_FRACTION = 0.05


def _loc_key(prompt_index: Tensor, position: Tensor) -> Tensor:
    lo = min(int(prompt_index.min()), int(position.min()))
    if lo < 0 or int(position.max()) >= 2**_POS_BITS:
        raise ArgumentError("prompt_index and position must be non-negative (position < 2**32)")
    return (prompt_index.long() << _POS_BITS) | position.long()


class LatentStats:
    """Streaming per-latent statistics of SAE activations over tokens (one model, one site).

    Tracks per latent: token count, sum, sum of squares, firing count (activation > 0), the largest
    activation and the (prompt, position) where it first occurred (ties go to the smaller prompt,
    then position), and sparse per-prompt sums with per-prompt token counts.

    Args:
        d_sae: number of latents.
        track_prompts: keep the sparse per-prompt sums (needed for confidence intervals and
            p-values). Turn off only for a quick ranking without uncertainty.

    Example:
        >>> import torch
        >>> a, b = LatentStats(3), LatentStats(3)
        >>> x = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
        >>> a.update(x[:1], prompt_index=torch.tensor([0]), position=torch.tensor([0]))
        >>> b.update(x[1:], prompt_index=torch.tensor([1]), position=torch.tensor([0]))
        >>> a.merge(b).max_location(2)
        (1, 0)
    """

    def __init__(self, d_sae: int, *, track_prompts: bool = True) -> None:
        if d_sae < 1:
            raise ArgumentError(f"d_sae must be positive, got {d_sae}")
        self.d_sae = int(d_sae)
        self.track_prompts = bool(track_prompts)
        self.count = 0
        self.sum = torch.zeros(d_sae, dtype=torch.float64)
        self.sumsq = torch.zeros(d_sae, dtype=torch.float64)
        self.fire = torch.zeros(d_sae, dtype=torch.int64)
        self.max = torch.zeros(d_sae, dtype=torch.float64)
        self.max_key = torch.full((d_sae,), _NO_LOC, dtype=torch.int64)
        # Per-prompt token counts live in a buffer that grows geometrically (see ``prompt_count``).
        self._prompt_buf = torch.zeros(0, dtype=torch.int64)
        self._n_prompts = 0
        # Sparse per-prompt sums: a coalesced part (keys prompt * d_sae + latent, sorted, unique)
        # plus chunks appended update by update. A prompt split across updates (a long prompt
        # encoded in chunks, shards of the same prompts) repeats keys across chunks; readers add
        # them up, so nothing is ever re-sorted while streaming. state_dict() coalesces.
        self._pp_key = torch.zeros(0, dtype=torch.int64)
        self._pp_val = torch.zeros(0, dtype=torch.float64)
        self._pending: list[tuple[Tensor, Tensor]] = []

    # -- derived quantities ----------------------------------------------------------------------
    @property
    def mean(self) -> Float[Tensor, " d_sae"]:
        """Mean activation per latent over all tokens seen (zeros before any update)."""
        return self.sum / max(self.count, 1)

    @property
    def var(self) -> Float[Tensor, " d_sae"]:
        """Population variance per latent over tokens (clamped at 0 against rounding)."""
        m = self.mean
        return (self.sumsq / max(self.count, 1) - m * m).clamp_min(0.0)

    @property
    def freq(self) -> Float[Tensor, " d_sae"]:
        """Fraction of tokens on which each latent fired (activation > 0)."""
        return self.fire.double() / max(self.count, 1)

    @property
    def n_prompts(self) -> int:
        """One more than the largest prompt index seen."""
        return self._n_prompts

    @property
    def prompt_count(self) -> Int[Tensor, " n_prompts"]:
        """Tokens seen per prompt index (a view of a buffer with spare capacity)."""
        return self._prompt_buf[: self._n_prompts]

    @prompt_count.setter
    def prompt_count(self, value: Int[Tensor, " n_prompts"]) -> None:
        self._prompt_buf = value.long()
        self._n_prompts = int(value.numel())

    def max_location(self, latent: int) -> tuple[int, int]:
        """``(prompt, position)`` of the latent's largest activation, ``(-1, -1)`` if it never fired."""
        key = int(self.max_key[latent])
        if key < 0:
            return (-1, -1)
        return (key >> _POS_BITS, key & (2**_POS_BITS - 1))

    @property
    def max_prompt(self) -> Int[Tensor, " d_sae"]:
        """Prompt index of each latent's largest activation (-1 if it never fired)."""
        return torch.where(self.max_key >= 0, self.max_key >> _POS_BITS, -1)

    @property
    def max_position(self) -> Int[Tensor, " d_sae"]:
        """Token position of each latent's largest activation (-1 if it never fired)."""
        return torch.where(self.max_key >= 0, self.max_key & (2**_POS_BITS - 1), -1)

    # -- update ----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(
        self,
        acts: Float[Tensor, "n d_sae"],
        *,
        prompt_index: Int[Tensor, " n"],
        position: Int[Tensor, " n"],
    ) -> None:
        """Fold in the latent activations of ``n`` tokens (any device; statistics live on CPU).

        ``acts`` may be dense or a sparse COO tensor (what :func:`modeldiff.saes.encode_sparse`
        gives for a TopK SAE); both give the same statistics.
        """
        if acts.ndim != 2 or acts.shape[1] != self.d_sae:
            raise ArgumentError(
                f"acts must have shape [n, {self.d_sae}] (one row per token, one column per latent); "
                f"got {tuple(acts.shape)}"
            )
        n = acts.shape[0]
        if prompt_index.shape != (n,) or position.shape != (n,):
            raise ArgumentError(
                f"prompt_index and position need one entry per row of acts ({n}); got "
                f"{tuple(prompt_index.shape)} and {tuple(position.shape)}"
            )
        if n == 0:
            return
        prompt_index = prompt_index.to(acts.device).long()
        position = position.to(acts.device).long()
        key = _loc_key(prompt_index, position)
        coo = None
        if acts.is_sparse:  # (row, latent, value) triples as given: no scan for the non-zeros
            idx, val = acts._indices(), acts._values()
            nz = val != 0
            coo = (idx[0][nz], idx[1][nz], val[nz])
        # Rows are folded in location order, so that "first occurrence" is the smallest location.
        ordered = not bool((key[1:] < key[:-1]).any())
        dense = coo is None and self._is_dense(acts)
        fn = kernel("dense_stats") if dense and acts.device.type == "cpu" else None
        if fn is not None:
            # The kernel takes each prompt's row range: a batch of whole prompts, each in location
            # order but the prompts in another order (a capture batch: longest first), is read
            # where it lies, never copied into order; any other layout is put in order first.
            runs = _prompt_runs(prompt_index, key)
            if runs is None:
                acts, coo, key, prompt_index = _in_order(acts, coo, key, prompt_index)
                ordered, runs = True, _prompt_runs(prompt_index, key)
            if runs is not None:  # (always, once in order)
                uniq, lo, hi = runs
                a32 = acts if acts.dtype == torch.float32 else acts.float()
                done = self._native_parts(fn, a32, key, lo, hi)
                if done is not None:
                    self._fold(n, done, uniq, hi - lo)
                    return
        if not ordered:
            acts, coo, key, prompt_index = _in_order(acts, coo, key, prompt_index)
        uniq, inv = torch.unique_consecutive(prompt_index, return_inverse=True)
        if dense:  # (on the PyTorch path: no kernel, or its sums came out NaN)
            parts = self._dense_parts(acts, key, inv, len(uniq))
        else:
            if coo is None:
                r, c = acts.nonzero(as_tuple=True)  # row-major: sorted by token row
                coo = (r, c, acts[r, c])
            r, c, v = coo
            parts = self._sparse_parts(r, c, v.to(torch.float64), key, inv, len(uniq))
        self._fold(n, parts, uniq, torch.bincount(inv, minlength=len(uniq)))

    @staticmethod
    def _is_dense(acts: Tensor) -> bool:
        # Dense batches take the dense path; only sparse ones pay for nonzero(), which on a dense
        # batch costs more than the rest of the update together. Which path is only a matter of
        # speed (both are exact, signed activations included): a sample of rows decides unless it
        # lands near the threshold, then an exact count does.
        n_rows = max(1, min(64, (1 << 15) // max(acts.shape[1], 1)))  # ~32k entries decide
        sample = acts[:: max(1, acts.shape[0] // n_rows)]
        share = float(torch.count_nonzero(sample)) / max(sample.numel(), 1)
        if share > 2 * _SPARSE_FRACTION:
            return True
        if share < _SPARSE_FRACTION / 2:
            return False
        return float(torch.count_nonzero(acts)) > _SPARSE_FRACTION * acts.numel()

    def _fold(self, n: int, parts: tuple, uniq: Tensor, per_prompt_rows: Tensor) -> None:
        s, sq, fire, mx, mk = (t.cpu() for t in parts[:5])
        pp = parts[5]
        self.count += n
        self.sum += s
        self.sumsq += sq
        self.fire += fire
        self._fold_max(mx, mk)
        # Per-prompt token counts and sparse sums.
        uniq_cpu = uniq.cpu()
        self._grow_prompts(int(uniq_cpu.max()) + 1)
        self.prompt_count.index_add_(0, uniq_cpu, per_prompt_rows.cpu())
        if self.track_prompts:
            rows, lat, val = pp
            self._pending.append((uniq_cpu[rows] * self.d_sae + lat, val))

    def _dense_parts(
        self,
        acts: Tensor,
        key: Tensor,
        inv: Tensor,
        n_rows: int,
    ) -> tuple:
        # Column reductions over a [tokens, d_sae] batch are memory-bound, so the batch is read once,
        # in row blocks small enough to stay in cache: each block is copied into a float64 scratch
        # block there (never the whole batch), and its per-prompt sums, sums of squares and firing
        # counts are matrix products. Comparisons write 1.0 / 0.0 straight into a float32 scratch
        # block: on CPU a comparison into a bool tensor, then a cast, costs several times as much.
        n, d, dev = acts.shape[0], self.d_sae, acts.device
        a32 = acts if acts.dtype == torch.float32 else acts.float()
        per_prompt = torch.zeros(n_rows, d, dtype=torch.float64, device=dev)
        sq = torch.zeros(1, d, dtype=torch.float64, device=dev)
        fire_acc = torch.zeros(1, d, dtype=torch.float64, device=dev)
        block = max(1, min(128, (1 << 21) // (4 * d)))
        # scratch blocks, allocated once per call: fresh multi-MB blocks per row block would cost
        # page faults that take longer than the arithmetic
        a64 = torch.empty(block, d, dtype=torch.float64, device=dev)
        flag = torch.empty(block, d, dtype=torch.float32, device=dev)
        ones = torch.ones(1, block, dtype=torch.float32, device=dev)
        ones64 = torch.ones(1, block, dtype=torch.float64, device=dev)
        # each column's max, then the first row holding it: per block, the rows equal to the max
        # weighted by a descending ramp, so the largest weight marks the block's first such row
        mx = a32.amax(0)
        target = torch.where(mx > 0, mx, torch.inf)
        ramp = torch.arange(block, 0, -1, dtype=torch.float32, device=dev).unsqueeze(1)
        row = torch.full((d,), -1, dtype=torch.long, device=dev)
        inv_cpu = inv.cpu()
        for i in range(0, n, block):
            part = a32[i : i + block]
            m = part.shape[0]
            lo, hi = int(inv_cpu[i]), int(inv_cpu[i + m - 1]) + 1
            b64, f = a64[:m], flag[:m]
            b64.copy_(part)  # float64, in cache: a block, never the whole batch
            if hi - lo == 1:
                per_prompt[lo] += (ones64[:, :m] @ b64).reshape(-1)
            else:  # row by row (a one-hot product would turn one prompt's inf into NaN elsewhere)
                per_prompt.index_add_(0, inv[i : i + m], b64)
            sq += ones64[:, :m] @ b64.square_()
            torch.gt(part, 0, out=f)  # 1.0 where fired
            fire_acc += ones[:, :m] @ f
            torch.eq(part, target, out=f)
            first = f.mul_(ramp[:m]).amax(0)  # block - (first row at the max), 0 if none here
            new = (first > 0) & (row < 0)
            row = torch.where(new, i + block - first.long(), row)
        s = per_prompt.sum(0)
        fire = fire_acc.reshape(-1).round().long()
        row = row.clamp_min(0)
        mx = mx.to(torch.float64).clamp_min(0.0)
        mk = torch.where(mx > 0, key[row], _NO_LOC)
        return s, sq.reshape(-1), fire, mx, mk, self._prompt_entries(per_prompt)

    def _native_parts(
        self, fn: Any, a32: Tensor, key: Tensor, seg_lo: Tensor, seg_hi: Tensor
    ) -> tuple | None:
        # The same statistics as _dense_parts (PyTorch), in one pass of the compiled kernel
        # (modeldiff/_csrc/dense_stats.c): prompt s is rows seg_lo[s] to seg_hi[s] - 1, the
        # prompts in ascending order, each prompt's rows in location order.
        x = a32.contiguous()
        d, n_rows = x.shape[1], len(seg_lo)
        seg_lo, seg_hi = seg_lo.contiguous(), seg_hi.contiguous()
        per_prompt = torch.zeros(n_rows, d, dtype=torch.float64)
        sq = torch.zeros(d, dtype=torch.float64)
        fire = torch.zeros(d, dtype=torch.int64)
        mx = torch.zeros(d, dtype=torch.float32)
        row = torch.full((d,), -1, dtype=torch.int64)
        fn(
            x.data_ptr(), d, seg_lo.data_ptr(), seg_hi.data_ptr(), n_rows, per_prompt.data_ptr(),
            sq.data_ptr(), fire.data_ptr(), mx.data_ptr(), row.data_ptr(),
        )  # fmt: skip
        s = per_prompt.sum(0)
        if bool(torch.isnan(s).any()):
            return None  # a NaN can hide a column's maximum from the kernel: the PyTorch path
        mx64 = mx.double()
        mk = torch.where(mx64 > 0, key[row.clamp_min(0)], _NO_LOC)
        return s, sq, fire, mx64, mk, self._prompt_entries(per_prompt)

    def _prompt_entries(self, per_prompt: Tensor) -> tuple | None:
        if not self.track_prompts:
            return None
        r, lat = per_prompt.nonzero(as_tuple=True)
        return (r.cpu(), lat.cpu(), per_prompt[r, lat].cpu())

    def _sparse_parts(
        self, r: Tensor, c: Tensor, v: Tensor, key: Tensor, inv: Tensor, n_rows: int
    ) -> tuple:
        d, dev = self.d_sae, v.device
        s = torch.zeros(d, dtype=torch.float64, device=dev).index_add_(0, c, v)
        sq = torch.zeros(d, dtype=torch.float64, device=dev).index_add_(0, c, v * v)
        fire = torch.bincount(c[v > 0], minlength=d)  # fired: > 0 (signed encoders too)
        mx = torch.zeros(d, dtype=torch.float64, device=dev).scatter_reduce_(
            0, c, v, "amax", include_self=True
        )
        at_max = (v == mx[c]) & (v > 0)  # only a positive max has a location
        big = torch.iinfo(torch.int64).max
        mk = torch.full((d,), big, dtype=torch.int64, device=dev).scatter_reduce_(
            0, c[at_max], key[r][at_max], "amin", include_self=True
        )
        mk = torch.where(mk == big, _NO_LOC, mk)
        pp = None
        if self.track_prompts:
            rows = inv[r]
            if n_rows * d <= 4 * len(v):  # few prompts per batch: a small dense table is cheapest
                table = torch.zeros(n_rows, d, dtype=torch.float64, device=dev)
                table.index_put_((rows, c), v, accumulate=True)
                pr, lat = table.nonzero(as_tuple=True)
                pp = (pr.cpu(), lat.cpu(), table[pr, lat].cpu())
            else:
                uk, ui = torch.unique(rows * d + c, return_inverse=True)
                vals = torch.zeros(len(uk), dtype=torch.float64, device=dev).index_add_(0, ui, v)
                pp = ((uk // d).cpu(), (uk % d).cpu(), vals.cpu())
        return s, sq, fire, mx, mk, pp

    def _fold_max(self, mx: Tensor, mk: Tensor) -> None:
        # Replace where the incoming max is larger, or equal (and positive) at an earlier location.
        cur_key = torch.where(self.max_key < 0, torch.iinfo(torch.int64).max, self.max_key)
        new_key = torch.where(mk < 0, torch.iinfo(torch.int64).max, mk)
        better = (mx > self.max) | ((mx == self.max) & (mx > 0) & (new_key < cur_key))
        # In place: long-lived state that is reallocated every batch fragments the heap.
        self.max[better] = mx[better]
        self.max_key[better] = mk[better]

    def _grow_prompts(self, n: int) -> None:
        if n > self._prompt_buf.numel():
            # Geometric growth: O(log n) reallocations of this long-lived buffer, not one per batch
            # (long-lived state reallocated every batch fragments the heap and inflates peak RSS).
            grown = torch.zeros(max(n, 2 * self._prompt_buf.numel()), dtype=torch.int64)
            grown[: self._n_prompts] = self.prompt_count
            self._prompt_buf = grown
        self._n_prompts = max(self._n_prompts, n)

    def _chunks(self) -> list[tuple[Tensor, Tensor]]:
        return [(self._pp_key, self._pp_val), *self._pending]

    def _coalesce(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self._pp_key, *(k for k, _ in self._pending)])
        vals = torch.cat([self._pp_val, *(v for _, v in self._pending)])
        uk, ui = torch.unique(keys, return_inverse=True)  # sorted
        self._pp_key = uk
        self._pp_val = torch.zeros(len(uk), dtype=torch.float64).index_add_(0, ui, vals)
        self._pending = []

    # -- per-prompt access -----------------------------------------------------------------------
    def prompt_sums(
        self, latents: Int[Tensor, " k"] | None = None, *, n_prompts: int | None = None
    ) -> Float[Tensor, "n_prompts k"]:
        """Dense per-prompt activation sums for ``latents`` (all latents when ``None``).

        Prompts never seen get zero rows. Divide by :attr:`prompt_count` for per-prompt means.
        """
        if not self.track_prompts:
            raise ArgumentError(
                "these statistics were gathered with track_prompts=False, so per-prompt sums are "
                "unavailable; re-run with track_prompts=True for confidence intervals and p-values"
            )
        n_p = self.n_prompts if n_prompts is None else n_prompts
        if latents is None:
            latents = torch.arange(self.d_sae)
        latents = torch.as_tensor(latents, dtype=torch.int64).cpu()
        col = torch.full((self.d_sae,), -1, dtype=torch.int64)
        col[latents] = torch.arange(len(latents))
        width = len(latents)
        out = torch.zeros(n_p, width, dtype=torch.float64)
        flat = out.view(-1)
        # Index temporaries are made per slice of entries, so reading a few latents out of millions of
        # (prompt, latent) entries costs O(slice) extra memory, not several copies of every entry.
        step = 1 << 16
        for keys, vals in self._chunks():  # a key may repeat across chunks: accumulate
            for i in range(0, len(keys), step):
                key, val = keys[i : i + step], vals[i : i + step]
                pr = key // self.d_sae
                c = col[key - pr * self.d_sae]
                keep = (c >= 0) & (pr < n_p)
                if bool(keep.all()):  # (every latent asked for: no boolean gathers, 7x faster)
                    flat.index_add_(0, pr * width + c, val)
                else:
                    flat.index_add_(0, pr[keep] * width + c[keep], val[keep])
        return out

    @property
    def n_prompt_entries(self) -> int:
        """How many (prompt, latent) sums are held: the memory the paired analysis costs (a prompt
        split across updates may hold a latent in two entries until :meth:`state_dict` merges them)."""
        return sum(int(v.numel()) for _, v in self._chunks())

    # -- merge / persistence ---------------------------------------------------------------------
    def merge(self, other: LatentStats) -> LatentStats:
        """Fold ``other`` into ``self`` (in place) and return ``self``.

        Shards may hold different prompts, or different tokens of the same prompts: counts and
        sums add, maxima keep the larger (earlier on ties), per-prompt sums add entry by entry.
        """
        if not isinstance(other, LatentStats) or other.d_sae != self.d_sae:
            raise ArgumentError(
                f"can only merge LatentStats with the same d_sae ({self.d_sae}); got "
                f"{getattr(other, 'd_sae', type(other).__name__)}"
            )
        if self.track_prompts != other.track_prompts:
            raise ArgumentError(
                "cannot merge statistics gathered with and without track_prompts; use the same setting"
            )
        self.count += other.count
        self.sum += other.sum
        self.sumsq += other.sumsq
        self.fire += other.fire
        self._fold_max(other.max, other.max_key)
        self._grow_prompts(other.n_prompts)
        self.prompt_count[: other.n_prompts] += other.prompt_count
        if self.track_prompts:
            self._pending.extend((k.clone(), v.clone()) for k, v in other._chunks() if len(v))
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """All state as named CPU tensors (safetensors-ready)."""
        self._coalesce()
        return {
            KIND_KEY: _kind("LatentStats"),
            "d_sae": torch.tensor(self.d_sae),
            "track_prompts": torch.tensor(int(self.track_prompts)),
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": self.sum.clone(),
            "sumsq": self.sumsq.clone(),
            "fire": self.fire.clone(),
            "max": self.max.clone(),
            "max_key": self.max_key.clone(),
            "prompt_count": self.prompt_count.clone(),
            "pp_key": self._pp_key.clone(),
            "pp_val": self._pp_val.clone(),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (replaces the current state)."""
        missing = {
            "d_sae",
            "count",
            "sum",
            "sumsq",
            "fire",
            "max",
            "max_key",
            "prompt_count",
        } - set(state)
        if missing:
            raise ArgumentError(f"not a LatentStats state: missing {sorted(missing)}")
        self.d_sae = int(state["d_sae"])
        self.track_prompts = bool(int(state.get("track_prompts", torch.tensor(1))))
        self.count = int(state["count"])
        self.sum = state["sum"].double().clone()
        self.sumsq = state["sumsq"].double().clone()
        self.fire = state["fire"].long().clone()
        self.max = state["max"].double().clone()
        self.max_key = state["max_key"].long().clone()
        self.prompt_count = state["prompt_count"].long().clone()
        self._pp_key = state.get("pp_key", torch.zeros(0, dtype=torch.int64)).long().clone()
        self._pp_val = state.get("pp_val", torch.zeros(0, dtype=torch.float64)).double().clone()
        self._pending = []

    def copy(self) -> LatentStats:
        """An independent copy (one clone of every tensor)."""
        out = LatentStats(self.d_sae, track_prompts=self.track_prompts)
        out.count = self.count
        for name in (
            "sum",
            "sumsq",
            "fire",
            "max",
            "max_key",
            "prompt_count",
            "_pp_key",
            "_pp_val",
        ):
            setattr(out, name, getattr(self, name).clone())
        out._pending = [(k.clone(), v.clone()) for k, v in self._pending]
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> LatentStats:
        """A new instance holding ``state``.

        Example:
            >>> s = LatentStats(2)
            >>> LatentStats.from_state_dict(s.state_dict()).d_sae
            2
        """
        out = cls(int(state["d_sae"]))
        out.load_state_dict(state)
        return out


def _in_order(
    acts: Tensor, coo: tuple | None, key: Tensor, prompt_index: Tensor
) -> tuple[Tensor, tuple | None, Tensor, Tensor]:
    """The rows in location order: dense activations moved, sparse triples renumbered."""
    order = torch.argsort(key, stable=True)
    if coo is None:
        acts = acts[order]
    else:  # renumber the rows instead of moving them
        new_row = torch.empty_like(order)
        new_row[order] = torch.arange(len(order), device=order.device)
        coo = (new_row[coo[0]], coo[1], coo[2])
    return acts, coo, key[order], prompt_index[order]


def _prompt_runs(prompt_index: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """For rows that hold each prompt in one run of consecutive rows, in location order within
    the run: the prompts in ascending order and the first and one-past-last row of each one's
    run. ``None`` when the rows are not laid out so (a prompt split in two runs, or a run out of
    location order)."""
    n = len(prompt_index)
    change = (prompt_index[1:] != prompt_index[:-1]).nonzero().flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), change])
    ends = torch.cat([change, torch.tensor([n])])
    prompts = prompt_index[starts]
    order = torch.argsort(prompts)
    sorted_prompts = prompts[order]
    if bool((sorted_prompts[1:] == sorted_prompts[:-1]).any()):
        return None  # a prompt in two runs
    back = key[1:] < key[:-1]
    back[change - 1] = False  # (steps between runs may go back)
    if bool(back.any()):
        return None
    return sorted_prompts, starts[order], ends[order]


class VectorStats:
    """Streaming mean of vectors (e.g. residual activations), in float64, with the mean L2 norm.

    Example:
        >>> import torch
        >>> v = VectorStats(2)
        >>> v.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> v.mean.tolist(), v.mean_norm
        ([2.0, 0.0], 2.0)
    """

    def __init__(self, d: int) -> None:
        self.d = int(d)
        self.count = 0
        self.sum = torch.zeros(d, dtype=torch.float64)
        self.norm_sum = 0.0

    @property
    def mean(self) -> Float[Tensor, " d"]:
        """Mean vector (zeros before any update)."""
        return self.sum / max(self.count, 1)

    @property
    def mean_norm(self) -> float:
        """Mean L2 norm of the vectors seen."""
        return self.norm_sum / max(self.count, 1)

    @torch.no_grad()
    def update(self, x: Float[Tensor, "n d"]) -> None:
        """Fold in ``n`` vectors."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ArgumentError(f"expected shape [n, {self.d}], got {tuple(x.shape)}")
        # float64 accumulation without materialising a float64 copy of the batch
        self.count += int(x.shape[0])
        self.sum += x.sum(0, dtype=torch.float64).cpu()
        self.norm_sum += float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).sum())

    def merge(self, other: VectorStats) -> VectorStats:
        """Fold ``other`` into ``self`` and return ``self``."""
        if not isinstance(other, VectorStats) or other.d != self.d:
            raise ArgumentError(f"can only merge VectorStats of the same dimension {self.d}")
        self.count += other.count
        self.sum += other.sum
        self.norm_sum += other.norm_sum
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """All state as named CPU tensors."""
        return {
            KIND_KEY: _kind("VectorStats"),
            "d": torch.tensor(self.d),
            "count": torch.tensor(self.count, dtype=torch.int64),
            "sum": self.sum.clone(),
            "norm_sum": torch.tensor(self.norm_sum, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.d = int(state["d"])
        self.count = int(state["count"])
        self.sum = state["sum"].double().clone()
        self.norm_sum = float(state["norm_sum"])

    def copy(self) -> VectorStats:
        """An independent copy."""
        return VectorStats.from_state_dict(self.state_dict())

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> VectorStats:
        """A new instance holding ``state``."""
        out = cls(int(state["d"]))
        out.load_state_dict(state)
        return out


class SiteStats:
    """Everything one model contributes to a latent diff at one site: SAE latent statistics plus the
    running mean of the raw activations at the site (for the decoder-cosine ranking).

    Example:
        >>> import torch
        >>> st = SiteStats(d_sae=3, d_model=2)
        >>> st.update(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, -1.0]]),
        ...           prompt_index=torch.tensor([0]), position=torch.tensor([4]))
        >>> st.latents.count, st.resid.mean.tolist()
        (1, [1.0, -1.0])
    """

    def __init__(self, d_sae: int, d_model: int, *, track_prompts: bool = True) -> None:
        self.latents = LatentStats(d_sae, track_prompts=track_prompts)
        self.resid = VectorStats(d_model)

    def update(
        self,
        latent_acts: Float[Tensor, "n d_sae"],
        resid: Float[Tensor, "n d_model"],
        *,
        prompt_index: Int[Tensor, " n"],
        position: Int[Tensor, " n"],
    ) -> None:
        """Fold in one batch: the SAE's latents and the site activations they came from."""
        self.latents.update(latent_acts, prompt_index=prompt_index, position=position)
        self.resid.update(resid)

    # A container of statistics: every method below is the same loop over its named parts.
    def _parts(self) -> dict[str, Any]:
        return {"latents": self.latents, "resid": self.resid}

    def merge(self, other: SiteStats) -> SiteStats:
        """Fold ``other`` (e.g. another shard of prompts) into ``self`` and return ``self``."""
        theirs = other._parts()
        for name, part in self._parts().items():
            part.merge(theirs[name])
        return self

    def state_dict(self) -> dict[str, Tensor]:
        """Flat named tensors (``latents.*`` and ``resid.*``), each part tagged with its kind."""
        out = {KIND_KEY: _kind("SiteStats")}
        for name, part in self._parts().items():
            out.update({f"{name}.{k}": v for k, v in part.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned."""
        for name, part in self._parts().items():
            part.load_state_dict(_sub(state, name))

    def copy(self) -> SiteStats:
        """An independent copy."""
        out = SiteStats.__new__(SiteStats)
        out.latents, out.resid = self.latents.copy(), self.resid.copy()
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> SiteStats:
        """A new instance holding ``state``."""
        out = SiteStats.__new__(SiteStats)
        out.latents = LatentStats.from_state_dict(_sub(state, "latents"))
        out.resid = VectorStats.from_state_dict(_sub(state, "resid"))
        return out


def _sub(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}


# -- the Stat protocol ---------------------------------------------------------------------------


@runtime_checkable
class Stat(Protocol):
    """What every statistic offers, so statistics compose, merge across shards and persist.

    ``state_dict()`` is a flat ``dict[str, Tensor]`` (safetensors-ready) whose ``stat.kind`` entry
    names the class, so :func:`stat_from_state_dict` rebuilds any registered statistic from a file.

    Example:
        >>> a, b = VectorStats(2), VectorStats(2)
        >>> a.update(torch.tensor([[1.0, 3.0]])); b.update(torch.tensor([[3.0, 5.0]]))
        >>> merged = a.copy().merge(b)  # two shards of tokens folded into one
        >>> merged.mean.tolist(), stat_from_state_dict(merged.state_dict()).mean.tolist()
        ([2.0, 4.0], [2.0, 4.0])
    """

    def merge(self, other: Any) -> Any: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def copy(self) -> Any: ...


STAT_KINDS: dict[str, type] = {}


def register_stat(cls: type) -> type:
    """Make ``cls`` (a :class:`Stat` with ``from_state_dict``) rebuildable by its kind tag.

    Example:
        >>> class Count:
        ...     def __init__(self, n=0):
        ...         self.n = n
        ...     def merge(self, other):
        ...         self.n += other.n
        ...         return self
        ...     def copy(self):
        ...         return Count(self.n)
        ...     def state_dict(self):
        ...         kind = torch.tensor(list(b"Count"), dtype=torch.uint8)  # the class name
        ...         return {"stat.kind": kind, "n": torch.tensor(self.n)}
        ...     def load_state_dict(self, state):
        ...         self.n = int(state["n"])
        ...     @classmethod
        ...     def from_state_dict(cls, state):
        ...         out = cls()
        ...         out.load_state_dict(state)
        ...         return out
        >>> _ = register_stat(Count)
        >>> stat_from_state_dict(Count(3).merge(Count(4)).state_dict()).n
        7
        >>> del STAT_KINDS["Count"]  # leave the registry as it was
    """
    if not hasattr(cls, "from_state_dict"):
        raise ArgumentError(f"{cls.__name__} needs a from_state_dict(state) classmethod")
    STAT_KINDS[cls.__name__] = cls
    return cls


def stat_from_state_dict(state: dict[str, Tensor]) -> Any:
    """Rebuild whatever statistic wrote ``state`` (its ``stat.kind`` entry names it).

    Example:
        >>> st = SiteStats(d_sae=3, d_model=2)
        >>> type(stat_from_state_dict(st.state_dict())).__name__
        'SiteStats'
    """
    tag = state.get(KIND_KEY)
    if tag is None:
        raise ArgumentError(
            "this state has no 'stat.kind' entry (written before statistics were tagged); "
            "rebuild it with the class it came from, e.g. SiteStats.from_state_dict(state)"
        )
    name = bytes(tag.tolist()).decode()
    if name not in STAT_KINDS:
        raise ArgumentError(f"unknown statistic kind {name!r}; known: {', '.join(STAT_KINDS)}")
    return STAT_KINDS[name].from_state_dict(state)


for _cls in (LatentStats, VectorStats, SiteStats):
    register_stat(_cls)


# The paired-test maths moved to its own module; these names stay importable from here.
from .uncertainty import PairedResult, benjamini_hochberg, paired_uncertainty  # noqa: E402
