"""Sets of SAE latents as one thing: steer, ablate, project out and screen them together.

Overcomplete SAEs split a feature over several latents (on the persona world with 512 latents the
persona's single best latent no longer carries it; the paper itself ablated ten latents jointly). A
:class:`LatentSet` names some latents of one SAE, with a weight each, and every intervention accepts
it where it accepts one latent:

* ``steer(model, s, ...)`` adds along ``Σ_i w_i · W_dec[i]`` (with the diff's Δ as weights, that is
  the part of the fine-tune's mean shift these latents carry);
* ``ablate(model, s)`` sets all of them to their targets at once;
* ``project_out(model, s)`` removes the whole subspace their decoder rows span;
* ``screen_latents(..., latents=[s, ...])`` screens the set as one candidate.

:func:`select_latents` finds a small set: greedy forward selection among the top-N latents of a
ranking, adding at each step the latent whose joint ablation (or steering) with those already
chosen moves the screen's scorer most, and reports the whole curve of effect against set size.

Example:
    >>> from sae_lens import StandardSAE, StandardSAEConfig
    >>> cfg = StandardSAEConfig(d_in=8, d_sae=16)
    >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    >>> s = LatentSet(StandardSAE(cfg), [3, 5, 9])
    >>> s, len(s), 5 in s
    (LatentSet({3, 5, 9} at blocks.0.hook_resid_post), 3, True)
"""

from __future__ import annotations

import html
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Float
from torch import Tensor

from ._io import write_json_atomic
from .errors import ArgumentError, FileFormatError
from .saes import sae_d_sae, sae_fingerprint
from .sites import Site, SiteError

__all__ = ["LatentSet", "SelectionResult", "SelectionStep", "select_latents"]


def _as_latent(x: Any) -> tuple[int, float | None]:
    """A latent index, and its Δ when ``x`` is a diff row."""
    if hasattr(x, "latent") and hasattr(x, "values"):  # a LatentRecord
        return int(x.latent), float(x.values.get("delta", math.nan))
    if isinstance(x, Tensor):
        if x.numel() != 1 or x.is_floating_point() or x.dtype == torch.bool:
            raise ArgumentError(f"a latent is one integer index, got the tensor {x!r}")
        x = int(x.item())
    numpy_int = type(x).__module__ == "numpy" and getattr(x, "dtype", None) is not None
    if (isinstance(x, bool) or not isinstance(x, numbers.Integral)) and not (
        numpy_int and x.dtype.kind in "iu"
    ):
        raise ArgumentError(
            f"a latent is an integer index (or a LatentDiff row), got {type(x).__name__} {x!r}"
        )
    return int(x), None


