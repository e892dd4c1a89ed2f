"""Views of results: HTML tables for Jupyter and plotly figures (kept apart from the data).

The result classes call these from ``_repr_html_`` and ``plot``; nothing here computes statistics.
"""

from __future__ import annotations

import html
import math
from typing import Any

import torch

__all__ = ["latent_diff_figure", "latent_diff_html"]


def latent_diff_html(diff: Any, k: int = 10) -> str:
    """The HTML table of a LatentDiff's top and bottom ``k`` latents (Jupyter's view)."""
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
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (
        f"<div><b>{html.escape(repr(diff))}</b><table><thead><tr>{th}</tr></thead>"
        f"<tbody>{cells}</tbody></table></div>"
    )


def latent_diff_figure(diff: Any, k: int = 10, *, max_points: int = 20_000) -> Any:
    """A plotly figure: mean base vs fine-tuned per latent (top/bottom ``k`` labelled) and a
    bar chart of Δ with confidence intervals for those latents.

    Only latents that fired are drawn, at most ``max_points`` of them (the ranked extremes
    always included), so the figure stays light for million-latent SAEs.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    c = diff._cols
    active = ((c["freq_base"] + c["freq_finetuned"]) > 0).nonzero().flatten()
    if len(active) > max_points:
        keep = torch.cat([diff._order[: max_points // 2], diff._order.flip(0)[: max_points // 2]])
        active = keep[((c["freq_base"] + c["freq_finetuned"]) > 0)[keep]].unique()
    marked = [r.latent for r in diff.top(k)] + [r.latent for r in diff.bottom(k)]
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
            name="latents",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=[float(c["mean_base"][i]) for i in marked],
            y=[float(c["mean_finetuned"][i]) for i in marked],
            mode="markers+text",
            text=[str(i) for i in marked],
            textposition="top center",
            marker={
                "size": 7,
                "color": ["crimson"] * len(diff.top(k)) + ["royalblue"] * len(diff.bottom(k)),
            },
            name="top / bottom",
        ),
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
    fig.update_xaxes(title_text="base", row=1, col=1)
    fig.update_yaxes(title_text="fine-tuned", row=1, col=1)
    fig.update_yaxes(title_text="Δ mean (fine-tuned − base)", row=1, col=2)
    fig.update_layout(
        title=f"Latent shifts at {diff._site.hook_name} ({diff._rank_by})", showlegend=False
    )
    return fig
