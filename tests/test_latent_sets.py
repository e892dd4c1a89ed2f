"""Latent sets: one thing that steer / ablate / project_out / screen_latents accept, and
select_latents' greedy search checked against a planted behaviour only a joint ablation removes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modeldiff import (
    LatentSet,
    SelectionResult,
    ablate,
    diff_latents,
    project_out,
    select_latents,
    steer,
)
from modeldiff._hooks import add_hook
from modeldiff.errors import ArgumentError, FileFormatError
from modeldiff.evals import ScreenScore, screen_latents
from modeldiff.interventions import InterventionError

SITE = "blocks.0.hook_resid_post"
D = 64


def _sae(d_sae: int = 16, seed: int = 0, rows: torch.Tensor | None = None):
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=D, d_sae=d_sae)
    cfg.metadata.hook_name = SITE
    torch.manual_seed(seed)
    s = StandardSAE(cfg)
    if rows is not None:  # decoder rows given; encoder = their transpose, no biases
        with torch.no_grad():
            s.W_dec.copy_(rows)
            s.W_enc.copy_(rows.T)
            s.b_enc.zero_()
            s.b_dec.zero_()
    s.requires_grad_(False)
    return s


@pytest.fixture(scope="module")
def model(tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer, seed=1)


@pytest.fixture(scope="module")
def sae():
    return _sae()


TOKS = torch.tensor([[5, 6, 7, 8, 9]])


def value_at(model, site=SITE):
    got = []
    h = add_hook(model, site, lambda x, hook: got.append(x.detach().clone()))
    try:
        with torch.no_grad():
            model(TOKS)
    finally:
        h.remove()
    return got[0]


# -- the set itself ------------------------------------------------------------------------------


def test_set_validates_and_names_the_fix(sae):
    with pytest.raises(ArgumentError, match=r"out of range.*16 latents"):
        LatentSet(sae, [3, 16])
    with pytest.raises(ArgumentError, match="repeat"):
        LatentSet(sae, [3, 3])
    with pytest.raises(ArgumentError, match="one per latent"):
        LatentSet(sae, [1, 2], weights=[1.0])
    with pytest.raises(ArgumentError, match="finite"):
        LatentSet(sae, [1], weights=[math.nan])
    with pytest.raises(ArgumentError, match="integer index"):
        LatentSet(sae, [1.5])
    with pytest.raises(ArgumentError, match="W_dec"):
        LatentSet("not an sae", [1])
    s = LatentSet(sae, torch.tensor([4, 2]))
    assert s.latents == (4, 2) and s.weights == (1.0, 1.0) and s.site.hook_name == SITE
    assert LatentSet(sae, 7).latents == (7,)
    u = s | LatentSet(sae, [2, 9], weights=[5.0, 3.0])
    assert u.latents == (4, 2, 9) and u.weights == (1.0, 1.0, 3.0)
    with pytest.raises(ArgumentError, match="same SAE"):
        s | LatentSet(_sae(seed=1), [1])
    assert s.with_latent(11, 2.0).latents == (4, 2, 11)


def test_set_round_trip_refuses_another_sae(sae):
    s = LatentSet(sae, [1, 5], weights=[0.5, -1.0], label="mine")
    back = LatentSet.from_dict(s.to_dict(), sae)
    assert (back.latents, back.weights, back.site, back.label) == (
        s.latents,
        s.weights,
        s.site,
        "mine",
    )
    with pytest.raises(ArgumentError, match="not the one the set was saved with"):
        LatentSet.from_dict(s.to_dict(), _sae(seed=3))


def test_from_diff_takes_the_diffs_top_rows_weighted_by_delta(tokenizer, sae):
    from modeldiff.testing import tiny_hooked_transformer

    base = tiny_hooked_transformer(tokenizer=tokenizer, seed=0)
    tuned = tiny_hooked_transformer(tokenizer=tokenizer, seed=1)
    d = diff_latents(
        base,
        tuned,
        sae,
        ["Hello there friend", "The fox ran"],
        uncertainty=None,
        positions="all",
        progress=False,
    )
    s = LatentSet.from_diff(d, sae, 4)
    assert s.latents == tuple(int(r.latent) for r in d.top(4))
    assert s.weights == tuple(pytest.approx(float(d.delta[i])) for i in s.latents)
    assert LatentSet(sae, d.top(4)).weights == s.weights  # rows carry their Δ
    with pytest.raises(Exception, match="not the one the diff was computed with"):
        LatentSet.from_diff(d, _sae(seed=5), 4)


# -- interventions accept it ---------------------------------------------------------------------


def test_steer_with_a_set_is_steering_with_its_weighted_direction(model, sae):
    s = LatentSet(sae, [2, 7, 11], weights=[1.0, -0.5, 2.0])
    vec = sae.W_dec[2] - 0.5 * sae.W_dec[7] + 2.0 * sae.W_dec[11]
    with torch.no_grad():
        with steer(model, s, coefficient=3.0):
            a = model(TOKS)
        with steer(model, vec, site=SITE, coefficient=3.0):
            b = model(TOKS)
        plain = model(TOKS)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)


def test_ablate_with_a_set_equals_ablating_its_latents(model, sae):
    s = LatentSet(sae, [0, 3, 9])
    with torch.no_grad():
        with ablate(model, s):
            a = model(TOKS)
        with ablate(model, sae, [0, 3, 9]):
            b = model(TOKS)
    assert torch.equal(a, b)
    with pytest.raises(InterventionError, match="not both"):
        ablate(model, s, [1])
    with pytest.raises(InterventionError, match="which latents"):
        ablate(model, sae)


def test_project_out_a_set_removes_its_span_and_nothing_else(model, sae):
    s = LatentSet(sae, [1, 4, 6])
    before = value_at(model)
    with project_out(model, s) as _:
        after = value_at(model)
    rows = sae.W_dec[[1, 4, 6]].double()
    # nothing of the span is left
    assert float((after.double() @ rows.T).abs().max()) < 1e-4
    # the naive projection: x - A^T (A A^T)^-1 A x
    x = before.double()
    proj = x @ rows.T @ torch.linalg.inv(rows @ rows.T) @ rows
    torch.testing.assert_close(after.double(), x - proj, atol=1e-4, rtol=1e-4)
    assert project_out(model, s).rank == 3
    # a dependent row adds nothing: rank stays 2
    dep = torch.stack([sae.W_dec[1], sae.W_dec[4], sae.W_dec[1] + sae.W_dec[4]])
    assert project_out(model, dep, site=SITE).rank == 2
    with pytest.raises(InterventionError, match="zero subspace"):
        project_out(model, torch.zeros(2, D), site=SITE)
    with pytest.raises(InterventionError, match=r"\[k, d_model=64\]"):
        project_out(model, torch.ones(2, 3), site=SITE)


@settings(max_examples=15, deadline=None)
@given(latents=st.lists(st.integers(0, 15), min_size=1, max_size=5, unique=True))
def test_project_out_any_set_is_an_idempotent_projection(latents, model, sae):
    s = LatentSet(sae, latents)
    with project_out(model, s):
        once = value_at(model)
        with project_out(model, s):
            twice = value_at(model)
    rows = sae.W_dec[latents]
    assert float((once @ rows.T).abs().max()) < 1e-4
    torch.testing.assert_close(once, twice, atol=1e-5, rtol=1e-5)
    if len(latents) == 1:  # a one-latent set is project_out of that latent's row
        with project_out(model, (sae, latents[0]), site=SITE):
            torch.testing.assert_close(value_at(model), once, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_after_set_interventions(model, sae):
    before = {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()}
    s = LatentSet(sae, [1, 2])
    with (
        pytest.raises(RuntimeError),
        steer(model, s, coefficient=1.0),
        ablate(model, s),
        project_out(model, s),
    ):
        raise RuntimeError("boom")
    assert {n: len(hp.fwd_hooks) for n, hp in model.hook_dict.items()} == before


def test_screen_accepts_sets_beside_latents(tokenizer, sae):
    from modeldiff.testing import tiny_hooked_transformer

    base = tiny_hooked_transformer(tokenizer=tokenizer, seed=0)
    tuned = tiny_hooked_transformer(tokenizer=tokenizer, seed=1)

    def score(m):
        with torch.no_grad():
            return ScreenScore(float(m(TOKS)[0, -1].softmax(-1)[5]))

    res = screen_latents(
        base,
        tuned,
        sae,
        latents=[3, LatentSet(sae, [3]), LatentSet(sae, [3, 8], weights=[1.0, -1.0])],
        coefficients=(0.5, 1.0),
        scorer=score,
        unit=2.0,
        progress=False,
    )
    by = {r.latent: r for r in res.rows}
    assert set(by) == {3, (3,), (3, 8)}
    # a one-latent set with weight 1 steers exactly like the latent
    assert by[3].induce_curve == by[(3,)].induce_curve
    assert by[3].repair_curve == by[(3,)].repair_curve
    assert by[(3, 8)].name == "{3, 8}" and "{3, 8}" in res._repr_html_()
    assert "induce c" in res._repr_html_() and "repair c" in res._repr_html_()
    back = type(res).from_dict(res.to_dict())
    assert {r.latent for r in back.rows} == {3, (3,), (3, 8)}


# -- select_latents ------------------------------------------------------------------------------


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, n, generator=g))
    return q.T.contiguous()


@pytest.fixture(scope="module")
def planted(tokenizer):
    """A fine-tune whose 'behaviour' is carried redundantly by latents A and B (an OR): ablating
    either alone leaves it; only the pair removes it. Latent C carries a small separate part."""
    from modeldiff.testing import tiny_hooked_transformer

    base = tiny_hooked_transformer(tokenizer=tokenizer, seed=0)
    tuned = tiny_hooked_transformer(tokenizer=tokenizer, seed=0)
    rows = _orthonormal(8, 0)
    a, b, c = 0, 1, 2
    push = 10.0 * (rows[a] + rows[b]) + 4.0 * rows[c]
    with torch.no_grad():  # the fine-tune writes along A, B and C at every token
        tuned.blocks[0].attn.b_O.add_(push)
    sae = _sae(8, rows=rows)

    def behaviour(m):
        got = []
        h = add_hook(m, "blocks.1.hook_resid_pre", lambda x, hook: got.append(x.detach()))
        try:
            with torch.no_grad():
                m(TOKS)
        finally:
            h.remove()
        x = got[0][0]
        ra, rb, rc = (x @ rows[i] for i in (a, b, c))
        either = ((ra > 5) | (rb > 5)).float()  # on where A or B is on: an OR of the two
        return ScreenScore(float(either.mean() + 0.5 * (rc > 2).float().mean()))

    return base, tuned, sae, behaviour, (a, b, c)


def test_select_finds_the_pair_only_a_joint_ablation_removes(planted):
    base, tuned, sae, behaviour, (a, b, c) = planted
    res = select_latents(
        base, tuned, sae, candidates=list(range(8)), max_size=4, scorer=behaviour, progress=False
    )
    assert isinstance(res, SelectionResult)
    # step 1 cannot remove the OR: the best single latent is C (the only one that moves it alone)
    assert res.steps[0].added == c
    assert res.steps[0].tried[a] == pytest.approx(0.0, abs=1e-4)
    chosen = set(res.latents)
    assert {a, b} <= chosen
    assert res.effects[len(res.latents) - 1] >= 0.95 * max(res.effects)
    assert res.effects[0] < 0.5 * max(res.effects)
    # the effect recorded for the chosen set is what ablating it does
    with ablate(tuned, sae, list(res.latents)):
        after = behaviour(tuned).misalignment
    assert res.finetuned_score - after == pytest.approx(res.effects[res.chosen_size - 1], abs=1e-6)
    # target stops early: once 90% of the gap is gone nothing more is added
    early = select_latents(
        base,
        tuned,
        sae,
        candidates=list(range(8)),
        max_size=6,
        scorer=behaviour,
        target=0.9,
        progress=False,
    )
    assert len(early.steps) == early.chosen_size <= 3
    assert early.effects[-1] >= 0.9 * early.gap
    # the greedy order is the same whichever way candidates are listed
    rev = select_latents(
        base,
        tuned,
        sae,
        candidates=list(range(8))[::-1],
        max_size=3,
        scorer=behaviour,
        progress=False,
    )
    assert set(rev.steps[2].latents) == set(res.steps[2].latents)


def test_select_in_steering_mode_raises_the_base(planted):
    base, tuned, sae, behaviour, (a, b, c) = planted
    res = select_latents(
        base,
        tuned,
        sae,
        candidates=[a, b, c, 5],
        max_size=2,
        mode="steer",
        unit=8.0,
        coefficient=1.0,
        scorer=behaviour,
        progress=False,
    )
    assert res.mode == "steer"
    assert res.steps[0].added in (a, b)  # steering along A (or B) alone already raises the OR
    assert res.effects[0] > 0


def test_selection_result_saves_plots_and_renders(planted, tmp_path):
    base, tuned, sae, behaviour, _ = planted
    res = select_latents(
        base, tuned, sae, candidates=[0, 1, 2], max_size=3, scorer=behaviour, progress=False
    )
    path = res.save(tmp_path / "sel.json")
    back = SelectionResult.load(path)
    assert back.to_dict() == res.to_dict()
    fig = res.plot()
    assert list(fig.data[0].y) == pytest.approx(res.effects)
    assert "greedy selection" in res._repr_html_() and "added latent" in res._repr_html_()
    assert res.latent_set(sae).latents == res.latents
    (tmp_path / "bad.json").write_text('{"format": "other"}')
    with pytest.raises(FileFormatError, match="not a saved SelectionResult"):
        SelectionResult.load(tmp_path / "bad.json")


def test_select_rejects_bad_options(planted):
    base, tuned, sae, behaviour, _ = planted
    with pytest.raises(ArgumentError, match="mode must be"):
        select_latents(base, tuned, sae, candidates=[1], mode="both", scorer=behaviour)
    with pytest.raises(ArgumentError, match="candidates"):
        select_latents(base, tuned, sae, scorer=behaviour)
    with pytest.raises(ArgumentError, match="max_size"):
        select_latents(base, tuned, sae, candidates=[1], max_size=0, scorer=behaviour)
    with pytest.raises(ArgumentError, match="diff"):
        select_latents(base, tuned, sae, candidates=[1], ablation="mean", scorer=behaviour)
    with pytest.raises(ArgumentError, match="out of range"):
        select_latents(base, tuned, sae, candidates=[99], scorer=behaviour)


def test_docs_page_example_runs_as_written(capsys):
    """docs/latent-sets.md: the tiny-model block runs and prints what the page shows."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "latent-sets.md").read_text()
    pairs = re.findall(r"```python\n(.*?)```\n\n```text\n(.*?)```", doc, flags=re.S)
    tiny = [(code, out) for code, out in pairs if "build_persona_organism" not in code]
    assert len(tiny) == 1
    code, expected = tiny[0]
    exec(compile(code, "docs/latent-sets.md", "exec"), {})
    assert capsys.readouterr().out == expected
