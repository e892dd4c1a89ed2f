"""Token selection that skips template boilerplate, the shared-prefix warning and the outlier filter."""

from __future__ import annotations

import copy

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig
from transformers import AutoTokenizer

from modeldiff import Site, diff_latents, tokenize_prompts
from modeldiff.testing import (
    make_tokenizer,
    smollm2_gguf_path,
    tiny_hooked_transformer,
)
from modeldiff.tokens import PromptError, select_positions

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] | trim }}"
    "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Name a bird."},
        {"role": "assistant", "content": "A robin."},
        {"role": "user", "content": "user"},  # content equal to a role name: not the header
    ],
]
USER = [["What is the capital of France?"], ["Name a bird.", "user"]]


@pytest.fixture(scope="module")
def smollm2_tok():
    p = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)


def _runs(idx):
    runs, cur = [], []
    for j in idx:
        if cur and j != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(j)
    return [*runs, cur] if cur else runs


@pytest.mark.parametrize("template", ["smollm2", "llama3", "gemma", "modeldiff-test"])
def test_user_positions_are_exactly_the_user_contents(smollm2_tok, template):
    if template == "modeldiff-test":
        tok = make_tokenizer()
    else:
        tok = copy.deepcopy(smollm2_tok)
        if template != "smollm2":  # SmolLM2's own template inserts a default system prompt
            tok.chat_template = {"llama3": LLAMA3, "gemma": GEMMA}[template]
            # as in those families' tokenizers, the turn markers are special tokens
            markers = {
                "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "gemma": ["<start_of_turn>", "<end_of_turn>"],
            }[template]
            tok.add_special_tokens({"additional_special_tokens": markers})
    tps = tokenize_prompts(tok, CHATS)
    for tp, contents in zip(tps, USER, strict=True):
        [sel] = select_positions([tp], "user")
        runs = _runs(list(sel))
        assert [tok.decode([tp.ids[j] for j in r]).strip() for r in runs] == contents
        assert len(sel) < tp.n_prompt / 2 or template == "modeldiff-test"  # the rest is boilerplate


def test_assistant_positions_cover_history_and_response(smollm2_tok):
    pair = (CHATS[1][:3], "Sparrows are small birds.")
    [tp] = tokenize_prompts(smollm2_tok, [pair])
    [sel] = select_positions([tp], "assistant")
    runs = _runs(list(sel))
    texts = [smollm2_tok.decode([tp.ids[j] for j in r]).strip() for r in runs]
    assert texts == ["A robin.", "Sparrows are small birds."]
    assert all(j >= tp.n_prompt for j in runs[-1])  # the response's tokens are response tokens


def test_plain_strings_are_user_content_and_ids_have_none():
    tok = make_tokenizer()
    [tp] = tokenize_prompts(tok, ["Hello world"], prepend_bos=True)
    assert list(select_positions([tp], "user")[0]) == list(range(1, len(tp)))
    [ids] = tokenize_prompts(tok, [[1, 5, 6]])
    with pytest.raises(PromptError, match=r"positions='user' needs to know where"):
        select_positions([ids], "user")


def test_smollm2_default_system_prompt_triggers_the_shared_prefix_warning(smollm2_tok):
    chats = [
        [{"role": "user", "content": q}] for q in ("Hi?", "Why is the sky blue?", "Name a fish.")
    ]
    tps = tokenize_prompts(smollm2_tok, chats)
    from modeldiff.diff import warn_shared_prefix

    with pytest.warns(UserWarning, match=r"prefix shared by every prompt.*positions='user'"):
        share = warn_shared_prefix(tps, "prompt")
    assert share > 0.5
    assert warn_shared_prefix(tps, "user") == 0.0  # the questions differ from their first token


# ------------------------------------------------------------------------------------------------
# The outlier filter
# ------------------------------------------------------------------------------------------------

SITE = Site.resid_post(0)
PROMPTS = ["Hello world! How are you?", "The quick brown fox jumps", "What is the capital?"]


def _sae():
    cfg = StandardSAEConfig(d_in=64, d_sae=48)
    cfg.metadata.hook_name = SITE.hook_name
    torch.manual_seed(0)
    sae = StandardSAE(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(0.05)
    return sae


def _with_huge_token(seed, token):
    m = tiny_hooked_transformer(seed=seed)
    with torch.no_grad():
        m.embed.W_E[token] *= 1e4  # an attention-sink-like token: its residual norm explodes
    return m


def test_outlier_tokens_are_dropped_in_both_models_and_counted():
    tok = make_tokenizer()
    ids = [tokenize_prompts(tok, [p])[0].ids for p in PROMPTS]
    planted = ids[0][2]
    n_planted = sum(t == planted for row in ids for t in row)
    base, tuned = _with_huge_token(0, planted), _with_huge_token(1, planted)
    d = diff_latents(base, tuned, _sae(), PROMPTS, positions="all", progress=False, seed=0)
    assert d.meta["n_outliers_dropped"] == n_planted >= 1
    # the same numbers as a diff told explicitly to skip those tokens, with no filter
    keep = [[j for j, t in enumerate(row) if t != planted] for row in ids]
    ref = diff_latents(
        base, tuned, _sae(), PROMPTS, positions=keep, outlier_factor=None, progress=False, seed=0
    )
    torch.testing.assert_close(d.mean_base, ref.mean_base, rtol=0, atol=0)
    torch.testing.assert_close(d.delta, ref.delta, rtol=0, atol=0)
    unfiltered = diff_latents(
        base, tuned, _sae(), PROMPTS, positions="all", outlier_factor=None, progress=False
    )
    assert unfiltered.meta["n_outliers_dropped"] == 0
    assert not torch.allclose(unfiltered.mean_base, d.mean_base)


def test_the_outlier_filter_does_not_depend_on_batching():
    tok = make_tokenizer()
    planted = tokenize_prompts(tok, [PROMPTS[1]])[0].ids[1]
    base, tuned = _with_huge_token(0, planted), _with_huge_token(1, planted)
    a = diff_latents(base, tuned, _sae(), PROMPTS, batch_size=1, uncertainty=None, progress=False)
    b = diff_latents(base, tuned, _sae(), PROMPTS, batch_size=3, uncertainty=None, progress=False)
    assert a.meta["n_outliers_dropped"] == b.meta["n_outliers_dropped"] >= 1
    torch.testing.assert_close(a.mean_base, b.mean_base, rtol=1e-6, atol=1e-7)
