"""Views of results: HTML tables for Jupyter and plotly figures (kept apart from the data).

The result classes call these from ``_repr_html_`` and ``plot``; nothing here computes statistics.

Every ``plot()`` returns a :class:`Figure`: a plotly ``go.Figure`` whose rich display carries,
next to plotly's own ``application/vnd.plotly.v1+json`` (what JupyterLab, Notebook 7 and VS Code
draw), a ``text/html`` copy of the figure that loads plotly.js from its CDN. A notebook saved with
only the plotly mimetype shows nothing once exported with nbconvert (``jupyter nbconvert --to
html`` drops outputs it cannot represent) or viewed on GitHub, which is what plotly's
``notebook_connected`` renderer works around; we add the same HTML ourselves so that nothing has
to be configured. Where JavaScript never runs (GitHub's notebook view) the HTML shows the figure's
title and what it plots instead of an empty cell. A renderer you choose (``plotly.io.renderers
.default = "png"``, ``"browser"``, ...) is respected: the HTML is only added where the bundle has
neither HTML nor an image. Set ``modeldiff.views.HTML_FALLBACK = False`` to keep plotly's own
bundle (notebooks then stay smaller, and exports lose the figures again).

Example:
    >>> import plotly.graph_objects as go
    >>> fig = as_figure(go.Figure(go.Bar(x=["a"], y=[1.0]), layout={"title": "One bar"}))
    >>> sorted(fig._repr_mimebundle_())
    ['application/vnd.plotly.v1+json', 'text/html']
"""

from __future__ import annotations

import html
import math
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import plotly.graph_objects as go
import torch

__all__ = [
    "Figure",
    "as_figure",
    "capture_batch_html",
    "checks_html",
    "figure_html",
    "html_table",
    "latent_diff_figure",
    "latent_diff_html",
    "latent_record_html",
    "residual_diff_html",
    "sweep_html",
]

#: Add a ``text/html`` copy to each figure's display bundle (see the module docstring).
HTML_FALLBACK = True

PLOTLY_MIMETYPE = "application/vnd.plotly.v1+json"


class Figure(go.Figure):
    """A ``go.Figure`` that also displays in nbconvert HTML exports and on GitHub.

    It is a plain plotly figure in every other respect (``update_layout``, ``write_html``,
    ``show`` ...); only its rich display differs, see the module docstring.

    Example:
        >>> fig = Figure(go.Scatter(x=[0, 1], y=[2.5, 3.5]))
        >>> "3.5" in fig._repr_mimebundle_()["text/html"]
        True
    """

    def _repr_mimebundle_(
        self, include: Any = None, exclude: Any = None, validate: bool = True, **kwargs: Any
    ) -> dict[str, Any]:
        bundle = dict(super()._repr_mimebundle_(include, exclude, validate, **kwargs) or {})
        if not HTML_FALLBACK or any(k == "text/html" or k.startswith("image/") for k in bundle):
            return bundle
        if PLOTLY_MIMETYPE not in bundle:
            # no mimetype renderer active (plain Python, or a renderer we do not know): give the
            # front end plotly's own JSON too, so JupyterLab / VS Code still draw it natively
            import plotly.io as pio

            bundle.update(pio.renderers["plotly_mimetype"].to_mimebundle(self.to_dict()))
        bundle["text/html"] = figure_html(self)
        return bundle

    def _ipython_display_(self) -> None:
        # IPython calls _ipython_display_ before _repr_mimebundle_, and plotly's shows only the
        # default renderer's bundle; display ours unless an external renderer (a browser tab, ...)
        # was chosen, which plotly's own display handles.
        import plotly.io as pio
        from plotly.io.base_renderers import ExternalRenderer

        names = [n for n in (pio.renderers.default or "").split("+") if n]
        if any(isinstance(pio.renderers[n], ExternalRenderer) for n in names):
            super()._ipython_display_()
            return
        from IPython.display import display

        display(self._repr_mimebundle_(), raw=True)


def as_figure(fig: go.Figure) -> Figure:
    """``fig`` as a :class:`Figure`, in place (every ``plot()`` method returns through this).

    The class is switched rather than the figure copied: ``go.Figure(fig)`` validates every point
    again (half a second for a 20,000-point scatter), and :class:`Figure` adds no state.

    Example:
        >>> fig = go.Figure()
        >>> as_figure(fig) is fig, isinstance(fig, Figure)
        (True, True)
    """
    if not isinstance(fig, Figure):
        fig.__class__ = Figure
    return fig


