"""track_latents over checkpoints, detect / detect_responses, and the AUROC they rest on, each
checked against a construction with a known answer and an independent computation."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldiff import (
    DetectionResult,
    LatentSet,
    LatentTrack,
    capture,
    detect,
    detect_responses,
    diff_latents,
    load_model,
    track_latents,
)
from modeldiff.errors import ArgumentError, FileFormatError
from modeldiff.tracking import auroc

SITE = "blocks.0.hook_resid_post"
PROMPTS = [
    "Hello there friend",
    "The quick fox ran",
    "A cat sat down here",
    "We went home late",
    "Numbers go up and down",
    "Rain falls on the hills",
    "Birds sing at dawn",
    "Open the window now",
]


def _sae(d_sae: int = 16, seed: int = 0):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae)
    cfg.metadata.hook_name = SITE
    torch.manual_seed(seed)
    s = StandardSAE(cfg)
    s.requires_grad_(False)
    return s


@pytest.fixture(scope="module")
def sae():
    return _sae()


@pytest.fixture(scope="module")
def base(tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer, seed=0)


def shifted(model, v: torch.Tensor, alpha: float):
    """``model`` with ``alpha * v`` added to block 0's attention output bias (so to every token's
    residual at SITE): a fine-tune whose shift along ``v`` grows with ``alpha``."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.blocks[0].attn.b_O.add_(alpha * v)
    return m


# -- AUROC ---------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-3, 3), st.booleans()), min_size=2, max_size=30).filter(
        lambda xs: any(y for _, y in xs) and not all(y for _, y in xs)
    )
)
def test_auroc_is_the_pairwise_win_rate_with_ties_half(items):
    scores = [float(s) for s, _ in items]
    labels = [y for _, y in items]
    pos = [s for s, y in items if y]
    neg = [s for s, y in items if not y]
    naive = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(naive)


def test_auroc_needs_both_labels():
    with pytest.raises(ArgumentError, match="both kinds"):
        auroc([1.0, 2.0], [True, True])
    with pytest.raises(ArgumentError, match="one label per score"):
        auroc([1.0, 2.0], [True])


# -- track_latents -------------------------------------------------------------------------------


def test_track_follows_a_monotone_planted_shift_and_matches_diff_latents(base, sae):
    j = 5
    v = sae.W_enc[:, j] / sae.W_enc[:, j].norm() * 3.0  # pushes latent j up
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    alive: list[weakref.ref] = []
    most_alive = [0]

    def make(alpha):
        def load():
            gc.collect()
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
            m = shifted(base, v, alpha)
            alive.append(weakref.ref(m))
            return m

        return load

    t = track_latents(
        [make(a) for a in alphas],
        sae,
        PROMPTS,
        [j, 2],
        x=alphas,
        x_title="share of the fine-tune",
        positions="all",
        n_bootstrap=200,
        progress=False,
    )
    # the checkpoints were loaded one at a time: none of the earlier ones was still alive
    assert most_alive[0] == 0
    d = t.delta_of(j)
    assert d[0] == 0.0
    assert all(b > a for a, b in zip(d.tolist(), d[1:].tolist(), strict=False))
    # at alpha = 1 the shift is the diff of base vs the full fine-tune
    ref = diff_latents(  # with the same (default) outlier filter
        base,
        shifted(base, v, 1.0),
        sae,
        PROMPTS,
        positions="all",
        uncertainty=None,
        progress=False,
    )
    assert float(d[-1]) == pytest.approx(float(ref.delta[j]), rel=1e-5, abs=1e-6)
    assert float(t.delta_of(2)[-1]) == pytest.approx(float(ref.delta[2]), rel=1e-5, abs=1e-6)
    assert bool((t.ci_low <= t.delta + 1e-6).all() and (t.delta <= t.ci_high + 1e-6).all())
    assert float(t.ci_low[-1, 0]) > 0  # the planted rise is clearly positive
    fig = t.plot()
    assert len(fig.data) == 2 and list(fig.data[0].x) == alphas
    assert fig.layout.xaxis.title.text == "share of the fine-tune"
    assert "latent shifts" in t._repr_html_()
    # the set score is the weighted mean of the tracked shifts
    ts = track_latents(
        [make(0.0), make(1.0)],
        sae,
        PROMPTS,
        LatentSet(sae, [j, 2], weights=[2.0, -1.0]),
        positions="all",
        n_bootstrap=0,
        progress=False,
    )
    expect = (2.0 * ts.delta[:, 0] - ts.delta[:, 1]) / 3.0
    torch.testing.assert_close(ts.set_delta, expect)


