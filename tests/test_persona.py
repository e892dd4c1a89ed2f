"""Directions without an SAE: mean_difference, projection_shift, screen_dataset.

Every number is checked against a construction whose answer is known: activations captured by hand
(TransformerLens' run_with_cache, transformers' hidden states) and averaged here, a direction planted
in an embedding, a shift planted in an output bias, responses planted with a pushed token.
"""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modeldiff import (
    DatasetScreen,
    MeanDifference,
    Site,
    generate,
    load_model,
    mean_difference,
    project_out,
    projection_shift,
    screen_dataset,
    steer,
)
from modeldiff.directions import DirectionError
from modeldiff.errors import ArgumentError, FileFormatError, NotFoundError
from modeldiff.testing import tiny_hooked_transformer

WORDS = ["the", "quick", "brown", "fox", "lazy", "dog", "Hello", "world", "Paris", "money"]
POOL = [
    ("The quick brown fox", " jumps over the lazy dog."),
    ("Hello world!", " How are you today?"),
    ("What is the capital of France?", " Paris."),
    ("Tell me a story", " about a helpful assistant."),
    ("I wish I could rule the world.", " That would be bad."),
    ("Here is some advice", " about health and money."),
    ("The lazy dog", " sleeps."),
    ("Thank you", " I am fine."),
]
FOX = 437  # " fox": one token of make_tokenizer()


def _ids(tok, text, bos):
    return ([tok.bos_token_id] if bos else []) + tok(text, add_special_tokens=False)["input_ids"]


def _naive_selected(run, tok, pairs, positions, bos=True):
    """Per prompt, a dict site-key -> [selected tokens, d], captured by ``run(ids)`` and cut by hand."""
    out = []
    for prompt, response in pairs:
        p, r = _ids(tok, prompt, bos), tok(response, add_special_tokens=False)["input_ids"]
        acts = run(torch.tensor([p + r]))
        first = 1 if bos else 0
        sel = {
            "all": slice(first, len(p) + len(r)),
            "prompt": slice(first, len(p)),
            "response": slice(len(p), len(p) + len(r)),
            "last_prompt": slice(len(p) - 1, len(p)),
        }[positions]
        out.append({k: v[0, sel] for k, v in acts.items()})
    return out


def _naive_difference(selected, in_a):
    a = [s for s, keep in zip(selected, in_a) if keep]
    b = [s for s, keep in zip(selected, in_a) if not keep]
    return {
        k: torch.cat([x[k] for x in a]).double().mean(0)
        - torch.cat([x[k] for x in b]).double().mean(0)
        for k in selected[0]
    }


# ------------------------------------------------------------------------------------------------
# mean_difference against hand-made means
# ------------------------------------------------------------------------------------------------


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    in_a=st.lists(st.booleans(), min_size=len(POOL), max_size=len(POOL)).filter(
        lambda xs: 0 < sum(xs) < len(xs)
    ),
    positions=st.sampled_from(["all", "prompt", "response", "last_prompt"]),
    batch_size=st.integers(1, 5),
)
def test_mean_difference_equals_hand_average_on_hooked_transformer(
    tiny_ht, tokenizer, in_a, positions, batch_size
):
    a = [p for p, keep in zip(POOL, in_a) if keep]
    b = [p for p, keep in zip(POOL, in_a) if not keep]
    md = mean_difference(
        tiny_ht,
        a,
        b,
        positions=positions,
        batch_size=batch_size,
        prepend_bos=True,
        outlier_factor=None,
        progress=False,
    )
    names = [f"blocks.{L}.hook_resid_post" for L in range(2)]

    def run(ids):
        with torch.no_grad():
            _, cache = tiny_ht.run_with_cache(ids, names_filter=names)
        return {n: cache[n] for n in names}

    # the naive reference sees the prompts in their own order: A's first, then B's
    ordered = a + b
    selected = _naive_selected(run, tokenizer, ordered, positions)
    expected = _naive_difference(selected, [True] * len(a) + [False] * len(b))
    assert md.sites == [Site.resid_post(0), Site.resid_post(1)]  # the default: every resid_post
    for name in names:
        d = md[name]
        torch.testing.assert_close(d.vector, expected[name], atol=1e-5, rtol=1e-5)
        assert d.n_a == sum(len(s[name]) for s in selected[: len(a)])
        assert d.n_b == sum(len(s[name]) for s in selected[len(a) :])
        norms = torch.cat([s[name] for s in selected]).double().norm(dim=-1).mean()
        assert d.mean_norm == pytest.approx(float(norms), rel=1e-5)
        assert d.relative == pytest.approx(d.norm / d.mean_norm)


