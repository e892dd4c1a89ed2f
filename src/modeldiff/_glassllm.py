"""Map the glassllm NumPy language model onto a TransformerLens ``HookedTransformer``.

glassllm (``pip install glassllm``) ships a 3 MB decoder trained from scratch in NumPy: RMSNorm,
rotary position embeddings that rotate *adjacent* coordinate pairs (GPT-J style, not the
half-split used by Llama in transformers), grouped-query attention, a SwiGLU MLP without biases
and an unembedding tied to the token embedding. Every one of these has a direct TransformerLens
counterpart, so the weights are copied (reshaped, never changed) into a ``HookedTransformer``
whose config says exactly that. Its tokenizer (a character BPE with ``▁`` for spaces) is rebuilt
as a Hugging Face fast tokenizer that produces the same ids.

This module is private; users reach it through ``load_model("glassllm")`` or
``load_model("glassllm:en")``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .errors import ArgumentError, MissingDependencyError

GLASSLLM_LANGUAGES = ("en", "pt")


def _import_glassllm() -> Any:
    try:
        import glassllm
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise MissingDependencyError(
            "load_model('glassllm') needs the glassllm package, which is not installed. "
            "Install it with `pip install glassllm` or `pip install 'modeldiff[glassllm]'`."
        ) from err
    return glassllm


def parse_glassllm_source(source: str) -> str | None:
    """Return the language of a ``"glassllm"`` / ``"glassllm:<lang>"`` source, else ``None``."""
    if source == "glassllm":
        return "en"
    if source.startswith("glassllm:"):
        lang = source.split(":", 1)[1]
        if lang not in GLASSLLM_LANGUAGES:
            raise ArgumentError(
                f"unknown glassllm language {lang!r} in source {source!r}; "
                f"use one of {', '.join('glassllm:' + x for x in GLASSLLM_LANGUAGES)}."
            )
        return lang
    return None


def _tokenizer_folder(glass_tok: Any) -> Path:
    """Write (once per content) a transformers tokenizer folder equivalent to ``glass_tok``.

    TransformerLens re-loads a tokenizer from its ``name_or_path``, so it must live on disk.
    """
    from glassllm.tokenizer import SPACE, SPECIALS
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(glass_tok.vocab)}
    if len(vocab) != len(glass_tok.vocab):
        raise ArgumentError("glassllm tokenizer has duplicate vocabulary entries; cannot map it")
    spec = json.dumps({"vocab": glass_tok.vocab, "merges": glass_tok.merges}, ensure_ascii=False)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"modeldiff-glassllm-tokenizer-{digest}"
    if (folder / "tokenizer.json").exists():
        return folder

    bpe = models.BPE(
        vocab=vocab,
        merges=[tuple(pair) for pair in glass_tok.merges],
        unk_token="<unk>",
        fuse_unk=False,
    )
    tok = Tokenizer(bpe)
    # glassllm: NFC, then every " " becomes "▁"; chunks are "\n", "▁*<non-space run>" or "▁+".
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex(f"\n|{SPACE}*[^{SPACE}\n]+|{SPACE}+"), behavior="isolated"
    )
    tok.decoder = decoders.Replace(SPACE, " ")
    pad, unk, bos, eos = SPECIALS
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk, bos_token=bos, eos_token=eos
    )
    staging = Path(tempfile.mkdtemp(prefix=folder.name + "-", dir=folder.parent))
    fast.save_pretrained(staging)
    try:
        staging.rename(folder)
    except OSError:  # another process wrote the same folder first; its content is identical
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_glassllm_tokenizer(lang: str = "en") -> Any:
    """glassllm's tokenizer for ``lang`` as a transformers fast tokenizer (same ids)."""
    from transformers import AutoTokenizer

    glassllm = _import_glassllm()
    from importlib import resources

    path = resources.files("glassllm") / "weights" / f"{lang}.tokenizer.json"
    with resources.as_file(path) as p:
        glass_tok = glassllm.Tokenizer.load(p)
    return AutoTokenizer.from_pretrained(str(_tokenizer_folder(glass_tok)))