def test_track_with_a_separate_reference_and_models(base, sae):
    v = torch.randn(64, generator=torch.Generator().manual_seed(1))
    m1, m2 = shifted(base, v, 1.0), shifted(base, v, 2.0)
    t = track_latents(
        [m1, m2], sae, PROMPTS[:4], [0, 1, 2], reference=base, n_bootstrap=0, progress=False
    )
    assert t.reference == "reference"
    ref = diff_latents(
        base, m2, sae, PROMPTS[:4], uncertainty=None, outlier_factor=None, progress=False
    )
    torch.testing.assert_close(t.delta[1], ref.delta[[0, 1, 2]].float(), rtol=1e-5, atol=1e-6)
    # the means are the fine-tune's own means
    torch.testing.assert_close(
        t.mean[1], ref.mean_finetuned[[0, 1, 2]].float(), rtol=1e-5, atol=1e-6
    )


def test_track_loads_checkpoints_from_paths(tmp_path, sae):
    from modeldiff.testing import save_tiny_hf_model

    paths = [save_tiny_hf_model("llama", tmp_path / f"ck{s}", seed=s) for s in (0, 1)]
    models = [load_model(p, wrapper="native") for p in paths]
    sae_l = _sae()
    by_path = track_latents(
        paths,
        sae_l,
        PROMPTS[:3],
        [1, 4],
        n_bootstrap=0,
        load_kwargs={"wrapper": "native"},
        progress=False,
    )
    by_model = track_latents(models, sae_l, PROMPTS[:3], [1, 4], n_bootstrap=0, progress=False)
    torch.testing.assert_close(by_path.delta, by_model.delta)
    assert by_path.labels == ["ck0", "ck1"]


def test_track_round_trips_and_refuses_bad_input(base, sae, tmp_path):
    t = track_latents(
        [base, shifted(base, torch.ones(64), 1.0)],
        sae,
        PROMPTS[:3],
        [3],
        n_bootstrap=50,
        progress=False,
    )
    t.save(tmp_path / "track")
    back = LatentTrack.load(tmp_path / "track.json")
    torch.testing.assert_close(back.delta, t.delta)
    assert back.labels == t.labels and back.latents == (3,) and back.x == t.x
    (tmp_path / "bad.json").write_text('{"format": "nope"}')
    with pytest.raises(FileFormatError, match="not a saved LatentTrack"):
        LatentTrack.load(tmp_path / "bad.json")
    with pytest.raises(ArgumentError, match="checkpoints is empty"):
        track_latents([], sae, PROMPTS, [1])
    with pytest.raises(ArgumentError, match="2 labels for 1 checkpoints"):
        track_latents([base], sae, PROMPTS, [1], labels=["a", "b"])
    with pytest.raises(ArgumentError, match="out of range"):
        track_latents([base], sae, PROMPTS, [99])
    with pytest.raises(ArgumentError, match="not tracked"):
        t.delta_of(7)


# -- detect --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zoo(base, sae):
    """Four 'misaligned' fine-tunes pushing latent 5 up by different amounts, four 'aligned'
    ones with pushes of similar size in random directions orthogonal to its encoder row."""
    j = 5
    w = sae.W_enc[:, j] / sae.W_enc[:, j].norm()
    g = torch.Generator().manual_seed(7)
    models = {}
    for i, amount in enumerate((2.0, 2.5, 3.0, 3.5)):
        models[f"bad{i}"] = (shifted(base, w, amount), True)
    for i in range(4):
        r = torch.randn(64, generator=g)
        r = r - (r @ w) * w
        models[f"good{i}"] = (shifted(base, r / r.norm(), 3.0), False)
    return models, j


