"""Latents across many models: track them over checkpoints, and detect misaligned fine-tunes.

* :func:`track_latents` follows the chosen latents' mean activation (and its shift from a reference)
  over a list of checkpoints: training steps, bad-data fractions, anything ordered. Checkpoints are
  paths (loaded one at a time and dropped), callables returning a model, or models; only the
  statistics of the reference are kept, so at most one loaded checkpoint sits in memory.
* :func:`detect` asks whether a latent's (or a set's) shift separates misaligned from aligned
  fine-tunes of one base: AUROC over models with a bootstrap CI, the best threshold, per-model
  scores, and two baselines without an SAE (the raw residual drift and a mean-difference
  direction). When the latents are selected here they are selected on one split of the prompts and
  scored on the other, and a leave-one-model-out AUROC is reported beside it (the paper's perfect
  separation was measured on the prompts used for selection).
* :func:`detect_responses` scores single answers: the set's activation on each response against
  its label.

Scores of a set ``S`` with weights ``w``: ``Σ_i w_i x_i / Σ_i |w_i|``, with ``x`` the latents' shifts
(or activations), so a set of rises and falls counts both in the direction the weights give.

Example:
    >>> auroc([0.9, 0.8, 0.1, 0.3], [True, True, False, False])
    1.0
"""

from __future__ import annotations

import gc
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ._io import atomic_path, read_json, write_json_atomic
from .errors import ArgumentError, FileFormatError, reading
from .latent_sets import LatentSet
from .saes import sae_d_sae, sae_fingerprint
from .sites import Site

__all__ = [
    "DetectionResult",
    "LatentTrack",
    "auroc",
    "detect",
    "detect_responses",
    "track_latents",
]


# ------------------------------------------------------------------------------------------------
# shared pieces
# ------------------------------------------------------------------------------------------------


