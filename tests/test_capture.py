"""capture(): selected activations, batching/padding invariance, early stop, hook hygiene."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeldiff._hooks import add_hook
from modeldiff.capture import capture, collect
from modeldiff.sites import Site, SiteError
from modeldiff.tokens import PromptError, tokenize_prompts

WORDS = ["hello", "world", "the", "quick", "fox", "capital", "France", "is", "Paris", "?", "!"]
SITES = [Site.resid_pre(0), Site.attn_out(1), Site.resid_post(1)]


def _reference(model, prompt_ids, site):
    """Independent reference: one unpadded prompt through TransformerLens' own run_with_cache."""
    _, cache = model.run_with_cache(torch.tensor([prompt_ids]), names_filter=[site.hook_name])
    return cache[site.hook_name][0]


def test_matches_run_with_cache_per_prompt(tiny_ht):
    prompts = ["hello world the quick fox", "Paris", ("What is the capital", " of France? Paris")]
    toks = tokenize_prompts(tiny_ht, prompts)
    got = collect(
        tiny_ht, prompts, SITES, positions="all", include_bos=True, progress=False, batch_size=3
    )
    for site in SITES:
        for i, tp in enumerate(toks):
            ref = _reference(tiny_ht, list(tp.ids), site)
            torch.testing.assert_close(got[site][i], ref, atol=1e-5, rtol=1e-5)


def test_position_selections(tiny_ht):
    prompts = [("What is the capital", " of France? Paris"), "hello world"]
    toks = tokenize_prompts(tiny_ht, prompts)
    site = Site.resid_post(0)
    full = collect(tiny_ht, prompts, site, positions="all", include_bos=True, progress=False)[site]
    prompt_part = collect(tiny_ht, prompts, site, positions="prompt", progress=False)[site]
    last = collect(tiny_ht, prompts, site, positions="last_prompt", progress=False)[site]
    resp = collect(tiny_ht, prompts[:1], site, positions="response", progress=False)[site]
    n0 = toks[0].n_prompt
    torch.testing.assert_close(prompt_part[0], full[0][:n0])
    torch.testing.assert_close(resp[0], full[0][n0:])
    torch.testing.assert_close(last[0], full[0][n0 - 1 : n0])
    torch.testing.assert_close(last[1], full[1][-1:])
    explicit = collect(
        tiny_ht,
        prompts,
        site,
        positions=[[0, -1], [True, False] + [False] * (len(toks[1]) - 2)],
        include_bos=True,
        progress=False,
    )[site]
    torch.testing.assert_close(explicit[0], full[0][[0, -1]])
    torch.testing.assert_close(explicit[1], full[1][:1])


def test_bos_is_dropped_unless_asked(tiny_ht):
    site = Site.resid_post(0)
    with_bos = collect(
        tiny_ht, ["hello world"], site, prepend_bos=True, include_bos=True, progress=False
    )[site][0]
    without = collect(tiny_ht, ["hello world"], site, prepend_bos=True, progress=False)[site][0]
    assert with_bos.shape[0] == without.shape[0] + 1
    torch.testing.assert_close(with_bos[1:], without)


def test_rows_carry_prompt_index_position_and_token(tiny_ht):
    prompts = ["hello world the", "fox", "the quick fox is"]
    toks = tokenize_prompts(tiny_ht, prompts)
    for batch in capture(tiny_ht, prompts, Site.resid_post(0), batch_size=2, progress=False):
        for p, pos, tok in zip(
            batch.prompt_index.tolist(), batch.position.tolist(), batch.token.tolist()
        ):
            assert toks[p].ids[pos] == tok