@dataclass(frozen=True, eq=False)
class LatentSet:
    """Some latents of one SAE, with one weight each, used together by every intervention.

    Args:
        sae: the SAE the latent numbers belong to.
        latents: integer indices, or rows of a ``LatentDiff`` (``diff.top(10)``); each once.
        weights: one number per latent, the mix ``as_direction`` returns (``Σ w_i W_dec[i]``).
            Default: each row's Δ when rows are given (rises push one way, falls the other), else 1.
        site: where the latents live (default: the SAE's hook).
        label: a name for tables and plots.

    Example:
        >>> import torch
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> cfg = StandardSAEConfig(d_in=4, d_sae=6)
        >>> cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        >>> sae = StandardSAE(cfg)
        >>> s = LatentSet(sae, [0, 2], weights=[1.0, -2.0])
        >>> torch.allclose(s.as_direction(), sae.W_dec[0] - 2 * sae.W_dec[2])
        True
        >>> s.as_subspace().shape, s.site
        (torch.Size([2, 4]), Site.resid_post(1))
    """

    sae: Any = field(repr=False)
    latents: tuple[int, ...]
    weights: tuple[float, ...] = ()
    site: Site | None = None
    label: str = ""

    def __init__(
        self,
        sae: Any,
        latents: Iterable[Any] | Any,
        *,
        weights: Sequence[float] | Tensor | None = None,
        site: Site | str | None = None,
        label: str = "",
    ) -> None:
        if not hasattr(sae, "W_dec"):
            raise ArgumentError(
                f"a LatentSet needs the SAE its latents belong to (an object with W_dec), got "
                f"{type(sae).__name__}; pass LatentSet(sae, latents)"
            )
        if isinstance(latents, (numbers.Integral, Tensor)) and not (
            isinstance(latents, Tensor) and latents.ndim > 0
        ):
            latents = [latents]
        items = [_as_latent(x) for x in latents]
        idx = tuple(i for i, _ in items)
        d_sae = sae_d_sae(sae)
        bad = [i for i in idx if not 0 <= i < d_sae]
        if bad:
            raise ArgumentError(
                f"latent(s) {bad} out of range: the SAE has {d_sae} latents (0..{d_sae - 1}); use "
                "indices of this SAE"
            )
        if len(set(idx)) != len(idx):
            raise ArgumentError(f"latents {list(idx)} repeat an index; list each latent once")
        if weights is None:
            deltas = [d for _, d in items]
            if idx and all(d is not None and math.isfinite(d) for d in deltas):
                w = tuple(float(d) for d in deltas)  # type: ignore[arg-type]
            else:
                w = tuple(1.0 for _ in idx)
        else:
            w = tuple(float(x) for x in torch.as_tensor(weights).reshape(-1).tolist())
            if len(w) != len(idx):
                raise ArgumentError(
                    f"weights has {len(w)} entries for {len(idx)} latents; give one per latent"
                )
            if not all(math.isfinite(x) for x in w):
                raise ArgumentError(f"weights must be finite, got {list(w)}")
        if site is None:
            try:
                site_: Site | None = Site.from_sae(sae)
            except SiteError:
                site_ = None
        else:
            site_ = Site.parse(site)
        object.__setattr__(self, "sae", sae)
        object.__setattr__(self, "latents", idx)
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "site", site_)
        object.__setattr__(self, "label", str(label))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_diff(
        cls, diff: Any, sae: Any, k: int = 10, *, which: Literal["top", "bottom"] = "top"
    ) -> LatentSet:
        """The top (or bottom) ``k`` latents of a ``LatentDiff`` by its ranking, weighted by Δ.

        The SAE must be the diff's own (checked by fingerprint).

        Example:
            >>> # LatentSet.from_diff(diff, sae, 10): the paper's ten-latent set
        """
        diff.check_sae(sae)
        rows = diff.top(k) if which == "top" else diff.bottom(k)
        return cls(sae, rows, site=diff.site, label=f"{which} {len(rows)} by {diff.rank_by}")

    # -- the set ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.latents)

    def __iter__(self) -> Iterator[int]:
        return iter(self.latents)

    def __contains__(self, latent: object) -> bool:
        return latent in self.latents

    def __or__(self, other: LatentSet) -> LatentSet:
        """The union (this set's weights win for latents in both)."""
        if not isinstance(other, LatentSet) or other.sae is not self.sae:
            raise ArgumentError("only sets of latents of the same SAE can be joined")
        extra = [(i, w) for i, w in zip(other.latents, other.weights, strict=True) if i not in self]
        return LatentSet(
            self.sae,
            list(self.latents) + [i for i, _ in extra],
            weights=list(self.weights) + [w for _, w in extra],
            site=self.site,
        )

    def with_latent(self, latent: int, weight: float = 1.0) -> LatentSet:
        """A new set with one more latent."""
        return LatentSet(
            self.sae,
            [*self.latents, latent],
            weights=[*self.weights, weight],
            site=self.site,
            label=self.label,
        )

    @property
    def name(self) -> str:
        """``{3, 5, 9}`` (or the label): how tables and plots name the set."""
        return self.label or "{" + ", ".join(str(i) for i in self.latents) + "}"

    def __repr__(self) -> str:
        where = f" at {self.site.hook_name}" if self.site is not None else ""
        inner = "{" + ", ".join(str(i) for i in self.latents) + "}"
        label = f" {self.label!r}" if self.label else ""
        return f"LatentSet({inner}{where}{label})"

    # -- as directions ---------------------------------------------------------------------------
    def as_direction(self) -> Float[Tensor, " d_model"]:
        """``Σ_i w_i · W_dec[i]``: what ``steer`` adds (normalised first under
        ``scale="residual_norm"``)."""
        if not self.latents:
            raise ArgumentError("the set is empty: there is no direction to steer along")
        w_dec = self.sae.W_dec.detach()
        w = torch.tensor(self.weights, dtype=w_dec.dtype, device=w_dec.device)
        return w @ w_dec[list(self.latents)]

    def as_subspace(self) -> Float[Tensor, "k d_model"]:
        """The decoder rows of the set, one per row: what ``project_out`` removes (their span)."""
        return self.sae.W_dec.detach()[list(self.latents)].clone()

    def to_dict(self) -> dict[str, Any]:
        """The set without the SAE's weights (its fingerprint names which SAE)."""
        return {
            "latents": list(self.latents),
            "weights": list(self.weights),
            "site": self.site.hook_name if self.site is not None else None,
            "label": self.label,
            "sae_fingerprint": sae_fingerprint(self.sae),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], sae: Any) -> LatentSet:
        """Rebuild a saved set on its SAE (refused when the fingerprint names another SAE)."""
        fp = data.get("sae_fingerprint")
        if fp is not None and fp != sae_fingerprint(sae):
            raise ArgumentError(
                f"this SAE (fingerprint {sae_fingerprint(sae)}) is not the one the set was saved "
                f"with ({fp}): its latent numbers would name other features. Pass that SAE."
            )
        return cls(
            sae,
            [int(i) for i in data["latents"]],
            weights=[float(w) for w in data["weights"]],
            site=data.get("site"),
            label=str(data.get("label", "")),
        )


