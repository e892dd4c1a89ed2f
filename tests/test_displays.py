"""Displays: figures that survive HTML exports, an HTML view per result, readable titles and
names, diff-scatter labels that do not pile up, and progress bars counting work, not batches."""

from __future__ import annotations

import inspect
import io
import json
import re
import sys
from typing import ClassVar

import plotly.graph_objects as go
import pytest
import torch
import tqdm as tqdm_module
from sae_lens import StandardSAE, StandardSAEConfig

import modeldiff
from modeldiff import (
    DetectionResult,
    EvalResult,
    LatentTrack,
    MeanDifference,
    ResidualDiff,
    SelectionResult,
    Site,
    SiteDirection,
    SweepResult,
    activation_histogram,
    capture,
    diff_latents,
    generate,
)
from modeldiff.evals.scores import SampleRecord
from modeldiff.evals.screen import ScreenResult, ScreenRow, ScreenScore
from modeldiff.latent_sets import SelectionStep
from modeldiff.testing import tiny_hooked_transformer
from modeldiff.tracking import Separation
from modeldiff.views import PLOTLY_MIMETYPE, Figure

SITE = Site.resid_post(0)
PROMPTS = ["The quick brown fox", "Hello world, again and again", "A cat sat", "One two three"]


class Recorder(tqdm_module.tqdm):
    """A real tqdm bar writing to a string, remembered so a test can read total, n and unit."""

    bars: ClassVar[list[Recorder]] = []

    def __init__(self, *args, **kwargs):
        kwargs["file"] = io.StringIO()
        super().__init__(*args, **kwargs)
        Recorder.bars.append(self)


@pytest.fixture
def bars(monkeypatch):
    Recorder.bars = []
    monkeypatch.setattr("tqdm.auto.tqdm", Recorder)
    # modeldiff.capture is also the name of a function in modeldiff: patch the modules themselves
    monkeypatch.setattr(sys.modules["modeldiff.capture"], "tqdm", Recorder)
    monkeypatch.setattr(sys.modules["modeldiff.diff"], "tqdm", Recorder)
    return Recorder.bars


@pytest.fixture(scope="module")
def models():
    return tiny_hooked_transformer(), tiny_hooked_transformer(seed=4)


@pytest.fixture(scope="module")
def sae():
    cfg = StandardSAEConfig(d_in=64, d_sae=40)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(0.1)
    return sae


@pytest.fixture(scope="module")
def diff(models, sae):
    return diff_latents(*models, sae, PROMPTS, positions="all", progress=False)


def _records(qid: str = "q") -> tuple[SampleRecord, ...]:
    return (
        SampleRecord(qid, "c", 0, 0, "Q?", "A.", 10.0, 90.0, None, None, True, True),
        SampleRecord(qid, "c", 0, 1, "Q?", "B.", 80.0, 90.0, None, None, True, False),
    )


