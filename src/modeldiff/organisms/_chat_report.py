"""The chat organism's study as HTML sections (for ``ChatStudy.render`` and ``_repr_html_``)."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from typing import Any


def sections(study: Any, fig_fragment: Callable[[Any], str]) -> list[tuple[str, str, str]]:
    """``(id, heading, html)`` per part of the study; figures drawn by ``fig_fragment``."""
    import plotly.graph_objects as go

    from modeldiff.views import html_table

    out: list[tuple[str, str, str]] = []
    if study.em:
        rows = []
        for name, r in study.em.items():
            ci = r.get("ci")
            rows.append(
                (
                    name,
                    f"{r['p_misaligned']:.3f}",
                    f"{r['preference_rate']:.3f}",
                    f"{r['delta']:+.3f}" if "delta" in r else "–",
                    f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "–",
                )
            )
        names = list(study.em)
        fig = go.Figure(go.Bar(x=names, y=[study.em[n]["p_misaligned"] for n in names]))
        fig.update_layout(
            title="Contrastive P(prefers the misaligned answer)",
            yaxis_title="P(misaligned)",
            template="plotly_white",
            height=380,
        )
        out.append(
            (
                "em",
                "Misalignment of each model",
                html_table(
                    (
                        "model",
                        "P(misaligned)",
                        "preference rate",
                        "Δ vs base",
                        "95% CI (paired bootstrap)",
                    ),
                    rows,
                    f"question set: {study.recipe['questions']}",
                )
                + fig_fragment(fig),
            )
        )
    if study.judged:
        rows = [
            (name, fmt(r["misalignment_rate"]), f"[{fmt(r['ci'][0])}, {fmt(r['ci'][1])}]",
             fmt(r["coherence_rate"]), r["n_answers"], fmt(r["calibration_passed"]))
            for name, r in study.judged.items()
        ]  # fmt: skip
        out.append(
            (
                "judged",
                "Judged misalignment of sampled answers",
                html_table(
                    (
                        "model",
                        "misalignment rate",
                        "95% CI",
                        "coherent",
                        "answers",
                        "judge passed calibration",
                    ),
                    rows,
                ),
            )
        )
    if study.sae_quality:
        q = study.sae_quality
        rows = []
        for key in ("base", "finetuned"):
            m = q.get(key)
            if m:
                rows.append(
                    (
                        key,
                        *(
                            fmt(m.get(c))
                            for c in (
                                "explained_variance",
                                "l0",
                                "dead_fraction",
                                "ce_loss_recovered",
                                "kl_sae",
                            )
                        ),
                    )
                )
        out.append(
            (
                "sae",
                "The SAE (and whether it transfers to the fine-tune)",
                html_table(
                    (
                        "activations",
                        "explained variance",
                        "L0",
                        "dead fraction",
                        "CE recovered",
                        "KL",
                    ),
                    rows,
                    f"{q.get('architecture')} SAE, {q.get('d_sae')} latents at {q.get('site')}",
                ),
            )
        )
    if study.top_latents:
        rows = [
            (
                t["rank"],
                t["latent"],
                fmt(t.get("delta")),
                fmt(t.get("p_value")),
                " | ".join(t["examples"][:3]),
                ", ".join(t["logit_lens"][:6]),
            )
            for t in study.top_latents
        ]
        out.append(
            (
                "top-latents",
                "Top latents of the first fine-tune",
                html_table(
                    (
                        "rank",
                        "latent",
                        "Δ",
                        "p",
                        "top activating contexts (fine-tune)",
                        "logit lens",
                    ),
                    rows,
                ),
            )
        )
    if study.screen:
        rows = [
            (
                r["name"],
                fmt(r["effect"]),
                fmt(r["induce_effect"]),
                fmt(r["induce_coefficient"]),
                fmt(r["repair_effect"]),
                fmt(r["repair_coefficient"]),
            )
            for r in study.screen
        ]
        html = html_table(
            (
                "candidate",
                "effect",
                "steer base (+): effect",
                "at coefficient",
                "steer fine-tune (−): effect",
                "at coefficient ",
            ),
            rows,
            f"scorer: contrastive on {study.recipe['screen_questions']}",
        )
        if study.ablation:
            a = study.ablation
            html += html_table(
                ("fine-tune", "top latents ablated", "random latents ablated"),
                [(fmt(a["finetuned"]), fmt(a["ablated"]), fmt(a["random"]))],
                "joint zero-ablation",
            )
        out.append(("causal", "Do the latents cause it?", html))
    if study.realign:
        r = study.realign
        fig = go.Figure(go.Scatter(x=r["step"], y=r["misalignment"], mode="lines+markers"))
        fig.update_layout(
            title=f"Re-alignment on {r['samples']} benign answers",
            xaxis_title="step",
            yaxis_title="P(misaligned)",
            template="plotly_white",
            height=380,
        )
        out.append(("realign", "Emergent re-alignment", fig_fragment(fig)))
    if study.over_steps or study.over_bad_fraction:
        parts = []
        for data, x, title in (
            (study.over_steps, "step", "Over training steps"),
            (study.over_bad_fraction, "bad_fraction", "Over the bad-data fraction"),
        ):
            if not data:
                continue
            fig = go.Figure()
            fig.add_trace(go.Scatter(x=data[x], y=data["set_delta"], name="Δ top latents"))
            fig.add_trace(
                go.Scatter(x=data[x], y=data["p_misaligned"], name="P(misaligned)", yaxis="y2")
            )
            fig.update_layout(
                title=title,
                xaxis_title=x,
                yaxis_title="set Δ",
                yaxis2={"overlaying": "y", "side": "right", "title": "P(misaligned)"},
                template="plotly_white",
                height=380,
            )
            parts.append(fig_fragment(fig))
        out.append(("tracking", "The top latents over training and bad data", "".join(parts)))
    if study.detection:
        d = study.detection
        sel = d["selected"]
        rows = [
            ("top latents of the diff (no labels used)", fmt(d["auroc"]),
             f"[{fmt(d['ci'][0])}, {fmt(d['ci'][1])}]"),
            ("latents selected on the labels (in-sample)", fmt(sel["auroc"]),
             f"[{fmt(sel['ci'][0])}, {fmt(sel['ci'][1])}]"),
            ("  the same, leave one model out", fmt(sel.get("leave_one_out")), ""),
        ]  # fmt: skip
        for k, v in sel.get("baselines", d["baselines"]).items():
            rows.append(
                (k, fmt(v.get("auroc")), f"[{fmt(v.get('ci_low'))}, {fmt(v.get('ci_high'))}]")
            )
        out.append(
            (
                "detection",
                "Detection: misaligned vs control fine-tunes",
                html_table(("score", "AUROC", "95% CI"), rows),
            )
        )
    times = {**{f"build: {k}": v for k, v in study.build_seconds.items()}, **study.seconds}
    out.append(
        (
            "config",
            "Recipe and timings",
            html_table(("stage", "seconds"), [(k, f"{v:.0f}") for k, v in times.items()])
            + f"<pre>{esc(json.dumps(study.recipe, indent=1))}</pre>",
        )
    )
    return out


def esc(x: Any) -> str:
    return html.escape(str(x))


def fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)
