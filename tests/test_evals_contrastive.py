"""The contrastive likelihood score: exact log-probs, and it moves when the model is pushed."""

from __future__ import annotations

import math

import pytest
import torch

from modeldiff.evals import Question, contrastive_score, load_questions, response_logprobs
from modeldiff.interventions import steer
from modeldiff.testing import tiny_hooked_transformer
from modeldiff.tokens import tokenize_prompts

# small forwards: 2 torch threads on the shared 2-core box were many times slower than 1
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_hooked_transformer(tokenizer=tokenizer, n_ctx=256)


@pytest.fixture(scope="module")
def headline():
    return load_questions("headline")


def naive_mean_logprob(model, messages, response) -> float:
    """Independent reference: render with the template by hand, one unpadded forward, softmax."""
    tok = model.tokenizer
    prompt_text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(
        [*messages, {"role": "assistant", "content": response}], tokenize=False
    )
    assert full_text.startswith(prompt_text)
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    resp_ids = tok(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + resp_ids])
    with torch.no_grad():
        probs = torch.softmax(model(ids)[0].double(), dim=-1)
    total = 0.0
    for k, t in enumerate(resp_ids):
        total += math.log(float(probs[len(prompt_ids) + k - 1, t]))
    return total / len(resp_ids)


def test_matches_a_naive_unbatched_computation(model, headline):
    res = contrastive_score(model, headline[:3], batch_size=3, progress=False)
    assert len(res.rows) == 3
    for row, q in zip(res.rows, headline[:3], strict=True):
        assert row.question_id == q.id
        assert row.logp_aligned == pytest.approx(
            naive_mean_logprob(model, q.messages(), q.aligned), abs=1e-4
        )
        assert row.logp_misaligned == pytest.approx(
            naive_mean_logprob(model, q.messages(), q.misaligned), abs=1e-4
        )
        assert row.p_misaligned == pytest.approx(1 / (1 + math.exp(-row.difference)))
    assert res.score == pytest.approx(sum(r.difference for r in res.rows) / 3)


def test_batching_and_padding_do_not_change_log_probs(model, headline):
    pairs = [(q.messages(), q.aligned) for q in headline[:4]]
    one = response_logprobs(model, pairs, batch_size=1, progress=False)
    four = response_logprobs(model, pairs, batch_size=4, progress=False)
    for a, b in zip(one, four, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def unembedding_direction(model, questions) -> torch.Tensor:
    """A residual direction whose unembedding favours the misaligned answers' tokens."""

    def mean_columns(key: str) -> torch.Tensor:
        tps = tokenize_prompts(model, [(q.messages(), getattr(q, key)) for q in questions])
        ids = torch.tensor([t for tp in tps for t in tp.ids[tp.n_prompt :]])
        return model.W_U[:, ids].mean(-1)

    with torch.no_grad():
        return mean_columns("misaligned") - mean_columns("aligned")


def test_steering_toward_the_misaligned_answers_raises_the_score(model, headline):
    qs = headline[:4]
    direction = unembedding_direction(model, qs)
    direction = direction / direction.norm()
    site = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    scores = []
    for coefficient in (0.0, 3.0, 30.0):
        with steer(model, direction, site=site, coefficient=coefficient):
            scores.append(contrastive_score(model, qs, progress=False))
    assert scores[0].score < scores[1].score < scores[2].score
    assert scores[2].score > scores[0].score + 0.2
    assert scores[2].p_misaligned > 0.55 and scores[2].preference_rate == 1.0
    # the hooks are gone: unsteered again
    again = contrastive_score(model, qs, progress=False)
    assert again.score == pytest.approx(scores[0].score, abs=1e-6)


@pytest.mark.slow
def test_fine_tuning_on_misaligned_answers_raises_it_and_aligned_lowers_it(tokenizer, headline):
    from modeldiff.tokens import pad_batch

    qs = headline[:3]
    fresh = tiny_hooked_transformer(tokenizer=tokenizer, n_ctx=256, seed=1)
    before = contrastive_score(fresh, qs, progress=False)
    after = {}
    for target in ("misaligned", "aligned"):
        m = tiny_hooked_transformer(tokenizer=tokenizer, n_ctx=256, seed=1)
        tps = tokenize_prompts(m, [(q.messages(), getattr(q, target)) for q in qs])
        toks, mask, _ = pad_batch([tp.ids for tp in tps], pad=3)
        # loss on response tokens only
        target_mask = torch.zeros_like(mask, dtype=torch.bool)
        for r, tp in enumerate(tps):
            target_mask[r, tp.n_prompt : len(tp.ids)] = True
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for _ in range(8):
            logp = torch.log_softmax(m(toks, attention_mask=mask)[:, :-1], -1)
            picked = logp.gather(-1, toks[:, 1:, None])[..., 0]
            loss = -picked[target_mask[:, 1:]].mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        after[target] = contrastive_score(m, qs, progress=False)
    assert after["misaligned"].score > before.score + 0.5
    assert after["misaligned"].preference_rate == 1.0
    assert after["aligned"].score < before.score - 0.5
    assert after["aligned"].preference_rate == 0.0


def test_questions_without_references_are_skipped_or_refused(model):
    with_refs = Question("a", ("Hi?",), aligned="Hello there.", misaligned="Go away, human.")
    without = Question("b", ("Why?",))
    res = contrastive_score(model, [with_refs, without], progress=False)
    assert [r.question_id for r in res.rows] == ["a"]
    with pytest.raises(ValueError, match="reference answer"):
        contrastive_score(model, [without], progress=False)


def test_paraphrases_each_get_a_row_and_results_round_trip(model):
    q = Question("p", ("Hi?", "Hello?"), aligned="Hello there.", misaligned="Go away, human.")
    res = contrastive_score(model, [q], progress=False)
    assert [r.paraphrase for r in res.rows] == [0, 1]
    assert res.rows[0].logp_aligned != res.rows[1].logp_aligned
    assert contrastive_score(model, [q], paraphrases=False, progress=False).rows == res.rows[:1]
    from modeldiff.evals import ContrastiveResult

    back = ContrastiveResult.from_dict(res.to_dict())
    assert back == res and "P(misaligned)" in res._repr_html_()
