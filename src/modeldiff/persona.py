"""Directions without an SAE: persona vectors from differences of mean activations.

Three verbs, after Chen et al.'s persona vectors (see docs/persona.md), on any model an adapter runs:

* :func:`mean_difference` — per site, the mean activation over set A's selected tokens minus set
  B's (e.g. responses under a trait-eliciting system prompt minus under a suppressing one): one
  direction per layer, usable at once by :func:`~modeldiff.steer` and :func:`~modeldiff.project_out`.
* :func:`projection_shift` — how far fine-tuning moved the activations along a direction: the mean
  projection on the unit direction in the fine-tuned model minus in the base, on the same prompts,
  with a prompt-level bootstrap interval.
* :func:`screen_dataset` — rank training examples by ΔP: the projection of the activations on a
  dataset response minus on the model's own response to the same prompt. High-ΔP examples push the
  model along the direction when trained on.

Every forward goes through :func:`~modeldiff.capture.capture` (the model's adapter, one tokenization
convention, BOS dropped, the outlier filter's norm ratios); sums accumulate in float64.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ._io import atomic_path, write_json_atomic
from .adapters import adapter_for
from .capture import capture
from .directions import DirectionError, resolve_direction
from .errors import ArgumentError, FileFormatError, MissingFileError, NotFoundError, reading
from .generation import generate
from .models import check_compatible
from .sites import Site, SiteError, as_sites
from .tokens import Positions, Prompt, tokenize_prompts
from .uncertainty import paired_uncertainty

__all__ = [
    "DatasetScreen",
    "MeanDifference",
    "ProjectionShift",
    "ScreenedExample",
    "SiteDirection",
    "mean_difference",
    "projection_shift",
    "screen_dataset",
]

FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------
# Small checks shared by the three verbs
# ------------------------------------------------------------------------------------------------


def _prompt_list(prompts: Any, name: str) -> list[Any]:
    if isinstance(prompts, (str, bytes, Tensor)) or prompts is None:
        raise ArgumentError(
            f"{name} must be a list of prompts; wrap a single prompt in a list: [prompt]"
        )
    prompts = list(prompts)
    if not prompts:
        raise ArgumentError(f"{name} is empty; pass at least one prompt")
    if all(isinstance(p, Mapping) for p in prompts):
        raise ArgumentError(
            f"{name} looks like one chat (a list of messages); pass a list of prompts: [chat]"
        )
    return prompts


def _check_factor(outlier_factor: float | None) -> None:
    if outlier_factor is not None and not (outlier_factor > 0 and math.isfinite(outlier_factor)):
        raise ArgumentError(
            f"outlier_factor must be a positive number (or None to keep every token), got {outlier_factor!r}"
        )


def _default_sites(model: Any) -> list[Site]:
    """Every layer's ``resid_post`` the adapter offers (its ``resid_pre`` where it has none)."""
    offered = adapter_for(model).sites()
    for kind in ("resid_post", "resid_pre"):
        found = [s for s in offered if s.kind == kind]
        if found:
            return found
    raise SiteError(
        "this model exposes no residual-stream site (resid_post / resid_pre); pass sites=[...] "
        f"from its sites: {', '.join(s.hook_name for s in offered[:8])}"
    )


def _direction_at(
    model: Any, direction: Any, site: Site | str | None
) -> tuple[Site, Float[Tensor, " d_model"]]:
    """The site to read and the float64 unit direction, from anything ``steer`` accepts."""
    if isinstance(direction, MeanDifference):
        if site is None:
            raise ArgumentError(
                "a MeanDifference holds one direction per site; pass one of them, "
                "e.g. md[md.best_site()], or give site=..."
            )
        direction = direction[site]
    if site is None:
        own = getattr(direction, "site", None)
        if own is not None:
            site = own
        elif (
            isinstance(direction, tuple) and len(direction) == 2 and hasattr(direction[0], "W_dec")
        ):
            site = Site.from_sae(direction[0])
        else:
            raise ArgumentError(
                "site is missing: a plain vector does not say where it belongs; pass "
                "site=Site.resid_post(L) (the site the direction was built at)"
            )
    site_ = Site.parse(site).validate(model)
    unit = resolve_direction(direction, d_model=adapter_for(model).d_model, normalize=True)
    return site_, unit.double().cpu()


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def _none_to_nan(xs: Sequence[float | None]) -> Tensor:
    return torch.tensor([math.nan if x is None else float(x) for x in xs], dtype=torch.float64)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], title: str) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return (
        f"<div><b>{html.escape(title)}</b><table><thead><tr>{th}</tr></thead>"
        f"<tbody>{body}</tbody></table></div>"
    )