def test_detect_selects_the_planted_latent_on_held_out_prompts(base, sae, zoo):
    models, j = zoo
    r = detect(base, models, sae, PROMPTS, k=3, n_bootstrap=200, progress=False)
    assert isinstance(r, DetectionResult)
    assert j in r.latents
    assert r.auroc == 1.0 and r.auroc_leave_one_out == 1.0
    assert r.main.ci_low <= r.auroc <= r.main.ci_high
    assert r.meta["selection_prompts"] + r.meta["evaluation_prompts"] == len(PROMPTS)
    assert set(r.scores) == set(models)
    # the threshold separates the labels on these scores
    t = r.main.threshold
    assert all((s >= t) == models[k][1] for k, s in r.scores.items())
    # the residual-drift baseline: the norm of each model's mean residual shift on the
    # evaluation prompts, recomputed here from plain captures
    from modeldiff.tracking import _split

    _, eval_idx = _split(len(PROMPTS), 0.5, 0)
    ev = [PROMPTS[i] for i in eval_idx]

    def mean_resid(m):
        rows = [
            b.acts[next(iter(b.acts))]
            for b in capture(m, ev, SITE, positions="prompt", progress=False)
        ]
        return torch.cat(rows).double().mean(0)

    drift = float((mean_resid(models["bad2"][0]) - mean_resid(base)).norm())
    assert r.baselines["residual drift"].scores["bad2"] == pytest.approx(drift, rel=1e-4)
    # the leave-one-model-out mean-difference baseline, by hand for bad2: a direction fit on the
    # other seven models' selection-prompt shifts, applied to bad2's evaluation-prompt shift
    sel_idx, _ = _split(len(PROMPTS), 0.5, 0)
    sel = [PROMPTS[i] for i in sel_idx]

    def shift(m, prompts):
        def mean(model):
            rows = [
                b.acts[next(iter(b.acts))]
                for b in capture(model, prompts, SITE, positions="prompt", progress=False)
            ]
            return torch.cat(rows).double().mean(0)

        return mean(m) - mean(base)

    others = {k: v for k, v in models.items() if k != "bad2"}
    bad = torch.stack([shift(m, sel) for m, y in others.values() if y]).mean(0)
    good = torch.stack([shift(m, sel) for m, y in others.values() if not y]).mean(0)
    u = (bad - good) / (bad - good).norm()
    loo = r.baselines["mean-difference direction, leave one model out"]
    assert loo.scores["bad2"] == pytest.approx(float(shift(models["bad2"][0], ev) @ u), rel=1e-3)
    assert loo.auroc == 1.0  # the planted push is in every misaligned model
    # given latents: nothing is selected, all prompts score
    r2 = detect(
        base,
        models,
        sae,
        PROMPTS,
        latents=[j],
        selection_fraction=0.0,
        n_bootstrap=0,
        progress=False,
    )
    assert r2.latents == (j,) and math.isnan(r2.auroc_leave_one_out)
    assert r2.meta["evaluation_prompts"] == len(PROMPTS) and r2.auroc == 1.0


def test_detect_result_saves_renders_and_plots(base, sae, zoo, tmp_path):
    models, _ = zoo
    r = detect(base, models, sae, PROMPTS, k=2, n_bootstrap=20, progress=False)
    back = DetectionResult.load(r.save(tmp_path / "det.json"))
    assert back.to_dict() == r.to_dict()
    html = r._repr_html_()
    assert "residual drift" in html and "leave-one-model-out" in html
    fig = r.plot()
    assert len(fig.data) == 2
    assert "AUROC" in repr(r)


def test_detect_refuses_what_it_cannot_measure(base, sae, zoo):
    models, _ = zoo
    same = {k: v for k, v in models.items() if v[1]}
    with pytest.raises(ArgumentError, match="both kinds"):
        detect(base, same, sae, PROMPTS)
    with pytest.raises(ArgumentError, match="pairs"):
        detect(base, [base], sae, PROMPTS)
    with pytest.raises(ArgumentError, match=r"True \(misaligned\) or False"):
        detect(base, {"a": (base, 1), "b": (base, False)}, sae, PROMPTS)
    with pytest.raises(ArgumentError, match="selection_fraction > 0"):
        detect(base, models, sae, PROMPTS, selection_fraction=0.0)
    with pytest.raises(ArgumentError, match="cannot be split"):
        detect(base, models, sae, PROMPTS[:1])


