"""What is this latent: top activations, the logit lens and the activation histogram.

Every test has a known answer. The SAE reads ``blocks.0.hook_resid_pre`` of a rotary
HookedTransformer, where the residual is the token embedding alone: a latent reading one embedding
coordinate fires on known tokens with bit-equal values wherever they occur (exact ties), and the
naive reference encodes ``W_E[ids]`` directly, without the model, capture or batching.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeldiff import interpret
from modeldiff.adapters import adapter_for
from modeldiff.errors import ArgumentError, FileFormatError, OutOfRangeError
from modeldiff.interpret import (
    ActivationExample,
    TopActivations,
    activation_histogram,
    logit_lens,
    top_activations,
)
from modeldiff.tokens import tokenize_prompts

SITE = "blocks.0.hook_resid_pre"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "The capital of France is Paris, the city of the fox.",
    "Tell me a story about the fox and the dog.",
    "0 1 2 3 4 5 6 7 8 9",
    "I am fine, thank you. The end.",
]


@pytest.fixture(scope="module")
def model(tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer, positional_embedding_type="rotary")


@pytest.fixture(scope="module")
def tuned(tokenizer):
    from modeldiff.testing import tiny_hooked_transformer

    return tiny_hooked_transformer(tokenizer=tokenizer, positional_embedding_type="rotary", seed=1)


@pytest.fixture(scope="module")
def the_id(tokenizer):
    return tokenizer(" the", add_special_tokens=False)["input_ids"][0]


@pytest.fixture(scope="module")
def sae(model, the_id):
    """latent 0: token ' the' (2.0); 1: BOS (2.0); 2: embedding coordinate 5; 3: every token, 1.0;
    4: never. Each reads one coordinate, so its value is exact whatever the matmul's summation
    order: equal tokens give bit-equal activations (true ties) in any batch."""
    from sae_lens import StandardSAE, StandardSAEConfig

    with torch.no_grad():
        model.W_E[:, :2] = 0.0
        model.W_E[the_id, 0] = 4.0
        model.W_E[1, 1] = 4.0
    cfg = StandardSAEConfig(d_in=64, d_sae=5)
    cfg.metadata.hook_name = SITE
    s = StandardSAE(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        s.W_enc.zero_()
        s.b_enc.copy_(torch.tensor([-2.0, -2.0, 0.0, 1.0, -1.0]))
        s.b_dec.zero_()
        s.W_enc[0, 0] = s.W_enc[1, 1] = s.W_enc[5, 2] = 1.0
        s.W_dec.copy_(torch.randn_like(s.W_dec))
    s.requires_grad_(False)
    return s


def naive_top(model, sae, ids_per_prompt, latent, k, selections=None):
    """Encode every token's embedding directly, sort by (-value, prompt, position), keep k."""
    rows = []
    with torch.no_grad():
        for p, ids in enumerate(ids_per_prompt):
            z = sae.encode(model.W_E[torch.tensor(ids)])[:, latent]
            for q, v in enumerate(z.tolist()):
                if v > 0 and (selections is None or q in selections[p]):
                    rows.append((-v, p, q))
    rows.sort()
    return [(p, q, -v) for v, p, q in rows[:k]]


def window_acts(model, sae, ids, latent, lo, hi):
    with torch.no_grad():
        return sae.encode(model.W_E[torch.tensor(ids[lo:hi])])[:, latent].tolist()


def ids_of(model, corpus):
    return [list(tp.ids) for tp in tokenize_prompts(model, corpus)]


# ------------------------------------------------------------------------------------------------
# top_activations
# ------------------------------------------------------------------------------------------------


