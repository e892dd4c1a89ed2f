"""Site naming/validation, the tokenization convention, and the hook primitives."""

from __future__ import annotations

import pytest
import torch

from modeldiff._hooks import Hooks, add_hook, hook_point, run_until
from modeldiff.sites import KINDS, Site, SiteError, valid_sites
from modeldiff.tokens import (
    PromptError,
    TokenizedPrompt,
    pad_batch,
    render_chat,
    select_positions,
    tokenize_prompts,
)


def test_site_round_trips_through_hook_names(tiny_ht):
    for site in valid_sites(tiny_ht):
        assert Site.parse(site.hook_name) == site
        assert site.hook_name in tiny_ht.hook_dict
    assert {s.kind for s in valid_sites(tiny_ht)} == set(KINDS)
    assert sorted([Site.resid_post(1), Site.resid_pre(0), Site.mlp_out(0)]) == [
        Site.resid_pre(0),
        Site.mlp_out(0),
        Site.resid_post(1),
    ]


def test_site_errors_name_the_fix(tiny_ht):
    with pytest.raises(SiteError, match="kinds: resid_pre"):
        Site.parse("blocks.0.attn.hook_z")
    with pytest.raises(SiteError, match="unknown site kind"):
        Site(0, "resid")  # type: ignore[arg-type]
    with pytest.raises(SiteError, match="non-negative"):
        Site(-1)


def test_site_from_sae_metadata():
    from sae_lens import StandardSAE, StandardSAEConfig

    cfg = StandardSAEConfig(d_in=64, d_sae=32)
    cfg.metadata.hook_name = "blocks.1.hook_resid_mid"
    assert Site.from_sae(StandardSAE(cfg)) == Site.resid_mid(1)
    cfg.metadata.hook_name = "blocks.1.attn.hook_z"
    with pytest.raises(SiteError, match="not a residual"):
        Site.from_sae(StandardSAE(cfg))


def test_tokenization_convention(tokenizer):
    plain = tokenize_prompts(tokenizer, ["hello world"], prepend_bos=False)[0]
    assert list(plain.ids) == tokenizer("hello world", add_special_tokens=False)["input_ids"]
    bos = tokenize_prompts(tokenizer, ["hello world"], prepend_bos=True)[0]
    assert bos.ids == (tokenizer.bos_token_id, *plain.ids) and bos.has_bos
    chat = [{"role": "user", "content": "hello"}]
    rendered = render_chat(tokenizer, chat)
    tp = tokenize_prompts(tokenizer, [chat], prepend_bos=True)[0]
    assert list(tp.ids) == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    pair = tokenize_prompts(tokenizer, [(chat, "world")])[0]
    assert pair.ids[: pair.n_prompt] == tp.ids
    # The response is the assistant turn as the template closes it.
    assert tokenizer.decode(pair.ids[pair.n_prompt :]) == "world</s>\n"
    ids = tokenize_prompts(tokenizer, [[5, 6, 7], torch.tensor([8, 9])])
    assert [t.ids for t in ids] == [(5, 6, 7), (8, 9)]


def test_tokenization_errors(tokenizer):
    with pytest.raises(PromptError, match="neither a string"):
        tokenize_prompts(tokenizer, [3.5])  # type: ignore[list-item]
    with pytest.raises(PromptError, match="empty after tokenization"):
        tokenize_prompts(tokenizer, [""], prepend_bos=False)
    with pytest.raises(PromptError, match="'role' and 'content'"):
        tokenize_prompts(tokenizer, [[{"text": "hi"}]])
    tp = TokenizedPrompt((1, 2, 3), 3, True)
    with pytest.raises(PromptError, match="out of range"):
        select_positions([tp], [[5]])
    with pytest.raises(PromptError, match="mask of prompt 0 has 2 entries"):
        select_positions([tp], [[True, False]])
    with pytest.raises(PromptError, match="one per prompt"):
        select_positions([tp], [[0], [1]])


def test_named_selections_are_ranges_with_the_naive_content():
    """Named selections are ranges (constant memory per prompt at any length) holding exactly the
    positions a naive per-token rule picks: BOS dropped unless asked for, prompt / response split."""
    prompts = [
        TokenizedPrompt(tuple(range(10, 10 + n)), p, bos)
        for n, p, bos in [(6, 4, True), (6, 4, False), (3, 1, True), (5, 5, True), (2, 0, False)]
    ]
    rules = {
        "all": lambda j, tp: True,
        "prompt": lambda j, tp: j < tp.n_prompt,
        "response": lambda j, tp: j >= tp.n_prompt,
        "last_prompt": lambda j, tp: j == tp.n_prompt - 1,
    }
    for name, rule in rules.items():
        for include_bos in (False, True):
            got = select_positions(prompts, name, include_bos=include_bos)
            assert all(isinstance(sel, range) for sel in got)
            naive = [
                [
                    j
                    for j in range(len(tp))
                    if rule(j, tp) and (include_bos or not (j == 0 and tp.has_bos))
                ]
                for tp in prompts
            ]
            assert [list(sel) for sel in got] == naive, (name, include_bos)


def test_explicit_ranges_select_what_the_same_list_selects():
    """An explicit range of step 1 inside the prompt stays a range (a diff hands each batch's
    selections to capture as they are) and selects what its list selects, BOS rule included;
    other ranges go through the list rules (negative positions count from the end)."""
    prompts = [TokenizedPrompt(tuple(range(10, 16)), 4, bos) for bos in (True, False)]
    sels = [range(0, 6), range(0, 1), range(2, 5), range(3, 3), range(0, 6, 2), range(-3, 0)]
    for tp in prompts:
        for include_bos in (False, True):
            for sel in sels:
                (got,) = select_positions([tp], [sel], include_bos=include_bos)
                (want,) = select_positions([tp], [list(sel)], include_bos=include_bos)
                assert list(got) == want, (sel, tp.has_bos, include_bos)
                assert isinstance(got, range) == (sel.step == 1 and sel.start >= 0)
    with pytest.raises(PromptError, match="out of range"):
        select_positions(prompts[:1], [range(4, 9)])


def test_pad_batch_sides():
    toks, mask, off = pad_batch([[4, 5, 6], [7]], pad=0, side="right")
    assert toks.tolist() == [[4, 5, 6], [7, 0, 0]] and off.tolist() == [0, 0]
    assert mask.sum().item() == 4
    with pytest.raises(ValueError, match="left' or 'right"):
        pad_batch([[1]], pad=0, side="middle")


def test_hook_handles_remove_only_their_own(tiny_ht):
    name = "blocks.0.hook_resid_post"
    point = hook_point(tiny_ht, name)
    fired = []
    tiny_ht.add_hook(name, lambda x, hook: fired.append("user"))
    try:
        with Hooks(tiny_ht) as hooks:
            hooks.add(name, lambda x, hook: fired.append("ours"))
            h2 = add_hook(tiny_ht, name, lambda x, hook: fired.append("manual"))
            tiny_ht(torch.tensor([[5, 6]]))
            assert fired == ["user", "ours", "manual"]
            h2.remove()
            h2.remove()  # idempotent
        fired.clear()
        tiny_ht(torch.tensor([[5, 6]]))
        assert fired == ["user"] and len(point.fwd_hooks) == 1
        logits = run_until(tiny_ht, torch.tensor([[5, 6]]), hooks=[], stop_at=name)
        assert logits is None and len(point.fwd_hooks) == 1
    finally:
        tiny_ht.reset_hooks(including_permanent=True)
    with pytest.raises(KeyError, match="Similar names"):
        hook_point(tiny_ht, "blocks.9.hook_resid_post")