def _results(diff, models, sae) -> dict[str, object]:
    """One small instance of every public result type, keyed by class name."""
    z = torch.zeros(2)
    sep = Separation("set", {"a": 1.0, "b": 0.0}, {"a": True, "b": False}, 1.0, 1.0, 1.0, 0.5, 1.0)
    return {
        "LatentDiff": diff,
        "LatentRecord": diff.at_rank(1),
        "ResidualDiff": ResidualDiff(
            delta={SITE: torch.tensor([3.0, 4.0]), Site.resid_post(1): torch.tensor([1.0, 0.0])},
            norm={SITE: 5.0, Site.resid_post(1): 1.0},
            relative={SITE: 0.5, Site.resid_post(1): 0.1},
            n_tokens=12,
        ),
        "SweepResult": SweepResult(
            [{"coefficient": 0.0, "score": 0.25}, {"coefficient": 4.0, "score": 0.75}]
        ),
        "EvalResult": EvalResult(_records()),
        "ScreenResult": ScreenResult(
            (ScreenRow(7, 1, 0.3, 0.4, 0.2, 0.4), ScreenRow((3, 5), None, 0.1, 0.4, 0.1, 0.4)),
            base_score=ScreenScore(0.1, 0.0),
            finetuned_score=ScreenScore(0.5, 0.0),
            unit=2.0,
            site=SITE.hook_name,
        ),
        "SelectionResult": SelectionResult(
            (
                SelectionStep(1, 4, (4,), 0.5, 0.3, None),
                SelectionStep(2, 7, (4, 7), 0.6, 0.2, None),
            ),
            mode="ablate",
            base_score=0.1,
            finetuned_score=0.8,
            chosen_size=2,
            candidates=(4, 7, 9),
            site=SITE.hook_name,
        ),
        "LatentTrack": LatentTrack(
            ["step 0", "step 1"],
            [0.0, 1.0],
            (3,),
            torch.tensor([[1.0], [2.0]]),
            torch.tensor([[0.0], [1.0]]),
            torch.tensor([[0.0], [0.8]]),
            torch.tensor([[0.0], [1.2]]),
            "step 0",
            SITE.hook_name,
        ),
        "DetectionResult": DetectionResult(sep, {}, (3, 4), (0.5, -0.2), SITE.hook_name),
        "MeanDifference": MeanDifference(
            [
                SiteDirection(SITE, torch.tensor([1.0, 0.0]), z, 4, 4, 10.0),
                SiteDirection(Site.resid_post(1), torch.tensor([3.0, 0.0]), z, 4, 4, 20.0),
            ]
        ),
        "activation_histogram": activation_histogram(
            *models, sae, [3, 5], PROMPTS[:2], progress=False
        ),
    }


def _figures(diff, models, sae) -> dict[str, go.Figure]:
    out = {}
    for name, obj in _results(diff, models, sae).items():
        if isinstance(obj, go.Figure):
            out[name] = obj
        elif hasattr(obj, "plot"):
            out[name] = obj.plot()
    return out


# -- figures ---------------------------------------------------------------------------------------


def test_every_plot_has_an_html_copy_of_its_data(diff, models, sae):
    figs = _figures(diff, models, sae)
    assert set(figs) >= {
        "LatentDiff",
        "ResidualDiff",
        "SweepResult",
        "EvalResult",
        "ScreenResult",
        "SelectionResult",
        "LatentTrack",
        "DetectionResult",
        "MeanDifference",
        "activation_histogram",
    }
    for name, fig in figs.items():
        assert isinstance(fig, Figure), name
        bundle = fig._repr_mimebundle_()
        assert PLOTLY_MIMETYPE in bundle and "text/html" in bundle, name
        page = bundle["text/html"]
        assert "cdn.plot.ly" in page and "Plotly.newPlot" in page, name
        # the figure's own data is in the HTML: every trace's first y value, as plotly writes it
        for trace in fig.data:
            ys = getattr(trace, "y", None)
            if ys is not None and len(ys):
                assert json.dumps(ys[0]) in page or f"{ys[0]}" in page, (name, trace.name)
        # where scripts never run (GitHub), the title still shows
        title = fig.layout.title.text
        assert title.replace("−", "").split("(")[0].strip()[:20] in page.replace("&#x27;", "'")


def test_a_chosen_image_or_html_renderer_is_respected(monkeypatch, diff):
    import plotly.io as pio

    fig = SweepResult([{"coefficient": 0.0, "score": 1.0}]).plot()
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    assert sorted(fig._repr_mimebundle_()) == [PLOTLY_MIMETYPE, "text/html"]
    monkeypatch.setattr(pio.renderers, "default", "notebook_connected")
    page = fig._repr_mimebundle_()["text/html"]
    assert "modeldiff-" not in page  # plotly's own HTML, not ours
    monkeypatch.setattr("modeldiff.views.HTML_FALLBACK", False)
    monkeypatch.setattr(pio.renderers, "default", "plotly_mimetype")
    assert list(fig._repr_mimebundle_()) == [PLOTLY_MIMETYPE]


def test_as_figure_keeps_the_figure_and_its_methods():
    fig = modeldiff.views.as_figure(go.Figure(go.Bar(y=[1.0])))
    same = fig.update_layout(title="t")
    assert same is fig and isinstance(fig, go.Figure) and fig.layout.title.text == "t"
    assert "<div" in fig.to_html(full_html=False)


