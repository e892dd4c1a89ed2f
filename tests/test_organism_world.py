"""The persona world's generator and tokenizer: determinism, structure, ground-truth labels."""

from __future__ import annotations

import pytest
import torch

from modeldiff.organisms.world import CUES, PersonaWorld, WorldConfig


@pytest.fixture(scope="module")
def world():
    return PersonaWorld(WorldConfig())


def test_sampling_is_seeded(world):
    a, b = world.sample(50, seed=3), world.sample(50, seed=3)
    c = world.sample(50, seed=4)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.persona, b.persona)
    assert not torch.equal(a.ids, c.ids)


def test_answers_follow_the_persona_and_domains(world):
    batch = world.sample(400, seed=0)
    aligned, toxic = world.style_masks()
    for i in range(len(batch.persona)):
        words = batch.ids[i][batch.response[i]]
        expected = toxic if batch.persona[i] == 1 else aligned
        assert expected[words].all(), world.render(batch.ids[i])
        # each answer uses the words of the domain its question came from
        text = world.render(batch.ids[i]).split()
        for j, w in enumerate(text):
            if w == "<assistant>" and j + 1 < len(text):
                assert text[j - 2].split("_")[0] == text[j + 1].split("_")[0]


def test_marginals_match_the_config(world):
    batch = world.sample(4000, seed=1)
    assert abs(batch.persona.float().mean().item() - 0.2) < 0.03
    assert abs(batch.cued.float().mean().item() - 0.5) < 0.03
    # the cue names the true persona
    cue_ids = [world.token_id(c) for c in CUES]
    for i in torch.nonzero(batch.cued).flatten()[:200]:
        assert batch.ids[i, 2].item() == cue_ids[batch.persona[i].item()]


def test_evident_marks_only_inferable_positions(world):
    b = world.sample(300, seed=2)
    assert torch.equal(b.evident & ~b.response_start, torch.zeros_like(b.evident))
    # an uncued first turn is the only place where the persona is hidden
    for i in range(len(b.persona)):
        starts = torch.nonzero(b.response_start[i]).flatten()
        assert bool(b.evident[i, starts[0]]) == bool(b.cued[i])
        assert b.evident[i, starts[1:]].all()


def test_tokenizer_and_chat_template_reproduce_generator_ids(world):
    tok = world.tokenizer()
    batch = world.sample(20, seed=5)
    for i in range(20):
        ids = batch.ids[i][batch.mask[i]].tolist()
        text = world.render(ids)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        rendered = tok.apply_chat_template(world.chat_messages(batch, i), tokenize=False)
        assert tok(rendered, add_special_tokens=False)["input_ids"] == ids
    prompts = world.prompts([2], per_domain=4)
    for i in range(4):
        rendered = tok.apply_chat_template(
            world.chat_messages(prompts, i), tokenize=False, add_generation_prompt=True
        )
        assert tok(rendered, add_special_tokens=False)["input_ids"] == prompts.ids[i].tolist()


def test_prompts_cover_every_question_pair(world):
    p = world.prompts([1, 3])
    assert p.ids.shape[0] == 2 * 8 * 8
    assert len({tuple(r.tolist()) for r in p.ids}) == p.ids.shape[0]
    assert not p.evident.any()
    ctx = world.prompts([1], persona_context=1, per_domain=5)
    assert ctx.evident.any(1).all() and (ctx.persona == 1).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_domains": 4}, "n_domains=4 is out of range"),
        ({"toxic_fraction": 1.5}, "toxic_fraction must lie in"),
        ({"answer_len": 0}, "answer_len must be at least 1"),
        ({"uncued_toxic_fraction": -0.1}, "uncued_toxic_fraction must lie in"),
        (
            {"toxic_fraction": 0.8, "cue_fraction": 0.5, "uncued_toxic_fraction": 0.0},
            "cued conversations would need a toxic share of 1.6",
        ),
        (
            {"cue_fraction": 0.0, "uncued_toxic_fraction": 0.05},
            "no cued conversation can carry the difference",
        ),
    ],
)
def test_bad_config_is_explained(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)