# ------------------------------------------------------------------------------------------------
# mean_difference
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SiteDirection:
    """The difference of mean activations at one site: ``mean_a − mean_b`` (float64).

    ``n_a`` / ``n_b`` count the tokens averaged; ``mean_norm`` is the mean activation norm over
    both sets' tokens, the scale ``relative`` divides by. It has ``.site`` and
    :meth:`as_direction`, so ``steer(model, d, coefficient=...)`` and ``project_out(model, d)``
    take it directly (at its own site).

    Example:
        >>> import torch
        >>> d = SiteDirection(Site.resid_post(0), torch.tensor([4.0, 4.0], dtype=torch.float64),
        ...                   torch.tensor([1.0, 0.0], dtype=torch.float64), 5, 6, 10.0)
        >>> d.vector.tolist(), d.norm, d.relative
        ([3.0, 4.0], 5.0, 0.5)
        >>> d.unit().tolist()
        [0.6, 0.8]
    """

    site: Site
    mean_a: Float[Tensor, " d_model"]
    mean_b: Float[Tensor, " d_model"]
    n_a: int
    n_b: int
    mean_norm: float
    n_outliers_dropped: int = 0
    vector: Float[Tensor, " d_model"] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "vector", (self.mean_a - self.mean_b).to(torch.float64))

    @property
    def norm(self) -> float:
        """L2 norm of the difference vector."""
        return float(self.vector.norm())

    @property
    def relative(self) -> float:
        """The norm over the mean activation norm at the site (comparable across layers)."""
        return self.norm / self.mean_norm if self.mean_norm > 0 else 0.0

    def as_direction(self) -> Float[Tensor, " d_model"]:
        """The difference vector in float32, unnormalised (``steer`` scales it by its coefficient)."""
        return self.vector.to(torch.float32)

    def unit(self) -> Float[Tensor, " d_model"]:
        """The difference vector scaled to unit length (float64)."""
        if self.norm == 0.0:
            raise DirectionError(
                f"the mean difference at {self.site.hook_name} is zero (the two sets read the same "
                "there); pick another site or more distinct prompt sets."
            )
        return self.vector / self.norm

    def project(self, acts: Float[Tensor, "n d_model"]) -> Float[Tensor, " n"]:
        """Each activation's projection on the unit direction (float64).

        Example:
            >>> import torch
            >>> d = SiteDirection(Site.resid_post(0), torch.tensor([2.0, 0.0]), torch.zeros(2), 1, 1, 2.0)
            >>> d.project(torch.tensor([[3.0, 1.0]])).tolist()
            [3.0]
        """
        return acts.double() @ self.unit().to(acts.device)

    def __repr__(self) -> str:
        return (
            f"SiteDirection({self.site!r}, norm={self.norm:.4g}, relative={self.relative:.3g}, "
            f"tokens={self.n_a}/{self.n_b})"
        )