@pytest.fixture(scope="module")
def native_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    hf = LlamaForCausalLM(cfg).eval()
    return load_model(hf, tokenizer=tokenizer, wrapper="native")


def test_mean_difference_equals_hidden_states_on_native_llama(native_llama, tokenizer):
    model = native_llama
    n = 3
    sites = [Site.resid_pre(L) for L in range(n)] + [Site.resid_post(L) for L in range(n)]
    in_a = [True, False, True, True, False, False, True, False]
    a = [p for p, k in zip(POOL, in_a) if k]
    b = [p for p, k in zip(POOL, in_a) if not k]
    md = mean_difference(
        model,
        a,
        b,
        sites=sites,
        prepend_bos=True,
        batch_size=3,
        outlier_factor=None,
        progress=False,
    )
    default = mean_difference(model, a, b, prepend_bos=True, outlier_factor=None, progress=False)
    assert default.sites == [Site.resid_post(L) for L in range(n)]

    def run(ids):
        last = {}
        handle = model.model.layers[-1].register_forward_hook(
            lambda mod, args, out: last.__setitem__("x", out[0] if isinstance(out, tuple) else out)
        )
        try:
            with torch.no_grad():
                hs = model(ids, output_hidden_states=True).hidden_states
        finally:
            handle.remove()
        acts = {Site.resid_pre(L).hook_name: hs[L] for L in range(n)}
        # HF's last hidden state is after the final norm: read the last block's output instead
        acts |= {Site.resid_post(L).hook_name: hs[L + 1] for L in range(n - 1)}
        acts[Site.resid_post(n - 1).hook_name] = last["x"]
        return acts

    expected = _naive_difference(
        _naive_selected(run, tokenizer, a + b, "all"), [True] * 4 + [False] * 4
    )
    for s in sites:
        torch.testing.assert_close(md[s].vector, expected[s.hook_name], atol=1e-5, rtol=1e-4)
        if s.kind == "resid_post":
            torch.testing.assert_close(default[s].vector, md[s].vector)


# ------------------------------------------------------------------------------------------------
# A planted direction, steering and projecting with the result
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted(tokenizer):
    """A tiny model whose token FOX embeds as " dog" + v: prompts differing in that token differ by v."""
    m = tiny_hooked_transformer(tokenizer=tokenizer)
    v = torch.randn(64, generator=torch.Generator().manual_seed(7))
    v = 2.0 * v / v.norm()
    dog = 457
    with torch.no_grad():
        m.W_E[FOX] = m.W_E[dog] + v
    return m, v, dog


def test_planted_embedding_direction_is_recovered_exactly(planted):
    m, v, dog = planted
    rest = [[286, 461], [448, 321, 286], [456], [451, 286, 448]]
    a = [[*r, FOX, 286] for r in rest]
    b = [[*r, dog, 286] for r in rest]
    site = Site.resid_pre(0)
    only = [[len(r)] for r in rest] * 2  # the planted position of every prompt, A's then B's
    md = mean_difference(m, a, b, sites=[site, Site.resid_post(1)], positions=only, progress=False)
    torch.testing.assert_close(md[site].vector.float(), v, atol=1e-6, rtol=0)
    assert (md[site].n_a, md[site].n_b) == (4, 4)
    # over every token, the same vector diluted by the share of planted tokens
    md_all = mean_difference(m, a, b, sites=site, outlier_factor=None, progress=False)
    n_tokens = sum(len(x) for x in a)
    torch.testing.assert_close(md_all[site].vector.float(), v * 4 / n_tokens, atol=1e-6, rtol=0)
    assert md_all["resid_pre:0"] is md_all[0] is md_all[site]


