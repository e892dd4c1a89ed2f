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