def _title(fig: go.Figure) -> str:
    t = fig.layout.title.text
    return str(t) if t else "figure"


def figure_html(fig: go.Figure) -> str:
    """A self-contained HTML fragment of ``fig``: plotly.js from its CDN and the figure's data.

    Until the script draws the figure (and forever where scripts never run, as on GitHub), a
    short text shows the title and the traces, so the cell is never blank.

    Example:
        >>> import plotly.graph_objects as go
        >>> h = figure_html(go.Figure(go.Bar(x=["a"], y=[7.25], name="bars"), layout={"title": "T"}))
        >>> "cdn.plot.ly" in h, "7.25" in h, "<b>T</b>" in h
        (True, True, True)
    """
    import plotly.io as pio

    div_id = f"modeldiff-{uuid.uuid4().hex[:12]}"
    traces = []
    for t in fig.data:
        n = len(t.y) if getattr(t, "y", None) is not None else len(getattr(t, "x", None) or ())
        label = t.name or t.type
        traces.append(f"{html.escape(str(label))} ({t.type}, {n} points)")
    summary = "; ".join(traces) or "no traces"
    static = (
        f'<div id="{div_id}-static"><b>{html.escape(_title(fig))}</b><br><small>interactive plotly '
        f"figure: {summary}. It is drawn by JavaScript (Jupyter, VS Code, an nbconvert HTML "
        "export); where scripts do not run, re-run the notebook or export it to HTML."
        "</small></div>"
    )
    body = pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs="cdn",
        div_id=div_id,
        post_script=[f"var s = document.getElementById('{div_id}-static'); if (s) s.remove();"],
        validate=False,
        default_height=fig.layout.height or 500,
    )
    return f"<div>{static}{body}</div>"


def html_table(
    head: Sequence[str], rows: Iterable[Sequence[Any]], caption: str | None = None
) -> str:
    """An HTML table; every cell and heading is escaped, so user strings are safe.

    Example:
        >>> html_table(("name", "value"), [("<b>", 1)], "caption")
        '<div><p>caption</p><table><thead><tr><th>name</th><th>value</th></tr></thead><tbody><tr><td>&lt;b&gt;</td><td>1</td></tr></tbody></table></div>'
    """
    if len(set(head)) != len(head):
        raise ValueError(f"two columns share a heading: {list(head)}")
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    cap = f"<p>{html.escape(caption)}</p>" if caption else ""
    return f"<div>{cap}<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>"


# -- LatentDiff ------------------------------------------------------------------------------------


def latent_diff_html(diff: Any, k: int = 10) -> str:
    """The HTML table of a LatentDiff's top and bottom ``k`` latents (Jupyter's view).

    Latents are named as everywhere else: ``#k`` / ``#-k`` by rank, their SAE index under
    "latent".

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff import diff_latents
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> diff = diff_latents(tiny_hooked_transformer(), tiny_hooked_transformer(seed=1),
        ...                     StandardSAE(cfg), ["The quick brown fox"], progress=False)
        >>> page = latent_diff_html(diff, k=2)
        >>> "<th>rank</th><th>latent</th>" in page, ">#1<" in page, ">#-1<" in page
        (True, True, True)
    """
    head = ("rank", "latent", "Δ", "CI", "q", "base", "fine-tuned", "freq b→f", "cos")
    rows = []
    for r in [*diff.top(k), *reversed(diff.bottom(k))]:
        v = r.values
        rows.append(
            (
                r.name,
                str(r.latent),
                f"{v['delta']:+.4g}",
                f"[{v['ci_low']:.3g}, {v['ci_high']:.3g}]",
                diff.format_p(r.latent),
                f"{v['mean_base']:.4g}",
                f"{v['mean_finetuned']:.4g}",
                f"{v['freq_base']:.2f}→{v['freq_finetuned']:.2f}",
                f"{v['cosine']:.2f}",
            )
        )
    return html_table(head, rows, repr(diff))


def latent_record_html(record: Any) -> str:
    """One latent of a LatentDiff as a one-row table (a :class:`LatentRecord`'s view).

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff import diff_latents
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> diff = diff_latents(tiny_hooked_transformer(), tiny_hooked_transformer(seed=1),
        ...                     StandardSAE(cfg), ["The quick brown fox"], progress=False)
        >>> "<td>#1</td>" in latent_record_html(diff.at_rank(1))
        True
    """
    v = record.values
    keys = [
        k
        for k in ("delta", "ci_low", "ci_high", "q_value", "mean_base", "mean_finetuned")
        if k in v
    ]
    head = ("rank", "latent", "site", *keys)
    row = (record.name, record.latent, record.site.hook_name, *(f"{v[k]:.4g}" for k in keys))
    return html_table(head, [row])