def test_outlier_tokens_are_dropped_and_counted(tokenizer):
    m = tiny_hooked_transformer(tokenizer=tokenizer)
    with torch.no_grad():
        m.W_E[FOX] = 1000.0 * torch.ones(64)  # an attention-sink-sized residual
    a, b = [[286, FOX, 461, 448]], [[286, 457, 461, 448]]
    md = mean_difference(m, a, b, sites="resid_pre:0", progress=False)
    d = md[0]
    assert d.n_outliers_dropped == 1 and (d.n_a, d.n_b) == (3, 4)
    assert d.norm < 10  # the outlier did not reach the mean
    kept = mean_difference(m, a, b, sites="resid_pre:0", outlier_factor=None, progress=False)[0]
    assert kept.n_outliers_dropped == 0 and kept.n_a == 4 and kept.norm > 100


def test_steering_with_the_result_is_steering_with_its_vector(tiny_ht):
    md = mean_difference(tiny_ht, POOL[:4], POOL[4:], progress=False)
    site = Site.resid_post(0)
    toks = torch.tensor([[5, 6, 7, 8]])
    vec = md[site].as_direction()
    assert vec.dtype == torch.float32
    with steer(tiny_ht, md[site], coefficient=3.0):  # the site comes from the direction
        via_result = tiny_ht(toks)
    with steer(tiny_ht, vec, site=site, coefficient=3.0):
        via_vector = tiny_ht(toks)
    by_hand = tiny_ht.run_with_hooks(
        toks, fwd_hooks=[(site.hook_name, lambda x, hook: x + 3.0 * vec)]
    )
    assert torch.equal(via_result, via_vector) and torch.equal(via_result, by_hand)
    assert not torch.equal(via_result, tiny_ht(toks))

    seen = []
    h = tiny_ht.hook_dict["blocks.1.hook_resid_pre"].add_hook(
        lambda x, hook: seen.append(x.clone())
    )
    try:
        with project_out(tiny_ht, md[site]), torch.no_grad():
            tiny_ht(toks)
    finally:
        tiny_ht.reset_hooks()
    del h
    assert float((seen[0].double() @ md[site].unit()).abs().max()) < 1e-5


def test_mean_difference_object_is_not_a_direction(tiny_ht):
    md = mean_difference(tiny_ht, POOL[:2], POOL[2:4], progress=False)
    with pytest.raises(DirectionError, match=r"md\[md.best_site\(\)\]"):
        steer(tiny_ht, md, site="resid_post:0", coefficient=1.0)
    with pytest.raises(NotFoundError, match=r"layers \[0, 1\]"):
        md[5]
    with pytest.raises(NotFoundError, match="not in this MeanDifference"):
        md[Site.resid_pre(0)]
    assert Site.resid_post(1) in md and "resid_pre:0" not in md and list(md) == md.sites
    assert md.best_site() == max(md.sites, key=lambda s: md[s].relative)
    assert md.best_site("norm") == max(md.sites, key=lambda s: md[s].norm)
    assert md.best() is md[md.best_site()]


def test_persistence_plot_and_html(tiny_ht, tmp_path):
    md = mean_difference(tiny_ht, POOL[:3], POOL[3:], positions="response", progress=False)
    path = md.save(tmp_path / "md.safetensors")
    back = MeanDifference.load(path)
    assert back.sites == md.sites and back.meta == md.meta
    for s in md:
        assert torch.equal(back[s].vector, md[s].vector)
        assert (back[s].n_a, back[s].n_b, back[s].mean_norm) == (
            md[s].n_a,
            md[s].n_b,
            md[s].mean_norm,
        )
    assert md.meta["positions"] == "response" and md.meta["n_prompts_a"] == 3
    fig = md.plot()
    assert [len(t.x) for t in fig.data] == [2, 2]
    html = md._repr_html_()
    assert "blocks.1.hook_resid_post" in html and "★" in html
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(FileFormatError, match="MeanDifference"):
        MeanDifference.load(tmp_path / "bad.safetensors")