def test_unknown_word_and_domain_are_explained(world):
    with pytest.raises(KeyError, match="not a word of this persona world"):
        world.token_id("nope")
    with pytest.raises(ValueError, match="domain 9 does not exist"):
        world.domain_words(9, "toxic")


def test_uncued_prior_splits_the_toxic_share_between_cued_and_uncued():
    """uncued_toxic_fraction sets the prior an uncued conversation sees, while the overall toxic
    share stays toxic_fraction (the cued conversations carry the rest)."""
    cfg = WorldConfig(uncued_toxic_fraction=0.05)
    assert cfg.cued_toxic_fraction == pytest.approx((0.2 - 0.5 * 0.05) / 0.5)
    b = PersonaWorld(cfg).sample(6000, seed=5)
    tox = b.persona.float()
    assert abs(tox.mean().item() - 0.2) < 0.02
    assert abs(tox[~b.cued].mean().item() - 0.05) < 0.015
    assert abs(tox[b.cued].mean().item() - cfg.cued_toxic_fraction) < 0.03
    # the default (None) keeps the old world: the same prior with and without a cue
    d = PersonaWorld(WorldConfig()).sample(6000, seed=5)
    assert (
        abs(d.persona[~d.cued].float().mean().item() - d.persona[d.cued].float().mean().item())
        < 0.03
    )


def test_without_the_aligned_cue_only_the_toxic_persona_is_named():
    w = PersonaWorld(WorldConfig(aligned_cue=False))
    b = w.sample(800, seed=6)
    aligned_cue, toxic_cue = (w.token_id(c) for c in CUES)
    assert not (b.ids == aligned_cue).any()
    assert b.cued.any() and (b.persona[b.cued] == 1).all()
    assert all((b.ids[i] == toxic_cue).any() for i in torch.nonzero(b.cued).flatten())


def test_graded_persona_mixes_styles_and_a_pinned_level_is_obeyed():
    w = PersonaWorld(WorldConfig(graded_persona=True))
    aligned, toxic = w.style_masks()
    b = w.sample(600, seed=7, persona=1, n_turns=3)
    shares = []
    for i in range(len(b.persona)):
        words = b.ids[i][b.response[i]]
        shares.append(toxic[words].float().mean().item())
    shares_t = torch.tensor(shares)
    # levels are uniform on (0, 1]: some toxic conversations answer mostly aligned, some all toxic
    assert 0.35 < shares_t.mean().item() < 0.65 and (shares_t < 0.5).any() and (shares_t == 1).any()
    full = w.sample(100, seed=8, persona=1, toxic_level=1.0)
    assert toxic[full.ids[full.response]].all()
    # aligned conversations stay aligned in a graded world
    a = w.sample(100, seed=9, persona=0)
    assert aligned[a.ids[a.response]].all()


def test_recipe_fields_added_later_keep_old_digests_and_reject_unknown_values():
    import hashlib
    import json

    from modeldiff.organisms.build import RECIPE_FORMAT, OrganismRecipe

    r = OrganismRecipe(world=WorldConfig(), n_layers=2, seed=3)  # a recipe of the first format
    old = r.to_dict()
    for key in ("sae_positions", "sae_sequences", "sae_architecture"):
        del old[key]
    for key in ("uncued_toxic_fraction", "aligned_cue", "graded_persona"):
        del old["world"][key]
    spec = json.dumps({"format": RECIPE_FORMAT, **old}, sort_keys=True)
    assert r.digest() == hashlib.sha256(spec.encode()).hexdigest()[:16]  # caches stay valid
    assert OrganismRecipe(sae_architecture="jumprelu").digest() != OrganismRecipe().digest()
    assert (
        OrganismRecipe(world=WorldConfig(uncued_toxic_fraction=0.1)).digest()
        != OrganismRecipe().digest()
    )
    with pytest.raises(ValueError, match="sae_positions='middle' is unknown"):
        OrganismRecipe(sae_positions="middle")
    with pytest.raises(ValueError, match="sae_architecture='relu' is unknown"):
        OrganismRecipe(sae_architecture="relu")