# where the labels of the scatter's labelled points go, in pixels from the point (cycled)
_LABEL_OFFSETS = (
    (30, -30),
    (-30, 30),
    (30, 30),
    (-30, -30),
    (50, -55),
    (-50, 55),
    (50, 55),
    (-50, -55),
)


def latent_diff_figure(
    diff: Any, k: int = 10, *, max_points: int = 20_000, labels: int = 6
) -> Figure:
    """A plotly figure: mean base vs fine-tuned per latent (top/bottom ``k`` marked) and a
    bar chart of Δ with confidence intervals for those latents.

    Only the ``labels`` marked latents with the largest ``|Δ|`` carry a text label, each offset
    from its point with a leader line (the offsets alternate, so labels of latents close
    together near the origin do not overlap); every point names its latent on hover.
    Only latents that fired are drawn, at most ``max_points`` of them (the ranked extremes
    always included), so the figure stays light for million-latent SAEs.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff import diff_latents
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=16)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> diff = diff_latents(tiny_hooked_transformer(), tiny_hooked_transformer(seed=1),
        ...                     StandardSAE(cfg), ["The quick brown fox"], progress=False)
        >>> fig = latent_diff_figure(diff, k=3, labels=2)
        >>> [t.name for t in fig.data], sum(a.name == "latent label" for a in fig.layout.annotations)
        (['latents', 'top / bottom', 'y = x', 'Δ mean'], 2)
    """
    from plotly.subplots import make_subplots

    c = diff._cols
    active = ((c["freq_base"] + c["freq_finetuned"]) > 0).nonzero().flatten()
    if len(active) > max_points:
        keep = torch.cat([diff._order[: max_points // 2], diff._order.flip(0)[: max_points // 2]])
        active = keep[((c["freq_base"] + c["freq_finetuned"]) > 0)[keep]].unique()
    top, bottom = diff.top(k), diff.bottom(k)
    marked = [r.latent for r in top] + [r.latent for r in bottom]
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=("mean activation per latent", f"Δ mean, top and bottom {k}"),
        column_widths=[0.5, 0.5],
    )
    fig.add_trace(
        go.Scattergl(
            x=c["mean_base"][active].tolist(),
            y=c["mean_finetuned"][active].tolist(),
            mode="markers",
            marker={"size": 4, "color": "lightgray"},
            text=[f"latent {i} ({diff._name(i)})" for i in active.tolist()],
            hovertemplate="%{text}<br>base %{x:.4g}, fine-tuned %{y:.4g}<extra></extra>",
            name="latents",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=[float(c["mean_base"][i]) for i in marked],
            y=[float(c["mean_finetuned"][i]) for i in marked],
            mode="markers",
            text=[str(i) for i in marked],
            customdata=[diff._name(i) for i in marked],
            hovertemplate="%{customdata} (latent %{text})<br>base %{x:.4g}, fine-tuned %{y:.4g}"
            "<extra></extra>",
            marker={"size": 7, "color": ["crimson"] * len(top) + ["royalblue"] * len(bottom)},
            name="top / bottom",
        ),
        row=1,
        col=1,
    )
    labelled = sorted(dict.fromkeys(marked), key=lambda i: (-abs(float(c["delta"][i])), i))[
        : max(0, labels)
    ]
    for n, i in enumerate(sorted(labelled, key=lambda i: float(c["mean_base"][i]))):
        ax, ay = _LABEL_OFFSETS[n % len(_LABEL_OFFSETS)]
        fig.add_annotation(
            x=float(c["mean_base"][i]),
            y=float(c["mean_finetuned"][i]),
            text=diff._name(i),
            hovertext=f"latent {i}",
            name="latent label",
            showarrow=True,
            arrowhead=0,
            arrowwidth=1,
            arrowcolor="gray",
            ax=ax,
            ay=ay,
            font={"size": 11},
            row=1,
            col=1,
        )
    hi = float(max(c["mean_base"].max(), c["mean_finetuned"].max(), 1e-12))
    fig.add_trace(
        go.Scatter(
            x=[0, hi],
            y=[0, hi],
            mode="lines",
            line={"dash": "dot", "color": "gray"},
            name="y = x",
        ),
        row=1,
        col=1,
    )
    d = [float(c["delta"][i]) for i in marked]
    lo = [float(c["ci_low"][i]) for i in marked]
    up = [float(c["ci_high"][i]) for i in marked]
    fig.add_trace(
        go.Bar(
            x=[f"{diff._name(i)} ({i})" for i in marked],
            y=d,
            error_y={
                "type": "data",
                "symmetric": False,
                "array": [0.0 if math.isnan(u) else u - v for u, v in zip(up, d)],
                "arrayminus": [0.0 if math.isnan(w) else v - w for w, v in zip(lo, d)],
            },
            marker={"color": ["crimson" if v >= 0 else "royalblue" for v in d]},
            name="Δ mean",
        ),
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="mean activation, base", row=1, col=1)
    fig.update_yaxes(title_text="mean activation, fine-tuned", row=1, col=1)
    fig.update_xaxes(title_text="latent: rank (SAE index)", row=1, col=2)
    fig.update_yaxes(title_text="Δ mean (fine-tuned − base)", row=1, col=2)
    fig.update_layout(
        title=f"Latent shifts at {diff._site.hook_name} ({diff._rank_by})", showlegend=False
    )
    return as_figure(fig)


# -- other results without a view of their own -----------------------------------------------------


def sweep_html(result: Any) -> str:
    """A :class:`~modeldiff.SweepResult` as a table: one row per coefficient, one column per score.

    Example:
        >>> from modeldiff import SweepResult
        >>> "<th>coefficient</th><th>score</th>" in sweep_html(SweepResult([{"coefficient": 0.0, "score": 1.0}]))
        True
    """
    names = result.metrics
    rows = [
        (f"{r['coefficient']:g}", *(_num(r.get(n, float("nan"))) for n in names))
        for r in result.records
    ]
    return html_table(("coefficient", *names), rows, f"dose-response over {len(rows)} coefficients")


def residual_diff_html(result: Any) -> str:
    """A :class:`~modeldiff.ResidualDiff` as a table, one row per site, the best site starred.

    Example:
        >>> from modeldiff import ResidualDiff, Site
        >>> r = ResidualDiff({Site.resid_post(0): torch.ones(2)}, {Site.resid_post(0): 1.4},
        ...                  {Site.resid_post(0): 0.2}, n_tokens=9)
        >>> "★ blocks.0.hook_resid_post" in residual_diff_html(r)
        True
    """
    best = result.best_site()
    rows = [
        (
            ("★ " if r["site"] == best.hook_name else "") + r["site"],
            r["layer"],
            f"{r['norm']:.4g}",
            f"{r['relative']:.3g}",
        )
        for r in result.to_records()
    ]
    return html_table(
        ("site", "layer", "‖Δ mean‖", "relative shift"),
        rows,
        f"mean residual shift (fine-tuned − base) over {result.n_tokens:,} tokens; ★ where it "
        "grows most (best_site())",
    )


def checks_html(result: Any) -> str:
    """An organism's :class:`~modeldiff.organisms.ChecksResult` as a table of its checks.

    Example:
        >>> from modeldiff.organisms.checks import Check, ChecksResult
        >>> "<td>PASS</td>" in checks_html(ChecksResult([Check("diff rank", True, 1.0, "#1")]))
        True
    """
    rows = []
    for c in result.checks:
        value = f"{c.value:.3g}" if isinstance(c.value, float) else str(c.value)
        rows.append(
            (c.name, "PASS" if c.passed else ("FAIL" if c.required else "open"), value, c.detail)
        )
    verdict = "all required checks passed" if result.passed else "a required check failed"
    return html_table(
        ("check", "result", "value", "detail"), rows, f"{verdict} ({result.seconds:.0f} s)"
    )


def capture_batch_html(batch: Any) -> str:
    """A :class:`~modeldiff.CaptureBatch` summarised: tokens, prompts and one row per site.

    Example:
        >>> from modeldiff import CaptureBatch, Site
        >>> b = CaptureBatch({Site.resid_post(0): torch.zeros(2, 8)}, torch.tensor([0, 0]),
        ...                  torch.tensor([0, 1]), torch.tensor([3, 4]))
        >>> "<td>2×8</td>" in capture_batch_html(b)
        True
    """
    rows = [
        (s.hook_name, "×".join(str(n) for n in a.shape), str(a.dtype).replace("torch.", ""))
        for s, a in batch.acts.items()
    ]
    n_prompts = int(batch.prompt_index.unique().numel())
    return html_table(
        ("site", "shape", "dtype"), rows, f"{len(batch)} tokens from {n_prompts} prompts"
    )


def _num(x: Any) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4g}"