def load_glassllm(
    lang: str = "en", *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> Any:
    """Load glassllm's pretrained ``lang`` model as a ``HookedTransformer`` with a tokenizer.

    Residual activations equal glassllm's own (``resid_pre`` of block L is the input of its
    block L); no weight processing is applied.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    glassllm = _import_glassllm()
    glass, glass_tok = glassllm.load_pretrained(lang)
    c = glass.cfg
    d_head = c.d_model // c.n_heads
    d_mlp = glass.blocks[0].ffn.W1.data.shape[1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_tokenizer_folder(glass_tok)))
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers,
        d_model=c.d_model,
        n_heads=c.n_heads,
        n_key_value_heads=c.n_kv_heads,
        d_head=d_head,
        d_mlp=d_mlp,
        n_ctx=c.max_len,
        d_vocab=c.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        final_rms=True,
        eps=c.eps,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=c.rope_base,
        rotary_adjacent_pairs=True,
        original_architecture="GlassLM",
        model_name=f"glassllm-{lang}",
        tokenizer_name=tokenizer.name_or_path,
        default_prepend_bos=False,
        init_weights=False,
        dtype=dtype,
        device=str(device),
    )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)

    def t(array: Any) -> torch.Tensor:
        return torch.from_numpy(array.copy()).float()

    d, h, kv = c.d_model, c.n_heads, c.n_kv_heads
    state: dict[str, torch.Tensor] = {}
    state["embed.W_E"] = t(glass.E.data)
    state["unembed.W_U"] = t(glass.E.data).T.contiguous()
    state["ln_final.w"] = t(glass.norm_f.gamma.data)
    for i, block in enumerate(glass.blocks):
        a, f = block.attn, block.ffn
        p = f"blocks.{i}."
        state[p + "ln1.w"] = t(block.norm1.gamma.data)
        state[p + "ln2.w"] = t(block.norm2.gamma.data)
        # glassllm splits heads as (d, heads * d_head) -> heads of d_head consecutive columns.
        state[p + "attn.W_Q"] = t(a.W_Q.data).reshape(d, h, d_head).permute(1, 0, 2)
        state[p + "attn._W_K"] = t(a.W_K.data).reshape(d, kv, d_head).permute(1, 0, 2)
        state[p + "attn._W_V"] = t(a.W_V.data).reshape(d, kv, d_head).permute(1, 0, 2)
        state[p + "attn.W_O"] = t(a.W_O.data).reshape(h, d_head, d)
        state[p + "mlp.W_gate"] = t(f.W1.data)  # silu(x @ W1) * (x @ W3) @ W2
        state[p + "mlp.W_in"] = t(f.W3.data)
        state[p + "mlp.W_out"] = t(f.W2.data)
    own = model.state_dict()
    for name, value in own.items():
        if name not in state and name.split(".")[-1].startswith(("b_", "_b_")):
            state[name] = torch.zeros_like(value)  # glassllm has no biases
    missing = [n for n in own if n not in state and "IGNORE" not in n and "mask" not in n]
    missing = [n for n in missing if not n.endswith(("rotary_sin", "rotary_cos"))]
    if missing:  # pragma: no cover - guards against a TransformerLens layout change
        raise RuntimeError(f"glassllm mapping left TransformerLens parameters unset: {missing}")
    with torch.no_grad():
        for name, value in state.items():
            if own[name].shape != value.shape:  # pragma: no cover - layout guard
                raise RuntimeError(
                    f"glassllm weight for {name} has shape {tuple(value.shape)}, "
                    f"TransformerLens expects {tuple(own[name].shape)}"
                )
            own[name].copy_(value)
    model.eval()
    return model.to(device, print_details=False)
