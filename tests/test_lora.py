"""LoRA / PEFT fine-tunes: loaded as they are, sharing the base's weights, diffed exactly like the
merged model, and saved back."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from sae_lens import TopKSAE, TopKSAEConfig
from transformers import AutoModelForCausalLM

from _reference import plain_logits
from modeldiff import Site, diff_latents, load_model, model_kind
from modeldiff.adapters import adapter_for
from modeldiff.models import save_model
from modeldiff.testing import save_tiny_hf_model

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today?",
    "What is the capital of France?",
    "Tell me a story about a helpful assistant.",
]


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A tiny llama base and a rank-4 LoRA adapter on it with non-zero (random) B matrices."""
    root = tmp_path_factory.mktemp("lora")
    base = save_tiny_hf_model("llama", root / "base")
    hf = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(hf, config)
    peft_model.save_pretrained(root / "adapter")
    return base, root / "adapter"


def _merged(base_folder, adapter_folder):
    hf = AutoModelForCausalLM.from_pretrained(base_folder, attn_implementation="eager")
    return PeftModel.from_pretrained(hf, str(adapter_folder)).merge_and_unload().eval()


def _sae():
    sae = TopKSAE(TopKSAEConfig(d_in=64, d_sae=64, k=8))
    sae.cfg.metadata.hook_name = Site.resid_post(1).hook_name
    return sae


def test_adapter_shares_the_base_weights_and_leaves_the_base_unchanged(lora):
    base_folder, adapter_folder = lora
    base = load_model(base_folder, wrapper="native")
    toks = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        before = plain_logits(base, toks)
    flags = [p.requires_grad for p in base.parameters()]
    tuned = load_model(adapter_folder, like=base)
    assert model_kind(tuned) == "native"
    # no second full copy: the fine-tune's frozen weights are the base's tensors
    emb_b = base.get_input_embeddings().weight
    emb_t = tuned.get_input_embeddings().weight
    assert emb_b.data_ptr() == emb_t.data_ptr()
    with torch.no_grad():
        after = plain_logits(tuned, toks)
        assert not torch.allclose(after, before)  # the adapter changes the model
        merged = plain_logits(_merged(base_folder, adapter_folder), toks)
        torch.testing.assert_close(after, merged, rtol=1e-5, atol=1e-5)
        assert torch.equal(plain_logits(base, toks), before)  # ... but not the base
    assert [p.requires_grad for p in base.parameters()] == flags
    assert tuned.tokenizer is base.tokenizer


def test_diff_against_the_adapter_equals_diff_against_the_merged_model(lora):
    base_folder, adapter_folder = lora
    base = load_model(base_folder, wrapper="native")
    tuned = load_model(adapter_folder, like=base)
    merged = load_model(
        _merged(base_folder, adapter_folder), tokenizer=base.tokenizer, wrapper="native"
    )
    sae = _sae()
    a = diff_latents(base, tuned, sae, PROMPTS, progress=False, seed=0)
    b = diff_latents(base, merged, sae, PROMPTS, progress=False, seed=0)
    torch.testing.assert_close(a.mean_finetuned, b.mean_finetuned, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.mean_base, b.mean_base, rtol=0, atol=0)
    assert a.delta.abs().max() > 1e-4  # the adapter moved something
    assert a.top(5)[0].latent == b.top(5)[0].latent


def test_the_three_ways_to_name_an_adapter_agree(lora):
    base_folder, adapter_folder = lora
    toks = torch.tensor([[1, 5, 6, 7]])
    by_like = load_model(adapter_folder, like=load_model(base_folder, wrapper="native"))
    explicit = load_model(base_folder, adapter=adapter_folder)
    by_config = load_model(adapter_folder)  # the base named in adapter_config.json
    bridge = load_model(adapter_folder, like=load_model(base_folder, wrapper="bridge"))
    assert model_kind(bridge) == "bridge"  # merged into a copy and wrapped like its base
    with torch.no_grad():
        ref = plain_logits(by_like, toks)
        for m in (explicit, by_config):
            torch.testing.assert_close(plain_logits(m, toks), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bridge(toks), ref, rtol=1e-4, atol=1e-4)


def test_peft_model_objects_run_natively(lora):
    base_folder, adapter_folder = lora
    hf = AutoModelForCausalLM.from_pretrained(base_folder)
    peft_model = PeftModel.from_pretrained(hf, str(adapter_folder))
    model = load_model(peft_model)
    assert adapter_for(model).name == "native" and model.tokenizer is not None


def test_save_model_writes_an_adapter_or_the_merged_model(lora, tmp_path):
    base_folder, adapter_folder = lora
    base = load_model(base_folder, wrapper="native")
    tuned = load_model(adapter_folder, like=base)
    toks = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        ref = plain_logits(tuned, toks)
    small = save_model(tuned, tmp_path / "adapter")
    assert (small / "adapter_config.json").is_file() and not (small / "config.json").exists()
    full = save_model(tuned, tmp_path / "merged", merge=True)
    assert (full / "config.json").is_file()
    with torch.no_grad():
        again = plain_logits(load_model(small, like=base), toks)
        merged = plain_logits(load_model(full, wrapper="native"), toks)
    torch.testing.assert_close(again, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, ref, rtol=1e-5, atol=1e-5)


def test_adapter_errors_name_the_fix(lora, tmp_path):
    base_folder, _ = lora
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"not valid JSON.*re-save"):
        load_model(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ValueError, match=r"does not name its base model.*like=base"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"not a PEFT adapter folder"):
        load_model(base_folder, adapter=tmp_path / "nothing")
