"""The model-adapter layer: native transformers families the Bridge does not know, a custom torch
decoder, the registry and its errors. Every path is checked against plain transformers / torch."""

from __future__ import annotations

import math

import pytest
import torch
from sae_lens import TopKSAE, TopKSAEConfig
from torch import nn
from transformers import AutoModelForCausalLM

from _reference import plain_logits, reference_greedy
from modeldiff import Site, collect, diff_latents, generate_ids, load_model, model_kind, steer
from modeldiff.adapters import (
    AdapterError,
    ModelAdapter,
    adapter_for,
    register_adapter,
    registered_adapters,
    unregister_adapter,
)
from modeldiff.testing import make_tokenizer, save_tiny_hf_model
from modeldiff.tokens import tokenize_prompts

UNSUPPORTED = ("persimmon", "biogpt", "gpt_neox_japanese", "helium")
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "What is the capital of France?",
    "Tell me a story about a helpful assistant.",
    "I wish I could rule the world.",
    "Here is some advice about health and money.",
]


# ------------------------------------------------------------------------------------------------
# A custom torch decoder, written here: no transformers, no TransformerLens
# ------------------------------------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        allowed = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()[None, None]
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        y = torch.softmax(scores, -1) @ v
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class _Block(nn.Module):
    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class TinyDecoder(nn.Module):
    """Pre-norm decoder blocks in ``self.stack``: a name no convention finds."""

    def __init__(self, vocab: int, d: int = 32, n_layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(128, d)
        self.stack = nn.ModuleList([_Block(d, 4) for _ in range(n_layers)])
        self.norm = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def residuals(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Independent reference: the residual stream before each block and after the last."""
        x = self.embed(tokens) + self.pos(torch.arange(tokens.shape[1]))[None]
        out = [x]
        for block in self.stack:
            x = block(x)
            out.append(x)
        return out

    def forward(self, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None):
        if attention_mask is None:
            pos = torch.arange(tokens.shape[1], device=tokens.device)[None]
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.stack:
            x = block(x, attention_mask)
        return self.unembed(self.norm(x))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {f: save_tiny_hf_model(f, root / f) for f in (*UNSUPPORTED, "llama", "gpt2")}


@pytest.fixture(scope="module")
def custom(tokenizer):
    return load_model(TinyDecoder(len(tokenizer)), layers="stack", tokenizer=tokenizer)


def _hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def _hooks_snapshot(model: nn.Module) -> list[tuple[str, int, int]]:
    return [(n, len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()]


# ------------------------------------------------------------------------------------------------
# Loading and residuals
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_family_loads_natively_with_hf_residuals(folders, family):
    model = load_model(folders[family])
    assert model_kind(model) == "native"  # the Bridge does not know these; no wrapper= needed
    adapter = adapter_for(model)
    n = adapter.n_layers
    sites = [Site.resid_pre(L) for L in range(n)] + [Site.resid_post(L) for L in range(n - 1)]
    acts = collect(model, PROMPTS[:3], sites, include_bos=True, progress=False)
    hf = _hf(folders[family])
    for p, tp in enumerate(tokenize_prompts(model, PROMPTS[:3])):
        with torch.no_grad():
            hs = hf(torch.tensor([tp.ids]), output_hidden_states=True).hidden_states
        for L in range(n):
            torch.testing.assert_close(acts[Site.resid_pre(L)][p], hs[L][0], rtol=1e-5, atol=1e-5)
        for L in range(n - 1):
            torch.testing.assert_close(
                acts[Site.resid_post(L)][p], hs[L + 1][0], rtol=1e-5, atol=1e-5
            )


@pytest.mark.parametrize("family", ["persimmon", "gpt_neox_japanese", "helium", "llama", "gpt2"])
def test_sub_block_sites_decompose_the_block(folders, family):
    model = load_model(folders[family], wrapper="native")
    kinds = ["resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"]
    sites = [Site(1, k) for k in kinds]
    acts = collect(model, PROMPTS[:2], sites, progress=False)
    a = {s.kind: acts[s][0] for s in sites}
    torch.testing.assert_close(a["resid_pre"] + a["attn_out"], a["resid_mid"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a["resid_mid"] + a["mlp_out"], a["resid_post"], rtol=1e-5, atol=1e-5)


def test_missing_sub_block_sites_are_refused_with_the_reason(folders):
    biogpt = load_model(folders["biogpt"])  # its MLP is two bare Linear layers (fc1, fc2)
    with pytest.raises(
        ValueError, match=r"no hook 'blocks.0.hook_mlp_out'.*Valid sites: resid_pre, resid_post"
    ):
        Site.mlp_out(0).validate(biogpt)
    gemma = load_model(
        save_tiny_hf_model("gemma2", folders["llama"].parent / "g2"), wrapper="native"
    )
    with pytest.raises(ValueError, match=r"extra norms or scales"):
        steer(gemma, torch.ones(64), site=Site.attn_out(0), coefficient=1.0)


def test_native_matches_the_bridge_on_a_family_both_run(folders):
    native = load_model(folders["llama"], wrapper="native")
    bridge = load_model(folders["llama"], wrapper="bridge")
    site = Site.resid_post(0)
    ids = [
        list(tp.ids) for tp in tokenize_prompts(bridge, PROMPTS[:3])
    ]  # one tokenization for both
    a = collect(native, ids, site, progress=False)[site]
    b = collect(bridge, ids, site, progress=False)[site]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_left_padding_and_batching_change_nothing(folders):
    model = load_model(folders["gpt2"], wrapper="native")  # learned positions: the sharpest test
    site = Site.resid_post(1)
    one = collect(model, PROMPTS, site, batch_size=1, progress=False)[site]
    left = collect(model, PROMPTS, site, batch_size=4, padding_side="left", progress=False)[site]
    for x, y in zip(one, left, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_custom_decoder_residuals_match_its_own_blocks(custom):
    adapter = adapter_for(custom)
    assert (adapter.name, adapter.n_layers, adapter.d_model, adapter.layers_path) == (
        "native",
        2,
        32,
        "stack",
    )
    sites = [Site.resid_pre(0), Site.resid_pre(1), Site.resid_mid(0), Site.resid_post(1)]
    acts = collect(custom, PROMPTS[:2], sites, include_bos=True, progress=False)
    for p, tp in enumerate(tokenize_prompts(custom, PROMPTS[:2])):
        with torch.no_grad():
            ref = custom.residuals(torch.tensor([tp.ids]))
        torch.testing.assert_close(acts[Site.resid_pre(0)][p], ref[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acts[Site.resid_pre(1)][p], ref[1][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acts[Site.resid_post(1)][p], ref[2][0], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Diffing, steering, generation
# ------------------------------------------------------------------------------------------------


def _planted_diff(base, tuned, d_model):
    site = Site.resid_post(0)
    sae = TopKSAE(TopKSAEConfig(d_in=d_model, d_sae=96, k=8))
    sae.cfg.metadata.hook_name = site.hook_name
    shift = 4.0 * sae.W_dec[5].detach() / sae.W_dec[5].detach().norm()
    block = adapter_for(tuned).layers[0]

    def plant(module, args, out):  # a plain torch hook: the "fine-tune"
        return out + shift if isinstance(out, torch.Tensor) else (out[0] + shift, *out[1:])

    handle = block.register_forward_hook(plant)
    try:
        return diff_latents(base, tuned, sae, PROMPTS, progress=False)
    finally:
        handle.remove()


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_planted_shift_ranks_first(folders, family):
    base = load_model(folders[family])
    tuned = load_model(folders[family], like=base)
    d = _planted_diff(base, tuned, 64)
    assert d.rank_of(5) == 1 and d.at_rank(1).ci_low > 0


def test_planted_shift_ranks_first_on_the_custom_decoder(tokenizer):
    base = load_model(TinyDecoder(len(tokenizer)), layers="stack", tokenizer=tokenizer)
    tuned = load_model(TinyDecoder(len(tokenizer)), layers="stack", tokenizer=tokenizer)
    d = _planted_diff(base, tuned, 32)
    assert d.rank_of(5) == 1


@pytest.mark.parametrize("family", [*UNSUPPORTED, "custom"])
def test_steering_moves_logits_and_leaves_the_model_bit_identical(folders, custom, family):
    model = custom if family == "custom" else load_model(folders[family])
    adapter = adapter_for(model)
    toks = torch.tensor([list(tokenize_prompts(model, PROMPTS[:1])[0].ids)])
    before_hooks = _hooks_snapshot(model)
    with torch.no_grad():
        plain = plain_logits(model, toks)
    d = torch.randn(adapter.d_model, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), steer(model, d, site=Site.resid_post(0), coefficient=8.0):
        steered = plain_logits(model, toks)
    assert (steered - plain).abs().max() > 1e-3
    with torch.no_grad():
        assert torch.equal(plain_logits(model, toks), plain)
    with (
        pytest.raises(RuntimeError, match="boom"),
        steer(model, d, site=Site.resid_pre(1), coefficient=8.0),
    ):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(plain_logits(model, toks), plain)
    assert _hooks_snapshot(model) == before_hooks


def test_user_hooks_on_native_modules_are_never_touched(folders):
    model = load_model(folders["helium"])
    block = adapter_for(model).layers[0]
    calls = []
    user = block.register_forward_hook(lambda m, a, o: calls.append(1))
    try:
        with steer(model, torch.ones(64), site=Site.resid_post(0), coefficient=1.0):
            plain_logits(model, torch.tensor([[1, 5, 6]]))
        plain_logits(model, torch.tensor([[1, 5, 6]]))
        assert len(calls) == 2 and len(block._forward_hooks) == 1
    finally:
        user.remove()


@pytest.mark.parametrize("family", ["persimmon", "helium", "llama", "gpt2"])
def test_cached_greedy_equals_transformers_generate(folders, family):
    model = load_model(folders[family], wrapper="native")
    ids = [list(tp.ids) for tp in tokenize_prompts(model, PROMPTS[:3])]
    got = generate_ids(model, ids, max_new_tokens=8, stop_at_eos=False, progress=False)
    assert got == generate_ids(
        model, ids, max_new_tokens=8, stop_at_eos=False, use_cache=False, progress=False
    )
    hf = _hf(folders[family])
    for row, prompt in zip(got, ids, strict=True):
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
        )
        assert row == out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("positions", ["all", "generated", "prompt"])
@pytest.mark.parametrize("family", ["persimmon", "biogpt", "custom"])
def test_cached_steered_greedy_equals_a_full_recompute_reference(
    folders, custom, family, positions
):
    model = custom if family == "custom" else load_model(folders[family])
    d = torch.randn(adapter_for(model).d_model, generator=torch.Generator().manual_seed(1))
    site = Site.resid_pre(1)
    prompts = [list(tp.ids) for tp in tokenize_prompts(model, PROMPTS[:3])]
    with steer(model, d, site=site, coefficient=6.0, positions=positions):
        got = generate_ids(model, prompts, max_new_tokens=6, stop_at_eos=False, progress=False)
    for row, prompt in zip(got, prompts, strict=True):
        assert row == reference_greedy(model, prompt, d, site, 6.0, positions, 6)


def test_steering_generated_tokens_under_transformers_own_generate(folders):
    """The position tracker reads transformers' cache, so 'generated' stays right step by step."""
    model = load_model(folders["helium"])
    d = torch.randn(64, generator=torch.Generator().manual_seed(2))
    [prompt] = [list(tp.ids) for tp in tokenize_prompts(model, PROMPTS[:1])]
    site = Site.resid_pre(1)
    with steer(model, d, site=site, coefficient=6.0, positions="generated"):
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6
        )
    assert out[0, len(prompt) :].tolist() == reference_greedy(
        model, prompt, d, site, 6.0, "generated", 6
    )


# ------------------------------------------------------------------------------------------------
# Errors and the registry
# ------------------------------------------------------------------------------------------------


def test_a_plain_module_without_layers_gets_one_short_error(tokenizer):
    with pytest.raises(AdapterError) as info:
        load_model(TinyDecoder(len(tokenizer)), tokenizer=tokenizer)
    msg = str(info.value)
    assert "layers='<path>'" in msg and "'stack' (2)" in msg and len(msg) < 400
    with pytest.raises(AdapterError) as info:
        steer(nn.Linear(2, 2), torch.ones(2), site="resid_post:0", coefficient=1.0)
    msg = str(info.value)
    assert "Tried: native, hooked, bridge" in msg and "docs/adapters.md" in msg and len(msg) < 600
    with pytest.raises(AdapterError, match=r"no attribute path 'blocks'.*'stack' \(2\)"):
        load_model(TinyDecoder(len(tokenizer)), layers="blocks", tokenizer=tokenizer)


def test_wrappers_that_cannot_run_a_family_say_what_can(folders):
    with pytest.raises(
        ValueError, match=r"does not support PersimmonForCausalLM.*wrapper='native'"
    ) as info:
        load_model(folders["persimmon"], wrapper="bridge")
    assert len(str(info.value)) < 300  # not TransformerBridge's list of 150 architectures
    with pytest.raises(
        NotImplementedError, match=r"wrapper='native' \(the default for this family\)"
    ):
        load_model(folders["persimmon"], wrapper="hooked")
    with pytest.raises(
        ValueError, match=r"compatibility_mode=True needs a TransformerLens wrapper"
    ):
        load_model(folders["persimmon"], compatibility_mode=True)


def test_a_registered_adapter_is_tried_first_and_can_be_removed(custom):
    class Claims(ModelAdapter):
        name = "claims"

        @classmethod
        def matches(cls, model):
            return isinstance(model, nn.Linear)

        n_layers = 1
        d_model = 2

    register_adapter(Claims)
    try:
        assert registered_adapters()[0] == "claims"
        assert adapter_for(nn.Linear(2, 2)).name == "claims"
    finally:
        unregister_adapter(Claims)
    assert "claims" not in registered_adapters()
    with pytest.raises(AdapterError):
        register_adapter(object)  # type: ignore[arg-type]


def test_sae_goes_where_its_sites_activations_are(folders, monkeypatch):
    from sae_lens import StandardSAE, StandardSAEConfig

    from modeldiff.adapters.native import NativeAdapter
    from modeldiff.saes import SAEError, check_sae

    model = load_model(folders["helium"])
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=16))
    site = Site.resid_post(1)
    assert check_sae(sae, model, site) is sae
    # a model spread over devices: the SAE must sit with layer 1's activations, not the embedding
    monkeypatch.setattr(NativeAdapter, "site_device", lambda self, s: torch.device("meta"))
    with pytest.raises(SAEError, match=r"on cpu but the model is float32 on meta"):
        check_sae(sae, model, site)
    converted = check_sae(sae, model, site, convert=True)
    assert next(converted.parameters()).device.type == "meta"