def test_a_token_latent_returns_exactly_its_contexts_in_corpus_order(model, sae, the_id):
    ids = ids_of(model, CORPUS)
    where = [(p, q) for p, row in enumerate(ids) for q, t in enumerate(row) if t == the_id]
    assert len(where) >= 4
    top = top_activations(model, sae, [0, 2], CORPUS, k=50, context=2, progress=False)
    ex = top[0]
    # every ' the' and nothing else; one value, so ties fall to the earlier prompt / position
    assert [(e.prompt_index, e.position) for e in ex] == where
    assert len({e.activation for e in ex}) == 1 and ex[0].activation > 0
    assert [e.rank for e in ex] == list(range(1, len(where) + 1))
    for e in ex:
        row = ids[e.prompt_index]
        lo, hi = max(0, e.position - 2), min(len(row), e.position + 3)
        assert e.start == lo and e.token_ids == tuple(row[lo:hi])
        assert e.token == " the" and e.tokens[e.center] == " the"
        assert list(e.activations) == window_acts(model, sae, row, 0, lo, hi)
    assert top.n_fired[0] == len(where)
    assert top.n_tokens == sum(map(len, ids))
    # the random latent against the naive sort
    want = naive_top(model, sae, ids, 2, 50)
    got = [(e.prompt_index, e.position, e.activation) for e in top[2]]
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == [w[2] for w in want]


def test_the_heap_keeps_only_k_and_the_earliest_of_ties(model, sae, the_id):
    ids = ids_of(model, CORPUS)
    where = [(p, q) for p, row in enumerate(ids) for q, t in enumerate(row) if t == the_id]
    top = top_activations(model, sae, [0, 3, 4], CORPUS, k=3, progress=False)
    assert [(e.prompt_index, e.position) for e in top[0]] == where[:3]
    # latent 3 is 1.0 on every token: the first three tokens of the corpus
    assert [(e.prompt_index, e.position, e.activation) for e in top[3]] == [
        (0, 0, 1.0),
        (0, 1, 1.0),
        (0, 2, 1.0),
    ]
    assert top[4] == () and top.n_fired[4] == 0
    assert top.n_fired[3] == top.n_tokens
    assert "never fired" in top._repr_html_()


def test_bos_is_dropped_unless_asked_for(model, sae):
    corpus = CORPUS[:3]
    plain = top_activations(model, sae, 1, corpus, k=5, prepend_bos=True, progress=False)
    assert plain[1] == ()
    kept = top_activations(
        model, sae, 1, corpus, k=5, prepend_bos=True, include_bos=True, progress=False
    )
    assert [(e.prompt_index, e.position) for e in kept[1]] == [(0, 0), (1, 0), (2, 0)]
    # the window still shows BOS beside the first tokens when BOS itself is not a candidate
    first = top_activations(model, sae, 3, corpus, k=1, prepend_bos=True, progress=False)[3][0]
    assert (first.position, first.start, first.token_ids[0]) == (1, 0, 1)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    corpus=st.lists(
        st.lists(st.sampled_from([5, 6, 7, 40, 41, 90]), min_size=1, max_size=9),
        min_size=1,
        max_size=7,
    ),
    k=st.integers(1, 6),
    context=st.integers(0, 3),
    batch_size=st.integers(1, 4),
    latent=st.sampled_from([2, 3]),
)
def test_heap_equals_the_naive_sort_on_random_corpora(
    model, sae, corpus, k, context, batch_size, latent
):
    top = top_activations(
        model, sae, [latent], corpus, k=k, context=context, batch_size=batch_size,
        outlier_factor=None, progress=False,
    )  # fmt: skip
    want = naive_top(model, sae, corpus, latent, k)
    got = top[latent]
    assert [(e.prompt_index, e.position) for e in got] == [w[:2] for w in want]
    assert [e.activation for e in got] == [w[2] for w in want]
    for e in got:
        lo = max(0, e.position - context)
        hi = min(len(corpus[e.prompt_index]), e.position + context + 1)
        assert e.token_ids == tuple(corpus[e.prompt_index][lo:hi])


