"""The HTML report: every section present, self-contained, plots drawn in a real headless browser."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from modeldiff.report import SECTIONS, render_report, write_report


def full_data() -> dict:
    """A result with every section's data (shaped like ``modeldiff demo``'s result.json)."""
    return {
        "checks": [
            {"name": "emergent misalignment", "passed": True, "value": 0.9, "detail": "0.2 → 0.9"},
            {"name": "diff rank", "passed": False, "value": 12.0, "detail": "#12"},
        ],
        "persona_latent": 7,
        "top_latents": [
            {"rank": 1, "latent": 7, "delta": 2.5, "mean_base": 0.1, "mean_finetuned": 2.6},
            {"rank": 2, "latent": 3, "delta": 1.0, "mean_base": 0.0, "mean_finetuned": 1.0},
        ],
        "delta_all": [0.1, -0.2, 0.0, 1.0, 0.0, 0.0, 0.0, 2.5],
        "screen": [{"latent": 7, "rank": 1, "rate": 0.8}, {"latent": 3, "rank": 2, "rate": 0.3}],
        "steer_curve": [{"coefficient": c, "rate": 0.2 + c} for c in (0.0, 0.2, 0.4)],
        "negative_steer_curve": [{"coefficient": -c, "rate": 0.9 - c} for c in (0.0, 0.2, 0.4)],
        "rates": {"base": 0.2, "finetuned": 0.9, "control": 0.1},
        "ablation": {"finetuned": 0.9, "ablated": 0.05},
        "realign": {
            "domain": 1,
            "samples": 320,
            "curve": [{"step": s, "rate": 0.9 / (1 + s)} for s in range(5)],
        },
        "dose": [{"bad_fraction": f, "rate": f, "delta": 2 * f} for f in (0.0, 0.5, 1.0)],
        "tracking": {
            "curve": [{"step": s, "rate": s / 4, "delta": s / 2} for s in range(5)],
            "pearson": 1.0,
        },
        "recipe": {"seed": 0},
    }


N_FIGURES = 7  # delta, screen, dose-response, evals, realign, dose, tracking


def test_every_section_is_rendered_with_its_content():
    html = render_report(full_data(), title="t")
    for sid in SECTIONS:
        assert f'<section id="{sid}">' in html, sid
    assert html.count('class="plotly-graph-div"') == N_FIGURES
    # the table marks pass/fail and highlights the persona latent
    assert ">PASS<" in html and ">FAIL<" in html
    assert "background:#fff3c4" in html
    assert "&quot;seed&quot;: 0" in html


def test_missing_data_drops_sections_instead_of_failing():
    html = render_report({"top_latents": full_data()["top_latents"]})
    assert '<section id="top-latents">' in html and '<section id="config">' in html
    for sid in ("summary", "dose-response", "realign", "tracking", "evals"):
        assert f'<section id="{sid}">' not in html


def test_self_contained_no_external_resources(tmp_path):
    path = write_report(tmp_path, full_data())
    html = path.read_text()
    # plotly.js is inlined exactly once, and nothing is loaded from elsewhere
    assert html.count("<script type='text/javascript'>") == 1
    assert len(html) > 3_000_000
    # no tag loads anything: no <script src>, <link href>, <img src> or <iframe> anywhere
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=", html, re.I)
    # outside the inlined library, no URL at all
    own = re.sub(r"<script type='text/javascript'>.*?</script>", "", html, count=1, flags=re.S)
    assert "http://" not in own and "https://" not in own


def test_write_is_atomic_and_accepts_file_paths(tmp_path):
    target = tmp_path / "r.html"
    assert write_report(target, {}) == target
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"],
            capture_output=True,
            timeout=600,
            check=False,
        )
    return shutil.which("chromium")


def test_plots_are_drawn_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed and `apt-get install chromium` failed here")
    path = write_report(tmp_path, full_data())
    out = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            # offline: any network request would fail, so drawing proves self-containment
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--virtual-time-budget=10000",
            "--dump-dom",
            path.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dom = out.stdout
    assert dom, out.stderr[-2000:]
    # plotly replaces each empty div with SVG plots once its JS ran
    assert dom.count('class="main-svg"') >= N_FIGURES, out.stderr[-2000:]
    assert dom.count('class="trace bars"') + dom.count('class="scatterlayer') >= N_FIGURES