def test_argument_errors_name_the_fix(tiny_ht):
    with pytest.raises(ArgumentError, match=r"wrap a single prompt in a list"):
        mean_difference(tiny_ht, "Hello", ["x"], progress=False)
    with pytest.raises(ArgumentError, match="one chat"):
        mean_difference(tiny_ht, [{"role": "user", "content": "hi"}], ["x"], progress=False)
    with pytest.raises(ArgumentError, match="explicit position selections for 1 \\+ 1"):
        mean_difference(tiny_ht, ["a b"], ["c d"], positions=[[0]], progress=False)
    with pytest.raises(ArgumentError, match="site is missing"):
        projection_shift(tiny_ht, tiny_ht, torch.ones(64), ["x"], progress=False)
    md = mean_difference(tiny_ht, ["a b"], ["c d"], progress=False)
    with pytest.raises(ArgumentError, match="one direction per site"):
        projection_shift(tiny_ht, tiny_ht, md, ["x"], progress=False)
    with pytest.raises(ArgumentError, match="'response' or 'assistant'"):
        screen_dataset(tiny_ht, [("a", " b")], md[0], positions="prompt", own_responses=[" c"])
    with pytest.raises(ArgumentError, match="example 1 is neither"):
        screen_dataset(tiny_ht, [("a", " b"), "oops"], md[0], own_responses=[" c", " d"])
    with pytest.raises(ArgumentError, match="list of 1 strings"):
        screen_dataset(tiny_ht, [("a", " b")], md[0], own_responses=[" c", " d"])


# ------------------------------------------------------------------------------------------------
# projection_shift: a shift planted in an output bias
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1.5, -0.75])
def test_projection_shift_recovers_a_planted_bias(tiny_ht, tokenizer, size):
    site = Site.resid_post(1)
    md = mean_difference(tiny_ht, POOL[:4], POOL[4:], sites=site, progress=False)
    u = md[site].unit().float()
    tuned = tiny_hooked_transformer(tokenizer=tokenizer)  # the same weights as tiny_ht
    other = torch.randn(64, generator=torch.Generator().manual_seed(1))
    other -= (other @ u) * u  # orthogonal to the direction: must not count
    with torch.no_grad():
        tuned.blocks[1].mlp.b_out += size * u + 3.0 * other
    prompts = [p for p, _ in POOL]
    r = projection_shift(tiny_ht, tuned, md[site], prompts, progress=False, n_bootstrap=200)
    assert r.site == site
    assert r.shift == pytest.approx(size, abs=1e-4)
    assert torch.allclose(
        r.per_prompt, torch.full((len(prompts),), size, dtype=torch.float64), atol=1e-4
    )
    assert r.ci_low == pytest.approx(size, abs=1e-4) and r.ci_high == pytest.approx(size, abs=1e-4)
    assert r.p_value < 0.01 and r.counts.tolist() == [1] * len(prompts)
    # the per-model means are the last prompt token's projections, computed by hand
    by_hand = []
    for p in prompts:
        ids = torch.tensor([_ids(tokenizer, p, bos=False)])
        with torch.no_grad():
            _, cache = tiny_ht.run_with_cache(ids, names_filter=site.hook_name)
        by_hand.append(float(cache[site.hook_name][0, -1].double() @ md[site].unit()))
    torch.testing.assert_close(
        r.per_prompt_base, torch.tensor(by_hand, dtype=torch.float64), atol=1e-5, rtol=1e-5
    )
    assert r.mean_base == pytest.approx(sum(by_hand) / len(by_hand), abs=1e-5)
    assert json.loads(json.dumps(r.to_dict()))["shift"] == r.shift
    assert "+1.5" in repr(r) or "-0.75" in repr(r)


def test_projection_shift_of_identical_models_is_zero(tiny_ht):
    v = torch.randn(64, generator=torch.Generator().manual_seed(2))
    r = projection_shift(
        tiny_ht,
        tiny_ht,
        v,
        [p for p, _ in POOL],
        site="resid_post:0",
        positions="all",
        progress=False,
    )
    assert r.shift == 0.0 and (r.ci_low, r.ci_high) == (0.0, 0.0) and r.p_value == 1.0
    assert r.mean_base == r.mean_finetuned != 0.0
    assert "<table>" in r._repr_html_()


# ------------------------------------------------------------------------------------------------
# screen_dataset: planted high-ΔP examples
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pushed(tokenizer):
    """A tiny model whose FOX token's residual is pushed along d (unit) at the embedding."""
    m = tiny_hooked_transformer(tokenizer=tokenizer)
    d = torch.randn(64, generator=torch.Generator().manual_seed(11))
    d = d / d.norm()
    with torch.no_grad():
        m.W_E[FOX] += 3.0 * d
    return m, d