@st.composite
def prompt_sets(draw):
    n = draw(st.integers(1, 6))
    return [
        " ".join(draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=9))) for _ in range(n)
    ]


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    prompts=prompt_sets(),
    batch_size=st.integers(1, 4),
    side=st.sampled_from(["left", "right"]),
    sort=st.booleans(),
    positions=st.sampled_from(["all", "prompt", "last_prompt"]),
)
def test_batching_and_padding_do_not_change_activations(
    tiny_ht, prompts, batch_size, side, sort, positions
):
    kw = dict(positions=positions, progress=False, prepend_bos=True)
    alone = collect(tiny_ht, prompts, SITES, batch_size=1, **kw)
    batched = collect(
        tiny_ht, prompts, SITES, batch_size=batch_size, padding_side=side, sort_by_length=sort, **kw
    )
    for site in SITES:
        for a, b in zip(alone[site], batched[site]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_forward_stops_after_deepest_site(tiny_ht):
    calls = []
    tiny_ht.hook_dict["blocks.1.hook_resid_pre"].add_hook(lambda x, hook: calls.append("later"))
    tiny_ht.hook_dict["hook_embed"].add_hook(lambda x, hook: calls.append("earlier"))
    try:
        list(capture(tiny_ht, ["hello world"], Site.resid_post(0), progress=False))
        assert calls == ["earlier"], "blocks after the deepest site must not run"
        calls.clear()
        list(
            capture(
                tiny_ht, ["hello world"], [Site.resid_post(0), Site.resid_pre(1)], progress=False
            )
        )
        assert calls == ["earlier", "later"]
    finally:
        tiny_ht.reset_hooks(including_permanent=True)


def _hook_counts(model):
    return {name: len(hp.fwd_hooks) for name, hp in model.hook_dict.items()}


def test_hooks_removed_on_exception_and_user_hooks_kept(tiny_ht):
    user = tiny_ht.hook_dict["blocks.0.hook_resid_post"]
    marker = []
    tiny_ht.add_hook("blocks.0.hook_resid_post", lambda x, hook: marker.append(1))
    try:
        before = _hook_counts(tiny_ht)
        torch_hooks_before = len(user._forward_hooks)

        def boom(x, hook):
            raise RuntimeError("user bug inside a hook")

        h = add_hook(tiny_ht, "blocks.0.hook_resid_pre", boom)
        with pytest.raises(RuntimeError, match="user bug"):
            list(capture(tiny_ht, ["hello world", "fox"], SITES, progress=False))
        h.remove()
        assert _hook_counts(tiny_ht) == before
        assert len(user._forward_hooks) == torch_hooks_before
        # The generator closed halfway must also clean up.
        gen = capture(tiny_ht, ["hello", "world", "fox"], SITES, batch_size=1, progress=False)
        next(gen)
        gen.close()
        assert _hook_counts(tiny_ht) == before
        marker.clear()
        tiny_ht(torch.tensor([[5, 6]]))
        assert marker == [1], "the user's hook must still fire"
    finally:
        tiny_ht.reset_hooks(including_permanent=True)


def test_bad_input_errors(tiny_ht):
    with pytest.raises(PromptError, match="empty"):
        list(capture(tiny_ht, [], Site.resid_post(0)))
    with pytest.raises(SiteError, match=r"out of range.*2 layers.*Valid sites"):
        list(capture(tiny_ht, ["hi"], Site.resid_post(7)))
    long = "hello " * 400
    with pytest.raises(
        PromptError, match=r"prompt 1 has \d+ tokens.*context window of 128.*truncate=True"
    ):
        list(capture(tiny_ht, ["fine", long], Site.resid_post(0)))
    got = collect(tiny_ht, ["fine", long], Site.resid_post(0), truncate=True, progress=False)
    assert got[Site.resid_post(0)][1].shape[0] == 128
    with pytest.raises(PromptError, match="selects nothing"):
        list(capture(tiny_ht, ["hi"], Site.resid_post(0), positions="response"))
    with pytest.raises(PromptError, match="unknown positions"):
        list(capture(tiny_ht, ["hi"], Site.resid_post(0), positions="middle"))


def test_chat_prompt_without_template_is_a_clear_error():
    from modeldiff.testing import make_tokenizer, tiny_hooked_transformer

    model = tiny_hooked_transformer(tokenizer=make_tokenizer(chat_template=None))
    with pytest.raises(PromptError, match="chat template"):
        list(capture(model, [[{"role": "user", "content": "hi"}]], Site.resid_post(0)))


@pytest.mark.slow
def test_smollm2_resid_post_matches_hf_hidden_states(smollm2, smollm2_hf):
    """Resid-post at layer L equals transformers' hidden_states[L + 1] on the real model."""
    hf = smollm2_hf
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        "The quick brown fox",
    ]
    sites = [Site.resid_post(3), Site.resid_post(15)]
    got = collect(
        smollm2, prompts, sites, include_bos=True, batch_size=2, padding_side="left", progress=False
    )
    for i, tp in enumerate(tokenize_prompts(smollm2, prompts)):
        with torch.no_grad():
            hidden = hf(torch.tensor([tp.ids]), output_hidden_states=True).hidden_states
        for site in sites:
            torch.testing.assert_close(
                got[site][i], hidden[site.layer + 1][0], atol=1e-4, rtol=1e-4
            )


