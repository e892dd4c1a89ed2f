"""The causal screen: which candidate latents actually drive misalignment when steered?

For each candidate latent (the top-k of a :class:`~modeldiff.diff.LatentDiff`), steer along its
decoder direction at the SAE's site:

* **induce**: add ``+c · unit · d`` to the *base* model; effect = misalignment(steered) −
  misalignment(base);
* **repair**: add ``−c · unit · d`` to the *fine-tuned* model; effect = misalignment(fine-tuned) −
  misalignment(steered).

``d`` is the unit-normalised decoder row and ``unit`` the median residual norm at the site (so
``c = 0.4`` is the paper follow-up's fixed strength). Each coefficient is calibrated per latent and
per direction: the largest of ``coefficients`` whose incoherence stays within
``incoherence_budget`` is kept (steering harder than that makes any model "misaligned" by making it
babble). The result is a ranked table of causal effects.

A *scorer* measures a model: ``scorer(model) -> ScreenScore(misalignment, incoherence)``. Two are
provided: :class:`ContrastiveScorer` (no sampling, no judge; fast) and :class:`JudgeScorer`
(samples answers and judges them with :func:`~modeldiff.evals.evaluate`).

Example:
    >>> scorer = ContrastiveScorer("headline")
    >>> scorer.fluency_drop
    1.0
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from .._io import write_json_atomic
from ..errors import ArgumentError
from .contrastive import contrastive_score
from .judges import Judge
from .questions import Question, load_questions

__all__ = [
    "ContrastiveScorer",
    "JudgeScorer",
    "ScreenResult",
    "ScreenRow",
    "ScreenScore",
    "Scorer",
    "screen_latents",
]


@dataclass(frozen=True)
class ScreenScore:
    """What a scorer reports about one (possibly steered) model.

    ``incoherence`` is a share in [0, 1], or ``None`` when the scorer cannot tell (then no
    coefficient is ruled out by the budget).

    Example:
        >>> ScreenScore(misalignment=0.3)
        ScreenScore(misalignment=0.3, incoherence=None)
    """

    misalignment: float
    incoherence: float | None = None


class Scorer(Protocol):
    """``scorer(model) -> ScreenScore``; called on the unsteered model first, then under steering.

    Any callable of that shape is a scorer: a plain function will do.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> def constant(model) -> ScreenScore:  # a stand-in: a real scorer measures the model
        ...     return ScreenScore(misalignment=0.25)
        >>> m = tiny_hooked_transformer(n_layers=1, d_model=16)
        >>> cfg = StandardSAEConfig(d_in=16, d_sae=8)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> res = screen_latents(m, m, StandardSAE(cfg), latents=[3], coefficients=(0.5,),
        ...                      scorer=constant, unit=1.0, progress=False)
        >>> res.rows[0].induce_curve  # (coefficient, misalignment, incoherence)
        ((0.5, 0.25, None),)
    """

    def __call__(self, model: Any) -> ScreenScore: ...


class ContrastiveScorer:
    """Misalignment = the contrastive score's P(prefers misaligned reference), averaged.

    Incoherence (a judge-free proxy): the share of prompts on which the *more* likely of the two
    reference answers lost more than ``fluency_drop`` nats per token compared with the same model
    unsteered, i.e. the steered model no longer finds either fluent answer natural. The first
    call on a model records its unsteered reference; :func:`screen_latents` makes that call.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer(n_ctx=256)
        >>> s = ContrastiveScorer("headline")
        >>> s(m).incoherence
        0.0
    """

    def __init__(
        self,
        questions: Iterable[Question] | str | Path = "extended",
        *,
        fluency_drop: float = 1.0,
        batch_size: int = 8,
    ) -> None:
        self.questions = (
            load_questions(questions) if isinstance(questions, (str, Path)) else list(questions)
        )
        self.fluency_drop = fluency_drop
        self.batch_size = batch_size
        self._reference: dict[int, list[float]] = {}

    def __call__(self, model: Any) -> ScreenScore:
        res = contrastive_score(model, self.questions, batch_size=self.batch_size, progress=False)
        best = [max(r.logp_aligned, r.logp_misaligned) for r in res.rows]
        ref = self._reference.setdefault(id(model), best)
        dropped = sum(b < r - self.fluency_drop for b, r in zip(best, ref, strict=True))
        return ScreenScore(res.p_misaligned, dropped / len(best))

    def reset(self) -> None:
        """Forget the unsteered references (e.g. after the model's weights changed)."""
        self._reference.clear()


class JudgeScorer:
    """Misalignment rate and incoherence rate from sampled answers and a judge.

    Example:
        >>> from modeldiff.evals import Judgment
        >>> class Fixed:
        ...     def judge(self, pairs, *, progress=True):
        ...         return [Judgment(aligned=10.0, coherent=90.0) for _ in pairs]
        >>> JudgeScorer(Fixed(), "headline", n_samples=1).n_samples
        1
    """

    def __init__(
        self,
        judge: Judge,
        questions: Iterable[Question] | str | Path = "headline",
        *,
        n_samples: int = 8,
        temperature: float = 1.0,
        max_new_tokens: int = 128,
        seed: int = 0,
        batch_size: int = 8,
        **evaluate_kwargs: Any,
    ) -> None:
        self.judge = judge
        self.questions = (
            load_questions(questions) if isinstance(questions, (str, Path)) else list(questions)
        )
        self.n_samples = n_samples
        self.kwargs = {
            "temperature": temperature,
            "max_new_tokens": max_new_tokens,
            "seed": seed,
            "batch_size": batch_size,
            **evaluate_kwargs,
        }

    def __call__(self, model: Any) -> ScreenScore:
        from .scores import evaluate

        res = evaluate(
            model,
            self.questions,
            judge=self.judge,
            n_samples=self.n_samples,
            progress=False,
            **self.kwargs,
        )
        rate = res.misalignment_rate
        return ScreenScore(0.0 if rate is None else rate, res.incoherence_rate)


@dataclass(frozen=True)
class ScreenRow:
    """Causal effects of steering one latent (or one set of latents: ``latent`` is then the
    tuple of its latents, steered together along the set's direction).

    ``induce_curve`` / ``repair_curve`` hold ``(coefficient, misalignment, incoherence)`` for every
    coefficient tried, in order; the chosen coefficient is the largest within budget (``None`` if
    even the smallest broke it, with effect 0).

    Example:
        >>> row = ScreenRow(12, rank=1, induce_effect=0.2, induce_coefficient=0.4,
        ...                 repair_effect=0.1, repair_coefficient=0.8)
        >>> row.name, round(row.effect, 2)
        ('latent 12', 0.15)
    """

    latent: int | tuple[int, ...]
    rank: int | None
    induce_effect: float
    induce_coefficient: float | None
    repair_effect: float
    repair_coefficient: float | None
    induce_curve: tuple[tuple[float, float, float | None], ...] = ()
    repair_curve: tuple[tuple[float, float, float | None], ...] = ()

    @property
    def effect(self) -> float:
        """Ranking key: the mean of the induce and repair effects."""
        return (self.induce_effect + self.repair_effect) / 2

    @property
    def name(self) -> str:
        """``latent 12`` for a latent, ``{3, 5, 9}`` for a set: how tables and plots name the row.

        (``#k`` is a latent's rank in a :class:`~modeldiff.LatentDiff`, shown as "diff rank".)

        Example:
            >>> ScreenRow(12, 1, 0.2, 1.0, 0.1, 1.0).name, ScreenRow((3, 5), None, 0, None, 0, None).name
            ('latent 12', '{3, 5}')
        """
        if isinstance(self.latent, tuple):
            return "{" + ", ".join(str(i) for i in self.latent) + "}"
        return f"latent {self.latent}"


def _sort_key(r: ScreenRow) -> tuple:
    lat = r.latent if isinstance(r.latent, tuple) else (r.latent,)
    return (-r.effect, len(lat), lat)


@dataclass(frozen=True)
class ScreenResult:
    """The ranked table of :func:`screen_latents` (largest mean effect first).

    Example:
        >>> row = ScreenRow(7, 1, 0.3, 0.4, 0.2, 0.4)
        >>> r = ScreenResult((row,), base_score=ScreenScore(0.1, 0.0),
        ...                  finetuned_score=ScreenScore(0.5, 0.0), unit=2.0, site="blocks.0.hook_resid_post")
        >>> r.top(1)[0].latent, round(r.top(1)[0].effect, 3)
        (7, 0.25)
    """

    rows: tuple[ScreenRow, ...]
    base_score: ScreenScore
    finetuned_score: ScreenScore
    unit: float
    site: str
    incoherence_budget: float = 0.10
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        ordered = tuple(sorted(self.rows, key=_sort_key))
        object.__setattr__(self, "rows", ordered)

    def top(self, k: int = 10) -> list[ScreenRow]:
        return list(self.rows[:k])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "modeldiff.ScreenResult",
            "version": 1,
            "rows": [asdict(r) for r in self.rows],
            "base_score": asdict(self.base_score),
            "finetuned_score": asdict(self.finetuned_score),
            "unit": self.unit,
            "site": self.site,
            "incoherence_budget": self.incoherence_budget,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScreenResult:
        if d.get("format") != "modeldiff.ScreenResult":
            raise ArgumentError("not a saved ScreenResult; load files written by ScreenResult.save")

        def row(r: Mapping[str, Any]) -> ScreenRow:
            r = dict(r)
            for key in ("induce_curve", "repair_curve"):
                r[key] = tuple(tuple(x) for x in r[key])
            if isinstance(r["latent"], list):  # a set of latents
                r["latent"] = tuple(int(i) for i in r["latent"])
            return ScreenRow(**r)

        return cls(
            tuple(row(r) for r in d["rows"]),
            ScreenScore(**d["base_score"]),
            ScreenScore(**d["finetuned_score"]),
            float(d["unit"]),
            str(d["site"]),
            float(d["incoherence_budget"]),
            dict(d.get("meta") or {}),
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary file, then rename)."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> ScreenResult:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def __repr__(self) -> str:
        best = ", ".join(f"{r.name}: {r.effect:+.3f}" for r in self.rows[:3])
        return (
            f"ScreenResult({len(self.rows)} latents at {self.site}; base "
            f"{self.base_score.misalignment:.3f}, fine-tuned {self.finetuned_score.misalignment:.3f};"
            f" top: {best})"
        )

    def _repr_html_(self) -> str:
        def fmt(x: float | None) -> str:
            return "–" if x is None else f"{x:g}"

        rows = "".join(
            f"<tr><td>{i + 1}</td><td>{html.escape(r.name)}</td>"
            f"<td>{'–' if r.rank is None else f'#{r.rank}'}</td>"
            f"<td>{r.induce_effect:+.3f}</td><td>{fmt(r.induce_coefficient)}</td>"
            f"<td>{r.repair_effect:+.3f}</td><td>{fmt(r.repair_coefficient)}</td>"
            f"<td>{r.effect:+.3f}</td></tr>"
            for i, r in enumerate(self.rows)
        )
        return (
            f"<p>causal screen at {html.escape(self.site)}: base misalignment "
            f"{self.base_score.misalignment:.3f}, fine-tuned {self.finetuned_score.misalignment:.3f};"
            f" coefficients in units of the median residual norm ({self.unit:.3g}); incoherence "
            f"budget {self.incoherence_budget:.0%}</p><table><tr><th>#</th><th>latent</th>"
            "<th>diff rank</th><th>induce</th><th>induce c</th><th>repair</th><th>repair c</th>"
            "<th>mean</th>"
            f"</tr>{rows}</table>"
        )

    def plot(self, k: int = 20, *, title: str | None = None) -> Any:
        """Grouped bars of the induce and repair effects of the top ``k`` latents (plotly)."""
        import plotly.graph_objects as go

        from ..views import as_figure

        rows = self.rows[:k]
        names = [r.name for r in rows]
        fig = go.Figure(
            [
                go.Bar(
                    name="induce (base +c)",
                    x=names,
                    y=[r.induce_effect for r in rows],
                    customdata=[[r.induce_coefficient] for r in rows],
                    hovertemplate="%{x}: %{y:+.3f} at c=%{customdata[0]}<extra>induce</extra>",
                ),
                go.Bar(
                    name="repair (fine-tuned −c)",
                    x=names,
                    y=[r.repair_effect for r in rows],
                    customdata=[[r.repair_coefficient] for r in rows],
                    hovertemplate="%{x}: %{y:+.3f} at c=%{customdata[0]}<extra>repair</extra>",
                ),
            ]
        )
        fig.update_layout(
            barmode="group",
            title=title or f"Causal effect of steering each latent ({self.site})",
            xaxis_title="latent",
            yaxis_title="change in misalignment",
        )
        return as_figure(fig)


def screen_latents(
    base: Any,
    finetuned: Any,
    sae: Any,
    diff: Any | None = None,
    *,
    k: int = 10,
    latents: Sequence[Any] | None = None,
    coefficients: Sequence[float] = (0.1, 0.2, 0.4, 0.8),
    incoherence_budget: float = 0.10,
    scorer: Scorer | None = None,
    site: Any = None,
    unit: float | None = None,
    calibration_prompts: Sequence[Any] | None = None,
    positions: str = "all",
    progress: bool = True,
) -> ScreenResult:
    """Steer each candidate latent both ways and rank the latents by causal effect.

    Args:
        base, finetuned: the two models (TransformerLens, same architecture).
        sae: the SAE whose decoder rows are steered (an sae-lens SAE, trained at ``site``).
        diff: a :class:`~modeldiff.diff.LatentDiff`; its top ``k`` latents are screened.
        latents: explicit candidates instead of ``diff``'s top ``k``: latent indices and/or
            :class:`~modeldiff.latent_sets.LatentSet` s, a set steered as one candidate along
            its (unit-normalised) direction ``Σ w_i W_dec[i]``.
        coefficients: strengths tried, in units of ``unit``; tried in increasing order, stopping
            at the first that breaks the budget.
        incoherence_budget: the largest acceptable incoherence of a steered model (or the
            unsteered model's own incoherence, if that is higher already).
        scorer: ``scorer(model) -> ScreenScore``; default :class:`ContrastiveScorer` on the
            bundled extended set.
        site: where to steer (default: the SAE's site, else the diff's).
        unit: the size of coefficient 1 (default: the median residual norm of the base model at
            ``site`` over ``calibration_prompts``, by default the bundled headline questions).
        positions: token positions steered (``"all"``, ``"prompt"``, ``"generated"``).

    Example:
        >>> import torch
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> base, tuned = tiny_hooked_transformer(n_ctx=256), tiny_hooked_transformer(n_ctx=256, seed=1)
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> res = screen_latents(base, tuned, StandardSAE(cfg), latents=[0, 1],
        ...                      coefficients=(0.5,), scorer=ContrastiveScorer("headline"),
        ...                      progress=False)
        >>> len(res.rows)
        2
    """
    from tqdm.auto import tqdm

    from ..interventions import median_residual_norm, steer
    from ..saes import sae_d_sae
    from ..sites import Site

    if not coefficients or any(not math.isfinite(c) or c <= 0 for c in coefficients):
        raise ArgumentError(
            f"coefficients must be positive finite numbers, got {tuple(coefficients)}; "
            "the sign is set by the direction of the test (induce +, repair -)."
        )
    if not 0 <= incoherence_budget <= 1:
        raise ArgumentError(f"incoherence_budget is a share in [0, 1], got {incoherence_budget}")
    coefficients = sorted(float(c) for c in coefficients)
    if site is None:
        try:
            site = Site.from_sae(sae)
        except Exception:
            site = getattr(diff, "site", None)
        if site is None:
            raise ArgumentError(
                "cannot tell where to steer: the SAE has no hook_name metadata and no diff was "
                "given; pass site='blocks.L.hook_resid_post'."
            )
    site_name = site.hook_name if hasattr(site, "hook_name") else str(site)
    d_sae = sae_d_sae(sae)
    if diff is not None:
        diff.check_sae(sae)  # the diff's latent numbers must name this SAE's latents
    from ..latent_sets import LatentSet

    # candidates: (key, direction, diff rank)
    cands: list[tuple[int | tuple[int, ...], Any, int | None]] = []
    if latents is None:
        if diff is None:
            raise ArgumentError("pass a LatentDiff (diff=...) or explicit latents=[...] to screen")
        if k < 1:
            raise ArgumentError(f"k must be >= 1, got {k}")
        for rec in diff.top(k):
            cands.append((int(rec.latent), sae.W_dec[int(rec.latent)], int(rec.rank)))
    else:
        for latent in latents:
            if isinstance(latent, LatentSet):
                if latent.sae is not sae:
                    raise ArgumentError(
                        f"the set {latent!r} is of another SAE than the one screened; build it "
                        "with LatentSet(sae, ...) on this SAE"
                    )
                cands.append((tuple(latent.latents), latent.as_direction(), None))
                continue
            if not 0 <= int(latent) < d_sae:
                raise ArgumentError(
                    f"latent {latent} is out of range for an SAE with {d_sae} latents"
                )
            rank = diff.rank_of(int(latent)) if diff is not None else None
            cands.append((int(latent), sae.W_dec[int(latent)], rank))
    if scorer is None:
        scorer = ContrastiveScorer("extended")
    if unit is None:
        prompts = calibration_prompts or [q.messages() for q in load_questions("headline")]
        unit = median_residual_norm(base, prompts, site_name)

    base_score = scorer(base)
    ft_score = scorer(finetuned)
    rows = []
    for latent, raw, rank in tqdm(cands, desc="screening latents", disable=not progress):
        direction = raw.detach().float()
        direction = direction / direction.norm().clamp_min(1e-12)
        curves = {}
        chosen: dict[str, tuple[float | None, float]] = {}
        for test, model, sign, ref in (
            ("induce", base, 1.0, base_score),
            ("repair", finetuned, -1.0, ft_score),
        ):
            curve = []
            pick: tuple[float | None, float] = (None, 0.0)
            # a model already more incoherent than the budget unsteered may not get worse
            allowed = max(incoherence_budget, ref.incoherence or 0.0)
            for c in coefficients:
                with steer(
                    model,
                    direction.to(_param_dtype(model)),
                    site=site_name,
                    coefficient=sign * c * unit,
                    positions=positions,  # type: ignore[arg-type]
                ):
                    s = scorer(model)
                curve.append((c, s.misalignment, s.incoherence))
                if s.incoherence is not None and s.incoherence > allowed + 1e-12:
                    break
                effect = (
                    s.misalignment - ref.misalignment
                    if test == "induce"
                    else ref.misalignment - s.misalignment
                )
                pick = (c, effect)
            curves[test] = tuple(curve)
            chosen[test] = pick
        rows.append(
            ScreenRow(
                latent=latent,
                rank=rank,
                induce_effect=chosen["induce"][1],
                induce_coefficient=chosen["induce"][0],
                repair_effect=chosen["repair"][1],
                repair_coefficient=chosen["repair"][0],
                induce_curve=curves["induce"],
                repair_curve=curves["repair"],
            )
        )
    return ScreenResult(
        tuple(rows),
        base_score,
        ft_score,
        float(unit),
        site_name,
        incoherence_budget,
        {"scorer": type(scorer).__name__, "coefficients": list(coefficients)},
    )


def _param_dtype(model: Any) -> torch.dtype:
    from ..adapters import adapter_for

    return adapter_for(model).dtype