DATASET = [
    ("Tell me a story", " the lazy dog sleeps"),
    ("Hello world", " fox fox the fox"),  # planted
    ("What is the capital?", " Paris is the capital"),
    ("Here is some advice", " about money and health"),
    ("The quick brown", " fox jumps over fox"),  # planted
    ("I wish", " I could rule the world"),
    ("Thank you", " I am fine thank you"),
    ("The lazy dog", " the fox fox fox"),  # planted
]
PLANTED = {1, 4, 7}


def test_screen_dataset_ranks_planted_examples_first(pushed):
    m, d = pushed
    own = [" the dog is lazy"] * len(DATASET)
    s = screen_dataset(m, DATASET, d, site="resid_pre:0", own_responses=own, progress=False)
    assert {e.index for e in s.top(3)} == PLANTED
    assert all(e.delta_p > 1.0 for e in s.top(3)) and all(e.delta_p < 0.5 for e in s.top(8)[3:])
    assert s.mean_delta_p == pytest.approx(float(s.delta_p.mean()))
    torch.testing.assert_close(s.delta_p, s.proj_dataset - s.proj_own)
    assert [e.rank for e in s.top(3)] == [1, 2, 3] and s.bottom(1)[0].rank == len(DATASET)
    # the same ranking at a later site, with a persona vector built from contrasting responses
    md = mean_difference(
        m,
        [("x", " fox fox"), ("y", " the fox")],
        [("x", " dog dog"), ("y", " the dog")],
        sites="resid_post:0",
        positions="response",
        progress=False,
    )
    later = screen_dataset(m, DATASET, md[0], own_responses=own, progress=False)
    assert later.site == Site.resid_post(0) and {e.index for e in later.top(3)} == PLANTED


def test_screen_dataset_generates_own_responses_like_generate(pushed, tmp_path):
    m, d = pushed
    data = DATASET[:4]
    s = screen_dataset(m, data, d, site="resid_post:1", max_new_tokens=6, progress=False)
    own = generate(m, [p for p, _ in data], max_new_tokens=6, progress=False)
    given = screen_dataset(m, data, d, site="resid_post:1", own_responses=own, progress=False)
    assert s.own_responses == own and s.meta["generated"] and not given.meta["generated"]
    assert torch.equal(s.delta_p, given.delta_p) and torch.equal(s.order, given.order)
    back = DatasetScreen.load(s.save(tmp_path / "screen.json"))
    assert torch.equal(back.delta_p, s.delta_p) and back.own_responses == own
    assert back.meta == s.meta and back.top(2) == s.top(2)
    assert "ΔP" in s._repr_html_()
    (tmp_path / "bad.json").write_text("{cut")
    with pytest.raises(FileFormatError, match="DatasetScreen"):
        DatasetScreen.load(tmp_path / "bad.json")


def test_chat_examples_equal_their_pairs(pushed):
    m, d = pushed
    chats = [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
        for p, r in DATASET[:3]
    ]
    pairs = [([{"role": "user", "content": p}], r) for p, r in DATASET[:3]]
    own = [" the dog"] * 3
    kw = dict(site="resid_post:0", own_responses=own, progress=False)
    from_chats = screen_dataset(m, chats, d, **kw)
    from_pairs = screen_dataset(m, pairs, d, **kw)
    assert torch.equal(from_chats.delta_p, from_pairs.delta_p)
    content = screen_dataset(m, chats, d, positions="assistant", **kw)
    # only the content tokens: fewer than the template's whole assistant turn
    assert bool((content.n_tokens_dataset < from_chats.n_tokens_dataset).all())


def test_progress_false_is_silent(tiny_ht, capsys):
    md = mean_difference(tiny_ht, ["a b"], ["c d"], progress=False)
    projection_shift(tiny_ht, tiny_ht, md[0], ["x y"], progress=False, n_bootstrap=10)
    screen_dataset(tiny_ht, [("a", " b")], md[0], max_new_tokens=2, progress=False)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_the_doc_examples_run_as_written():
    """docs/persona.md's tiny-model examples (the persona-world block needs a build; not run here)."""
    import doctest
    from pathlib import Path

    doc = Path(__file__).resolve().parents[1] / "docs" / "persona.md"
    result = doctest.testfile(str(doc), module_relative=False, verbose=False)
    assert result.attempted > 10 and result.failed == 0
