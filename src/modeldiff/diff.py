"""Which SAE latents moved between a base and a fine-tuned model, and which layer moved most.

``diff_latents`` runs both models on the same prompts, reads one site, encodes it with an SAE and
accumulates streaming statistics; ``LatentDiff`` ranks the latents (``#1`` is the largest rise of the
mean activation, ``#-1`` the largest fall) and attaches prompt-level uncertainty.
``diff_residuals`` answers the question before it: at which layer does the fine-tune change the
residual stream most?

Example:
    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> base = tiny_hooked_transformer()
    >>> cfg = StandardSAEConfig(d_in=64, d_sae=128)
    >>> cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    >>> sae = StandardSAE(cfg)
    >>> d = diff_latents(base, base, sae, ["Hello world", "The quick fox"], progress=False)
    >>> float(d.delta.abs().max())
    0.0
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from ._io import atomic_path
from .adapters import adapter_for
from .capture import CaptureBatch, capture, plan_batches
from .config import TestName, TokenSelection, Uncertainty, unpack
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    FileFormatError,
    MissingFileError,
    NotFoundError,
    OutOfRangeError,
    reading,
)
from .rankings import RANKINGS as _RANKINGS
from .rankings import compute_ranking
from .saes import SAEError, check_sae, encode_sparse, load_sae, sae_fingerprint, sae_identity
from .sites import Site, as_sites
from .stats import SiteStats, VectorStats
from .tokens import Positions, Prompt, select_positions, tokenize_prompts
from .uncertainty import PairedAnalysis, benjamini_hochberg

__all__ = [
    "RANKINGS",
    "LatentDiff",
    "LatentRecord",
    "ResidualDiff",
    "collect_site_stats",
    "diff_latents",
    "diff_residuals",
]

FORMAT_VERSION = 1
# What a LatentDiff can be ranked by: the registry of modeldiff.rankings (a live dict).
RANKINGS = _RANKINGS
_COLUMNS = (
    "mean_base",
    "mean_finetuned",
    "delta",
    "var_base",
    "var_finetuned",
    "freq_base",
    "freq_finetuned",
    "delta_freq",
    "effect_size",
    "relative_change",
    "cosine",
    "ci_low",
    "ci_high",
    "p_value",
    "q_value",
    "max_base",
    "max_finetuned",
)
_INT_COLUMNS = ("max_base_prompt", "max_base_position", "max_ft_prompt", "max_ft_position")


# -- one latent ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatentRecord:
    """All numbers for one latent of a :class:`LatentDiff` (frozen).

    ``rank`` is the paper's ``#k`` (1 = largest value of the ranking metric), ``rank_from_bottom``
    its ``#-k`` (-1 = smallest, i.e. the largest fall). Means are over the selected tokens of all
    prompts; ``ci_low``/``ci_high``/``p_value``/``q_value`` are paired over prompts (NaN where not
    computed). ``max_*_at`` is ``(prompt index, token position)`` of the largest activation
    (``(-1, -1)`` if the latent never fired). ``as_direction()`` returns the decoder row, ready for
    ``steer``.

    Example:
        >>> import torch
        >>> r = LatentRecord(latent=3, site=Site.resid_post(1), rank=1, rank_from_bottom=-8,
        ...                  values={"delta": 0.5}, direction=torch.ones(4))
        >>> r.delta, r.as_direction().shape
        (0.5, torch.Size([4]))
    """

    latent: int
    site: Site
    rank: int
    rank_from_bottom: int
    values: dict[str, float] = field(default_factory=dict)
    max_base_at: tuple[int, int] = (-1, -1)
    max_finetuned_at: tuple[int, int] = (-1, -1)
    direction: Tensor | None = field(default=None, repr=False, compare=False)

    def __getattr__(self, name: str) -> float:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"LatentRecord has no field {name!r}; fields: {', '.join(values)}")

    @property
    def name(self) -> str:
        """The paper's name for the latent: ``#k`` in the upper half of the ranking, ``#-k`` in
        the lower half (``#-1`` is the largest fall); the same in every table and figure.

        Example:
            >>> r = LatentRecord(latent=7, site=Site.resid_post(0), rank=99, rank_from_bottom=-2)
            >>> r.name
            '#-2'
        """
        if self.rank == 0:
            return "unranked"
        if self.rank <= -self.rank_from_bottom:
            return f"#{self.rank}"
        return f"#{self.rank_from_bottom}"

    def as_direction(self) -> Float[Tensor, " d_model"]:
        """The latent's decoder row ``W_dec[latent]`` (a copy)."""
        if self.direction is None:
            raise SAEError(
                f"no decoder row stored for latent {self.latent}: the saved LatentDiff kept rows only "
                "for its top and bottom latents. Attach the SAE: diff = diff.with_sae(sae)"
            )
        return self.direction.clone()

    def _repr_html_(self) -> str:
        from .views import latent_record_html

        return latent_record_html(self)

    def as_dict(self) -> dict[str, Any]:
        """A flat, JSON-ready dict of every number (no decoder row)."""
        out: dict[str, Any] = {
            "latent": self.latent,
            "site": self.site.hook_name,
            "rank": self.rank,
            "rank_from_bottom": self.rank_from_bottom,
            "name": self.name,
        }
        out.update(self.values)
        out["max_base_at"] = list(self.max_base_at)
        out["max_finetuned_at"] = list(self.max_finetuned_at)
        return out


# -- the result ------------------------------------------------------------------------------------


class LatentDiff:
    """Ranked, immutable result of :func:`diff_latents`.

    Build it with :func:`diff_latents`, :meth:`from_stats` or :meth:`load`. Columns are float64
    tensors of length ``d_sae``; accessors return copies, so nothing a caller does changes it. The
    one thing shared rather than copied is the SAE's decoder matrix (copying a million-latent
    decoder would double its memory): edit the SAE in place (e.g. ``fold_W_dec_norm``) and
    ``as_direction()`` follows.

    Example:
        >>> from sae_lens import TopKSAE, TopKSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=1)
        >>> sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=96, k=8))
        >>> d = diff_latents(base, tuned, sae, ["Hello world", "The fox"], site="blocks.0.hook_resid_post",
        ...                  progress=False)
        >>> top = d.top(3)
        >>> [r.rank for r in top], d.rank_of(top[0].latent)
        ([1, 2, 3], 1)
        >>> d.at_rank(-1).delta <= d.at_rank(1).delta
        True
    """

    def __init__(
        self,
        columns: dict[str, Tensor],
        *,
        site: Site,
        rank_by: str = "delta",
        meta: dict[str, Any] | None = None,
        directions: Tensor | None = None,
        direction_index: Tensor | None = None,
        resid_delta: Tensor | None = None,
        stats: tuple[SiteStats, SiteStats] | None = None,
        absent: tuple[str, ...] = (),
    ) -> None:
        columns = {k: v for k, v in columns.items() if k not in absent}
        if not {"delta", "mean_base", "mean_finetuned"} <= set(columns):
            raise ArgumentError(
                "a LatentDiff needs at least the columns mean_base, mean_finetuned and delta"
            )
        d_sae = int(columns["delta"].numel())
        # Columns a file saved by an earlier version lacks: computed from the statistics where
        # they were kept, otherwise marked absent (NaN, or -1 for locations).
        absent = []
        for name in (*_COLUMNS, *(r for r in RANKINGS if r not in _COLUMNS)):
            if name in columns:
                continue
            if stats is not None and name in RANKINGS:
                col = compute_ranking(name, stats, None)
                if not bool(col.isnan().all()):
                    columns[name] = col
                    continue
            columns[name] = torch.full((d_sae,), math.nan, dtype=torch.float64)
            absent.append(name)
        for name in _INT_COLUMNS:
            if name not in columns:
                columns[name] = torch.full((d_sae,), -1, dtype=torch.long)
                absent.append(name)
        if rank_by not in columns:
            raise ArgumentError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")
        if rank_by in absent:
            present = [c for c in RANKINGS if c in columns and c not in absent]
            raise ArgumentError(
                f"this diff has no {rank_by!r} scores (its file was saved before that ranking "
                "existed, without statistics); recompute the diff, or rank by one of: "
                f"{', '.join(present)}"
            )
        names = [*_COLUMNS, *_INT_COLUMNS, *sorted(set(columns) - {*_COLUMNS, *_INT_COLUMNS})]
        self._cols = {k: columns[k].detach().cpu() for k in names}
        self._absent = tuple(absent)
        self._site = site
        self._rank_by = rank_by
        self._meta = dict(meta or {})
        self._d_sae = d_sae
        # Decoder rows: either all of W_dec (index None) or some rows with their latent indices.
        self._directions = directions.detach() if directions is not None else None
        self._direction_index = (
            direction_index.long().cpu() if direction_index is not None else None
        )
        self._resid_delta = resid_delta.detach().cpu() if resid_delta is not None else None
        # Own copies of the statistics: the caller may keep updating the objects it passed in.
        self._stats = None if stats is None else tuple(st.copy() for st in stats)
        # Latents whose statistics are not finite (NaN/inf activations: broken weights, overflow)
        # are never ranked: a NaN must not pose as the largest fall.
        finite = self._cols["mean_base"].isfinite() & self._cols["mean_finetuned"].isfinite()
        self._unranked = (~finite).nonzero().flatten()
        key = self._cols[rank_by].clone()
        key = torch.nan_to_num(key, nan=-math.inf)
        key[~finite] = -math.inf
        order = torch.argsort(-key, stable=True)  # ties: smaller latent index first
        self._order = order[finite[order]]
        self._n_ranked = int(self._order.numel())
        self._rank = torch.zeros(d_sae, dtype=torch.long)  # 0: not ranked
        self._rank[self._order] = torch.arange(1, self._n_ranked + 1)
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError("LatentDiff is immutable; derive a new one (e.g. ranked_by(...))")
        super().__setattr__(name, value)

    # -- basic facts -----------------------------------------------------------------------------
    @property
    def site(self) -> Site:
        """Where the activations were read."""
        return self._site

    @property
    def rank_by(self) -> str:
        """The metric the ranking sorts by (descending)."""
        return self._rank_by

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self._d_sae

    @property
    def meta(self) -> dict[str, Any]:
        """Run settings and SAE identity (a copy): prompts, tokens, positions, test, seeds..."""
        return json.loads(json.dumps(self._meta))

    def column(self, name: str) -> Float[Tensor, " d_sae"]:
        """A copy of one per-latent column, indexed by latent (see ``columns``)."""
        if name not in self._cols:
            raise NotFoundError(f"no column {name!r}; columns: {', '.join(self.columns)}")
        return self._cols[name].clone()

    @property
    def columns(self) -> tuple[str, ...]:
        """Names of the per-latent columns."""
        return tuple(self._cols)

    @property
    def delta(self) -> Float[Tensor, " d_sae"]:
        """Mean activation fine-tuned − base, per latent (a copy)."""
        return self.column("delta")

    @property
    def mean_base(self) -> Float[Tensor, " d_sae"]:
        """Mean activation in the base model, per latent."""
        return self.column("mean_base")

    @property
    def mean_finetuned(self) -> Float[Tensor, " d_sae"]:
        """Mean activation in the fine-tuned model, per latent."""
        return self.column("mean_finetuned")

    @property
    def p_value(self) -> Float[Tensor, " d_sae"]:
        """Paired p-value per latent (NaN where not computed)."""
        return self.column("p_value")

    @property
    def q_value(self) -> Float[Tensor, " d_sae"]:
        """Benjamini–Hochberg q-value per latent (NaN where not computed)."""
        return self.column("q_value")

    @property
    def order(self) -> Int[Tensor, " n_ranked"]:
        """Latent indices from rank #1 to the last rank (latents with non-finite statistics left out)."""
        return self._order.clone()

    @property
    def unranked(self) -> list[int]:
        """Latents whose statistics are not finite (NaN/inf activations), left out of the ranking."""
        return self._unranked.tolist()

    @property
    def resid_delta(self) -> Float[Tensor, " d_model"] | None:
        """Mean site activation fine-tuned − base (the vector the cosine ranking compares with)."""
        return None if self._resid_delta is None else self._resid_delta.clone()

    @property
    def stats(self) -> tuple[SiteStats, SiteStats] | None:
        """The raw ``(base, fine-tuned)`` statistics, for merging or re-analysis (copies)."""
        if self._stats is None:
            return None
        return tuple(s.copy() for s in self._stats)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self._d_sae

    # -- ranking ---------------------------------------------------------------------------------
    def rank_of(self, latent: int) -> int:
        """The latent's rank ``#k`` (1-based, descending). Its ``#-k`` is ``rank_of - n - 1`` with
        ``n = len(d.order)`` the number of ranked latents (all of them unless some are
        :attr:`unranked`)."""
        i = self._check_latent(latent)
        rank = int(self._rank[i])
        if rank == 0:
            raise ArgumentError(
                f"latent {i} is not ranked: its statistics are not finite (NaN/inf activations "
                "reached the SAE). Check the models' and the SAE's weights; see LatentDiff.unranked."
            )
        return rank

    def latent(self, latent: int) -> LatentRecord:
        """All numbers for one latent, with its decoder row when available."""
        i = self._check_latent(latent)
        rank = int(self._rank[i])
        c = self._cols
        return LatentRecord(
            latent=i,
            site=self._site,
            rank=rank,
            rank_from_bottom=rank - self._n_ranked - 1 if rank else 0,
            values={k: float(v[i]) for k, v in c.items() if k not in _INT_COLUMNS},
            max_base_at=(int(c["max_base_prompt"][i]), int(c["max_base_position"][i])),
            max_finetuned_at=(int(c["max_ft_prompt"][i]), int(c["max_ft_position"][i])),
            direction=self._direction_row(i),
        )

    def at_rank(self, rank: int) -> LatentRecord:
        """The latent at rank ``#rank``: ``1`` is the largest rise, ``-1`` the largest fall."""
        n = self._n_ranked
        if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
            raise ArgumentTypeError(f"rank must be an integer such as 1 or -1, got {rank!r}")
        rank = int(rank)
        if rank == 0 or not -n <= rank <= n:
            raise OutOfRangeError(f"rank {rank} is out of range: ranks run 1..{n} and -1..-{n}")
        pos = rank - 1 if rank > 0 else n + rank
        return self.latent(int(self._order[pos]))

    def top(self, k: int = 10) -> list[LatentRecord]:
        """Records of ranks ``#1 .. #k`` (the largest rises)."""
        return [self.latent(int(i)) for i in self._order[: _count(k, "top")]]

    def bottom(self, k: int = 10) -> list[LatentRecord]:
        """Records of ranks ``#-1 .. #-k`` (the largest falls), largest fall first."""
        return [self.latent(int(i)) for i in self._order.flip(0)[: _count(k, "bottom")]]

    def ranked_by(self, metric: str) -> LatentDiff:
        """The same result ranked by another metric (one of :data:`RANKINGS`).

        Example:
            >>> # d.ranked_by("cosine").top(5): decoder rows best aligned with the mean shift
        """
        return LatentDiff(
            self._cols,
            site=self._site,
            rank_by=metric,
            meta=self._meta,
            directions=self._directions,
            direction_index=self._direction_index,
            resid_delta=self._resid_delta,
            stats=self._stats,
            absent=self._absent,
        )

    @property
    def absent(self) -> tuple[str, ...]:
        """Columns this diff lacks (saved by an earlier version without the statistics to
        compute them); they read as NaN and cannot be ranked by."""
        return self._absent

    def significant(self, q: float = 0.05) -> list[LatentRecord]:
        """Records with q-value below ``q``, in rank order."""
        qv = self._cols["q_value"][self._order]
        return [self.latent(int(i)) for i in self._order[torch.nan_to_num(qv, nan=2.0) < q]]

    def to_records(self, limit: int | None = None) -> list[dict[str, Any]]:
        """JSON-ready dicts in rank order (all latents, or the first ``limit``)."""
        idx = self._order if limit is None else self._order[:limit]
        return [self.latent(int(i)).as_dict() for i in idx]

    # -- directions ------------------------------------------------------------------------------
    def direction(self, latent: int) -> Float[Tensor, " d_model"]:
        """The decoder row of ``latent`` (see :meth:`LatentRecord.as_direction`)."""
        return self.latent(latent).as_direction()

    def check_sae(self, sae: Any) -> None:
        """Raise :class:`SAEError` unless ``sae`` is the SAE this diff was computed with.

        Compares the latent count and the weight fingerprint recorded at diffing time, so a diff's
        latent numbers are never read against another SAE's dictionary.
        """
        ident = self._meta.get("sae", {})
        fp = sae_fingerprint(sae)
        d_sae = int(sae.cfg.d_sae)
        if d_sae != self._d_sae or ident.get("fingerprint") not in (None, fp):
            raise SAEError(
                f"this SAE (d_sae={d_sae}, fingerprint {fp}) is not the one the diff was computed "
                f"with (d_sae={self._d_sae}, fingerprint {ident.get('fingerprint')}): its latent "
                "numbers would name other features. Pass the diff's own SAE."
            )

    def with_sae(self, sae: Any) -> LatentDiff:
        """The same result with every decoder row available, after checking it is the same SAE."""
        sae = load_sae(sae)
        self.check_sae(sae)
        return LatentDiff(
            self._cols,
            site=self._site,
            rank_by=self._rank_by,
            meta=self._meta,
            directions=sae.W_dec.detach(),
            direction_index=None,
            resid_delta=self._resid_delta,
            stats=self._stats,
            absent=self._absent,
        )

    def _direction_row(self, i: int) -> Tensor | None:
        if self._directions is None:
            return None
        if self._direction_index is None:
            return self._directions[i].detach().clone()
        hit = (self._direction_index == i).nonzero()
        return None if hit.numel() == 0 else self._directions[int(hit[0, 0])].clone()

    def _check_latent(self, latent: int) -> int:
        if isinstance(latent, Tensor):
            latent = int(latent.item())
        if (
            isinstance(latent, bool)
            or not isinstance(latent, numbers.Integral)
            or not 0 <= latent < self._d_sae
        ):
            raise OutOfRangeError(
                f"latent {latent!r} is out of range: this SAE has {self._d_sae} latents "
                f"(0..{self._d_sae - 1}); for a rank use at_rank()"
            )
        return int(latent)

    # -- construction from statistics ------------------------------------------------------------
    @classmethod
    def from_stats(
        cls,
        base: SiteStats,
        finetuned: SiteStats,
        *,
        site: Site,
        sae: Any | None = None,
        rank_by: str = "delta",
        uncertainty: str | int | None = "all",
        test: TestName = "permutation",
        n_bootstrap: int = 1000,
        n_permutations: int = 10_000,
        confidence: float = 0.95,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
        paired: bool = True,
        extra_columns: dict[str, Tensor] | None = None,
    ) -> LatentDiff:
        """Rank latents from the two models' statistics (e.g. merged shards).

        Args:
            base, finetuned: statistics of the same prompts and positions through each model.
            site: where they were read.
            sae: the SAE (for decoder rows, the cosine ranking and identity); optional.
            rank_by: default ranking, one of :data:`RANKINGS`.
            uncertainty: ``"all"`` (every latent that fired in either model), an integer ``k``
                (only the top and bottom ``k`` by Δ, faster for huge SAEs) or ``None`` (skip).
                Latents that never fired get CI ``[0, 0]`` and ``p = 1`` when ``"all"``.
            test: ``"permutation"`` (sign-flip, default) or ``"t"`` (paired t).
            n_bootstrap, n_permutations, confidence, seed: see
                :func:`modeldiff.stats.paired_uncertainty`.
            paired: whether both statistics cover the same tokens (two models on one token set,
                the default); ``False`` for two token sets of one model (then ``uncertainty``
                must be ``None``).
            extra_columns: further per-latent columns (e.g. ``attribution``), rankable by name.
        """
        check_diff_options(
            rank_by="delta" if rank_by in (extra_columns or {}) else rank_by,
            uncertainty=uncertainty,
            test=test,
            n_bootstrap=n_bootstrap,
            n_permutations=n_permutations,
            confidence=confidence,
            seed=seed,
        )
        lb, lf = base.latents, finetuned.latents
        if lb.d_sae != lf.d_sae:
            raise ArgumentError(
                f"base has {lb.d_sae} latents, fine-tuned {lf.d_sae}: not the same SAE"
            )
        if not paired and uncertainty is not None:
            raise ArgumentError(
                "unpaired statistics (two different token sets) have no prompt-level pairing for "
                "the intervals and tests; pass uncertainty=None"
            )
        if paired and (lb.count != lf.count or not torch.equal(lb.prompt_count, lf.prompt_count)):
            raise ArgumentError(
                f"base and fine-tuned statistics cover different tokens ({lb.count} vs {lf.count} "
                "tokens, or different tokens per prompt); both models must see the same prompts "
                "and positions (same tokenizer, same positions= selection)"
            )
        if lb.count == 0 or lf.count == 0:
            raise ArgumentError("no tokens were selected; check positions= and the prompts")
        d_sae = lb.d_sae
        mb, mf = lb.mean, lf.mean
        finite = mb.isfinite() & mf.isfinite()
        if not bool(finite.any()):
            raise ArgumentError(
                f"every latent's statistics are NaN/inf at {site.hook_name}: the models or the SAE "
                "produced non-finite activations (NaN/inf weights, or overflow in a low-precision "
                "dtype). Check torch.isfinite on the weights, or run in float32."
            )
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten()
            warnings.warn(
                f"{len(bad)} of {d_sae} latents have non-finite statistics (NaN/inf activations "
                f"at {site.hook_name}; e.g. latents {bad[:5].tolist()}): they are left out of the "
                "ranking (LatentDiff.unranked). Check the models' and the SAE's weights.",
                RuntimeWarning,
                stacklevel=3,
            )
        resid_delta = finetuned.resid.mean - base.resid.mean
        # every registered ranking is a column (the built-ins: modeldiff.rankings)
        ranked = {name: compute_ranking(name, (base, finetuned), sae) for name in RANKINGS}
        delta = ranked["delta"]
        cols: dict[str, Tensor] = {
            "mean_base": mb,
            "mean_finetuned": mf,
            "var_base": lb.var,
            "var_finetuned": lf.var,
            "freq_base": lb.freq,
            "freq_finetuned": lf.freq,
            **ranked,
            "max_base": lb.max.clone(),
            "max_finetuned": lf.max.clone(),
            "max_base_prompt": lb.max_prompt,
            "max_base_position": lb.max_position,
            "max_ft_prompt": lf.max_prompt,
            "max_ft_position": lf.max_position,
        }
        nan = torch.full((d_sae,), math.nan, dtype=torch.float64)
        ci_lo, ci_hi, p, q = nan.clone(), nan.clone(), nan.clone(), nan.clone()
        method, p_floor = None, 0.0
        if uncertainty is not None:
            active = (lb.fire + lf.fire) > 0
            if uncertainty == "all":
                tested = active.nonzero().flatten()
                ci_lo[~active], ci_hi[~active], p[~active] = 0.0, 0.0, 1.0
            elif isinstance(uncertainty, int) and not isinstance(uncertainty, bool):
                order = torch.argsort(-delta, stable=True)
                pick = torch.cat([order[:uncertainty], order.flip(0)[:uncertainty]]).unique()
                tested = pick[active[pick]]
                never = pick[~active[pick]]
                ci_lo[never], ci_hi[never], p[never] = 0.0, 0.0, 1.0
            else:
                raise ArgumentError(
                    f"uncertainty must be 'all', an integer k, or None; got {uncertainty!r}"
                )
            tested = tested[finite[tested]]
            n_p = max(lb.n_prompts, lf.n_prompts)
            counts = lb.prompt_count
            # dense [prompts, chunk] blocks of ~8 MB; the paired analysis draws once for all chunks
            # and works in ~2 MB pieces, so its working set stays within the streaming's
            chunk = max(1, 2**20 // max(n_p, 1))
            if len(tested):  # (nothing to draw for, or to refuse, when no latent is tested)
                analysis = PairedAnalysis(
                    counts,
                    test=test,
                    n_bootstrap=n_bootstrap,
                    n_permutations=n_permutations,
                    confidence=confidence,
                    seed=seed,
                )
            for j in range(0, len(tested), chunk):
                idx = tested[j : j + chunk]
                dsum = lf.prompt_sums(idx, n_prompts=n_p)
                dsum -= lb.prompt_sums(idx, n_prompts=n_p)
                r = analysis(dsum)
                del dsum
                ci_lo[idx], ci_hi[idx], p[idx] = r.ci_low, r.ci_high, r.p_value
                method, p_floor = r.method, r.p_floor
            if method is None:
                method = "none tested (no latent fired)"
            # BH over every latent with a p-value (never-fired latents have p = 1).
            has_p = ~p.isnan()
            q[has_p] = benjamini_hochberg(p[has_p])
        cols.update({"ci_low": ci_lo, "ci_high": ci_hi, "p_value": p, "q_value": q})
        for name, col in (extra_columns or {}).items():
            cols[name] = torch.as_tensor(col, dtype=torch.float64).reshape(d_sae)
        info = dict(meta or {})
        info.update(
            {
                "n_tokens": lb.count,
                "n_prompts_with_tokens": int((lb.prompt_count > 0).sum()),
                "uncertainty": uncertainty,
                "test": method,
                "p_floor": p_floor,
                "n_bootstrap": n_bootstrap,
                "n_permutations": n_permutations,
                "confidence": confidence,
                "seed": seed,
                "resid_delta_norm": float(resid_delta.norm()),
                "resid_mean_norm_base": base.resid.mean_norm,
            }
        )
        if sae is not None:
            info["sae"] = sae_identity(sae)
        return cls(
            cols,
            site=site,
            rank_by=rank_by,
            meta=info,
            directions=sae.W_dec.detach() if sae is not None else None,
            resid_delta=resid_delta,
            stats=(base, finetuned),
        )

    # -- persistence -----------------------------------------------------------------------------
    def save(
        self, path: str | Path, *, n_directions: int | None = 1000, stats: bool = True
    ) -> Path:
        """Write one ``.safetensors`` file (tensors; settings as JSON in its header), atomically.

        Decoder rows are kept for the top and bottom ``n_directions`` latents of the current ranking
        (``None``: all rows), so their ``as_direction()`` works after :meth:`load` without the SAE.
        ``stats=True`` also stores both models' raw statistics (for merging or re-analysis).

        Example:
            >>> # d.save("diff.safetensors"); LatentDiff.load("diff.safetensors")
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"col.{k}": v.contiguous() for k, v in self._cols.items()}
        if self._resid_delta is not None:
            tensors["resid_delta"] = self._resid_delta.contiguous()
        if self._directions is not None:
            if self._direction_index is None:
                if n_directions is None or 2 * n_directions >= self._d_sae:
                    index = torch.arange(self._d_sae)
                else:
                    index = torch.cat(
                        [self._order[:n_directions], self._order.flip(0)[:n_directions]]
                    ).unique()
                rows = self._directions.cpu()[index]
            else:
                index, rows = self._direction_index, self._directions.cpu()
            tensors["directions.index"] = index.contiguous()
            tensors["directions.rows"] = rows.contiguous()
        if stats and self._stats is not None:
            for name, st in zip(("base", "finetuned"), self._stats):
                for k, v in st.state_dict().items():
                    tensors[f"stats.{name}.{k}"] = v.contiguous()
        header = {
            "format": "modeldiff.LatentDiff",
            "version": FORMAT_VERSION,
            "site": self._site.hook_name,
            "rank_by": self._rank_by,
            "meta": self._meta,
            "absent": list(self._absent),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"modeldiff": json.dumps(header)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> LatentDiff:
        """Read a file written by :meth:`save` (exact round trip)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no LatentDiff file at {str(path)!r}")
        with reading(path, "a LatentDiff file (written by LatentDiff.save)"):
            with safe_open(str(path), framework="pt") as f:
                header_text = (f.metadata() or {}).get("modeldiff")
                if header_text is None:
                    raise FileFormatError(
                        f"{str(path)!r} is a safetensors file but not a saved LatentDiff "
                        "(write one with LatentDiff.save)"
                    )
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iter
            header = json.loads(header_text)
        if header.get("version", 0) > FORMAT_VERSION:
            raise ArgumentError(
                f"{str(path)!r} was written by a newer modeldiff (format {header['version']}); upgrade"
            )
        cols = {k[4:]: v for k, v in tensors.items() if k.startswith("col.")}
        stats = None
        if any(k.startswith("stats.base.") for k in tensors):
            stats = tuple(
                SiteStats.from_state_dict(
                    {
                        k[len(f"stats.{n}.") :]: v
                        for k, v in tensors.items()
                        if k.startswith(f"stats.{n}.")
                    }
                )
                for n in ("base", "finetuned")
            )
        return cls(
            cols,
            site=Site.parse(header["site"]),
            rank_by=header["rank_by"],
            meta=header["meta"],
            directions=tensors.get("directions.rows"),
            direction_index=tensors.get("directions.index"),
            resid_delta=tensors.get("resid_delta"),
            stats=stats,  # type: ignore[arg-type]
            absent=tuple(header.get("absent", ())),
        )

    # -- display ---------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"LatentDiff({self._d_sae} latents at {self._site.hook_name}, ranked by {self._rank_by}, "
            f"{self._meta.get('n_tokens', '?')} tokens)"
        )

    def _name(self, i: int) -> str:
        rank = int(self._rank[i])
        if rank == 0:
            return "unranked"
        below = rank - self._n_ranked - 1
        return f"#{rank}" if rank <= -below else f"#{below}"

    def format_p(self, latent: int, column: str = "q_value") -> str:
        """A latent's p- or q-value as text: ``"≤ 0.0001"`` where its p-value is at the test's
        floor (the smallest p the permutation test can give), so a bound never reads as an
        estimate; ``"n/a"`` where none was computed."""
        i = self._check_latent(latent)
        value, p = float(self._cols[column][i]), float(self._cols["p_value"][i])
        if math.isnan(value):
            return "n/a"
        floor = float(self._meta.get("p_floor") or 0.0)
        if floor > 0 and p <= floor * (1 + 1e-9):
            return f"≤ {value:.2g}"
        return f"{value:.2g}"

    def _repr_html_(self, k: int = 10) -> str:
        from .views import latent_diff_html

        return latent_diff_html(self, k)

    def plot(self, k: int = 10, *, max_points: int = 20_000, labels: int = 6) -> Any:
        """A plotly figure: mean base vs fine-tuned per latent (top/bottom ``k`` marked) and a
        bar chart of Δ with confidence intervals for those latents.

        The ``labels`` marked latents with the largest ``|Δ|`` are labelled by name (``#k`` /
        ``#-k``), offset from their points so that neighbours near the origin stay readable;
        every point names its latent on hover. Only latents that fired are drawn, at most
        ``max_points`` of them (the ranked extremes always included), so the figure stays light
        for million-latent SAEs.
        """
        from .views import latent_diff_figure

        return latent_diff_figure(self, k, max_points=max_points, labels=labels)


# -- running the models ----------------------------------------------------------------------------


def _prepare(
    base: Any,
    finetuned: Any | None,
    sae: Any,
    site: Site | str | None,
    convert_sae: bool,
) -> tuple[Any, Site]:
    sae = load_sae(sae)
    site = Site.parse(site) if site is not None else Site.from_sae(sae)
    if finetuned is not None:
        _check_pair(base, finetuned)
    site.validate(base)
    if finetuned is not None:
        _check_placement(base, finetuned, site)
    sae = check_sae(sae, base, site, convert=convert_sae)
    if finetuned is not None:
        check_sae(sae, finetuned, site, convert=False)
    return sae, site


def _count(k: Any, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ArgumentError(
            f"{what}(k) takes a count k >= 0, got {k!r}; for the largest falls use bottom(k) "
            "(or at_rank(-1) for the single largest fall)"
        )
    return int(k)


def warn_shared_prefix(
    tokenized: Sequence[Any], positions: Positions, *, include_bos: bool = False
) -> float:
    """Warn when most selected tokens are a prefix every prompt shares; return that share.

    A chat template's default system prompt is such a prefix: its tokens are identical in every
    prompt, so they say nothing about the prompts and make the intervals look tighter than they are.

    Example:
        >>> from modeldiff.tokens import TokenizedPrompt
        >>> tps = [TokenizedPrompt((5, 6, 7, 8, 9), 5, False), TokenizedPrompt((5, 6, 7, 8, 2), 5, False)]
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     share = warn_shared_prefix(tps, "prompt")
        >>> share, "positions='user'" in str(w[0].message)
        (0.8, True)
    """
    if len(tokenized) < 2:
        return 0.0
    first = tokenized[0].ids
    common = len(first)
    for tp in tokenized[1:]:
        n = min(common, len(tp.ids))
        j = 0
        while j < n and tp.ids[j] == first[j]:
            j += 1
        common = j
        if common == 0:
            return 0.0
    selections = select_positions(tokenized, positions, include_bos=include_bos)
    total = sum(len(sel) for sel in selections)
    shared = sum(sum(1 for p in sel if p < common) for sel in selections)
    share = shared / total if total else 0.0
    if share > 0.5:
        warnings.warn(
            f"{share:.0%} of the selected tokens are a prefix shared by every prompt ({common} "
            "tokens, e.g. a default system prompt the chat template inserts): they are the same in "
            "every prompt and make the intervals look tighter than they are. positions='user' "
            "selects only the content of the user turns.",
            UserWarning,
            stacklevel=3,
        )
    return share


def check_diff_options(
    *,
    rank_by: str = "delta",
    uncertainty: Any = "all",
    test: TestName = "permutation",
    n_bootstrap: int = 1000,
    n_permutations: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> None:
    """Refuse bad ranking / uncertainty options before any model runs, naming the fix.

    Example:
        >>> check_diff_options(n_bootstrap=0)
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: n_bootstrap must be a positive integer (e.g. 1000), got 0
    """
    if rank_by not in RANKINGS:
        raise ArgumentError(f"unknown ranking {rank_by!r}; choose one of {', '.join(RANKINGS)}")
    if not (
        uncertainty is None
        or uncertainty == "all"
        or (isinstance(uncertainty, int) and not isinstance(uncertainty, bool) and uncertainty > 0)
    ):
        raise ArgumentError(
            f"uncertainty must be 'all', a positive integer k (top and bottom k by delta), or None; "
            f"got {uncertainty!r}"
        )
    if test not in ("permutation", "t"):
        raise ArgumentError(
            f"unknown test {test!r}; choose 'permutation' (sign-flip) or 't' (paired t)"
        )
    for name, value in (("n_bootstrap", n_bootstrap), ("n_permutations", n_permutations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{name} must be a positive integer (e.g. 1000), got {value!r}")
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, (int, float))
        or not (0 < confidence < 1)
    ):
        raise ArgumentError(
            f"confidence must lie strictly between 0 and 1 (e.g. 0.95), got {confidence!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentError(f"seed must be an integer, got {seed!r}")


def _check_placement(base: Any, finetuned: Any, site: Site) -> None:
    """One SAE reads both models' activations at ``site``: one device and one dtype."""
    ab, af = adapter_for(base), adapter_for(finetuned)
    if ab.dtype != af.dtype:
        tb, tf = (str(t).removeprefix("torch.") for t in (ab.dtype, af.dtype))
        raise ArgumentError(
            f"the base model is {tb} but the fine-tuned model is {tf}; one SAE reads both, so "
            f"load them in one dtype (load_model(..., dtype=torch.{tb}) for both, or "
            f"finetuned.to(torch.{tb})). convert_sae converts the SAE, not the models."
        )
    db, df = ab.site_device(site), af.site_device(site)
    if db != df:
        raise ArgumentError(
            f"the base model's activations at {site.hook_name} are on {db} but the fine-tuned "
            f"model's on {df}; one SAE reads both. Place the two models alike (the same device= "
            "or device_map= in load_model), or move one: finetuned.to(...)."
        )


def _check_pair(base: Any, finetuned: Any) -> None:
    from .models import check_compatible

    vb, vf = adapter_for(base).d_vocab, adapter_for(finetuned).d_vocab
    if vb != vf:
        raise ArgumentError(
            f"the base model has d_vocab={vb} and the fine-tuned one d_vocab={vf}: the same token "
            "ids would not mean the same. Diff a fine-tune against its own base (with the base's "
            "tokenizer); if the fine-tune added tokens, resize the base's embeddings to match"
        )
    check_compatible(base, finetuned)


def collect_site_stats(
    model: Any,
    sae: Any,
    prompts: Sequence[Prompt],
    *,
    site: Site | str | None = None,
    positions: Positions = "prompt",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    padding_side: Literal["right", "left"] = "right",
    prompt_offset: int = 0,
    tokenizer_model: Any | None = None,
    convert_sae: bool = False,
    track_prompts: bool = True,
    outlier_factor: float | None = None,
    progress: bool = True,
) -> SiteStats:
    """Statistics of one model's SAE latents over ``prompts`` (one half of a diff, or one shard).

    ``outlier_factor`` drops this model's tokens whose activation norm exceeds that many times
    their prompt's median (``diff_latents`` drops a token that is an outlier in either model from
    both; here only this model is seen, so compare halves collected with it off, the default, or
    check that both drop the same tokens).

    Use this when the two models do not fit in memory together, or to split prompts into shards:
    ``SiteStats.merge`` combines shards (give each shard its ``prompt_offset`` so prompt indices stay
    distinct), and :meth:`LatentDiff.from_stats` ranks. ``tokenizer_model`` (default ``model``)
    tokenizes, so pass the base model when collecting the fine-tune's half.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32))
        >>> st = collect_site_stats(m, sae, ["Hi there"], site="blocks.0.hook_resid_post", progress=False)
        >>> st.latents.count > 0
        True
    """
    sae, site = _prepare(model, None, sae, site, convert_sae)
    tok_model = tokenizer_model if tokenizer_model is not None else model
    tokenized = tokenize_prompts(tok_model, prompts, prepend_bos=prepend_bos, truncate=truncate)
    d_sae = int(sae.cfg.d_sae)
    out = SiteStats(d_sae, adapter_for(model).d_model, track_prompts=track_prompts)
    stream = capture(
        model,
        prompts,
        site,
        positions=positions,
        batch_size=batch_size,
        include_bos=include_bos,
        padding_side=padding_side,
        tokenized=tokenized,
        progress=progress,
        desc="collect_site_stats",
    )
    with torch.inference_mode():
        for b in stream:
            x, pi, pos = b.acts[site], b.prompt_index, b.position
            if outlier_factor is not None:
                keep = ~(b.norm_ratio[site] > outlier_factor)  # a NaN norm stays (and is flagged)
                if not bool(keep.all()):
                    x, pi, pos = x[keep.to(x.device)], pi[keep], pos[keep]
            if len(pi):
                _encode_into(out, sae, x, pi + prompt_offset, pos)
            del b, x  # free this batch's activations before the next forward
    return out


# Elements of one [rows, d_sae] encoder output (float32: 16 MB). The SAE encodes a batch in chunks
# of this size, so its transient memory is bounded whatever the batch size and dictionary width, and
# every chunk but a batch's last has the same shape (the allocator reuses the same blocks). Each chunk
# costs a fixed overhead in the statistics update: 2^21 measured 7% slower than no chunking, 2^22 2%.
_ENCODE_ELEMENTS = 2**22
_MIN_ENCODE_ROWS = 16


def _encode_rows(d_sae: int) -> int:
    return max(_MIN_ENCODE_ROWS, _ENCODE_ELEMENTS // max(d_sae, 1))


def _encode_into(
    stats: SiteStats, sae: Any, x: Tensor, prompt_index: Tensor, position: Tensor
) -> None:
    """Encode ``x`` with the SAE chunk by chunk and fold each chunk into ``stats``."""
    rows = _encode_rows(stats.latents.d_sae)
    for j in range(0, x.shape[0], rows):
        sl = slice(j, j + rows)
        xs = x[sl]
        z = encode_sparse(sae, xs)  # sparse for a TopK SAE: no scan for its few non-zeros
        stats.update(z, xs, prompt_index=prompt_index[sl], position=position[sl])


def _batch_plan(
    tokenized: Sequence[Any], selections: Sequence[Sequence[int]], batch_size: int
) -> list[list[int]]:
    """The global batch plan: prompt indices per batch, as :func:`capture` would batch them."""
    todo = [i for i, sel in enumerate(selections) if sel]
    batches = plan_batches([len(tokenized[i]) for i in todo], batch_size, sort_by_length=True)
    return [[todo[j] for j in b] for b in batches]


def _capture_pair(
    models: tuple[Any, Any],
    site: Site,
    tokenized: Sequence[Any],
    selections: Sequence[Sequence[int]],
    index: Sequence[int],
    padding_side: Literal["right", "left"],
) -> tuple[CaptureBatch, CaptureBatch]:
    """Both models' activations for one batch of the run (prompts ``index``, with global prompt
    indices). The batch is captured alone, with the same prompts in the same order and padding as
    in a whole-run stream, so its activations are the same."""
    opts: dict[str, Any] = {
        "positions": list(selections),  # (ranges stay ranges: no per-token checks again)
        "batch_size": len(index),
        "include_bos": True,  # the selections are final
        "padding_side": padding_side,
        "tokenized": tokenized,
        "progress": False,
    }
    glob = torch.as_tensor(index, dtype=torch.long)
    (bb,) = capture(models[0], tokenized, site, **opts)
    (bf,) = capture(models[1], tokenized, site, **opts)
    return (
        dataclasses.replace(bb, prompt_index=glob[bb.prompt_index]),
        dataclasses.replace(bf, prompt_index=glob[bf.prompt_index]),
    )


def _fold_pair(
    pair: tuple[CaptureBatch, CaptureBatch],
    sae: Any,
    site: Site,
    *,
    outlier_factor: float | None,
    sizes: tuple[int, int],
    track: bool,
) -> tuple[SiteStats, SiteStats, int]:
    """One batch of a diff: fresh statistics of both models and the number of outliers dropped."""
    bb, bf = pair
    if not (
        torch.equal(bb.prompt_index, bf.prompt_index) and torch.equal(bb.position, bf.position)
    ):
        raise RuntimeError("internal: base and fine-tuned batches selected different tokens")
    dev = sae.W_dec.device  # cached activations come from the CPU
    xb, xf = bb.acts[site].to(dev), bf.acts[site].to(dev)
    pi, pos = bb.prompt_index, bb.position
    n_out = 0
    if outlier_factor is not None:
        # a token that is an outlier in either model leaves both (the pairing stays);
        # a NaN norm is not an outlier: it stays, and the statistics flag it
        keep = ~((bb.norm_ratio[site] > outlier_factor) | (bf.norm_ratio[site] > outlier_factor))
        if not bool(keep.all()):
            n_out = int((~keep).sum())
            xb, xf = xb[keep.to(dev)], xf[keep.to(dev)]
            pi, pos = pi[keep], pos[keep]
    del bb, bf, pair
    part_b = SiteStats(*sizes, track_prompts=track)
    part_f = SiteStats(*sizes, track_prompts=track)
    if len(pi):
        _encode_into(part_b, sae, xb, pi, pos)
        _encode_into(part_f, sae, xf, pi, pos)
    return part_b, part_f, n_out


def _open_cache(
    folder: Any, fingerprint: dict[str, Any], n_tokens: int, dtype: Any, progress: bool
) -> tuple[Any, Any]:
    """``(reader, None)`` for a complete cache that matches, ``(None, writer)`` otherwise."""
    from .cache import MANIFEST, ActivationCache, CacheWriter, cache_size

    if not isinstance(folder, (str, Path)):
        raise ArgumentTypeError(
            f"cache must be a folder path (str or Path) or None, got {type(folder).__name__}"
        )
    expected = {k: fingerprint[k] for k in _CACHE_KEYS}
    if (Path(folder) / MANIFEST).exists():
        reader = ActivationCache(folder)
        reader.check(expected)
        return reader, None
    nbytes = cache_size(n_tokens, int(fingerprint["d_model"]), dtype)
    if progress:
        tqdm.write(
            f"modeldiff: writing an activation cache to {str(folder)!r}: {n_tokens} tokens x "
            f"{fingerprint['d_model']} x 2 models in {str(dtype).removeprefix('torch.')} = "
            f"{nbytes / 2**20:.1f} MiB"
        )
    manifest = {**expected, "dtype": str(dtype).removeprefix("torch."), "n_tokens": n_tokens}
    return None, CacheWriter(folder, {**manifest, "nbytes": nbytes})


def _check_checkpoint_options(checkpoint: Any, every: Any) -> int:
    if checkpoint is not None and not isinstance(checkpoint, (str, Path)):
        raise ArgumentTypeError(
            f"checkpoint must be a file path (str or Path) or None, got {type(checkpoint).__name__}"
        )
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ArgumentError(
            f"checkpoint_every must be a positive integer (batches between checkpoints), got {every!r}"
        )
    if checkpoint is not None and Path(checkpoint).is_dir():
        raise ArgumentError(f"checkpoint {str(checkpoint)!r} is a folder; pass a file path")
    return every


def _run_fingerprint(
    base: Any,
    finetuned: Any,
    sae: Any,
    site: Site,
    tokenized: Sequence[Any],
    selections: Sequence[Sequence[int]],
    plan: list[list[int]],
    outlier_factor: float | None,
    track: bool,
    padding_side: str,
) -> dict[str, Any]:
    """Everything that decides a diff's statistics, for refusing a checkpoint of another run."""
    from .checkpoint import hash_selection, model_fingerprint

    ab = adapter_for(base)
    return {
        "site": site.hook_name,
        "sae": sae_fingerprint(sae),
        "sae_dtype": str(sae.W_dec.dtype),
        "d_sae": int(sae.cfg.d_sae),
        "base_model": model_fingerprint(base),
        "finetuned_model": model_fingerprint(finetuned),
        "model_dtype": str(ab.dtype),
        "n_prompts": len(tokenized),
        "prompts_and_positions": hash_selection((t.ids for t in tokenized), selections),
        "batch_plan": hash_selection(plan, [[len(b)] for b in plan]),
        "n_batches": len(plan),
        "d_model": ab.d_model,
        "padding_side": padding_side,
        "outlier_factor": outlier_factor,
        "track_prompts": track,
    }


# What a cache of activations depends on (a subset of the run fingerprint: no SAE, no options).
_CACHE_KEYS = (
    "site",
    "base_model",
    "finetuned_model",
    "model_dtype",
    "d_model",
    "n_prompts",
    "prompts_and_positions",
    "batch_plan",
    "n_batches",
    "padding_side",
)


def diff_latents(
    base: Any,
    finetuned: Any,
    sae: Any,
    prompts: Sequence[Prompt],
    *,
    site: Site | str | None = None,
    positions: Positions = "prompt",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    padding_side: Literal["right", "left"] = "right",
    outlier_factor: float | None = 10.0,
    convert_sae: bool = False,
    rank_by: str = "delta",
    uncertainty: str | int | None = "all",
    test: TestName = "permutation",
    n_bootstrap: int = 1000,
    n_permutations: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    tokens: TokenSelection | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 50,
    cache: str | Path | None = None,
    distributed: bool = False,
) -> LatentDiff:
    """Rank SAE latents by how much their mean activation moved from ``base`` to ``finetuned``.

    Both models run on the same token ids (tokenized once, with the base's tokenizer and chat
    template), each forward stops right after ``site``, the SAE encodes the selected tokens, and
    float64 statistics accumulate batch by batch; no activations are kept.

    Args:
        base, finetuned: models from :func:`~modeldiff.load_model` (any adapter) of the same
            architecture and tokenizer.
        sae: an sae-lens SAE, a saved SAE folder or ``"release/sae_id"`` (see :func:`load_sae`).
        prompts: strings, chat message lists (chat template applied) or ``(prompt, response)``
            pairs.
        site: where to read (default: the SAE's own hook).
        positions: ``"prompt"`` (default, as the paper), ``"response"``, ``"all"``,
            ``"last_prompt"`` or explicit per-prompt selections.
        include_bos: keep BOS tokens (dropped by default: outlier activations).
        outlier_factor: drop tokens whose activation norm at the site exceeds this multiple of
            the median norm of their prompt's tokens, in either model (attention sinks: the
            first token of a SmolLM2 sequence without BOS has ~130x the median); the count is
            ``meta["n_outliers_dropped"]``. ``None`` keeps every token.
        convert_sae: use a copy of the SAE converted to the model's dtype/device instead of failing.
        rank_by: default ranking (:data:`RANKINGS`); ``LatentDiff.ranked_by`` switches later.
        uncertainty, test, n_bootstrap, n_permutations, confidence, seed: prompt-level CIs and
            p-values (see :meth:`LatentDiff.from_stats`).
        progress: show a progress bar.
        tokens: a :class:`~modeldiff.config.TokenSelection` instead of ``positions``,
            ``include_bos``, ``outlier_factor``, ``prepend_bos`` and ``truncate``; likewise
            ``uncertainty`` may be an :class:`~modeldiff.config.Uncertainty` standing for
            ``uncertainty``, ``test``, ``n_bootstrap``, ``n_permutations``, ``confidence``, ``seed``.
        checkpoint: a file to checkpoint the running statistics to every ``checkpoint_every``
            batches (and after the last). If it exists, the run resumes from it, to exactly the
            result of an uninterrupted run; a checkpoint of another run (models, SAE, prompts,
            positions, batch plan or options differ) is refused naming the difference. The file
            is kept after success: running again returns at once. See docs/scale.md.
        checkpoint_every: batches between checkpoints (a positive integer).
        cache: a folder for an activation cache (:mod:`modeldiff.cache`): written during this
            run if it holds no complete cache (its size is printed first), read instead of
            running the models if it holds one for the same models, prompts, positions and site
            (any SAE); a cache for another run is refused naming the difference.
        distributed: shard the batches over the ranks of ``torch.distributed`` (launch with
            ``torchrun``; :mod:`modeldiff.distributed`). Rank 0 returns the diff, bit-identical
            to a single-process run; every other rank returns ``None``.

    Raises:
        SAEError: SAE ``d_in`` ≠ ``d_model``, dtype/device mismatch, BatchTopK encoder.
        SiteError: the site is not in the model.
        ValueError: the models are not a base/fine-tune pair (vocabulary, architecture, sizes).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=3)
        >>> sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128))
        >>> d = diff_latents(base, tuned, sae, ["Hi", "Hello there"], site="blocks.1.hook_resid_post",
        ...                  positions="all", progress=False)
        >>> d.top(1)[0].rank, d.at_rank(-1).rank_from_bottom
        (1, -1)
    """
    flat = unpack(
        tokens,
        TokenSelection,
        {
            "positions": positions,
            "include_bos": include_bos,
            "outlier_factor": outlier_factor,
            "prepend_bos": prepend_bos,
            "truncate": truncate,
        },
    )
    positions, include_bos, outlier_factor = (
        flat["positions"],
        flat["include_bos"],
        flat["outlier_factor"],
    )
    prepend_bos, truncate = flat["prepend_bos"], flat["truncate"]
    if isinstance(uncertainty, Uncertainty):
        u = unpack(
            uncertainty,
            Uncertainty,
            {
                "test": test,
                "n_bootstrap": n_bootstrap,
                "n_permutations": n_permutations,
                "confidence": confidence,
                "seed": seed,
            },
            rename={"latents": "uncertainty"},
        )
        uncertainty, test, n_bootstrap = u["uncertainty"], u["test"], u["n_bootstrap"]
        n_permutations, confidence, seed = u["n_permutations"], u["confidence"], u["seed"]
    check_diff_options(
        rank_by=rank_by,
        uncertainty=uncertainty,
        test=test,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        confidence=confidence,
        seed=seed,
    )
    every = _check_checkpoint_options(checkpoint, checkpoint_every)
    rank = 0
    if distributed:
        from .distributed import gather_batches, init_from_env

        if checkpoint is not None:
            raise ArgumentError(
                "checkpoint= does not combine with distributed=True yet; run distributed without a "
                "checkpoint, or checkpoint a single-process run"
            )
        rank, _ = init_from_env()
    sae, site = _prepare(base, finetuned, sae, site, convert_sae)
    tokenized = tokenize_prompts(base, prompts, prepend_bos=prepend_bos, truncate=truncate)
    d_sae, d_model = int(sae.cfg.d_sae), adapter_for(base).d_model
    # Per-prompt sums exist only for the paired analysis; without it memory stays O(d_sae).
    track = uncertainty is not None
    selections = select_positions(tokenized, positions, include_bos=include_bos)
    plan = _batch_plan(tokenized, selections, batch_size)
    warn_shared_prefix(tokenized, positions, include_bos=include_bos)

    fingerprint: dict[str, Any] = {}
    reader = writer = None
    if checkpoint is not None or cache is not None:
        fingerprint = _run_fingerprint(
            base,
            finetuned,
            sae,
            site,
            tokenized,
            selections,
            plan,
            outlier_factor,
            track,
            padding_side,
        )
    if cache is not None:
        n_tokens = sum(len(sel) for sel in selections)
        reader, writer = _open_cache(
            cache, fingerprint, n_tokens, adapter_for(base).dtype, progress
        )

    def run_batch(k: int) -> tuple[SiteStats, SiteStats, int]:
        if reader is not None:
            pair = (reader.batch("base", k), reader.batch("finetuned", k))
        else:
            pair = _capture_pair(
                (base, finetuned),
                site,
                [tokenized[i] for i in plan[k]],
                [selections[i] for i in plan[k]],
                plan[k],
                padding_side,
            )
            if writer is not None:
                writer.write("base", k, pair[0], site)
                writer.write("finetuned", k, pair[1], site)
        return _fold_pair(
            pair, sae, site, outlier_factor=outlier_factor, sizes=(d_sae, d_model), track=track
        )

    # Every path (plain, resumed, distributed) folds the same per-batch partial statistics into the
    # running ones in the same global batch order, so all of them do the same float arithmetic and
    # agree bit for bit.
    stats_b = SiteStats(d_sae, d_model, track_prompts=track)
    stats_f = SiteStats(d_sae, d_model, track_prompts=track)
    n_outliers, start = 0, 0
    if checkpoint is not None:
        from .checkpoint import load_checkpoint, save_checkpoint

        if Path(checkpoint).exists():
            saved, counters = load_checkpoint(checkpoint, fingerprint)
            stats_b, stats_f = saved["base"], saved["finetuned"]
            start, n_outliers = counters["next_batch"], counters["n_outliers"]
    # the bar counts selected tokens (each read by both models), not batches
    batch_tokens = [sum(len(selections[i]) for i in batch) for batch in plan]
    with (
        torch.inference_mode(),
        tqdm(
            total=sum(batch_tokens),
            initial=sum(batch_tokens[:start]),
            desc="diff_latents",
            unit="tok",
            unit_scale=True,
            disable=not progress or rank != 0,
        ) as bar,
    ):
        if distributed:
            folded = iter(batch_tokens)  # rank 0 folds the batches in global order
            n_outliers = gather_batches(
                len(plan),
                run_batch,
                (stats_b, stats_f),
                on_batch=lambda: bar.update(next(folded, 0)),
            )
            if n_outliers is None:  # not rank 0: its statistics went to rank 0
                return None  # type: ignore[return-value]
        for k in range(start, 0 if distributed else len(plan)):
            part_b, part_f, dropped = run_batch(k)
            stats_b.merge(part_b)
            stats_f.merge(part_f)
            n_outliers += dropped
            del part_b, part_f
            bar.update(batch_tokens[k])
            if checkpoint is not None and ((k + 1) % every == 0 or k + 1 == len(plan)):
                save_checkpoint(
                    checkpoint,
                    fingerprint,
                    {"base": stats_b, "finetuned": stats_f},
                    {"next_batch": k + 1, "n_outliers": n_outliers},
                )
    if writer is not None:
        writer.finish()
    if stats_b.latents.count == 0 and n_outliers:
        raise ArgumentError(
            f"every selected token ({n_outliers}) was dropped as an outlier (norm above "
            f"{outlier_factor}x its prompt's median); pass a larger outlier_factor, or None to "
            "keep them"
        )
    meta = {
        "positions": positions if isinstance(positions, str) else "explicit",
        "include_bos": include_bos,
        "outlier_factor": outlier_factor,
        "n_outliers_dropped": n_outliers,
        "n_prompts": len(tokenized),
        "base_model": adapter_for(base).model_name,
        "finetuned_model": adapter_for(finetuned).model_name,
    }
    return LatentDiff.from_stats(
        stats_b,
        stats_f,
        site=site,
        sae=sae,
        rank_by=rank_by,
        uncertainty=uncertainty,
        test=test,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        confidence=confidence,
        seed=seed,
        meta=meta,
    )


# -- residual-level diff ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ResidualDiff:
    """Mean residual difference (fine-tuned − base) per site, from :func:`diff_residuals`.

    ``delta[site]`` is the mean difference vector, ``norm[site]`` its L2 norm, ``relative[site]``
    that norm divided by the base's mean residual norm at the site (comparable across layers).

    Example:
        >>> import torch
        >>> r = ResidualDiff(delta={Site.resid_post(0): torch.tensor([3.0, 4.0])},
        ...                  norm={Site.resid_post(0): 5.0}, relative={Site.resid_post(0): 0.5},
        ...                  n_tokens=2)
        >>> r.best_site()
        Site.resid_post(0)
    """

    delta: dict[Site, Tensor]
    norm: dict[Site, float]
    relative: dict[Site, float]
    n_tokens: int

    def best_site(self, rule: str = "jump") -> Site:
        """The site to diff at, by ``rule``.

        ``"jump"`` (default): where the relative shift grows most over the site before it, i.e.
        the layer that adds the most of the fine-tune's change to the stream. The shift a layer
        adds is carried by every later layer, so the relative shift mostly grows with depth and its
        maximum sits at (or near) the last layer whatever the fine-tune did; the jump says where the
        change enters. ``"relative"``: the largest relative shift (the old rule). ``"norm"``: the
        largest absolute shift (not comparable across layers whose residual norms differ).
        """
        if rule == "jump":
            sites = sorted(self.relative)
            prev = [0.0, *(self.relative[s] for s in sites[:-1])]
            jumps = {s: self.relative[s] - p for s, p in zip(sites, prev)}
            return max(jumps, key=lambda s: jumps[s])
        if rule not in ("relative", "norm"):
            raise ArgumentError(f"unknown rule {rule!r}; use 'jump', 'relative' or 'norm'")
        table = self.relative if rule == "relative" else self.norm
        return max(table, key=lambda s: table[s])

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per site, in execution order."""
        return [
            {
                "site": s.hook_name,
                "layer": s.layer,
                "norm": self.norm[s],
                "relative": self.relative[s],
            }
            for s in sorted(self.delta)
        ]

    def plot(self) -> Any:
        """A plotly bar chart of the relative shift per site."""
        import plotly.graph_objects as go

        from .views import as_figure

        recs = self.to_records()
        fig = go.Figure(go.Bar(x=[r["site"] for r in recs], y=[r["relative"] for r in recs]))
        fig.update_layout(
            title="Mean residual shift (fine-tuned − base) relative to the base's residual norm",
            xaxis_title="site",
            yaxis_title="relative shift",
        )
        return as_figure(fig)

    def _repr_html_(self) -> str:
        from .views import residual_diff_html

        return residual_diff_html(self)


def diff_residuals(
    base: Any,
    finetuned: Any,
    prompts: Sequence[Prompt],
    *,
    layers: Sequence[int] | None = None,
    kind: str = "resid_post",
    positions: Positions = "prompt",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    distributed: bool = False,
    progress: bool = True,
) -> ResidualDiff:
    """Mean residual difference vector (fine-tuned − base) and its norm at each layer.

    One pass per model over all requested layers (the forward stops after the deepest one). Use it
    to choose where to put an SAE: the layer with the largest relative shift. Batches are folded
    in one global order, so ``distributed=True`` under ``torchrun`` (batches sharded over ranks,
    as in :func:`diff_latents`; rank 0 returns the result, the others ``None``) equals a
    single-process run bit for bit.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> r = diff_residuals(m, m, ["Hello world"], progress=False)
        >>> sorted(r.norm.values())
        [0.0, 0.0]
    """
    _check_pair(base, finetuned)
    rank = 0
    if distributed:
        from .distributed import gather_states, init_from_env

        rank, _ = init_from_env()
    layer_list = list(range(adapter_for(base).n_layers)) if layers is None else list(layers)
    sites = as_sites([Site(int(layer), kind) for layer in layer_list])  # type: ignore[arg-type]
    for s in sites:
        s.validate(base)
    tokenized = tokenize_prompts(base, prompts, prepend_bos=prepend_bos, truncate=truncate)
    selections = select_positions(tokenized, positions, include_bos=include_bos)
    plan = _batch_plan(tokenized, selections, batch_size)
    d_model = adapter_for(base).d_model
    names = ("base", "finetuned")
    acc = {name: {s: VectorStats(d_model) for s in sites} for name in names}

    def run_batch(k: int) -> dict[str, Tensor]:
        """Batch ``k``'s fresh statistics of both models at every site, as one flat state."""
        idx = plan[k]
        state: dict[str, Tensor] = {}
        for name, model in zip(names, (base, finetuned), strict=True):
            (b,) = capture(
                model,
                [tokenized[i] for i in idx],
                sites,
                positions=[list(selections[i]) for i in idx],
                batch_size=len(idx),
                include_bos=True,  # the selections are final
                tokenized=[tokenized[i] for i in idx],
                progress=False,
            )
            for j, s in enumerate(sites):
                part = VectorStats(d_model)
                part.update(b.acts[s])
                state.update({f"{name}.{j}.{key}": t for key, t in part.state_dict().items()})
            del b
        return state

    def fold(state: dict[str, Tensor]) -> None:
        for name in names:
            for j, s in enumerate(sites):
                prefix = f"{name}.{j}."
                sub = {key[len(prefix) :]: t for key, t in state.items() if key.startswith(prefix)}
                acc[name][s].merge(VectorStats.from_state_dict(sub))

    batch_tokens = [sum(len(selections[i]) for i in batch) for batch in plan]
    with (
        torch.inference_mode(),
        tqdm(
            total=sum(batch_tokens),
            desc="diff_residuals",
            unit="tok",
            unit_scale=True,
            disable=not progress or rank != 0,
        ) as bar,
    ):
        if distributed:
            blank = VectorStats(d_model).state_dict()
            template = {
                f"{name}.{j}.{key}": t
                for name in names
                for j in range(len(sites))
                for key, t in blank.items()
            }
            folded = iter(batch_tokens)

            def fold_and_count(state: dict[str, Tensor]) -> None:
                fold(state)
                bar.update(next(folded, 0))

            if not gather_states(len(plan), run_batch, template, fold_and_count):
                return None  # type: ignore[return-value]  # not rank 0
        else:
            for k in range(len(plan)):
                fold(run_batch(k))
                bar.update(batch_tokens[k])
    delta, norm, rel = {}, {}, {}
    for s in sites:
        d = acc["finetuned"][s].mean - acc["base"][s].mean
        delta[s] = d
        norm[s] = float(d.norm())
        base_norm = acc["base"][s].mean_norm
        rel[s] = norm[s] / base_norm if base_norm > 0 else 0.0
    return ResidualDiff(delta=delta, norm=norm, relative=rel, n_tokens=acc["base"][sites[0]].count)