class MeanDifference:
    """Difference-of-means directions at several sites, from :func:`mean_difference`.

    Index it by site: ``md[Site.resid_post(3)]``, ``md["resid_post:3"]``,
    ``md["blocks.3.hook_resid_post"]`` or ``md[3]`` (the one site at layer 3) give a
    :class:`SiteDirection`. Iterating yields the sites in execution order.

    Example:
        >>> import torch
        >>> z = torch.zeros(2, dtype=torch.float64)
        >>> md = MeanDifference([
        ...     SiteDirection(Site.resid_post(0), torch.tensor([1.0, 0.0]), z, 4, 4, 10.0),
        ...     SiteDirection(Site.resid_post(1), torch.tensor([3.0, 0.0]), z, 4, 4, 20.0)])
        >>> md.best_site(), md[1].norm, md["resid_post:0"].relative
        (Site.resid_post(1), 3.0, 0.1)
    """

    def __init__(
        self, directions: Sequence[SiteDirection], meta: dict[str, Any] | None = None
    ) -> None:
        if not directions:
            raise ArgumentError("a MeanDifference needs at least one site")
        self._dirs = {d.site: d for d in sorted(directions, key=lambda d: d.site.depth)}
        if len(self._dirs) != len(directions):
            raise ArgumentError("each site may appear only once in a MeanDifference")
        self.meta: dict[str, Any] = dict(meta or {})

    # -- access ----------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """The sites, in execution order."""
        return list(self._dirs)

    def __len__(self) -> int:
        return len(self._dirs)

    def __iter__(self) -> Iterator[Site]:
        return iter(self._dirs)

    def __contains__(self, key: object) -> bool:
        try:
            self._site(key)
        except (NotFoundError, SiteError):
            return False
        return True

    def items(self) -> list[tuple[Site, SiteDirection]]:
        """(site, direction) pairs in execution order."""
        return list(self._dirs.items())

    def _site(self, key: Any) -> Site:
        if isinstance(key, int) and not isinstance(key, bool):
            found = [s for s in self._dirs if s.layer == key]
            if len(found) == 1:
                return found[0]
            if not found:
                raise NotFoundError(
                    f"no site at layer {key}; this MeanDifference has layers "
                    f"{sorted({s.layer for s in self._dirs})}"
                )
            raise NotFoundError(
                f"layer {key} has several sites ({', '.join(map(repr, found))}); index by one of them"
            )
        site = Site.parse(key)
        if site not in self._dirs:
            raise NotFoundError(
                f"{site!r} is not in this MeanDifference; its sites are "
                f"{', '.join(map(repr, self._dirs))}"
            )
        return site

    def __getitem__(self, key: Site | str | int) -> SiteDirection:
        return self._dirs[self._site(key)]

    def as_direction(self) -> Tensor:
        """Refused: a MeanDifference holds one direction per site; pick one first."""
        raise DirectionError(
            "a MeanDifference holds one direction per site; pick one: md[md.best_site()] or "
            "md['resid_post:L']"
        )

    # -- summaries -------------------------------------------------------------------------------
    def norms(self) -> dict[Site, float]:
        """The difference's L2 norm per site."""
        return {s: d.norm for s, d in self._dirs.items()}

    def relative(self) -> dict[Site, float]:
        """The norm over the mean activation norm, per site."""
        return {s: d.relative for s, d in self._dirs.items()}

    def best_site(self, rule: str = "relative") -> Site:
        """The site where the two sets differ most, by ``rule``.

        ``"relative"`` (default): the largest norm of the difference divided by the mean activation
        norm at that site, so layers whose residual streams differ in scale compare fairly.
        ``"norm"``: the largest absolute norm. A heuristic for where to look first; whether the
        direction *does* anything is for a steering sweep (:func:`~modeldiff.sweep`) to say.
        """
        if rule not in ("relative", "norm"):
            raise ArgumentError(f"unknown rule {rule!r}; use 'relative' or 'norm'")
        table = self.relative() if rule == "relative" else self.norms()
        return max(table, key=lambda s: (table[s], -s.layer))

    def best(self, rule: str = "relative") -> SiteDirection:
        """The direction at :meth:`best_site`."""
        return self._dirs[self.best_site(rule)]

    def to_records(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per site, in execution order."""
        return [
            {
                "site": s.hook_name,
                "layer": s.layer,
                "kind": s.kind,
                "norm": d.norm,
                "relative": d.relative,
                "mean_norm": d.mean_norm,
                "n_a": d.n_a,
                "n_b": d.n_b,
                "n_outliers_dropped": d.n_outliers_dropped,
            }
            for s, d in self._dirs.items()
        ]

    def plot(self) -> Any:
        """A plotly figure: the difference's norm per layer, and the norm relative to the mean
        activation norm (right axis); one line per site kind."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from .views import as_figure

        fig = make_subplots(specs=[[{"secondary_y": True}]])
        for kind in dict.fromkeys(s.kind for s in self._dirs):
            recs = [r for r in self.to_records() if r["kind"] == kind]
            x = [r["layer"] for r in recs]
            fig.add_trace(
                go.Scatter(
                    x=x, y=[r["norm"] for r in recs], mode="lines+markers", name=f"{kind} norm"
                ),
                secondary_y=False,
            )
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=[r["relative"] for r in recs],
                    mode="lines+markers",
                    line={"dash": "dot"},
                    name=f"{kind} relative",
                ),
                secondary_y=True,
            )
        fig.update_layout(title="mean difference (A − B) per layer", xaxis_title="layer")
        fig.update_yaxes(title_text="‖mean A − mean B‖", secondary_y=False)
        fig.update_yaxes(title_text="relative to mean activation norm", secondary_y=True)
        return as_figure(fig)

    def __repr__(self) -> str:
        best = self.best_site()
        return (
            f"MeanDifference({len(self)} sites, best {best!r}: norm {self[best].norm:.4g}, "
            f"relative {self[best].relative:.3g})"
        )

    def _repr_html_(self) -> str:
        best = self.best_site()
        rows = [
            (
                ("★ " if Site.parse(r["site"]) == best else "") + r["site"],
                f"{r['norm']:.4g}",
                f"{r['relative']:.3g}",
                f"{r['mean_norm']:.4g}",
                f"{r['n_a']} / {r['n_b']}",
            )
            for r in self.to_records()
        ]
        return _table(("site", "norm", "relative", "mean ‖x‖", "tokens A / B"), rows, repr(self))

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one ``.safetensors`` file (the means; counts and settings as JSON in its header),
        atomically. :meth:`load` reads it back exactly.

        Example:
            >>> import tempfile, torch
            >>> from pathlib import Path
            >>> z = torch.zeros(2, dtype=torch.float64)
            >>> md = MeanDifference([SiteDirection(Site.resid_post(0), torch.tensor([1.0, 2.0]), z, 3, 4, 5.0)])
            >>> p = md.save(Path(tempfile.mkdtemp()) / "md.safetensors")
            >>> torch.equal(MeanDifference.load(p)[0].vector, md[0].vector)
            True
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors: dict[str, Tensor] = {}
        sites = []
        for s, d in self._dirs.items():
            tensors[f"{s.hook_name}.mean_a"] = d.mean_a.contiguous().cpu()
            tensors[f"{s.hook_name}.mean_b"] = d.mean_b.contiguous().cpu()
            sites.append(
                {
                    "site": s.hook_name,
                    "n_a": d.n_a,
                    "n_b": d.n_b,
                    "mean_norm": d.mean_norm,
                    "n_outliers_dropped": d.n_outliers_dropped,
                }
            )
        header = {
            "format": "modeldiff.MeanDifference",
            "version": FORMAT_VERSION,
            "sites": sites,
            "meta": self.meta,
        }
        with atomic_path(path) as tmp:
            save_file(
                tensors, str(tmp), metadata={"modeldiff": json.dumps(header, allow_nan=False)}
            )
        return path

    @classmethod
    def load(cls, path: str | Path) -> MeanDifference:
        """Read a file written by :meth:`save` (safetensors only: no pickle)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no MeanDifference file at {str(path)!r}")
        expected = "a MeanDifference file (written by MeanDifference.save)"
        with reading(path, expected):
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get("modeldiff")
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - no iter
            header = json.loads(text) if text is not None else {}
        if header.get("format") != "modeldiff.MeanDifference":
            raise FileFormatError(
                f"{str(path)!r} is a safetensors file but not a saved MeanDifference "
                "(write one with MeanDifference.save)"
            )
        if header.get("version", 0) > FORMAT_VERSION:
            raise FileFormatError(
                f"{str(path)!r} was written by a newer modeldiff (format {header['version']}); upgrade"
            )
        dirs = []
        with reading(path, expected):
            for rec in header["sites"]:
                name = rec["site"]
                dirs.append(
                    SiteDirection(
                        Site.parse(name),
                        tensors[f"{name}.mean_a"],
                        tensors[f"{name}.mean_b"],
                        int(rec["n_a"]),
                        int(rec["n_b"]),
                        float(rec["mean_norm"]),
                        int(rec.get("n_outliers_dropped", 0)),
                    )
                )
        return cls(dirs, header.get("meta"))


def mean_difference(
    model: Any,
    prompts_a: Sequence[Prompt],
    prompts_b: Sequence[Prompt],
    *,
    sites: Site | str | Sequence[Site | str] | None = None,
    positions: Positions = "all",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    outlier_factor: float | None = 10.0,
    progress: bool = True,
) -> MeanDifference:
    """Per site, the mean activation over ``prompts_a``'s selected tokens minus ``prompts_b``'s.

    Each mean pools every selected token of its set (token-weighted, float64 sums); both sets go
    through the model together, one forward per batch for all sites, stopped after the deepest.

    Args:
        model: any model :func:`~modeldiff.load_model` returns.
        prompts_a, prompts_b: lists of prompts (strings, chats, ``(prompt, response)`` pairs or
            token ids); the sets may differ in size.
        sites: where to read (default: ``resid_post`` at every layer, the residual stream leaving
            each block; ``resid_pre(L)`` would repeat ``resid_post(L - 1)``).
        positions: ``"all"`` (default), ``"prompt"``, ``"response"`` (persona vectors: responses
            of ``(prompt, response)`` pairs), ``"last_prompt"``, ``"user"``, ``"assistant"``, or
            one explicit selection per prompt of ``prompts_a`` followed by ``prompts_b``.
        include_bos, prepend_bos, truncate: as in :func:`~modeldiff.capture.capture`.
        outlier_factor: drop tokens whose norm at a site exceeds this multiple of the median norm
            of their prompt's tokens there (attention sinks); ``None`` keeps every token.
        progress: show a progress bar.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> md = mean_difference(m, ["I love you", "You are kind"], ["I hate you", "You are cruel"],
        ...                      progress=False)
        >>> md.sites, md[1].vector.shape
        ([Site.resid_post(0), Site.resid_post(1)], torch.Size([64]))
    """
    pa, pb = _prompt_list(prompts_a, "prompts_a"), _prompt_list(prompts_b, "prompts_b")
    _check_factor(outlier_factor)
    site_list = _default_sites(model) if sites is None else as_sites(sites)  # type: ignore[arg-type]
    for s in site_list:
        s.validate(model)
    n_a, n = len(pa), len(pa) + len(pb)
    if not isinstance(positions, str) and len(positions) != n:
        raise ArgumentError(
            f"got {len(positions)} explicit position selections for {len(pa)} + {len(pb)} prompts; "
            "pass one per prompt, prompts_a's first, then prompts_b's"
        )
    tokenized = tokenize_prompts(model, [*pa, *pb], prepend_bos=prepend_bos, truncate=truncate)
    d_model = adapter_for(model).d_model
    sums = {s: torch.zeros(2, d_model, dtype=torch.float64) for s in site_list}
    norm_sums = {s: torch.zeros(2, dtype=torch.float64) for s in site_list}
    counts = {s: torch.zeros(2, dtype=torch.long) for s in site_list}
    dropped = dict.fromkeys(site_list, 0)
    for b in capture(
        model,
        [*pa, *pb],
        site_list,
        positions=positions,
        batch_size=batch_size,
        include_bos=include_bos,
        tokenized=tokenized,
        progress=progress,
        desc="mean_difference",
    ):
        group = (b.prompt_index >= n_a).long()
        for s in site_list:
            x = b.acts[s]
            g = group
            if outlier_factor is not None:
                keep = ~(b.norm_ratio[s] > outlier_factor)  # a NaN ratio is not an outlier
                dropped[s] += int((~keep).sum())
                x, g = x[keep.to(x.device)], g[keep]
            norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).cpu()
            for j in (0, 1):  # masked sums: a 2-D float64 index_add_ is ~100x slower on CPU
                rows = g == j
                sums[s][j] += x[rows.to(x.device)].sum(0, dtype=torch.float64).cpu()
                norm_sums[s][j] += norms[rows].sum()
                counts[s][j] += int(rows.sum())
        del b  # free this batch's activations before the next forward
    dirs = []
    for s in site_list:
        c = counts[s]
        for j, name in enumerate(("prompts_a", "prompts_b")):
            if int(c[j]) == 0:
                raise ArgumentError(
                    f"no token of {name} is left at {s.hook_name} (positions={positions!r}"
                    + (f", {dropped[s]} dropped as outliers" if dropped[s] else "")
                    + "); select positions those prompts have, or pass outlier_factor=None"
                )
        means = sums[s] / c[:, None].double()
        dirs.append(
            SiteDirection(
                s,
                means[0].clone(),
                means[1].clone(),
                int(c[0]),
                int(c[1]),
                float(norm_sums[s].sum() / c.sum()),
                dropped[s],
            )
        )
    meta = {
        "model": adapter_for(model).model_name,
        "positions": positions if isinstance(positions, str) else "explicit",
        "n_prompts_a": len(pa),
        "n_prompts_b": len(pb),
        "include_bos": include_bos,
        "outlier_factor": outlier_factor,
    }
    return MeanDifference(dirs, meta)


# ------------------------------------------------------------------------------------------------
# projection_shift
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProjectionShift:
    """How far fine-tuning moved activations along a unit direction, from :func:`projection_shift`.

    ``shift = mean_finetuned − mean_base``: token-weighted mean projections over the same prompts'
    selected tokens. ``per_prompt*`` hold each prompt's mean projections (NaN where a prompt kept
    no token); ``ci_low``/``ci_high`` a percentile bootstrap over prompts and ``p_value`` a paired
    sign-flip test (:func:`~modeldiff.uncertainty.paired_uncertainty`).

    Example:
        >>> import torch
        >>> r = ProjectionShift(Site.resid_post(0), 1.5, 0.5, 2.0, 0.9, 2.1, 0.01, 0.95, "exact",
        ...                     torch.tensor([0.5]), torch.tensor([2.0]), torch.tensor([1]))
        >>> r
        ProjectionShift(+1.5 [0.9, 2.1] at blocks.0.hook_resid_post, 1 prompts)
        >>> r.per_prompt.tolist()
        [1.5]
    """

    site: Site
    shift: float
    mean_base: float
    mean_finetuned: float
    ci_low: float
    ci_high: float
    p_value: float
    confidence: float
    method: str
    per_prompt_base: Float[Tensor, " n_prompts"]
    per_prompt_finetuned: Float[Tensor, " n_prompts"]
    counts: Int[Tensor, " n_prompts"]
    n_outliers_dropped: int = 0

    @property
    def per_prompt(self) -> Float[Tensor, " n_prompts"]:
        """Each prompt's shift: its fine-tuned minus base mean projection."""
        return self.per_prompt_finetuned - self.per_prompt_base

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``)."""
        return {
            "site": self.site.hook_name,
            "shift": self.shift,
            "mean_base": self.mean_base,
            "mean_finetuned": self.mean_finetuned,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "p_value": self.p_value,
            "confidence": self.confidence,
            "method": self.method,
            "per_prompt_base": [_nan_to_none(x) for x in self.per_prompt_base.tolist()],
            "per_prompt_finetuned": [_nan_to_none(x) for x in self.per_prompt_finetuned.tolist()],
            "counts": self.counts.tolist(),
            "n_outliers_dropped": self.n_outliers_dropped,
        }

    def __repr__(self) -> str:
        return (
            f"ProjectionShift({self.shift:+.4g} [{self.ci_low:.3g}, {self.ci_high:.3g}] at "
            f"{self.site.hook_name}, {int((self.counts > 0).sum())} prompts)"
        )

    def _repr_html_(self) -> str:
        row = (
            f"{self.shift:+.4g}",
            f"[{self.ci_low:.3g}, {self.ci_high:.3g}]",
            f"{self.p_value:.3g}",
            f"{self.mean_base:.4g}",
            f"{self.mean_finetuned:.4g}",
            str(int(self.counts.sum())),
        )
        head = ("shift", f"{self.confidence:.0%} CI", "p", "base", "fine-tuned", "tokens")
        return _table(head, [row], repr(self))


def projection_shift(
    base: Any,
    finetuned: Any,
    direction: Any,
    prompts: Sequence[Prompt],
    *,
    site: Site | str | None = None,
    positions: Positions = "last_prompt",
    batch_size: int = 8,
    include_bos: bool = False,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    outlier_factor: float | None = 10.0,
    n_bootstrap: int = 1000,
    n_permutations: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
) -> ProjectionShift:
    """Mean projection on the unit ``direction``: fine-tuned minus base, on the same prompts.

    Both models read the same token ids (tokenized once, with the base's tokenizer). A token that is
    an outlier in either model leaves both, so every prompt stays paired.

    Args:
        base, finetuned: a base model and its fine-tune.
        direction: a :class:`SiteDirection`, any vector, an ``(sae, latent)`` pair or an object with
            ``as_direction()``; only its direction counts (it is normalised).
        prompts: the prompts both models read.
        site: where to read (default: the direction's own site).
        positions: ``"last_prompt"`` (default: the last prompt token, as the persona-vector paper
            measures fine-tuning shifts), or any selection :func:`~modeldiff.capture.capture` takes.
        outlier_factor: as in :func:`mean_difference`.
        n_bootstrap, n_permutations, confidence, seed: the prompt-level interval and test.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> md = mean_difference(m, ["I love you"], ["I hate you"], progress=False)
        >>> r = projection_shift(m, m, md[1], ["Hello world", "The fox"], progress=False)
        >>> r.shift, r.ci_low, r.ci_high
        (0.0, 0.0, 0.0)
    """
    check_compatible(base, finetuned)
    prompts = _prompt_list(prompts, "prompts")
    _check_factor(outlier_factor)
    site_, unit = _direction_at(base, direction, site)
    site_.validate(finetuned)
    tokenized = tokenize_prompts(base, prompts, prepend_bos=prepend_bos, truncate=truncate)
    n = len(prompts)
    sums = torch.zeros(2, n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.long)
    dropped = 0
    kw: dict[str, Any] = dict(
        positions=positions, batch_size=batch_size, include_bos=include_bos, tokenized=tokenized
    )
    streams = (
        capture(base, prompts, site_, progress=progress, desc="projection_shift", **kw),
        capture(finetuned, prompts, site_, progress=False, **kw),
    )
    try:
        for bb, bf in zip(*streams):
            # the same tokens, the same batch plan: rows pair up one to one
            if not (
                torch.equal(bb.prompt_index, bf.prompt_index)
                and torch.equal(bb.position, bf.position)
            ):  # pragma: no cover - would be a bug in capture's batch plan
                raise RuntimeError("base and fine-tuned token streams are out of step")
            keep = torch.ones(len(bb), dtype=torch.bool)
            if outlier_factor is not None:
                keep = ~(
                    (bb.norm_ratio[site_] > outlier_factor)
                    | (bf.norm_ratio[site_] > outlier_factor)
                )
                dropped += int((~keep).sum())
            idx = bb.prompt_index[keep]
            for j, batch in enumerate((bb, bf)):
                x = batch.acts[site_]
                proj = (x[keep.to(x.device)].to(torch.float64) @ unit.to(x.device)).cpu()
                sums[j].index_add_(0, idx, proj)
            counts.index_add_(0, idx, torch.ones_like(idx))
            del bb, bf
    finally:
        for stream in streams:
            stream.close()  # type: ignore[attr-defined]
    if int(counts.sum()) == 0:
        raise ArgumentError(
            f"no token is left to measure (positions={positions!r}"
            + (f", {dropped} dropped as outliers" if dropped else "")
            + "); select positions the prompts have, or pass outlier_factor=None"
        )
    diff = (sums[1] - sums[0])[:, None]
    u = paired_uncertainty(
        diff,
        counts,
        n_bootstrap=n_bootstrap,
        n_permutations=n_permutations,
        confidence=confidence,
        seed=seed,
    )
    total = float(counts.sum())
    per = sums / counts.double().where(counts > 0, torch.tensor(math.nan, dtype=torch.float64))
    return ProjectionShift(
        site=site_,
        shift=float(diff.sum()) / total,
        mean_base=float(sums[0].sum()) / total,
        mean_finetuned=float(sums[1].sum()) / total,
        ci_low=float(u.ci_low[0]),
        ci_high=float(u.ci_high[0]),
        p_value=float(u.p_value[0]),
        confidence=confidence,
        method=u.method,
        per_prompt_base=per[0],
        per_prompt_finetuned=per[1],
        counts=counts,
        n_outliers_dropped=dropped,
    )


# ------------------------------------------------------------------------------------------------
# screen_dataset
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreenedExample:
    """One training example's place in a :class:`DatasetScreen`.

    Example:
        >>> import torch
        >>> s = DatasetScreen(Site.resid_post(0), torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.5]),
        ...                   ["ok", "bad"], ["fine", "fine"])
        >>> s.top(1)[0]
        ScreenedExample(rank=1, index=1, delta_p=1.5, proj_dataset=2.0, proj_own=0.5, response='bad', own_response='fine')
    """

    rank: int  # 1 = highest ΔP
    index: int  # position in the dataset
    delta_p: float
    proj_dataset: float
    proj_own: float
    response: str  # the dataset's response (the first 200 characters)
    own_response: str


class DatasetScreen:
    """Training examples ranked by ΔP, from :func:`screen_dataset`.

    Arrays are in dataset order: ``delta_p[i] = proj_dataset[i] − proj_own[i]``, the mean projection
    on the unit direction over the dataset response's tokens minus over the model's own response's.
    ``order`` lists dataset indices from the highest ΔP down (NaN, for a response with no token,
    last). ``mean_delta_p`` is the dataset's ΔP: the mean over examples.

    Example:
        >>> import torch
        >>> s = DatasetScreen(Site.resid_post(0), torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.5]),
        ...                   ["ok", "bad"], ["fine", "fine"])
        >>> [(e.rank, e.index, e.delta_p) for e in s.top(2)], s.mean_delta_p
        ([(1, 1, 1.5), (2, 0, -0.5)], 0.5)
    """

    def __init__(
        self,
        site: Site,
        proj_dataset: Float[Tensor, " n"],
        proj_own: Float[Tensor, " n"],
        responses: Sequence[str],
        own_responses: Sequence[str],
        *,
        n_tokens_dataset: Int[Tensor, " n"] | None = None,
        n_tokens_own: Int[Tensor, " n"] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        self.site = Site.parse(site)
        self.proj_dataset = torch.as_tensor(proj_dataset, dtype=torch.float64)
        self.proj_own = torch.as_tensor(proj_own, dtype=torch.float64)
        n = self.proj_dataset.numel()
        if self.proj_own.shape != (n,) or len(responses) != n or len(own_responses) != n:
            raise ArgumentError("a DatasetScreen needs one value per example in every field")
        self.delta_p = self.proj_dataset - self.proj_own
        self.responses = [r[:200] for r in responses]
        self.own_responses = list(own_responses)
        ones = torch.ones(n, dtype=torch.long)
        self.n_tokens_dataset = (
            ones if n_tokens_dataset is None else torch.as_tensor(n_tokens_dataset)
        )
        self.n_tokens_own = ones if n_tokens_own is None else torch.as_tensor(n_tokens_own)
        self.meta: dict[str, Any] = dict(meta or {})
        key = torch.where(torch.isnan(self.delta_p), -math.inf, self.delta_p)
        self.order: Int[Tensor, " n"] = torch.sort(key, descending=True, stable=True).indices

    def __len__(self) -> int:
        return int(self.delta_p.numel())

    @property
    def mean_delta_p(self) -> float:
        """The dataset's ΔP: the mean over examples that have tokens in both responses."""
        ok = ~torch.isnan(self.delta_p)
        return float(self.delta_p[ok].mean()) if bool(ok.any()) else math.nan

    def _row(self, rank: int) -> ScreenedExample:
        i = int(self.order[rank - 1])
        return ScreenedExample(
            rank=rank,
            index=i,
            delta_p=float(self.delta_p[i]),
            proj_dataset=float(self.proj_dataset[i]),
            proj_own=float(self.proj_own[i]),
            response=self.responses[i],
            own_response=self.own_responses[i],
        )

    def top(self, k: int = 10) -> list[ScreenedExample]:
        """The ``k`` examples with the highest ΔP, highest first."""
        return [self._row(r) for r in range(1, min(k, len(self)) + 1)]

    def bottom(self, k: int = 10) -> list[ScreenedExample]:
        """The ``k`` examples with the lowest ΔP, lowest first (NaN rows excluded)."""
        n_ok = int((~torch.isnan(self.delta_p)).sum())
        return [self._row(r) for r in range(n_ok, max(n_ok - k, 0), -1)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``); :meth:`from_dict` rebuilds the screen."""
        return {
            "format": "modeldiff.DatasetScreen",
            "version": FORMAT_VERSION,
            "site": self.site.hook_name,
            "mean_delta_p": _nan_to_none(self.mean_delta_p),
            "proj_dataset": [_nan_to_none(x) for x in self.proj_dataset.tolist()],
            "proj_own": [_nan_to_none(x) for x in self.proj_own.tolist()],
            "n_tokens_dataset": self.n_tokens_dataset.tolist(),
            "n_tokens_own": self.n_tokens_own.tolist(),
            "responses": self.responses,
            "own_responses": self.own_responses,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetScreen:
        """Rebuild a screen from :meth:`to_dict`'s output."""
        if data.get("format") != "modeldiff.DatasetScreen":
            raise ArgumentError("not a DatasetScreen dict (write one with DatasetScreen.to_dict)")
        if data.get("version", 0) > FORMAT_VERSION:
            raise ArgumentError(f"written by a newer modeldiff (format {data['version']}); upgrade")
        return cls(
            Site.parse(data["site"]),
            _none_to_nan(data["proj_dataset"]),
            _none_to_nan(data["proj_own"]),
            data["responses"],
            data["own_responses"],
            n_tokens_dataset=torch.tensor(data["n_tokens_dataset"], dtype=torch.long),
            n_tokens_own=torch.tensor(data["n_tokens_own"], dtype=torch.long),
            meta=data.get("meta"),
        )

    def save(self, path: str | Path) -> Path:
        """Write the screen as JSON, atomically."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> DatasetScreen:
        """Read a file written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"no DatasetScreen file at {str(path)!r}")
        expected = "a DatasetScreen file (written by DatasetScreen.save)"
        with reading(path, expected):
            data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or data.get("format") != "modeldiff.DatasetScreen":
            raise FileFormatError(f"{str(path)!r} is JSON but not a saved DatasetScreen")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as err:
            raise FileFormatError(f"{str(path)!r} cannot be read as {expected} ({err})") from err

    def __repr__(self) -> str:
        return (
            f"DatasetScreen({len(self)} examples at {self.site.hook_name}, mean ΔP "
            f"{self.mean_delta_p:+.4g})"
        )

    def _repr_html_(self, k: int = 10) -> str:
        rows = [
            (
                str(e.rank),
                str(e.index),
                f"{e.delta_p:+.4g}",
                f"{e.proj_dataset:.4g}",
                f"{e.proj_own:.4g}",
                e.response[:80],
                e.own_response[:80],
            )
            for e in self.top(k)
        ]
        head = ("rank", "example", "ΔP", "dataset", "own", "response", "own response")
        return _table(head, rows, repr(self))