def test_device_map_loads_natively(folders):
    model = load_model(folders["llama"], device_map={"": "cpu"})
    assert model_kind(model) == "native"
    ids = [list(tp.ids) for tp in tokenize_prompts(model, PROMPTS[:2])]
    ref = load_model(folders["llama"], wrapper="native")
    a = collect(model, ids, Site.resid_post(0), progress=False)[Site.resid_post(0)]
    b = collect(ref, ids, Site.resid_post(0), progress=False)[Site.resid_post(0)]
    torch.testing.assert_close(a[1], b[1])


def test_custom_module_is_used_as_is_and_needs_a_tokenizer():
    module = TinyDecoder(512)
    with pytest.raises(
        ValueError,
        match=r"without a tokenizer; pass one with load_model\(model, tokenizer=\.\.\.\)",
    ):
        load_model(module, layers="stack")
    model = load_model(module, layers="stack", tokenizer=make_tokenizer())
    assert model is module and model.tokenizer is not None


def test_a_diff_of_models_placed_apart_is_refused_before_any_forward(folders):
    base = load_model(folders["helium"])
    tuned = load_model(folders["helium"], like=base)
    adapter = adapter_for(tuned)
    adapter.site_device = lambda site: torch.device("meta")  # as if layer 0 sat on another device
    calls = []
    handle = base.register_forward_pre_hook(lambda m, a: calls.append(1))
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=16, k=4))
    try:
        with pytest.raises(
            ValueError, match=r"on cpu but the fine-tuned model's on meta.*Place the two"
        ):
            diff_latents(base, tuned, sae, PROMPTS, site=Site.resid_post(0), progress=False)
    finally:
        handle.remove()
        del adapter.site_device
    assert calls == []