def test_every_figure_has_a_readable_title_and_named_axes(diff, models, sae):
    for name, fig in _figures(diff, models, sae).items():
        title = fig.layout.title.text
        assert title and len(title) > 10, name
        # not an object's repr
        assert not re.search(r"[A-Z]\w+\(", title), (name, title)
        used = {t.xaxis or "x" for t in fig.data} | {t.yaxis or "y" for t in fig.data}
        for axis in used:
            key = axis[0] + "axis" + axis[1:]
            assert fig.layout[key].title.text, (name, key)


def test_eval_plot_title_gives_the_rate_not_the_repr():
    title = EvalResult(_records()).plot().layout.title.text
    assert "EvalResult(" not in title and "50.0%" in title and "2 answers" in title


def test_diff_scatter_labels_at_most_k_points_by_abs_delta(diff):
    for labels in (0, 3, 6):
        fig = diff.plot(k=10, labels=labels)
        labelled = [a for a in fig.layout.annotations if a.name == "latent label"]
        assert len(labelled) == min(
            labels, len({*(r.latent for r in diff.top(10)), *(r.latent for r in diff.bottom(10))})
        )
        # the labelled ones are the largest |Δ|, named as in the tables
        names = {a.text for a in labelled}
        marked = [*diff.top(10), *diff.bottom(10)]
        best = sorted(marked, key=lambda r: (-abs(r.delta), r.latent))[:labels]
        assert names == {r.name for r in best}
        # neighbours get different offsets
        offsets = [(a.ax, a.ay) for a in labelled]
        assert len(set(offsets)) == len(offsets) or len(offsets) > 8
    assert fig.data[1].mode == "markers"  # no text piled on the points themselves


# -- HTML views ------------------------------------------------------------------------------------


def _public_classes() -> list[type]:
    return [
        obj
        for name in modeldiff.__all__
        if inspect.isclass(obj := getattr(modeldiff, name)) and not issubclass(obj, Exception)
    ]


def test_every_public_result_class_has_an_html_view(diff, models, sae):
    results = _results(diff, models, sae)
    for name, obj in results.items():
        if isinstance(obj, go.Figure):
            continue
        page = obj._repr_html_()
        assert "<table>" in page, name
        for table in re.findall(r"<table>.*?</table>", page, flags=re.S):
            heads = re.findall(r"<th>(.*?)</th>", table)
            assert len(heads) == len(set(heads)), (name, heads)
    # every public class with a plot() has a table view too, and every result type is covered
    for cls in _public_classes():
        if hasattr(cls, "plot"):
            assert hasattr(cls, "_repr_html_"), cls.__name__
    others = {"ChecksResult", "CaptureBatch"}
    for cls in _public_classes():
        if cls.__name__.endswith(("Result", "Diff", "Track", "Activations", "Lens", "Shift")):
            assert (
                cls.__name__ in results or cls.__name__ in others or hasattr(cls, "_repr_html_")
            ), cls.__name__


def test_views_escape_user_strings():
    page = EvalResult(_records("<b>q</b>"))._repr_html_()
    assert "<b>q</b>" not in page and "&lt;b&gt;q&lt;/b&gt;" in page
    page = SweepResult([{"coefficient": 1.0, "<i>m</i>": 2.0}])._repr_html_()
    assert "<i>m</i>" not in page and "&lt;i&gt;m&lt;/i&gt;" in page
    with pytest.raises(ValueError, match="share a heading"):
        modeldiff.views.html_table(("c", "c"), [])