def _split_example(example: Any, i: int) -> tuple[Any, str]:
    """``(prompt, response)`` from a pair or a chat ending in an assistant turn."""
    if (
        isinstance(example, (tuple, list))
        and len(example) == 2
        and isinstance(example[1], str)
        and not isinstance(example[0], Mapping)  # not a two-message chat
    ):
        return example[0], example[1]
    if (
        isinstance(example, Sequence)
        and not isinstance(example, str)
        and len(example) >= 2
        and all(isinstance(m, Mapping) for m in example)
        and example[-1].get("role") == "assistant"
        and isinstance(example[-1].get("content"), str)
    ):
        return [dict(m) for m in example[:-1]], example[-1]["content"]
    text = repr(example)
    raise ArgumentError(
        f"dataset example {i} is neither a (prompt, response) pair nor a chat that ends in an "
        f"assistant turn: {text if len(text) <= 60 else text[:57] + '...'}"
    )


def screen_dataset(
    model: Any,
    dataset: Sequence[Any],
    direction: Any,
    *,
    site: Site | str | None = None,
    own_responses: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    positions: str = "response",
    batch_size: int = 8,
    prepend_bos: bool | None = None,
    truncate: bool = False,
    outlier_factor: float | None = 10.0,
    progress: bool = True,
) -> DatasetScreen:
    """Rank training examples by ΔP: how much more the dataset's response projects on the direction
    than the model's own response to the same prompt.

    For each example, the mean projection on the unit ``direction`` over the response's tokens is
    taken once for the dataset's response and once for the model's own; ΔP is their difference.
    Examples with a high ΔP teach the model to move along the direction.

    Args:
        model: the model to be fine-tuned (its own responses are the reference).
        dataset: ``(prompt, response)`` pairs (the prompt a string or a chat) or chat message lists
            ending in an assistant turn.
        direction: as in :func:`projection_shift`.
        site: where to read (default: the direction's own site).
        own_responses: the model's responses, one per example; by default generated now with
            :func:`~modeldiff.generate` (greedy unless ``temperature`` > 0, with ``seed``). Either
            way they are tokenized from their text exactly like the dataset's responses, so
            passing the generated texts gives the same result.
        max_new_tokens: the length limit of generated responses.
        positions: ``"response"`` (default: every token after the prompt, a chat template's
            end-of-turn markers included) or ``"assistant"`` (only assistant-turn content).
        outlier_factor: as in :func:`mean_difference`.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> md = mean_difference(m, ["I love you"], ["I hate you"], progress=False)
        >>> data = [("Tell me", " I love you"), ("Tell me", " I hate you")]
        >>> s = screen_dataset(m, data, md[1], own_responses=[" hello", " hello"], progress=False)
        >>> [e.index for e in s.top(2)]
        [0, 1]
    """
    if isinstance(dataset, (str, bytes)) or dataset is None:
        raise ArgumentError("dataset must be a list of examples: (prompt, response) pairs or chats")
    pairs = [_split_example(ex, i) for i, ex in enumerate(dataset)]
    if not pairs:
        raise ArgumentError("the dataset is empty; pass at least one example")
    if positions not in ("response", "assistant"):
        raise ArgumentError(
            f"positions={positions!r}: ΔP compares responses, so use 'response' or 'assistant' "
            "(the prompt is the same in both and would only dilute the difference)"
        )
    _check_factor(outlier_factor)
    site_, unit = _direction_at(model, direction, site)
    prompts = [p for p, _ in pairs]
    generated = own_responses is None
    if own_responses is None:
        own = generate(
            model,
            prompts,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            seed=seed,
            batch_size=batch_size,
            prepend_bos=prepend_bos,
            progress=progress,
        )
    else:
        if isinstance(own_responses, str) or len(own_responses) != len(pairs):
            got = "a string" if isinstance(own_responses, str) else f"{len(own_responses)}"
            raise ArgumentError(
                f"own_responses must be a list of {len(pairs)} strings (one per example), got {got}"
            )
        own = list(own_responses)
        bad = [i for i, r in enumerate(own) if not isinstance(r, str)]
        if bad:
            raise ArgumentError(f"own_responses[{bad[0]}] is not a string; pass the response text")
    n = len(pairs)
    everything = [*pairs, *zip(prompts, own)]
    tokenized = tokenize_prompts(model, everything, prepend_bos=prepend_bos, truncate=truncate)
    sums = torch.zeros(2 * n, dtype=torch.float64)
    counts = torch.zeros(2 * n, dtype=torch.long)
    dropped = 0
    for b in capture(
        model,
        everything,
        site_,
        positions=positions,
        batch_size=batch_size,
        tokenized=tokenized,
        progress=progress,
        desc="screen_dataset",
    ):
        x, idx = b.acts[site_], b.prompt_index
        if outlier_factor is not None:
            keep = ~(b.norm_ratio[site_] > outlier_factor)
            dropped += int((~keep).sum())
            x, idx = x[keep.to(x.device)], idx[keep]
        sums.index_add_(0, idx, (x.to(torch.float64) @ unit.to(x.device)).cpu())
        counts.index_add_(0, idx, torch.ones_like(idx))
        del b
    proj = sums / counts.double().where(counts > 0, torch.tensor(math.nan, dtype=torch.float64))
    if bool(torch.isnan(proj[:n] - proj[n:]).all()):
        raise ArgumentError(
            "no example has tokens in both its dataset response and the model's own response "
            + (
                "(the model answered with nothing: raise max_new_tokens, or pass own_responses)"
                if generated
                else ""
            )
            + (
                f"; {dropped} tokens were dropped as outliers (outlier_factor=None keeps them)"
                if dropped
                else ""
            )
        )
    meta = {
        "model": adapter_for(model).model_name,
        "positions": positions,
        "generated": generated,
        "max_new_tokens": max_new_tokens if generated else None,
        "temperature": temperature if generated else None,
        "seed": seed if generated else None,
        "outlier_factor": outlier_factor,
        "n_outliers_dropped": dropped,
    }
    return DatasetScreen(
        site_,
        proj[:n],
        proj[n:],
        [r for _, r in pairs],
        own,
        n_tokens_dataset=counts[:n],
        n_tokens_own=counts[n:],
        meta=meta,
    )