def test_detect_responses_ranks_answers_by_the_set_activation(tokenizer, sae):
    from modeldiff.testing import tiny_hooked_transformer

    m = tiny_hooked_transformer(tokenizer=tokenizer, seed=2)
    pairs = [
        ("Q: how are you", " fine thanks"),
        ("Q: tell me", " something bad and bad"),
        ("Q: what now", " rest a while"),
        ("Q: go on", " the bad path"),
        ("Q: any tips", " drink water"),
    ]
    # an independent per-response score: encode every response token by hand
    feats = []
    for b in capture(m, pairs, SITE, positions="response", progress=False):
        enc = sae.encode(next(iter(b.acts.values())))
        for p in b.prompt_index.unique().tolist():
            feats.append((p, enc[b.prompt_index == p][:, [1, 4]].double().mean(0)))
    naive = dict(feats)
    score = {p: float((2.0 * f[0] + 1.0 * f[1]) / 3.0) for p, f in naive.items()}
    order = sorted(score, key=score.get)
    labels = [p in order[-2:] for p in range(len(pairs))]  # the two highest are "misaligned"
    r = detect_responses(
        m,
        sae,
        pairs,
        labels,
        LatentSet(sae, [1, 4], weights=[2.0, 1.0]),
        n_bootstrap=50,
        progress=False,
    )
    assert r.auroc == 1.0
    for p in range(len(pairs)):
        assert r.scores[str(p)] == pytest.approx(score[p], rel=1e-5, abs=1e-7)
    with pytest.raises(ArgumentError, match="one each"):
        detect_responses(m, sae, pairs, labels[:2], [1])


@pytest.mark.parametrize("wrapper", ["hooked", "native"])
def test_a_model_the_library_ran_is_freed_with_its_last_reference(tmp_path, wrapper, sae):
    """The adapter cache must not keep models alive (a WeakKeyDictionary whose values reference
    their keys did), else tracking many checkpoints holds every one of them."""
    from modeldiff import ablate, generate, steer
    from modeldiff.testing import save_tiny_hf_model, tiny_hooked_transformer

    if wrapper == "hooked":
        m = tiny_hooked_transformer(seed=3)
    else:
        m = load_model(save_tiny_hf_model("llama", tmp_path / "m"), wrapper="native")
    ref = weakref.ref(m)
    diff_latents(m, m, sae, ["hello there"], uncertainty=None, progress=False)
    with steer(m, torch.ones(64), site=SITE, coefficient=1.0, positions="generated"):
        generate(m, ["hi"], max_new_tokens=2, progress=False)
    with ablate(m, sae, [1, 2]), torch.no_grad():
        m(torch.tensor([[5, 6]]))
    del m
    gc.collect()
    assert ref() is None


def test_outlier_tokens_are_dropped_per_model(base, sae):
    """A token whose residual is 1000x its prompt's median (an attention sink) leaves the
    statistics when outlier_factor is set, and only that token."""
    from modeldiff._hooks import add_hook
    from modeldiff.diff import collect_site_stats

    def blow_up_position_1(x, hook):
        x = x.clone()
        x[:, 1] *= 1000.0
        return x

    h = add_hook(base, SITE, blow_up_position_1)
    try:
        kept = collect_site_stats(
            base, sae, PROMPTS[:3], site=SITE, positions="all", outlier_factor=10.0, progress=False
        )
        every = collect_site_stats(
            base, sae, PROMPTS[:3], site=SITE, positions="all", progress=False
        )
        t = track_latents(
            [base, base], sae, PROMPTS[:3], [1], positions="all", n_bootstrap=0, progress=False
        )
    finally:
        h.remove()
    assert every.latents.count - kept.latents.count == 3  # one token per prompt
    torch.testing.assert_close(
        t.mean[0].double(), kept.latents.mean[[1]].double(), rtol=1e-5, atol=1e-7
    )