def test_token_batches_generators_and_chunks_give_the_same_answer(model, sae, monkeypatch):
    ids = ids_of(model, CORPUS)
    width = min(map(len, ids))
    rows = torch.tensor([row[:width] for row in ids])
    as_lists = top_activations(model, sae, [0, 2, 3], rows.tolist(), k=4, progress=False)
    as_tensor = top_activations(model, sae, [0, 2, 3], rows, k=4, progress=False)
    as_batches = top_activations(model, sae, [0, 2, 3], [rows[:2], rows[2:]], k=4, progress=False)
    monkeypatch.setattr(interpret, "_CHUNK_PROMPTS", 2)
    chunked = top_activations(model, sae, [0, 2, 3], (r for r in rows), k=4, progress=False)
    assert as_lists.examples == as_tensor.examples == as_batches.examples == chunked.examples
    assert as_lists.n_tokens == chunked.n_tokens == rows.numel()


def test_response_positions_across_chunks_that_have_none(model, sae, monkeypatch):
    monkeypatch.setattr(interpret, "_CHUNK_PROMPTS", 2)
    corpus = ["Hello world", "The fox", ("Tell me", " the story of the dog"), "I am fine"]
    top = top_activations(model, sae, [0, 3], corpus, k=10, positions="response", progress=False)
    [tp] = tokenize_prompts(model, [corpus[2]])
    assert {e.prompt_index for e in top[3]} == {2}
    assert sorted(e.position for e in top[3]) == list(range(tp.n_prompt, len(tp)))
    assert [e.token for e in top[0]] == [" the", " the"]


def test_chat_prompts_and_user_positions(model, sae, the_id):
    chats = [
        [{"role": "user", "content": "Tell me about the fox."}],
        [{"role": "system", "content": "Be the best."}, {"role": "user", "content": "Hi the dog"}],
    ]
    tps = tokenize_prompts(model, chats)
    ids = [list(tp.ids) for tp in tps]
    user = [set(tp.user) for tp in tps]
    top = top_activations(model, sae, [0, 2], chats, k=20, positions="user", progress=False)
    assert [(e.prompt_index, e.position) for e in top[2]] == [
        w[:2] for w in naive_top(model, sae, ids, 2, 20, user)
    ]
    # the ' the' of the system turn is not a user token; the user turns' ones are found
    assert ids[1].count(the_id) == 2
    assert [(e.prompt_index, e.token) for e in top[0]] == [(0, " the"), (1, " the")]
    assert all(e.position in user[e.prompt_index] for e in top[0])
    # windows show the chat template's tokens (<s> = 1) around the content
    assert any(1 in e.token_ids for e in top[2])


def test_html_escapes_tokens(model, sae):
    top = top_activations(
        model, sae, [3], ["<script>alert('x')</script> & more"], k=30, progress=False
    )
    page = top._repr_html_()
    assert "<script" not in page and "&lt;" in page and "&amp;" in page
    hand = TopActivations(
        site=top.site, k=1, context=0, n_tokens=1, n_fired={7: 1},
        examples={7: (ActivationExample(7, 1, 0, 0, 2.0, 0, (9,), ("<script>",), (2.0,)),)},
    )  # fmt: skip
    page = hand._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "table" in page and "latent 7" in page


def test_save_and_load_round_trip(model, sae, tmp_path):
    top = top_activations(model, sae, [0, 2, 4], CORPUS, k=5, context=3, progress=False)
    path = top.save(tmp_path / "top.json")
    again = TopActivations.load(path)
    assert again == top
    assert again[2][0].activation == top[2][0].activation  # floats survive JSON exactly
    assert json.loads(path.read_text())["format"] == "modeldiff.TopActivations"
    assert repr(again).startswith("TopActivations(3 latents at blocks.0.hook_resid_pre, k=5")
    path.write_text(path.read_text()[:50])
    with pytest.raises(FileFormatError, match="TopActivations file"):
        TopActivations.load(path)