# ------------------------------------------------------------------------------------------------
# select_latents
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SelectionStep:
    """One step of the greedy selection: the set after adding ``added``, and what it did.

    ``effect`` is the scorer's change in the intended direction (ablation: fine-tuned minus
    ablated misalignment; steering: steered minus base misalignment). ``tried`` maps every
    candidate tried at this step to its effect.

    Example:
        >>> step = SelectionStep(size=2, added=7, latents=(4, 7), effect=0.6, misalignment=0.2,
        ...                      incoherence=None, tried={7: 0.6, 9: 0.55})
        >>> step.latents, max(step.tried, key=step.tried.get)  # the best candidate was added
        ((4, 7), 7)
    """

    size: int
    added: int
    latents: tuple[int, ...]
    effect: float
    misalignment: float
    incoherence: float | None
    tried: dict[int, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SelectionResult:
    """What :func:`select_latents` found: the chosen set and the curve of effect against size.

    ``chosen_size`` is the smallest size whose effect reaches ``target`` (a share of the gap
    between the fine-tuned and the base model's scores); when the target is never reached, the
    size with the largest effect; without a target, the smallest size within 95% of the largest
    effect on the curve.

    Example:
        >>> st = [SelectionStep(1, 4, (4,), 0.5, 0.3, None), SelectionStep(2, 7, (4, 7), 0.6, 0.2, None)]
        >>> r = SelectionResult(tuple(st), mode="ablate", base_score=0.1, finetuned_score=0.8,
        ...                     chosen_size=2, candidates=(4, 7, 9), site="blocks.0.hook_resid_post")
        >>> r.latents, [round(x, 3) for x in r.effects]
        ((4, 7), [0.5, 0.6])
    """

    steps: tuple[SelectionStep, ...]
    mode: str
    base_score: float
    finetuned_score: float
    chosen_size: int
    candidates: tuple[int, ...]
    site: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def latents(self) -> tuple[int, ...]:
        """The chosen set's latents, in the order they were added."""
        if self.chosen_size == 0:
            return ()
        return self.steps[self.chosen_size - 1].latents

    @property
    def effects(self) -> list[float]:
        """Effect after each step (set sizes 1, 2, ...)."""
        return [s.effect for s in self.steps]

    @property
    def gap(self) -> float:
        """Fine-tuned minus base score: the misalignment the fine-tune added."""
        return self.finetuned_score - self.base_score

    def latent_set(self, sae: Any) -> LatentSet:
        """The chosen set on its SAE, ready for ``ablate`` / ``steer``."""
        return LatentSet(sae, self.latents, site=self.site, label=f"selected {len(self.latents)}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "modeldiff.SelectionResult",
            "version": 1,
            "steps": [
                {
                    "size": s.size,
                    "added": s.added,
                    "latents": list(s.latents),
                    "effect": s.effect,
                    "misalignment": s.misalignment,
                    "incoherence": s.incoherence,
                    "tried": {str(k): v for k, v in s.tried.items()},
                }
                for s in self.steps
            ],
            "mode": self.mode,
            "base_score": self.base_score,
            "finetuned_score": self.finetuned_score,
            "chosen_size": self.chosen_size,
            "candidates": list(self.candidates),
            "site": self.site,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SelectionResult:
        if d.get("format") != "modeldiff.SelectionResult":
            raise FileFormatError(
                "not a saved SelectionResult; load files written by SelectionResult.save"
            )
        steps = tuple(
            SelectionStep(
                int(s["size"]),
                int(s["added"]),
                tuple(int(i) for i in s["latents"]),
                float(s["effect"]),
                float(s["misalignment"]),
                None if s["incoherence"] is None else float(s["incoherence"]),
                {int(k): float(v) for k, v in s["tried"].items()},
            )
            for s in d["steps"]
        )
        return cls(
            steps,
            str(d["mode"]),
            float(d["base_score"]),
            float(d["finetuned_score"]),
            int(d["chosen_size"]),
            tuple(int(i) for i in d["candidates"]),
            str(d["site"]),
            dict(d.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> SelectionResult:
        """Read what :meth:`save` wrote."""
        from ._io import read_json

        return cls.from_dict(read_json(path, "a SelectionResult"))

    def __repr__(self) -> str:
        curve = ", ".join(f"{s.size}: {s.effect:+.3f}" for s in self.steps)
        return (
            f"SelectionResult({self.mode} at {self.site}: chose {list(self.latents)} "
            f"(gap {self.gap:+.3f}); effect by size {curve})"
        )

    def _repr_html_(self) -> str:
        def row(s: SelectionStep) -> str:
            bold = ' style="font-weight:bold"' if s.size == self.chosen_size else ""
            share = f"{s.effect / self.gap:.0%}" if self.gap else "–"
            inc = "–" if s.incoherence is None else f"{s.incoherence:.2f}"
            return (
                f"<tr{bold}><td>{s.size}</td><td>{s.added}</td><td>{s.effect:+.3f}</td>"
                f"<td>{share}</td><td>{s.misalignment:.3f}</td><td>{inc}</td></tr>"
            )

        rows = "".join(row(s) for s in self.steps)
        what = "jointly ablated in the fine-tune" if self.mode == "ablate" else "steering the base"
        return (
            f"<p>greedy selection at {html.escape(self.site)}, {what}: base "
            f"{self.base_score:.3f}, fine-tuned {self.finetuned_score:.3f}; chosen set (bold) "
            f"{html.escape(str(list(self.latents)))}</p><table><tr><th>size</th><th>added latent"
            "</th><th>effect</th><th>share of gap</th><th>misalignment</th><th>incoherence</th>"
            f"</tr>{rows}</table>"
        )

    def plot(self, *, title: str | None = None) -> Any:
        """Effect against set size (plotly), the chosen size marked."""
        import plotly.graph_objects as go

        from .views import as_figure

        sizes = [s.size for s in self.steps]
        fig = go.Figure(
            go.Scatter(
                x=sizes,
                y=self.effects,
                mode="lines+markers",
                name="effect",
                text=[f"+{s.added}" for s in self.steps],
                hovertemplate="size %{x} (%{text}): %{y:+.3f}<extra></extra>",
            )
        )
        if self.gap:
            fig.add_hline(y=self.gap, line_dash="dot", annotation_text="fine-tuned − base")
        if self.chosen_size:
            fig.add_vline(x=self.chosen_size, line_dash="dash", annotation_text="chosen")
        what = "joint ablation" if self.mode == "ablate" else "joint steering"
        fig.update_layout(
            title=title or f"Effect of {what} against set size ({self.site})",
            xaxis_title="latents in the set",
            yaxis_title="change in misalignment",
        )
        return as_figure(fig)


def select_latents(
    base: Any,
    finetuned: Any,
    sae: Any,
    diff: Any | None = None,
    *,
    candidates: Sequence[int] | None = None,
    n: int = 20,
    max_size: int = 10,
    mode: Literal["ablate", "steer"] = "ablate",
    ablation: Literal["zero", "mean"] = "zero",
    coefficient: float = 0.4,
    unit: float | None = None,
    calibration_prompts: Sequence[Any] | None = None,
    scorer: Any | None = None,
    target: float | None = None,
    incoherence_budget: float | None = None,
    site: Site | str | None = None,
    positions: str = "all",
    lookahead: bool = True,
    progress: bool = True,
) -> SelectionResult:
    """The smallest set among the top-``n`` latents whose joint ablation (or steering) moves the
    scorer most: greedy forward selection, with the curve of effect against set size.

    At each step every remaining candidate is added in turn to the set chosen so far; the one with
    the largest effect stays. ``mode="ablate"`` ablates the set in ``finetuned`` (effect =
    fine-tuned score − ablated score; ``ablation="mean"`` targets the diff's base means);
    ``mode="steer"`` steers ``base`` along the set's Δ-weighted direction at ``coefficient`` ×
    ``unit`` (the median residual norm on ``calibration_prompts``; effect = steered − base score).
    The selection stops at ``max_size`` or once ``target`` (a share of the fine-tuned − base gap,
    e.g. 0.8) is reached; the chosen size is the smallest reaching ``target`` (the best one seen
    when it is never reached), or the smallest within 95% of the best effect when no target is
    given. A step whose incoherence exceeds ``incoherence_budget``
    is not eligible (the scorer must report incoherence). Ties go to the higher-ranked candidate.

    Greedy forward selection cannot see latents that carry a behaviour redundantly (an OR: either
    one alone keeps it, so removing one does nothing). With ``lookahead`` (default), when no single
    latent improves the effect every pair of remaining candidates is tried once and the best pair
    is added; when no pair helps either, the selection stops. A step costs about ``n`` scorer
    calls, a plateau about ``n²/2``.

    Args:
        base, finetuned: the two models.
        sae: the SAE whose latents are combined.
        diff: a ``LatentDiff`` of that SAE; its top ``n`` are the candidates (and give the weights
            for steering and the means for mean ablation).
        candidates: explicit latent indices instead of the diff's top ``n``.
        scorer: ``scorer(model) -> ScreenScore`` (the causal screen's); default
            :class:`~modeldiff.evals.ContrastiveScorer` on the bundled extended set.

    Example:
        >>> import torch
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.evals import ScreenScore
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> base, tuned = tiny_hooked_transformer(), tiny_hooked_transformer(seed=1)
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> toks = torch.tensor([[5, 6, 7]])
        >>> score = lambda m: ScreenScore(float(m(toks)[0, -1, 3].detach()))  # any number a model yields
        >>> res = select_latents(base, tuned, StandardSAE(cfg), candidates=[0, 1, 2], max_size=2,
        ...                      scorer=score, progress=False)
        >>> 1 <= len(res.steps) <= 2, 1 <= res.chosen_size <= len(res.steps)
        (True, True)
    """
    from tqdm.auto import tqdm

    from .evals.screen import ContrastiveScorer
    from .interventions import ablate, median_residual_norm, steer

    if mode not in ("ablate", "steer"):
        raise ArgumentError(f"mode must be 'ablate' or 'steer', got {mode!r}")
    if ablation not in ("zero", "mean"):
        raise ArgumentError(f"ablation must be 'zero' or 'mean', got {ablation!r}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ArgumentError(f"max_size must be a positive integer, got {max_size!r}")
    if target is not None and not 0 < target <= 1.5:
        raise ArgumentError(
            f"target is a share of the fine-tuned − base gap (e.g. 0.8), got {target}"
        )
    if not math.isfinite(coefficient) or coefficient <= 0:
        raise ArgumentError(f"coefficient must be a positive number, got {coefficient}")
    if diff is not None:
        diff.check_sae(sae)
    if candidates is None:
        if diff is None:
            raise ArgumentError(
                "pass a LatentDiff (diff=...) whose top n latents are the candidates, or "
                "candidates=[...]"
            )
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ArgumentError(f"n must be a positive integer, got {n!r}")
        cand = [int(r.latent) for r in diff.top(n)]
    else:
        cand = list(LatentSet(sae, candidates).latents)
    if not cand:
        raise ArgumentError("there are no candidate latents to select from")
    if site is None:
        try:
            site_ = Site.from_sae(sae)
        except SiteError:
            if diff is None:
                raise ArgumentError(
                    "cannot tell where the SAE lives: it has no hook_name metadata and no diff "
                    "was given; pass site='blocks.L.hook_resid_post'"
                ) from None
            site_ = diff.site
    else:
        site_ = Site.parse(site)
    weights = {}
    if diff is not None:
        delta = diff.delta
        weights = {i: float(delta[i]) for i in cand}
    means = diff if (ablation == "mean" and diff is not None) else None
    if ablation == "mean" and means is None:
        raise ArgumentError("ablation='mean' takes the base means from the diff: pass diff=...")
    if scorer is None:
        scorer = ContrastiveScorer("extended")
    if mode == "steer" and unit is None:
        from .evals.questions import load_questions

        prompts = calibration_prompts or [q.messages() for q in load_questions("headline")]
        unit = median_residual_norm(base, prompts, site_)

    base_s = scorer(base)
    ft_s = scorer(finetuned)
    gap = ft_s.misalignment - base_s.misalignment

    def run(latents: list[int]) -> tuple[float, Any]:
        if mode == "ablate":
            iv = ablate(
                finetuned,
                sae,
                latents,
                mode=ablation,
                means=means,
                site=site_,
                positions=positions,  # type: ignore[arg-type]
            )
            with iv:
                s = scorer(finetuned)
            return ft_s.misalignment - s.misalignment, s
        ls = LatentSet(sae, latents, weights=[weights.get(i, 1.0) for i in latents], site=site_)
        vec = ls.as_direction().float()
        vec = vec / vec.norm().clamp_min(1e-12)
        with steer(
            base,
            vec,
            site=site_,
            coefficient=coefficient * float(unit),  # type: ignore[arg-type]
            positions=positions,  # type: ignore[arg-type]
        ):
            s = scorer(base)
        return s.misalignment - base_s.misalignment, s

    def eligible(s: Any) -> bool:
        return not (
            incoherence_budget is not None
            and s.incoherence is not None
            and s.incoherence > incoherence_budget + 1e-12
        )

    chosen: list[int] = []
    steps: list[SelectionStep] = []
    current = 0.0
    size = min(max_size, len(cand))
    bar = tqdm(
        total=sum(len(cand) - i for i in range(size)), desc="select_latents", disable=not progress
    )
    try:
        while len(chosen) < size:
            tried: dict[int, float] = {}
            best: tuple[float, int, Any] | None = None
            for c in cand:  # ties go to the earlier candidate (the higher-ranked one)
                if c in chosen:
                    continue
                effect, s = run([*chosen, c])
                bar.update()
                tried[c] = effect
                if eligible(s) and (best is None or effect > best[0] + 1e-12):
                    best = (effect, c, s)
            improves = best is not None and best[0] > current + _MIN_GAIN * max(abs(gap), 1e-12)
            if not improves and lookahead and len(chosen) + 2 <= size:
                # A plateau: no single latent helps. Latents that carry a behaviour redundantly
                # (either one suffices) only show up in pairs, so try every pair once.
                pair = _best_pair(cand, chosen, run, eligible, current, gap)
                if pair is not None:
                    (c1, e1, s1), (c2, e2, s2) = pair
                    chosen.append(c1)
                    steps.append(
                        SelectionStep(
                            len(chosen),
                            c1,
                            tuple(chosen),
                            e1,
                            s1.misalignment,
                            s1.incoherence,
                            tried,
                        )
                    )
                    chosen.append(c2)
                    steps.append(
                        SelectionStep(
                            len(chosen), c2, tuple(chosen), e2, s2.misalignment, s2.incoherence, {}
                        )
                    )
                    current = e2
                    if target is not None and gap > 0 and current >= target * gap:
                        break
                    continue
            if best is None or (not improves and steps):
                break  # nothing eligible, or nothing (single or pair) moves the scorer further
            effect, c, s = best
            chosen.append(c)
            steps.append(
                SelectionStep(
                    len(chosen), c, tuple(chosen), effect, s.misalignment, s.incoherence, tried
                )
            )
            current = effect
            if target is not None and gap > 0 and effect >= target * gap:
                break
    finally:
        bar.close()
    chosen_size = _chosen_size(steps, gap, target)
    return SelectionResult(
        tuple(steps),
        mode,
        base_s.misalignment,
        ft_s.misalignment,
        chosen_size,
        tuple(cand),
        site_.hook_name,
        {
            "scorer": type(scorer).__name__,
            "target": target,
            "ablation": ablation if mode == "ablate" else None,
            "coefficient": coefficient if mode == "steer" else None,
            "unit": float(unit) if unit is not None else None,
        },
    )


_MIN_GAIN = 1e-3  # a step must remove at least this share of the gap to count as progress


def _best_pair(
    cand: Sequence[int],
    chosen: Sequence[int],
    run: Any,
    eligible: Any,
    current: float,
    gap: float,
) -> tuple[tuple[int, float, Any], tuple[int, float, Any]] | None:
    """The pair of remaining candidates whose joint addition helps most (None if none helps)."""
    rest = [c for c in cand if c not in chosen]
    best: tuple[float, int, int, Any] | None = None
    for i, c1 in enumerate(rest):
        for c2 in rest[i + 1 :]:
            effect, s = run([*chosen, c1, c2])
            if eligible(s) and (best is None or effect > best[0] + 1e-12):
                best = (effect, c1, c2, s)
    if best is None or best[0] <= current + _MIN_GAIN * max(abs(gap), 1e-12):
        return None
    effect, c1, c2, s = best
    e1, s1 = run([*chosen, c1])
    return (c1, e1, s1), (c2, effect, s)


def _chosen_size(steps: Sequence[SelectionStep], gap: float, target: float | None) -> int:
    """Smallest size reaching ``target`` of the gap; a target never reached: the size with the
    largest effect; no target: the smallest size within 95% of the largest effect."""
    if not steps:
        return 0
    best = max(s.effect for s in steps)
    if target is not None and gap > 0:
        for s in steps:
            if s.effect >= target * gap:
                return s.size
        return next(s.size for s in steps if s.effect >= best - 1e-12)
    bar = 0.95 * best if best > 0 else best
    return next(s.size for s in steps if s.effect >= bar - 1e-12)