def test_the_stream_holds_no_reference_to_a_yielded_batch(tiny_ht):
    """Dropping a batch frees its activations at once, even while the stream is suspended: a
    consumer that folds each batch into statistics holds one batch of activations, never two."""
    import weakref

    stream = capture(
        tiny_ht, ["Hello world", "The quick fox", "a b"], SITES, batch_size=1, progress=False
    )
    b = next(stream)
    refs = [weakref.ref(b.acts[s]) for s in SITES]
    del b
    assert [r() for r in refs] == [None] * len(SITES)
    assert len(list(stream)) == 2


def test_mixed_train_and_eval_modes_are_given_back_as_they_were(tiny_ht):
    """Capture runs the model in eval mode and gives back each submodule's own mode: a model in
    training mode with one block frozen in eval mode keeps exactly that mix (model.train() would set
    every part alike). An error mid-capture restores them too."""
    model = tiny_ht
    model.train()
    model.blocks[0].eval()
    before = {name: m.training for name, m in model.named_modules()}
    seen: list[bool] = []
    prompts = ["hello world", "the quick fox"]

    def spy(x, hook):
        seen.append(any(m.training for m in model.modules()))

    def boom(x, hook):
        raise RuntimeError("stop")

    try:
        h = add_hook(model, "blocks.0.hook_resid_pre", spy)
        list(capture(model, prompts, SITES, batch_size=2, progress=False))
        h.remove()
        assert seen == [False]  # the forward ran in eval mode throughout
        assert {name: m.training for name, m in model.named_modules()} == before
        h = add_hook(model, "blocks.0.hook_resid_pre", boom)
        with pytest.raises(RuntimeError, match="stop"):
            list(capture(model, prompts, SITES, progress=False))
        h.remove()
        assert {name: m.training for name, m in model.named_modules()} == before
    finally:
        model.eval()


def test_a_bridge_in_training_mode_is_evaluated_whole_and_given_back(tmp_path):
    """A TransformerBridge keeps the model it wraps outside its registered modules; eval_mode must
    still switch that model's modules off (the Bridge's own eval() does) and give them back."""
    from modeldiff._hooks import eval_mode, restore_training
    from modeldiff.models import load_model
    from modeldiff.testing import save_tiny_hf_model

    save_tiny_hf_model("llama", tmp_path)
    bridge = load_model(tmp_path)
    inner = bridge.__dict__["original_model"]
    bridge.train()
    assert inner.training and all(m.training for m in inner.modules())
    state = eval_mode(bridge)
    assert not any(m.training for m in bridge.modules())
    assert not any(m.training for m in inner.modules())
    restore_training(state)
    assert all(m.training for m in bridge.modules()) and all(m.training for m in inner.modules())
    bridge.eval()