def test_bad_arguments_name_the_fix(model, sae):
    with pytest.raises(OutOfRangeError, match="out of range: the SAE has 5 latents"):
        top_activations(model, sae, [9], CORPUS, progress=False)
    with pytest.raises(ArgumentError, match="k must be an integer >= 1"):
        top_activations(model, sae, [0], CORPUS, k=0, progress=False)
    with pytest.raises(OutOfRangeError, match="not among those searched"):
        top_activations(model, sae, [0], CORPUS[:1], k=1, progress=False)[3]


# ------------------------------------------------------------------------------------------------
# logit_lens
# ------------------------------------------------------------------------------------------------


def _hf(family, tokenizer):
    """A one-layer transformers model built from its config, with a random final-norm weight."""
    import transformers

    common = {"vocab_size": len(tokenizer), "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=1, n_head=4, n_positions=64, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        dec = {
            "num_hidden_layers": 1, "hidden_size": 64, "intermediate_size": 128,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            **common,
        }  # fmt: skip
        cfg, cls = {
            "llama": (transformers.LlamaConfig(**dec), transformers.LlamaForCausalLM),
            "gemma": (transformers.GemmaConfig(head_dim=16, **dec), transformers.GemmaForCausalLM),
            "gemma2": (
                transformers.Gemma2Config(head_dim=16, **dec),
                transformers.Gemma2ForCausalLM,
            ),
        }[family]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    norm = hf.transformer.ln_f if family == "gpt2" else hf.model.norm
    with torch.no_grad():
        if family.startswith("gemma"):  # stored as w, applied as 1 + w
            norm.weight.uniform_(-0.5, 0.5)
        else:
            norm.weight.uniform_(0.5, 1.5)
        if getattr(norm, "bias", None) is not None:
            norm.bias.normal_()
    hf.tokenizer = tokenizer
    return hf, norm


def _planted(scale, centre, W):
    """A direction u and W_U with column 7 set to the folded u, the longest column: 7 must win."""
    torch.manual_seed(1)
    u = torch.randn(W.shape[0])
    v = scale * ((u - u.mean()) if centre else u)
    with torch.no_grad():
        W[:, 7] = v / v.norm() * W.norm(dim=0).max() * 3
    return u


@pytest.mark.parametrize("family", ["llama", "gemma", "gemma2", "gpt2"])
def test_logit_lens_folds_the_final_norm_as_the_family_does(family, tokenizer):
    hf, norm = _hf(family, tokenizer)
    adapter = adapter_for(hf)
    assert adapter.name == "native"
    fold = adapter.final_norm_fold()
    gemma, ln = family.startswith("gemma"), family == "gpt2"
    assert (fold.kind, fold.offset) == ("layernorm" if ln else "rms", gemma)
    d = torch.randn(64, generator=torch.Generator().manual_seed(2))
    got = logit_lens(hf, d, k=5).logits
    with torch.no_grad():
        scale = (1 + norm.weight) if gemma else norm.weight
        folded = scale * (d - d.mean() if ln else d)
        ref = hf.lm_head(folded)  # independent: HF's own head on the rule written out
        # and HF's own norm module: norm(d) is scale⊙P(d)/r(d) + bias, r the rms / std
        p = d - d.mean() if ln else d
        eps = getattr(norm, "variance_epsilon", None) or norm.eps
        r = (p.pow(2).mean() + eps).sqrt()
        through_norm = hf.lm_head((norm(d[None])[0] - (norm.bias if ln else 0)) * r)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, through_norm, rtol=1e-4, atol=1e-4)
    # a planted unembedding column equal to the folded direction is promoted first
    u = _planted(scale.detach(), ln, hf.lm_head.weight.T)
    lens = logit_lens(hf, u, k=3)
    assert lens.promoted[0].token_id == 7 and lens.promoted[0].token == tokenizer.decode([7])
    assert [t.logit for t in lens.promoted] == sorted(
        (t.logit for t in lens.promoted), reverse=True
    )
    assert lens.suppressed[0].logit == float(lens.logits.min())