def auroc(scores: Sequence[float] | Tensor, labels: Sequence[bool] | Tensor) -> float:
    """Area under the ROC curve: P(a random positive scores above a random negative), ties ½.

    Example:
        >>> auroc([1.0, 1.0, 0.0], [True, False, False])
        0.75
    """
    s = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    y = torch.as_tensor(labels, dtype=torch.bool).reshape(-1)
    if s.shape != y.shape:
        raise ArgumentError(f"{s.numel()} scores for {y.numel()} labels; give one label per score")
    pos, neg = s[y], s[~y]
    if pos.numel() == 0 or neg.numel() == 0:
        raise ArgumentError(
            "AUROC needs both kinds: at least one misaligned (True) and one aligned (False) label"
        )
    # mid-ranks (ties share their average rank): the Mann-Whitney U statistic
    order = torch.argsort(s, stable=True)
    sorted_s = s[order]
    ranks = torch.empty_like(s)
    ranks[order] = torch.arange(1, s.numel() + 1, dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    n_p, n_n = pos.numel(), neg.numel()
    u = float(ranks[y].sum()) - n_p * (n_p + 1) / 2
    return u / (n_p * n_n)


def _bootstrap_auroc(
    scores: Tensor, labels: Tensor, n_bootstrap: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile CI of the AUROC, resampling positives and negatives separately (stratified)."""
    if n_bootstrap <= 0:
        return (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    pos, neg = scores[labels], scores[~labels]
    vals = []
    for _ in range(n_bootstrap):
        p = pos[torch.randint(len(pos), (len(pos),), generator=g)]
        n = neg[torch.randint(len(neg), (len(neg),), generator=g)]
        vals.append(
            (p[:, None] > n[None, :]).double().mean()
            + 0.5 * (p[:, None] == n[None, :]).double().mean()
        )
    v = torch.stack(vals)
    a = (1 - confidence) / 2
    return float(torch.quantile(v, a)), float(torch.quantile(v, 1 - a))


def _best_threshold(scores: Tensor, labels: Tensor) -> tuple[float, float]:
    """The threshold maximising Youden's J (TPR − FPR) for "score ≥ t means misaligned"; and J."""
    best_t, best_j = math.nan, -math.inf
    cand = torch.unique(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    for t in cand.tolist():
        pred = scores >= t
        tpr = float((pred & labels).sum()) / n_pos
        fpr = float((pred & ~labels).sum()) / n_neg
        if tpr - fpr > best_j + 1e-12:
            best_t, best_j = t, tpr - fpr
    return best_t, best_j


def _set_of(sae: Any, latents: Any) -> LatentSet:
    if isinstance(latents, LatentSet):
        if latents.sae is not sae:
            raise ArgumentError("the LatentSet belongs to another SAE; build it on the SAE passed")
        return latents
    return LatentSet(sae, latents)


def _set_score(values: Tensor, weights: Sequence[float]) -> Tensor:
    """``Σ_i w_i v[..., i] / Σ_i |w_i|``."""
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    return values.double() @ w / w.abs().sum().clamp_min(1e-300)


def _materialise(item: Any, load_kwargs: Mapping[str, Any]) -> tuple[Any, bool]:
    """A checkpoint as a model, and whether we loaded it (then we drop it after use)."""
    from .models import load_model

    if isinstance(item, (str, Path)):
        return load_model(item, **dict(load_kwargs)), True
    if callable(item) and not isinstance(item, torch.nn.Module):
        return item(), True
    return item, False


def _label_of(item: Any, i: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).name or str(item)
    name = getattr(getattr(item, "cfg", None), "model_name", None)
    return f"{i}" if not name else f"{i}: {name}"


class _Prompts:
    """Per-prompt latent sums and token counts of one model, plus its mean residual."""

    def __init__(
        self,
        model: Any,
        sae: Any,
        prompts: Sequence[Any],
        latents: Sequence[int] | None,
        *,
        site: Site,
        positions: Any,
        batch_size: int,
        tokenizer_model: Any,
        progress: bool,
        outlier_factor: float | None = None,
    ) -> None:
        from .diff import collect_site_stats

        st = collect_site_stats(
            model,
            sae,
            prompts,
            site=site,
            positions=positions,
            batch_size=batch_size,
            tokenizer_model=tokenizer_model,
            outlier_factor=outlier_factor,
            progress=progress,
        )
        idx = torch.arange(sae_d_sae(sae)) if latents is None else torch.tensor(list(latents))
        self.sums = st.latents.prompt_sums(idx, n_prompts=len(prompts))
        counts = torch.zeros(len(prompts), dtype=torch.int64)
        pc = st.latents.prompt_count
        counts[: len(pc)] = pc[: len(prompts)]
        self.counts = counts
        self.resid_mean = st.resid.mean.double().cpu()

    def mean(self) -> Tensor:
        return self.sums.sum(0) / max(int(self.counts.sum()), 1)


# ------------------------------------------------------------------------------------------------
# track_latents
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LatentTrack:
    """Latents' mean activations over checkpoints, and their shift from the reference.

    ``mean``, ``delta``, ``ci_low`` and ``ci_high`` are ``[checkpoints, latents]``; ``delta`` is
    the token-weighted mean shift from the reference on the same prompts and its CI a paired
    bootstrap over prompts. ``set_delta`` is the set's score (``Σ w_i Δ_i / Σ |w_i|``) per
    checkpoint.

    Example:
        >>> import torch
        >>> t = LatentTrack(["step 0", "step 1"], [0.0, 1.0], (3,), torch.tensor([[1.0], [2.0]]),
        ...                 torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.8]]),
        ...                 torch.tensor([[0.0], [1.2]]), "step 0", "blocks.0.hook_resid_post")
        >>> t.delta_of(3).tolist()
        [0.0, 1.0]
    """

    labels: list[str]
    x: list[float]
    latents: tuple[int, ...]
    mean: Float[Tensor, "n_checkpoints k"]
    delta: Float[Tensor, "n_checkpoints k"]
    ci_low: Float[Tensor, "n_checkpoints k"]
    ci_high: Float[Tensor, "n_checkpoints k"]
    reference: str
    site: str
    weights: tuple[float, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def _col(self, latent: int) -> int:
        if latent not in self.latents:
            raise ArgumentError(f"latent {latent} was not tracked; tracked: {list(self.latents)}")
        return self.latents.index(latent)

    def delta_of(self, latent: int) -> Float[Tensor, " n_checkpoints"]:
        """One latent's shift from the reference at every checkpoint."""
        return self.delta[:, self._col(latent)].clone()

    @property
    def set_delta(self) -> Float[Tensor, " n_checkpoints"]:
        """The tracked set's score per checkpoint (weights as given, default 1 each)."""
        w = self.weights or tuple(1.0 for _ in self.latents)
        return _set_score(self.delta, w).float()

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per (checkpoint, latent)."""
        return [
            {
                "checkpoint": lab,
                "x": x,
                "latent": lat,
                "mean": float(self.mean[i, j]),
                "delta": float(self.delta[i, j]),
                "ci_low": float(self.ci_low[i, j]),
                "ci_high": float(self.ci_high[i, j]),
            }
            for i, (lab, x) in enumerate(zip(self.labels, self.x, strict=True))
            for j, lat in enumerate(self.latents)
        ]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (the tables) and ``<path>.json`` (labels, meta), atomically."""
        from safetensors.torch import save_file

        base = Path(path)
        tensors = {
            "mean": self.mean.contiguous(),
            "delta": self.delta.contiguous(),
            "ci_low": self.ci_low.contiguous(),
            "ci_high": self.ci_high.contiguous(),
        }
        with atomic_path(base.with_suffix(".safetensors")) as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(
            base.with_suffix(".json"),
            {
                "format": "modeldiff.LatentTrack",
                "version": 1,
                "labels": self.labels,
                "x": self.x,
                "latents": list(self.latents),
                "weights": list(self.weights),
                "reference": self.reference,
                "site": self.site,
                "meta": self.meta,
            },
        )
        return base.with_suffix(".json")

    @classmethod
    def load(cls, path: str | Path) -> LatentTrack:
        """Read what :meth:`save` wrote (give either file's path, or the stem)."""
        from safetensors.torch import load_file

        base = Path(path)
        meta_path, table_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
        d = read_json(meta_path, "a saved LatentTrack")
        if d.get("format") != "modeldiff.LatentTrack":
            raise FileFormatError(f"{str(meta_path)!r} is not a saved LatentTrack")
        with reading(table_path, "a saved LatentTrack's tables"):
            t = load_file(str(table_path))
        return cls(
            list(d["labels"]),
            [float(x) for x in d["x"]],
            tuple(int(i) for i in d["latents"]),
            t["mean"],
            t["delta"],
            t["ci_low"],
            t["ci_high"],
            str(d["reference"]),
            str(d["site"]),
            tuple(float(w) for w in d.get("weights", [])),
            dict(d.get("meta") or {}),
        )

    def __repr__(self) -> str:
        return (
            f"LatentTrack({len(self.latents)} latents over {len(self.labels)} checkpoints at "
            f"{self.site}, shift from {self.reference!r})"
        )

    def _repr_html_(self) -> str:
        head = "".join(f"<th>latent {lat} Δ</th>" for lat in self.latents)
        body = "".join(
            f"<tr><td>{html.escape(lab)}</td>"
            + "".join(
                f"<td>{float(self.delta[i, j]):+.3f} [{float(self.ci_low[i, j]):+.3f}, "
                f"{float(self.ci_high[i, j]):+.3f}]</td>"
                for j in range(len(self.latents))
            )
            + "</tr>"
            for i, lab in enumerate(self.labels)
        )
        return (
            f"<p>latent shifts from {html.escape(self.reference)} at {html.escape(self.site)} "
            f"(95% CI over prompts)</p><table><tr><th>checkpoint</th>{head}</tr>{body}</table>"
        )

    def plot(self, *, title: str | None = None) -> Any:
        """One line per latent: its shift at each checkpoint, with the CI as a band (plotly)."""
        import plotly.graph_objects as go

        from .views import as_figure

        fig = go.Figure()
        for j, lat in enumerate(self.latents):
            fig.add_trace(
                go.Scatter(
                    x=self.x,
                    y=self.delta[:, j].tolist(),
                    error_y={
                        "type": "data",
                        "symmetric": False,
                        "array": (self.ci_high[:, j] - self.delta[:, j]).tolist(),
                        "arrayminus": (self.delta[:, j] - self.ci_low[:, j]).tolist(),
                    },
                    mode="lines+markers",
                    name=f"latent {lat}",
                    text=self.labels,
                    hovertemplate="%{text}: Δ %{y:+.3f}<extra>latent " + str(lat) + "</extra>",
                )
            )
        fig.update_layout(
            title=title or f"Latent shifts over checkpoints ({self.site})",
            xaxis_title=self.meta.get("x_title", "checkpoint"),
            yaxis_title=f"mean activation − {self.reference}",
        )
        return as_figure(fig)


def track_latents(
    checkpoints: Sequence[Any],
    sae: Any,
    prompts: Sequence[Any],
    latents: Any,
    *,
    reference: Any = None,
    labels: Sequence[str] | None = None,
    x: Sequence[float] | None = None,
    x_title: str = "checkpoint",
    site: Site | str | None = None,
    positions: Any = "prompt",
    batch_size: int = 8,
    outlier_factor: float | None = 10.0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    load_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> LatentTrack:
    """Follow ``latents`` of ``sae`` over ``checkpoints`` on the same prompts.

    Each checkpoint is a path (``load_model(path, **load_kwargs)``, dropped after use), a callable
    returning a model (dropped after use too), or a model object. ``reference`` (default: the first
    checkpoint) is the model shifts are measured from; its statistics are computed once and only
    they are kept, so at most one loaded checkpoint is in memory at a time. Every checkpoint must
    tokenize the prompts like the reference (the paired CIs compare the same tokens).

    Args:
        latents: latent indices or a :class:`~modeldiff.latent_sets.LatentSet` (its weights give
            :attr:`LatentTrack.set_delta`).
        x: a number per checkpoint for the plot's axis (training step, bad-data fraction);
            default 0, 1, 2, ...
        outlier_factor: drop tokens whose activation norm exceeds that many times their
            prompt's median (attention sinks), as ``diff_latents`` does; ``None`` keeps all.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> ckpts = [tiny_hooked_transformer(seed=s) for s in (0, 1)]
        >>> t = track_latents(ckpts, StandardSAE(cfg), ["Hello there", "A fox"], [2, 5],
        ...                   n_bootstrap=50, progress=False)
        >>> t.delta.shape, float(t.delta[0].abs().max())
        (torch.Size([2, 2]), 0.0)
    """
    from tqdm.auto import tqdm

    from .uncertainty import paired_uncertainty

    if not checkpoints:
        raise ArgumentError("checkpoints is empty; pass at least one checkpoint (path or model)")
    lset = _set_of(sae, latents)
    if not len(lset):
        raise ArgumentError("no latents to track; pass at least one latent index")
    if labels is not None and len(labels) != len(checkpoints):
        raise ArgumentError(f"{len(labels)} labels for {len(checkpoints)} checkpoints")
    if x is not None and len(x) != len(checkpoints):
        raise ArgumentError(f"{len(x)} x values for {len(checkpoints)} checkpoints")
    if not prompts:
        raise ArgumentError("prompts is empty; pass the prompts to measure the latents on")
    site_ = Site.parse(site) if site is not None else (lset.site or Site.from_sae(sae))
    load_kwargs = dict(load_kwargs or {})
    names = (
        list(labels) if labels is not None else [_label_of(c, i) for i, c in enumerate(checkpoints)]
    )
    xs = [float(v) for v in x] if x is not None else [float(i) for i in range(len(checkpoints))]
    opts = {
        "site": site_,
        "positions": positions,
        "batch_size": batch_size,
        "progress": False,
        "outlier_factor": outlier_factor,
    }

    ref_model, ref_loaded = _materialise(
        reference if reference is not None else checkpoints[0], load_kwargs
    )
    ref = _Prompts(ref_model, sae, prompts, lset.latents, tokenizer_model=ref_model, **opts)
    if ref_loaded:  # only its statistics are needed from here on
        del ref_model
        gc.collect()
    ref_name = "reference" if reference is not None else names[0]
    ref_first = reference is None
    means, deltas, lows, highs = [], [], [], []
    bar = tqdm(total=len(checkpoints), desc="track_latents", disable=not progress)
    try:
        for i, item in enumerate(checkpoints):
            if i == 0 and ref_first:
                cur = ref
            else:
                model, loaded = _materialise(item, load_kwargs)
                try:
                    cur = _Prompts(model, sae, prompts, lset.latents, tokenizer_model=model, **opts)
                finally:
                    if loaded:
                        del model
                        gc.collect()
                if not torch.equal(cur.counts, ref.counts):
                    raise ArgumentError(
                        f"checkpoint {names[i]!r} selects other tokens than the reference on the "
                        "same prompts (another tokenizer or chat template, or other outlier "
                        "tokens dropped); track checkpoints of one model family with one "
                        "tokenizer, or pass outlier_factor=None"
                    )
            d_sums = cur.sums - ref.sums
            total = max(int(ref.counts.sum()), 1)
            delta = d_sums.sum(0) / total
            if n_bootstrap > 0 and bool((d_sums != 0).any()):
                pr = paired_uncertainty(
                    d_sums,
                    ref.counts,
                    n_bootstrap=n_bootstrap,
                    confidence=confidence,
                    seed=seed,
                    n_permutations=1,
                )
                lo, hi = pr.ci_low.double(), pr.ci_high.double()
            else:
                lo = hi = delta.clone()
            means.append(cur.mean())
            deltas.append(delta)
            lows.append(lo)
            highs.append(hi)
            bar.update()
    finally:
        bar.close()
    return LatentTrack(
        names,
        xs,
        tuple(lset.latents),
        torch.stack(means).float(),
        torch.stack(deltas).float(),
        torch.stack(lows).float(),
        torch.stack(highs).float(),
        ref_name,
        site_.hook_name,
        tuple(lset.weights),
        {
            "x_title": x_title,
            "positions": positions if isinstance(positions, str) else "explicit",
            "n_prompts": len(prompts),
            "sae_fingerprint": sae_fingerprint(sae),
            "confidence": confidence,
        },
    )


# ------------------------------------------------------------------------------------------------
# detection
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Separation:
    """How well one score separates misaligned (True) from aligned (False) items."""

    name: str
    scores: dict[str, float]
    labels: dict[str, bool]
    auroc: float
    ci_low: float
    ci_high: float
    threshold: float
    youden_j: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scores": self.scores,
            "labels": self.labels,
            "auroc": self.auroc,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "threshold": self.threshold,
            "youden_j": self.youden_j,
        }


def _separation(
    name: str,
    keys: Sequence[str],
    scores: Tensor,
    labels: Tensor,
    n_bootstrap: int,
    confidence: float,
    seed: int,
) -> Separation:
    a = auroc(scores, labels)
    lo, hi = _bootstrap_auroc(scores.double(), labels, n_bootstrap, confidence, seed)
    t, j = _best_threshold(scores.double(), labels)
    return Separation(
        name,
        {k: float(s) for k, s in zip(keys, scores.tolist(), strict=True)},
        {k: bool(y) for k, y in zip(keys, labels.tolist(), strict=True)},
        a,
        lo,
        hi,
        t,
        j,
    )


@dataclass(frozen=True)
class DetectionResult:
    """Whether the latents separate misaligned from aligned items, beside the baselines.

    ``main`` is the latent set's separation; ``baselines`` maps a name to its separation (for
    :func:`detect`: ``"residual drift"`` and ``"mean-difference direction"``).
    ``auroc_leave_one_out`` is the AUROC when each model's score comes from latents selected
    without that model (NaN when the latents were given).

    Example:
        >>> s = Separation("set", {"a": 1.0, "b": 0.0}, {"a": True, "b": False}, 1.0, 1.0, 1.0, 1.0, 1.0)
        >>> DetectionResult(s, {}, (3, 4), (0.5, -0.2), "blocks.0.hook_resid_post").auroc
        1.0
    """

    main: Separation
    baselines: dict[str, Separation]
    latents: tuple[int, ...]
    weights: tuple[float, ...]
    site: str
    auroc_leave_one_out: float = math.nan
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def auroc(self) -> float:
        """The latent set's AUROC on the evaluation prompts."""
        return self.main.auroc

    @property
    def scores(self) -> dict[str, float]:
        """Per-item score of the latent set."""
        return dict(self.main.scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "modeldiff.DetectionResult",
            "version": 1,
            "main": self.main.as_dict(),
            "baselines": {k: v.as_dict() for k, v in self.baselines.items()},
            "latents": list(self.latents),
            "weights": list(self.weights),
            "site": self.site,
            "auroc_leave_one_out": None
            if math.isnan(self.auroc_leave_one_out)
            else self.auroc_leave_one_out,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DetectionResult:
        if d.get("format") != "modeldiff.DetectionResult":
            raise FileFormatError("not a saved DetectionResult; load files written by its save()")

        def sep(x: Mapping[str, Any]) -> Separation:
            return Separation(**{**x, "scores": dict(x["scores"]), "labels": dict(x["labels"])})

        lomo = d.get("auroc_leave_one_out")
        return cls(
            sep(d["main"]),
            {k: sep(v) for k, v in d["baselines"].items()},
            tuple(int(i) for i in d["latents"]),
            tuple(float(w) for w in d["weights"]),
            str(d["site"]),
            math.nan if lomo is None else float(lomo),
            dict(d.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DetectionResult:
        """Read what :meth:`save` wrote."""
        return cls.from_dict(read_json(path, "a saved DetectionResult"))

    def __repr__(self) -> str:
        base = ", ".join(f"{k} {v.auroc:.2f}" for k, v in self.baselines.items())
        return (
            f"DetectionResult(AUROC {self.main.auroc:.2f} [{self.main.ci_low:.2f}, "
            f"{self.main.ci_high:.2f}] with latents {list(self.latents)}"
            + (f"; baselines: {base}" if base else "")
            + ")"
        )

    def _repr_html_(self) -> str:
        def line(s: Separation) -> str:
            return (
                f"<tr><td>{html.escape(s.name)}</td><td>{s.auroc:.3f}</td>"
                f"<td>[{s.ci_low:.3f}, {s.ci_high:.3f}]</td><td>{s.threshold:.4g}</td></tr>"
            )

        table = "".join(line(s) for s in [self.main, *self.baselines.values()])
        items = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{'misaligned' if self.main.labels[k] else 'aligned'}"
            f"</td><td>{v:+.4f}</td></tr>"
            for k, v in self.main.scores.items()
        )
        lomo = (
            ""
            if math.isnan(self.auroc_leave_one_out)
            else f"; leave-one-model-out AUROC {self.auroc_leave_one_out:.3f}"
        )
        return (
            f"<p>detection at {html.escape(self.site)} with latents "
            f"{html.escape(str(list(self.latents)))}{lomo}</p><table><tr><th>score</th><th>AUROC"
            f"</th><th>CI</th><th>best threshold</th></tr>{table}</table><table><tr><th>item</th>"
            f"<th>label</th><th>score</th></tr>{items}</table>"
        )

    def plot(self, *, title: str | None = None) -> Any:
        """Per-item scores by label, the best threshold as a line (plotly)."""
        import plotly.graph_objects as go

        from .views import as_figure

        fig = go.Figure()
        for flag, name in ((True, "misaligned"), (False, "aligned")):
            keys = [k for k, y in self.main.labels.items() if y is flag]
            fig.add_trace(
                go.Box(
                    y=[self.main.scores[k] for k in keys],
                    name=name,
                    boxpoints="all",
                    text=keys,
                    hovertemplate="%{text}: %{y:+.4f}<extra></extra>",
                )
            )
        if math.isfinite(self.main.threshold):
            fig.add_hline(y=self.main.threshold, line_dash="dash", annotation_text="threshold")
        fig.update_layout(
            title=title or f"Latent-set score by label (AUROC {self.main.auroc:.2f})",
            xaxis_title="label",
            yaxis_title="set score",
            showlegend=False,
        )
        return as_figure(fig)


def _as_labelled(models: Any) -> list[tuple[str, Any, bool]]:
    items: list[tuple[str, Any, bool]] = []
    if isinstance(models, Mapping):
        for name, pair in models.items():
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ArgumentError(
                    f"models[{name!r}] must be a (model_or_path, misaligned: bool) pair"
                )
            items.append((str(name), pair[0], pair[1]))
    else:
        for i, pair in enumerate(models):
            if not (isinstance(pair, tuple) and len(pair) == 2):
                raise ArgumentError(
                    "models is a list of (model_or_path, misaligned: bool) pairs, or a dict "
                    "name -> pair"
                )
            items.append((_label_of(pair[0], i), pair[0], pair[1]))
    for name, _, y in items:
        if not isinstance(y, bool):
            raise ArgumentError(
                f"the label of {name!r} must be True (misaligned) or False, got {y!r}"
            )
    if len({n for n, _, _ in items}) != len(items):
        raise ArgumentError("two models share a name; give each a distinct name (pass a dict)")
    if not any(y for *_, y in items) or all(y for *_, y in items):
        raise ArgumentError(
            "detection needs both kinds: at least one misaligned (True) and one aligned (False) model"
        )
    return items


def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = round(n * fraction)
    return sorted(perm[:k]), sorted(perm[k:])


def _select(deltas: Tensor, labels: Tensor, k: int) -> tuple[list[int], list[float]]:
    """Top-``k`` latents by |mean Δ of misaligned − mean Δ of aligned|, weighted by that gap."""
    gap = deltas[labels].mean(0) - deltas[~labels].mean(0)
    order = torch.argsort(-gap.abs(), stable=True)[:k]
    return [int(i) for i in order], [float(gap[i]) for i in order]


def detect(
    base: Any,
    models: Any,
    sae: Any,
    prompts: Sequence[Any],
    latents: Any = None,
    *,
    k: int = 10,
    selection_fraction: float = 0.5,
    site: Site | str | None = None,
    positions: Any = "prompt",
    batch_size: int = 8,
    outlier_factor: float | None = 10.0,
    baselines: bool = True,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    load_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> DetectionResult:
    """Does a latent set's shift from ``base`` separate misaligned from aligned fine-tunes?

    ``models`` is a list of ``(model_or_path, misaligned)`` pairs or a dict ``name -> pair``
    (paths are loaded one at a time and dropped). Prompts are split once (``seed``): with
    ``latents=None`` the ``k`` latents whose mean shift differs most between misaligned and aligned
    models are selected on the first ``selection_fraction`` of the prompts, weighted by that
    difference, and every score is measured on the rest. Given ``latents`` (indices or a
    :class:`~modeldiff.latent_sets.LatentSet`), nothing is selected and ``selection_fraction=0``
    scores on all prompts.

    A model's score is the set's score of its mean shifts (``Σ w_i Δ_i / Σ |w_i|``). Reported:
    AUROC with a stratified bootstrap CI over models, the threshold maximising TPR − FPR,
    per-model scores, a leave-one-model-out AUROC (latents re-selected without the model scored),
    and the baselines: ``"residual drift"`` (norm of the mean residual shift),
    ``"mean-difference direction"`` (the residual shift projected on misaligned-minus-aligned mean
    shift, from the selection prompts; fit on the same models' labels, so in-sample) and, when each
    label keeps a model without the one scored, ``"mean-difference direction, leave one model
    out"`` (each model projected on a direction fit without it: the comparison to quote).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> base = tiny_hooked_transformer()
        >>> models = {f"m{s}": (tiny_hooked_transformer(seed=s), s % 2 == 1) for s in (1, 2, 3, 4)}
        >>> r = detect(base, models, StandardSAE(cfg), ["Hi", "A fox", "The cat", "Go on"], k=3,
        ...            n_bootstrap=20, progress=False)
        >>> 0.0 <= r.auroc <= 1.0, len(r.latents), sorted(r.baselines)
        (True, 3, ['mean-difference direction', 'mean-difference direction, leave one model out', 'residual drift'])
    """
    from tqdm.auto import tqdm

    items = _as_labelled(models)
    if not prompts:
        raise ArgumentError("prompts is empty; pass the prompts to measure the shifts on")
    given = latents is not None
    if not 0 <= selection_fraction < 1:
        raise ArgumentError(f"selection_fraction must lie in [0, 1), got {selection_fraction}")
    if not given and selection_fraction == 0:
        raise ArgumentError(
            "selecting latents needs selection prompts: use selection_fraction > 0 (e.g. 0.5), or "
            "pass latents=[...] to score given latents on all prompts"
        )
    if not given and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ArgumentError(f"k must be a positive integer, got {k!r}")
    sel_idx, eval_idx = _split(len(prompts), selection_fraction, seed)
    if not eval_idx or (not given and not sel_idx):
        raise ArgumentError(
            f"{len(prompts)} prompts cannot be split into selection and evaluation parts at "
            f"{selection_fraction}; pass more prompts"
        )
    lset = _set_of(sae, latents) if given else None
    site_ = Site.parse(site) if site is not None else Site.from_sae(sae)
    load_kwargs = dict(load_kwargs or {})
    sel_prompts = [prompts[i] for i in sel_idx]
    eval_prompts = [prompts[i] for i in eval_idx]
    opts = {
        "site": site_,
        "positions": positions,
        "batch_size": batch_size,
        "progress": False,
        "outlier_factor": outlier_factor,
    }
    track = None if lset is None else list(lset.latents)

    def measure(model: Any) -> tuple[_Prompts | None, _Prompts]:
        s = (
            _Prompts(model, sae, sel_prompts, track, tokenizer_model=base, **opts)
            if sel_idx
            else None
        )
        e = _Prompts(model, sae, eval_prompts, track, tokenizer_model=base, **opts)
        return s, e

    base_sel, base_eval = measure(base)
    d_sel, d_eval, r_sel, r_eval = [], [], [], []
    bar = tqdm(total=len(items), desc="detect", disable=not progress)
    try:
        for _name, item, _y in items:
            model, loaded = _materialise(item, load_kwargs)
            try:
                s, e = measure(model)
            finally:
                if loaded:
                    del model
                    gc.collect()
            if s is not None and base_sel is not None:
                d_sel.append(s.mean() - base_sel.mean())
                r_sel.append(s.resid_mean - base_sel.resid_mean)
            d_eval.append(e.mean() - base_eval.mean())
            r_eval.append(e.resid_mean - base_eval.resid_mean)
            bar.update()
    finally:
        bar.close()
    keys = [n for n, _, _ in items]
    labels = torch.tensor([y for *_, y in items])
    de = torch.stack(d_eval)
    lomo = math.nan
    if lset is None:
        ds = torch.stack(d_sel)
        chosen, weights = _select(ds, labels, k)
        lset = LatentSet(sae, chosen, weights=weights, site=site_)
        main_scores = _set_score(de[:, chosen], weights)
        # leave one model out: select without model m (when both labels remain), score m
        loo = []
        for m in range(len(items)):
            keep = torch.ones(len(items), dtype=torch.bool)
            keep[m] = False
            if labels[keep].all() or not labels[keep].any():
                loo = []
                break
            c, w = _select(ds[keep], labels[keep], k)
            loo.append(float(_set_score(de[m, c], w)))
        if loo:
            lomo = auroc(loo, labels)
    else:
        main_scores = _set_score(de, lset.weights)
    main = _separation("latent set", keys, main_scores, labels, n_bootstrap, confidence, seed)
    base_out: dict[str, Separation] = {}
    if baselines:
        re_ = torch.stack(r_eval)
        drift = re_.norm(dim=1)
        base_out["residual drift"] = _separation(
            "residual drift", keys, drift, labels, n_bootstrap, confidence, seed
        )
        source = torch.stack(r_sel) if r_sel else re_

        def direction(keep: Tensor) -> Tensor:
            y = labels[keep]
            u = source[keep][y].mean(0) - source[keep][~y].mean(0)
            return u / u.norm().clamp_min(1e-300)

        everyone = torch.ones(len(items), dtype=torch.bool)
        base_out["mean-difference direction"] = _separation(
            "mean-difference direction", keys, re_ @ direction(everyone), labels, n_bootstrap,
            confidence, seed,
        )  # fmt: skip
        # the direction is fit on the models' labels, so the score above is in-sample; each
        # model scored on a direction fit without it is the honest comparison
        loo_scores = []
        for m in range(len(items)):
            keep = everyone.clone()
            keep[m] = False
            if labels[keep].all() or not labels[keep].any():
                loo_scores = []
                break
            loo_scores.append(float(re_[m] @ direction(keep)))
        if loo_scores:
            name = "mean-difference direction, leave one model out"
            base_out[name] = _separation(
                name, keys, torch.tensor(loo_scores), labels, n_bootstrap, confidence, seed
            )
    return DetectionResult(
        main,
        base_out,
        tuple(lset.latents),
        tuple(lset.weights),
        site_.hook_name,
        lomo,
        {
            "selected": not given,
            "k": k if not given else len(lset),
            "selection_prompts": len(sel_idx),
            "evaluation_prompts": len(eval_idx),
            "seed": seed,
            "confidence": confidence,
            "sae_fingerprint": sae_fingerprint(sae),
            "positions": positions if isinstance(positions, str) else "explicit",
        },
    )


def detect_responses(
    model: Any,
    sae: Any,
    responses: Sequence[Any],
    labels: Sequence[bool],
    latents: Any,
    *,
    site: Site | str | None = None,
    positions: Any = "response",
    batch_size: int = 8,
    outlier_factor: float | None = 10.0,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> DetectionResult:
    """Per-response detection: the set's mean activation over each answer's tokens vs its label.

    ``responses`` are ``(prompt, response)`` pairs (``positions="response"``) or chats ending in
    an assistant turn (``positions="assistant"``); ``labels[i]`` is True when answer ``i`` is
    misaligned. Returns the AUROC over responses with a stratified bootstrap CI and the best
    threshold (no baselines).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> pairs = [("Q: hi", " fine"), ("Q: yo", " bad bad"), ("Q: ok", " good")]
        >>> r = detect_responses(tiny_hooked_transformer(), StandardSAE(cfg), pairs,
        ...                      [False, True, False], [1, 2], n_bootstrap=20, progress=False)
        >>> 0.0 <= r.auroc <= 1.0
        True
    """
    lset = _set_of(sae, latents)
    if len(responses) != len(labels):
        raise ArgumentError(f"{len(labels)} labels for {len(responses)} responses; give one each")
    y = torch.tensor([bool(v) for v in labels])
    site_ = Site.parse(site) if site is not None else (lset.site or Site.from_sae(sae))
    st = _Prompts(
        model,
        sae,
        responses,
        list(lset.latents),
        site=site_,
        positions=positions,
        batch_size=batch_size,
        tokenizer_model=model,
        progress=progress,
        outlier_factor=outlier_factor,
    )
    counts = st.counts.double().clamp_min(1)[:, None]
    per = st.sums / counts
    if bool((st.counts == 0).any()):
        bad = (st.counts == 0).nonzero().flatten().tolist()
        raise ArgumentError(
            f"responses {bad[:5]} have no tokens at positions={positions!r}; pass (prompt, "
            "response) pairs with non-empty responses (or positions='assistant' for chats)"
        )
    scores = _set_score(per, lset.weights)
    keys = [str(i) for i in range(len(responses))]
    main = _separation("latent set", keys, scores, y, n_bootstrap, confidence, seed)
    return DetectionResult(
        main,
        {},
        tuple(lset.latents),
        tuple(lset.weights),
        site_.hook_name,
        math.nan,
        {"per": "response", "n": len(responses), "sae_fingerprint": sae_fingerprint(sae)},
    )
