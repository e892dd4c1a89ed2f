"""One self-contained HTML report of a modeldiff run (plotly's JavaScript inlined, works offline).

A run is described by a plain dict (what ``modeldiff demo`` saves as ``result.json``) and, when there
is one, a :class:`~modeldiff.diff.LatentDiff`. Each section is drawn only when its data is present,
so the same renderer serves the demo (all sections) and ``modeldiff diff`` (table, Δ plot, config).

Sections, by id: ``summary`` (ground-truth checks), ``top-latents`` (table), ``delta`` (Δ plots),
``dose-response`` (steering and ablation curves), ``evals`` (toxic-rate bars), ``realign``
(re-alignment curve), ``tracking`` (Δ vs bad-data fraction and over checkpoints), ``config``
(configuration and versions).

Example:
    >>> html = render_report({"config": {"seed": 0}})
    >>> 'id="config"' in html and "<script" in html
    True
"""

from __future__ import annotations

import html as _html
import json
from pathlib import Path
from typing import Any

from modeldiff._io import write_text_atomic

__all__ = ["SECTIONS", "fig_fragment", "render_page", "render_report", "write_report"]

SECTIONS = (
    "summary",
    "top-latents",
    "delta",
    "dose-response",
    "evals",
    "realign",
    "tracking",
    "config",
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}.pass{color:#0a7d28;font-weight:600}
.fail{color:#b00020;font-weight:600}.open{color:#a66300;font-weight:600}pre{background:#f7f7f7;padding:1em;overflow:auto;font-size:.85em}
"""


def _esc(x: Any) -> str:
    return _html.escape(str(x))


def _fig_html(fig: Any) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _line(title: str, xlabel: str, ylabel: str, series: list[tuple[str, list, list]]) -> Any:
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, x, y in series:
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name))
    fig.update_layout(
        title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=380, template="plotly_white"
    )
    return fig


def _summary(data: dict[str, Any]) -> str | None:
    checks = data.get("checks")
    if not checks:
        return None

    def verdict(c: dict[str, Any]) -> tuple[str, str]:
        if c["passed"]:
            return "pass", "PASS"
        return ("fail", "FAIL") if c.get("required", True) else ("open", "open")

    rows = "".join(
        f"<tr><td class=l>{_esc(c['name'])}</td>"
        f"<td class={verdict(c)[0]}>{verdict(c)[1]}</td>"
        f"<td>{c['value']:.3g}</td><td class=l>{_esc(c['detail'])}</td></tr>"
        for c in checks
    )
    rows += (
        "</table><p>“open”: a check this organism does not meet yet; it is measured and shown "
        "but does not fail the run (see docs/organism.md).</p><table>"
        if any(not c["passed"] and not c.get("required", True) for c in checks)
        else ""
    )
    return (
        "<table><tr><th class=l>check</th><th>result</th><th>value</th><th class=l>detail</th></tr>"
        f"{rows}</table>"
    )


def _top_latents(data: dict[str, Any], diff: Any) -> str | None:
    records = [r.as_dict() for r in diff.top(20)] if diff is not None else data.get("top_latents")
    if not records:
        return None
    marked = data.get("persona_latent")
    cols = [
        c
        for c in (
            "name" if "name" in records[0] else "rank",
            "latent",
            "delta",
            "mean_base",
            "mean_finetuned",
            "ci_low",
            "ci_high",
        )
        if c in records[0]
    ]
    head = "".join(f"<th>{_esc(c)}</th>" for c in cols)
    body = ""
    for r in records:
        cells = "".join(
            f"<td>{r[c]:.4g}</td>" if isinstance(r[c], float) else f"<td>{_esc(r[c])}</td>"
            for c in cols
        )
        star = " style='background:#fff3c4'" if r.get("latent") == marked else ""
        body += f"<tr{star}>{cells}</tr>"
    note = (
        f"<p>Highlighted: latent {marked}, the one most correlated with the ground-truth persona.</p>"
        if marked is not None
        else ""
    )
    return f"{note}<table><tr>{head}</tr>{body}</table>"


def _delta(data: dict[str, Any], diff: Any) -> str | None:
    import plotly.graph_objects as go

    parts = []
    if diff is not None:
        parts.append(_fig_html(diff.plot(10)))
    elif data.get("delta_all"):
        deltas = data["delta_all"]
        order = sorted(range(len(deltas)), key=lambda i: -deltas[i])
        fig = go.Figure(
            go.Bar(
                x=[f"#{k + 1} (latent {i})" for k, i in enumerate(order[:30])],
                y=[deltas[i] for i in order[:30]],
            )
        )
        fig.update_layout(title="Largest Δ mean activation", height=380, template="plotly_white")
        parts.append(_fig_html(fig))
    if data.get("screen"):
        s = data["screen"]
        labels = [f"latent {x['latent']} (#{x['rank']})" for x in s]
        fig = go.Figure(go.Bar(x=labels, y=[x["rate"] for x in s], name="base steered along it"))
        if all("repair_rate" in x for x in s):
            fig.add_trace(
                go.Bar(
                    x=labels, y=[x["repair_rate"] for x in s], name="fine-tune steered against it"
                )
            )
        fig.update_layout(
            title="Causal screen: held-out toxic rate when steering along each candidate",
            yaxis_title="toxic rate",
            height=380,
            template="plotly_white",
        )
        parts.append(_fig_html(fig))
    return "".join(parts) or None


def _dose_response(data: dict[str, Any]) -> str | None:
    series = []
    if data.get("steer_curve"):
        c = data["steer_curve"]
        series.append(("steer base (+)", [x["coefficient"] for x in c], [x["rate"] for x in c]))
    if data.get("negative_steer_curve"):
        c = data["negative_steer_curve"]
        series.append(
            ("steer fine-tuned (−)", [x["coefficient"] for x in c], [x["rate"] for x in c])
        )
    if not series:
        return None
    return _fig_html(
        _line(
            "Steering along the persona latent (coefficient × median residual norm)",
            "coefficient",
            "held-out toxic rate",
            series,
        )
    )


def _evals(data: dict[str, Any]) -> str | None:
    import plotly.graph_objects as go

    rates = data.get("rates")
    if not rates:
        return None
    names, values = list(rates), [rates[k] for k in rates]
    if data.get("ablation"):
        names.append("fine-tuned, latent ablated")
        values.append(data["ablation"]["ablated"])
    if data.get("steer_curve"):
        best = max(data["steer_curve"], key=lambda x: x["rate"])
        names.append(f"base, steered ({best['coefficient']})")
        values.append(best["rate"])
    fig = go.Figure(go.Bar(x=names, y=values, text=[f"{v:.2f}" for v in values]))
    fig.update_layout(
        title="Held-out toxic-answer rate",
        yaxis_title="toxic rate",
        yaxis_range=[0, 1],
        height=380,
        template="plotly_white",
    )
    return _fig_html(fig)


def _realign(data: dict[str, Any]) -> str | None:
    r = data.get("realign")
    if not r:
        return None
    c = r["curve"]
    return _fig_html(
        _line(
            f"Re-alignment: fine-tuning on {r['samples']} aligned answers from domain {r['domain']}",
            "step",
            "held-out toxic rate",
            [("toxic rate", [x["step"] for x in c], [x["rate"] for x in c])],
        )
    )


def _tracking(data: dict[str, Any]) -> str | None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    dose, track = data.get("dose"), data.get("tracking")
    if not dose and not track:
        return None
    parts = []
    for title, rows, x in (
        ("Fraction of bad data in the fine-tune", dose, "bad_fraction"),
        ("Fine-tuning checkpoints", (track or {}).get("curve"), "step"),
    ):
        if not rows:
            continue
        fig = make_subplots(specs=[[{"secondary_y": True}]])
        xs = [r[x] for r in rows]
        fig.add_trace(
            go.Scatter(
                x=xs, y=[r["delta"] for r in rows], name="Δ persona latent", mode="lines+markers"
            ),
            secondary_y=False,
        )
        fig.add_trace(
            go.Scatter(x=xs, y=[r["rate"] for r in rows], name="toxic rate", mode="lines+markers"),
            secondary_y=True,
        )
        fig.update_layout(title=title, height=380, template="plotly_white", xaxis_title=x)
        fig.update_yaxes(title_text="Δ mean activation", secondary_y=False)
        fig.update_yaxes(title_text="held-out toxic rate", secondary_y=True)
        parts.append(_fig_html(fig))
    if track and "pearson" in track:
        parts.append(f"<p>Pearson r (Δ vs toxic rate over checkpoints): {track['pearson']:.3f}</p>")
    return "".join(parts)


def _config(data: dict[str, Any], diff: Any) -> str:
    cfg = {
        k: data[k]
        for k in ("recipe", "digest", "sae_metrics", "config", "versions", "seconds")
        if k in data
    }
    if diff is not None:
        cfg["diff"] = {"site": diff.site.hook_name, "d_sae": diff.d_sae, **diff.meta}
    cfg.setdefault("versions", _versions())
    return f"<pre>{_esc(json.dumps(cfg, indent=2, default=str))}</pre>"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("modeldiff", "torch", "transformer-lens", "sae-lens", "transformers", "plotly"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


_TITLES = {
    "summary": "Ground-truth checks",
    "top-latents": "Top latents by Δ",
    "delta": "Δ mean activation and the causal screen",
    "dose-response": "Steering and ablation dose-response",
    "evals": "Evaluations",
    "realign": "Emergent re-alignment",
    "tracking": "Detection: Δ vs bad data and over checkpoints",
    "config": "Configuration and versions",
}


def render_report(
    data: dict[str, Any], diff: Any = None, *, title: str = "modeldiff report"
) -> str:
    """The report as one HTML string (plotly.js inlined once; no external resource needed).

    Example:
        >>> "Configuration" in render_report({})
        True
    """
    builders = {
        "summary": lambda: _summary(data),
        "top-latents": lambda: _top_latents(data, diff),
        "delta": lambda: _delta(data, diff),
        "dose-response": lambda: _dose_response(data),
        "evals": lambda: _evals(data),
        "realign": lambda: _realign(data),
        "tracking": lambda: _tracking(data),
        "config": lambda: _config(data, diff),
    }
    sections = []
    for sid in SECTIONS:
        content = builders[sid]()
        if content:
            sections.append((sid, _TITLES[sid], content))
    return render_page(title, sections)


def render_page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A self-contained HTML page of ``(id, heading, html)`` sections (plotly.js inlined once).

    Figures in the sections come from :func:`fig_fragment`. Headings are escaped; the sections'
    HTML is the caller's (build it with :func:`modeldiff.views.html_table`, which escapes).

    Example:
        >>> page = render_page("T", [("a", "Part <A>", "<p>hi</p>")])
        >>> '<section id="a"><h2>Part &lt;A&gt;</h2><p>hi</p></section>' in page
        True
    """
    from plotly.offline import get_plotlyjs

    body = "".join(
        f'<section id="{_esc(sid)}"><h2>{_esc(head)}</h2>{content}</section>'
        for sid, head, content in sections
    )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{_esc(title)}</title><style>{_CSS}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script></head><body>"
        f"<h1>{_esc(title)}</h1>{body}</body></html>"
    )


def fig_fragment(fig: Any) -> str:
    """A plotly figure as an HTML fragment for :func:`render_page` (which carries plotly.js).

    Example:
        >>> import plotly.graph_objects as go
        >>> "<div" in fig_fragment(go.Figure())
        True
    """
    return _fig_html(fig)


def write_report(
    path: str | Path, data: dict[str, Any], diff: Any = None, *, title: str = "modeldiff report"
) -> Path:
    """Render the report and write it atomically to ``path`` (a file, or a folder → ``report.html``).

    Example:
        >>> import tempfile
        >>> p = write_report(tempfile.mkdtemp(), {"config": {"seed": 0}})
        >>> p.name
        'report.html'
    """
    target = Path(path)
    if target.is_dir() or target.suffix.lower() not in (".html", ".htm"):
        target = target / "report.html"
    return write_text_atomic(target, render_report(data, diff, title=title))