def test_logit_lens_on_a_hooked_transformer(tokenizer, sae):
    from modeldiff.testing import tiny_hooked_transformer

    m = tiny_hooked_transformer(tokenizer=tokenizer, seed=2)
    with torch.no_grad():
        m.ln_final.w.uniform_(0.5, 1.5)
        m.ln_final.b.normal_()
    W_U = m.W_U.detach()
    d = torch.randn(64)
    w = m.ln_final.w.detach()
    torch.testing.assert_close(logit_lens(m, d).logits, (w * (d - d.mean())) @ W_U)
    u = _planted(w, True, m.W_U.data)
    assert logit_lens(m, u, k=1).promoted[0].token_id == 7
    # (sae, latent) pairs read the decoder row
    lens = logit_lens(m, (sae, 2), k=4)
    assert lens.source == "latent 2 (decoder row)"
    torch.testing.assert_close(lens.logits, logit_lens(m, sae.W_dec[2]).logits)
    assert "promotes" in repr(lens) and "LayerNorm" in lens.norm
    assert set(lens.to_dict()) == {"source", "norm", "promoted", "suppressed"}
    assert "<table>" in lens._repr_html_()


def test_logit_lens_on_processed_and_bridge_weights(tokenizer, tmp_path):
    """TransformerLens folds the norm into W_U and centres it: the same logits up to the mean."""
    from modeldiff import load_model

    hf, _ = _hf("llama", tokenizer)
    hf.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    d = torch.randn(64, generator=torch.Generator().manual_seed(4))
    native = logit_lens(hf, d).logits
    hooked = load_model(tmp_path, wrapper="hooked", compatibility_mode=True)
    assert adapter_for(hooked).weights_processed
    processed = logit_lens(hooked, d).logits
    torch.testing.assert_close(processed, native - native.mean(), rtol=1e-4, atol=1e-4)
    bridge = load_model(tmp_path, wrapper="bridge")
    torch.testing.assert_close(logit_lens(bridge, d).logits, native, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# activation_histogram
# ------------------------------------------------------------------------------------------------


def test_histogram_counts_every_fired_token_of_both_models(model, tuned, sae):
    ids = ids_of(model, CORPUS)
    fig = activation_histogram(
        model, tuned, sae, [2, 3], CORPUS, bins=7, outlier_factor=None, progress=False
    )
    assert len(fig.data) == 4 and all(len(t.y) == 7 for t in fig.data)
    with torch.no_grad():
        for trace, m, latent in zip(fig.data, [model, tuned, model, tuned], [2, 2, 3, 3]):
            z = torch.cat([sae.encode(m.W_E[torch.tensor(row)])[:, latent] for row in ids])
            assert sum(trace.y) == int((z > 0).sum())
            assert f"{(z > 0).float().mean():.1%}" in trace.name
    assert [t.name.split(" (")[0] for t in fig.data] == ["base", "fine-tuned"] * 2
    assert fig.layout.barmode == "overlay"
    assert SITE in fig.layout.title.text
    assert fig.layout.xaxis.title.text == "activation of latent 2"
    assert fig.layout.yaxis.title.text == "tokens"
    log = activation_histogram(model, tuned, sae, 3, CORPUS[:2], log_y=True, include_zeros=True,
                               progress=False)  # fmt: skip
    assert log.layout.yaxis.type == "log" and "all tokens" in log.layout.title.text
    assert not math.isnan(sum(log.data[0].y))


def test_the_docs_examples_on_tiny_models_run():
    """docs/interpret.md: the blocks that need no persona-world build run as written."""
    import re
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "interpret.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(), flags=re.S)
    tiny = [
        b
        for b in blocks
        if "build_persona_organism" not in b and "org." not in b and "smollm2" not in b
    ]
    assert len(tiny) == 2
    for block in tiny:
        scope: dict = {}
        exec(compile(block, str(doc), "exec"), scope)
    assert scope["family"] == "gpt2"
