"""screen_latents on a small setting where exactly one latent is planted to matter."""

from __future__ import annotations

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from modeldiff.diff import diff_latents
from modeldiff.evals import (
    ContrastiveScorer,
    ScreenResult,
    ScreenScore,
    load_questions,
    screen_latents,
)
from modeldiff.interventions import median_residual_norm
from modeldiff.testing import tiny_hooked_transformer
from modeldiff.tokens import tokenize_prompts

SITE = "blocks.1.hook_resid_post"
PLANTED = 5


# small forwards: 2 torch threads on the shared 2-core box were many times slower than 1
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setting(tokenizer):
    qs = load_questions("headline")[:4]
    base = tiny_hooked_transformer(tokenizer=tokenizer, n_ctx=256)
    # the planted direction: its unembedding favours the misaligned answers' tokens
    with torch.no_grad():
        cols = {}
        for key in ("aligned", "misaligned"):
            tps = tokenize_prompts(base, [(q.messages(), getattr(q, key)) for q in qs])
            ids = torch.tensor([t for tp in tps for t in tp.ids[tp.n_prompt :]])
            cols[key] = base.W_U[:, ids].mean(-1)
        planted = cols["misaligned"] - cols["aligned"]
        planted = planted / planted.norm()
    # an SAE whose latents are orthonormal directions, one of them the planted direction
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.cat([planted[:, None], torch.randn(64, 15, generator=gen)], 1))[0]
    w_dec = basis.T.clone()
    w_dec[[0, PLANTED]] = w_dec[[PLANTED, 0]]
    w_dec[PLANTED] = planted  # qr may flip the sign
    cfg = StandardSAEConfig(d_in=64, d_sae=16)
    cfg.metadata.hook_name = SITE
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    # the "fine-tune": the same weights with a constant push along the planted direction
    unit = median_residual_norm(base, [q.messages() for q in qs], SITE)
    tuned = tiny_hooked_transformer(tokenizer=tokenizer, n_ctx=256)
    with torch.no_grad():
        tuned.blocks[1].mlp.b_out += 1.0 * unit * planted
    return qs, base, tuned, sae, unit


def test_the_planted_latent_comes_out_on_top(setting):
    qs, base, tuned, sae, _ = setting
    diff = diff_latents(
        base, tuned, sae, [q.messages() for q in qs], progress=False, uncertainty=None
    )
    assert diff.rank_of(PLANTED) == 1
    before = base(torch.tensor([[5, 6, 7, 8]]))
    scorer = ContrastiveScorer(qs)
    res = screen_latents(
        base, tuned, sae, diff, k=5, coefficients=(0.25, 0.5, 1.0), scorer=scorer, progress=False
    )
    assert torch.equal(base(torch.tensor([[5, 6, 7, 8]])), before)  # every hook removed
    headline = [q.messages() for q in load_questions("headline")]
    assert res.unit == pytest.approx(median_residual_norm(base, headline, SITE))
    assert res.finetuned_score.misalignment > res.base_score.misalignment
    top = res.rows[0]
    assert top.latent == PLANTED and top.rank == 1
    assert top.induce_effect > 0.03 and top.repair_effect > 0.03
    others = [r for r in res.rows if r.latent != PLANTED]
    assert len(others) == 4
    assert all(abs(r.effect) < top.effect / 3 for r in others)
    # effects are differences of the scorer's own numbers at the chosen coefficients
    c = top.induce_coefficient
    point = next(p for p in top.induce_curve if p[0] == c)
    assert top.induce_effect == pytest.approx(point[1] - res.base_score.misalignment)


class ProbeScorer:
    """Misalignment: mean logit of token 9; incoherence: grows with how far logits moved."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.ref: dict[int, torch.Tensor] = {}
        self.toks = torch.tensor([[5, 6, 7, 8, 9, 10]])

    def __call__(self, model):
        with torch.no_grad():
            logits = model(self.toks)[0]
        ref = self.ref.setdefault(id(model), logits)
        moved = float((logits - ref).norm() / ref.norm())
        return ScreenScore(float(logits[:, 9].mean()), min(1.0, moved / self.scale))


def test_coefficients_are_calibrated_to_the_incoherence_budget(setting, tmp_path):
    _, base, tuned, sae, unit = setting
    coefficients = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
    res = screen_latents(
        base,
        tuned,
        sae,
        latents=[PLANTED, 3],
        coefficients=coefficients,
        incoherence_budget=0.10,
        scorer=ProbeScorer(scale=2.0),
        unit=unit,
        progress=False,
    )
    for row in res.rows:
        for curve, chosen in (
            (row.induce_curve, row.induce_coefficient),
            (row.repair_curve, row.repair_coefficient),
        ):
            tried = [p[0] for p in curve]
            assert tried == list(coefficients[: len(tried)])
            within = [p for p in curve if p[2] <= 0.10]
            assert chosen == (within[-1][0] if within else None)
            if len(tried) < len(coefficients):  # stopped at the first over budget
                assert curve[-1][2] > 0.10
            assert len(within) < len(coefficients)  # the budget did bind somewhere
    assert all(r.rank is None for r in res.rows)
    back = ScreenResult.load(res.save(tmp_path / "screen.json"))
    assert back == res
    fig = res.plot()
    assert [b.name for b in fig.data] == ["induce (base +c)", "repair (fine-tuned −c)"]
    assert list(fig.data[0].y) == [r.induce_effect for r in res.rows]
    assert "<table>" in res._repr_html_()


def test_input_errors(setting):
    _, base, tuned, sae, unit = setting
    with pytest.raises(ValueError, match="LatentDiff"):
        screen_latents(base, tuned, sae, unit=unit, progress=False)
    with pytest.raises(ValueError, match="positive"):
        screen_latents(base, tuned, sae, latents=[1], coefficients=(-1.0,), unit=unit)
    with pytest.raises(ValueError, match="out of range"):
        screen_latents(base, tuned, sae, latents=[99], unit=unit)
    with pytest.raises(ValueError, match="incoherence_budget"):
        screen_latents(base, tuned, sae, latents=[1], incoherence_budget=5, unit=unit)
