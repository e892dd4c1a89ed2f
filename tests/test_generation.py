"""Our decoding loop against transformers' generate, with and without cache, on both wrappers."""

from __future__ import annotations

import pytest
import torch

from _reference import reference_greedy
from modeldiff.generation import GenerationError, generate, generate_ids
from modeldiff.interventions import InterventionError, steer
from modeldiff.tokens import tokenize_prompts

PROMPTS = [
    "Hello world! How are you",
    [{"role": "user", "content": "What is the capital of France?"}],
    "I",
]
N = 8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from modeldiff.testing import save_tiny_hf_model

    root = tmp_path_factory.mktemp("tiny")
    return {fam: save_tiny_hf_model(fam, root / fam) for fam in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="module")
def loaded(folders):
    from modeldiff.models import load_model

    cache = {}

    def get(fam, wrapper):
        if (fam, wrapper) not in cache:
            cache[fam, wrapper] = load_model(folders[fam], wrapper=wrapper)
        return cache[fam, wrapper]

    return get


def hf_greedy(folder, prompt_ids, n):
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder)
    hf.eval()
    out = []
    for ids in prompt_ids:
        gen = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=3,
            eos_token_id=None,
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("wrapper", ["hooked", "bridge"])
def test_greedy_matches_transformers_generate(folders, loaded, family, wrapper):
    model = loaded(family, wrapper)
    prompt_ids = [tp.ids for tp in tokenize_prompts(model, PROMPTS)]
    assert len({len(p) for p in prompt_ids}) == 3  # a batch that really needs left padding
    ref = hf_greedy(folders[family], prompt_ids, N)
    kw = {"max_new_tokens": N, "stop_at_eos": False, "progress": False}
    default = generate_ids(model, PROMPTS, **kw)
    uncached = generate_ids(model, PROMPTS, use_cache=False, **kw)
    assert default == ref
    assert uncached == ref
    if family == "gpt2":
        texts = generate(model, PROMPTS, batch_size=2, **kw)
        assert texts == [model.tokenizer.decode(r, skip_special_tokens=True) for r in ref]


def test_bridge_refuses_its_broken_cache(loaded):
    with pytest.raises(GenerationError, match="use_cache=None"):
        generate(
            loaded("llama", "bridge"), ["Hi"], max_new_tokens=2, use_cache=True, progress=False
        )


def test_stops_at_eos_per_row(tokenizer):
    from modeldiff.testing import make_tokenizer, tiny_hooked_transformer

    tok = make_tokenizer()
    model = tiny_hooked_transformer(tokenizer=tok, seed=4)
    prompts = ["Hello world! How are you", "The fox"]
    free = generate_ids(model, prompts, max_new_tokens=6, stop_at_eos=False, progress=False)
    stop = free[0][2]
    assert stop not in free[1][:6] or free[1].index(stop) > 2
    model.tokenizer.eos_token = tok.convert_ids_to_tokens(stop)
    assert model.tokenizer.eos_token_id == stop
    ids = generate_ids(model, prompts, max_new_tokens=6, progress=False)
    assert ids[0] == free[0][:3]  # stopped at (and kept) the EOS
    if stop in free[1]:
        assert ids[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert ids[1] == free[1]
    text = generate(model, prompts[:1], max_new_tokens=6, progress=False)[0]
    assert text == tok.decode(free[0][:2], skip_special_tokens=True)


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_ht):
    kw = {"max_new_tokens": 6, "stop_at_eos": False, "progress": False}
    a = generate_ids(tiny_ht, PROMPTS, temperature=1.0, seed=1, **kw)
    b = generate_ids(tiny_ht, PROMPTS, temperature=1.0, seed=1, **kw)
    c = generate_ids(tiny_ht, PROMPTS, temperature=1.0, seed=2, **kw)
    assert a == b and a != c
    greedy = generate_ids(tiny_ht, PROMPTS, **kw)
    assert generate_ids(tiny_ht, PROMPTS, temperature=1.0, top_p=1e-9, seed=3, **kw) == greedy


def test_bad_generation_arguments(tiny_ht):
    with pytest.raises(GenerationError, match="temperature"):
        generate(tiny_ht, ["Hi"], temperature=-1.0, progress=False)
    with pytest.raises(GenerationError, match="top_p"):
        generate(tiny_ht, ["Hi"], temperature=1.0, top_p=0.0, progress=False)
    with pytest.raises(GenerationError, match="wrap a single prompt"):
        generate(tiny_ht, "Hi", progress=False)
    with pytest.raises(GenerationError, match="exceeds the model's context of 128"):
        generate(tiny_ht, ["Hi"], max_new_tokens=200, progress=False)


# ------------------------------------------------------------------------------------------------
# generation under interventions
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("positions", ["generated", "prompt"])
@pytest.mark.parametrize(("family", "wrapper"), [("llama", "hooked"), ("llama", "bridge")])
def test_steered_generation_cached_uncached_and_reference_agree(loaded, family, wrapper, positions):
    model = loaded(family, wrapper)
    site = "blocks.0.hook_resid_post"
    d = torch.randn(64, generator=torch.Generator().manual_seed(0))
    prompts, n = PROMPTS[:2], 5
    prompt_ids = [tp.ids for tp in tokenize_prompts(model, prompts)]
    refs = [reference_greedy(model, p, d, site, 8.0, positions, n) for p in prompt_ids]
    kw = {"max_new_tokens": n, "stop_at_eos": False, "progress": False}
    plain = generate_ids(model, prompts, **kw)
    with steer(model, d, site=site, coefficient=8.0, positions=positions):
        ours = generate_ids(model, prompts, **kw)  # cached on HookedTransformer
        if wrapper == "hooked":
            assert generate_ids(model, prompts, use_cache=False, **kw) == refs
    assert ours == refs
    assert ours != plain


def test_steering_works_with_the_bridges_own_uncached_generate(loaded):
    """TransformerBridge.generate(use_past_kv_cache=False) re-runs the sequence; the tracker follows."""
    model = loaded("qwen2", "bridge")
    site = "blocks.1.hook_resid_pre"
    d = torch.randn(64, generator=torch.Generator().manual_seed(1))
    prompt = tokenize_prompts(model, ["The capital of France"])[0].ids
    ref = reference_greedy(model, prompt, d, site, 8.0, "generated", 5)
    with steer(model, d, site=site, coefficient=8.0, positions="generated"), torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=5,
            do_sample=False,
            use_past_kv_cache=False,
            verbose=False,
            stop_at_eos=False,
        )
    assert out[0, len(prompt) :].tolist() == ref
    # a string input to the Bridge cannot be located, and the hook says so instead of guessing
    with (
        steer(model, d, site=site, coefficient=1.0, positions="prompt"),
        pytest.raises(InterventionError, match="positions='all'"),
    ):
        model("The capital of France")
    assert not model._forward_pre_hooks
