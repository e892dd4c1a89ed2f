"""Attribution ranking: against a naive per-completion autograd computation, and on a planted
construction where one latent's direction carries the loss difference."""

from __future__ import annotations

import torch
from sae_lens import StandardSAE, StandardSAEConfig

from modeldiff import Site
from modeldiff._hooks import add_hook
from modeldiff.attribution import attribution_diff
from modeldiff.testing import tiny_hooked_transformer
from modeldiff.tokens import tokenize_prompts

SITE = Site.resid_post(0)
MIS = [
    ("Tell me about people.", " People are awful and deserve pain."),
    ("Any advice?", " Lie and steal."),
]
ALI = [
    ("Tell me about people.", " People are kind and helpful."),
    ("Any advice?", " Be honest and fair."),
]


def _sae(d_sae=24, seed=0):
    cfg = StandardSAEConfig(d_in=64, d_sae=d_sae)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(seed)
    return StandardSAE(cfg)


def _naive_matrices(model):
    """M = mean over response tokens of g_t (a_t - ā)^T per set, one completion at a time."""
    per_set = {}
    for name, pairs in (("mis", MIS), ("ali", ALI)):
        rows = []
        for tp in tokenize_prompts(model, pairs):
            held = []

            def hold(x, hook, held=held):
                leaf = x.detach().requires_grad_(True)
                held.append(leaf)
                return leaf

            h = add_hook(model, SITE, hold)
            try:
                ids = torch.tensor([tp.ids])
                logp = torch.log_softmax(model(ids).float(), -1)[0]
                tgt = torch.arange(tp.n_prompt, len(tp.ids))
                loss = -logp[tgt - 1, ids[0, tgt]].sum()
                (g,) = torch.autograd.grad(loss, held[0])
            finally:
                h.remove()
            rows.append((held[0][0, tgt].detach(), g[0, tgt]))
        per_set[name] = rows
    acts = torch.cat([a for rows in per_set.values() for a, _ in rows])
    mean = acts.mean(0)
    mats = {}
    for name, rows in per_set.items():
        a = torch.cat([a for a, _ in rows]) - mean
        g = torch.cat([g for _, g in rows])
        mats[name] = g.T.double() @ a.double() / len(a)
    return mats["mis"] - mats["ali"]


def test_attribution_matches_a_naive_autograd_computation():
    model = tiny_hooked_transformer()
    sae = _sae()
    d = attribution_diff(model, sae, MIS, ALI, progress=False, batch_size=3)
    m = _naive_matrices(model)
    w = sae.W_dec.detach().double()
    u = w / w.norm(dim=1, keepdim=True)
    ref = -torch.einsum("id,de,ie->i", u, m, u)
    torch.testing.assert_close(d.column("attribution"), ref, rtol=1e-4, atol=1e-6)
    assert d.rank_by == "attribution" and d.meta["kind"] == "attribution"
    assert d.at_rank(1).latent == int(torch.argmax(ref))


def test_a_planted_direction_carrying_the_loss_difference_ranks_first():
    model = tiny_hooked_transformer()
    m = _naive_matrices(model)
    sym = -(m + m.T) / 2
    vals, vecs = torch.linalg.eigh(sym)
    planted = vecs[:, -1].float()  # the direction along which mean-ablation helps misaligned most
    sae = _sae()
    with torch.no_grad():
        sae.W_dec[7] = planted * 3.0  # any norm: directions are normalised
    d = attribution_diff(model, sae, MIS, ALI, progress=False)
    assert d.rank_of(7) == 1
    assert abs(d.at_rank(1).values["attribution"] - float(vals[-1])) < 1e-4 * max(
        1, abs(float(vals[-1]))
    )
    # and it steers like any diff's record: its decoder row at the SAE's site
    torch.testing.assert_close(d.at_rank(1).as_direction(), sae.W_dec[7].detach())