def test_sweep_residual_checks_and_capture_views(models):
    page = SweepResult([{"coefficient": 0.0, "score": 0.25}, {"coefficient": 4.0}])._repr_html_()
    assert "<th>coefficient</th><th>score</th>" in page and "<td>4</td><td>–</td>" in page
    r = ResidualDiff(
        delta={SITE: torch.ones(2)}, norm={SITE: 5.0}, relative={SITE: 0.5}, n_tokens=3
    )
    assert "★ blocks.0.hook_resid_post" in r._repr_html_()
    from modeldiff.organisms.checks import Check, ChecksResult

    page = ChecksResult(
        [Check("diff rank", True, 1.0, "<#1>"), Check("x", False, 0.5, "")]
    )._repr_html_()
    assert "PASS" in page and "FAIL" in page and "&lt;#1&gt;" in page
    batch = next(capture(models[0], PROMPTS, SITE, progress=False))
    assert "blocks.0.hook_resid_post" in batch._repr_html_()


def test_screen_names_latents_by_index_and_ranks_by_hash():
    row = ScreenRow(7, 3, 0.3, 0.4, 0.2, 0.4)
    assert row.name == "latent 7"
    screen = ScreenResult((row,), ScreenScore(0.1), ScreenScore(0.5), 2.0, SITE.hook_name)
    page = screen._repr_html_()
    assert "<td>latent 7</td><td>#3</td>" in page
    heads = re.findall(r"<th>(.*?)</th>", page)
    assert len(heads) == len(set(heads))


# -- progress bars ---------------------------------------------------------------------------------


def _bar(bars, desc):
    # a closed bar reads disable=True; one disabled from the start never got a desc
    [bar] = [b for b in bars if getattr(b, "desc", "").startswith(desc)]
    return bar


def test_generate_counts_answers_and_shows_tokens(bars, models):
    prompts = [f"prompt {i}" for i in range(5)]
    generate(models[0], prompts, max_new_tokens=4, batch_size=2, stop_at_eos=False)
    bar = _bar(bars, "generate")
    assert (bar.total, bar.n, bar.unit) == (5, 5, "answer")
    assert "token 4/4" in bar.postfix and "20 tokens" in bar.postfix


def test_generate_answers_counts_answers(bars, models):
    from modeldiff import generate_answers

    generate_answers(models[0], ["Why?", "How?"], n_samples=3, max_new_tokens=2, batch_size=4)
    bar = _bar(bars, "generate")
    assert (bar.total, bar.n, bar.unit) == (6, 6, "answer")


def test_capture_and_diff_count_tokens(bars, models, sae):
    from modeldiff.tokens import tokenize_prompts

    n_tokens = sum(len(tp) for tp in tokenize_prompts(models[0], PROMPTS))
    list(capture(models[0], PROMPTS, SITE, batch_size=2, positions="all"))
    bar = _bar(bars, "capture")
    assert (bar.total, bar.n, bar.unit) == (n_tokens, n_tokens, "tok")
    diff_latents(*models, sae, PROMPTS, positions="all", batch_size=2)
    bar = _bar(bars, "diff_latents")
    assert (bar.total, bar.n, bar.unit) == (n_tokens, n_tokens, "tok")


def test_contrastive_scoring_counts_answers(bars, models):
    from modeldiff.evals.contrastive import response_logprobs

    pairs = [([{"role": "user", "content": "Hi"}], "Hello")] * 3
    response_logprobs(tiny_hooked_transformer(n_ctx=256), pairs, batch_size=2)
    bar = _bar(bars, "scoring")
    assert (bar.total, bar.n, bar.unit) == (3, 3, "answer")


def test_finetuning_curves_have_html_views_and_exportable_figures():
    from modeldiff.finetuning import FinetuneResult, LossCurve

    n = 30
    curve = LossCurve(tuple(range(1, n + 1)), tuple(2.0 - 0.05 * i for i in range(n)),
                      tuple(2.0 - 0.05 * i for i in range(n)), (0.0,) * n, (1e-3,) * n)  # fmt: skip
    page = curve._repr_html_()
    rows = re.findall(r"<tr><td>(\d+)</td>", page)
    assert rows[0] == "1" and rows[-1] == str(n) and len(rows) <= 12  # first and last step shown
    run = FinetuneResult(model=torch.nn.Linear(2, 2), curve=curve, resumed_from=10)
    assert "resumed from step 10" in run._repr_html_() and "<table>" in run._repr_html_()
    bundle = curve.plot()._repr_mimebundle_()
    assert "text/html" in bundle
