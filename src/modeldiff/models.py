"""Load any supported model as a TransformerLens hooked model, and ask a model what it is.

``load_model`` turns each kind of source into a TransformerLens ``HookedRootModule`` with a
transformers tokenizer attached as ``.tokenizer``:

* an existing ``HookedTransformer`` / ``HookedSAETransformer`` / ``TransformerBridge`` (as is);
* a transformers model object (copied first: the caller's object is never modified);
* a folder written by ``save_pretrained``;
* a GGUF file (dequantized by transformers through the ``gguf`` package);
* a Hugging Face hub name (offline: only when already in the local cache);
* ``"glassllm"`` / ``"glassllm:en"`` / ``"glassllm:pt"``, the 3 MB NumPy LM.

Weights are *unprocessed* by default on both wrappers, so residual activations equal the
transformers model's hidden states. ``compatibility_mode=True`` gives TransformerLens' processed
weights instead (folded norms, centred writing weights), which is what SAEs trained on
``HookedTransformer.from_pretrained`` activations expect. See docs/models.md.

Example:
    >>> import tempfile
    >>> from modeldiff.testing import save_tiny_hf_model
    >>> folder = save_tiny_hf_model("llama", tempfile.mkdtemp())
    >>> model = load_model(folder)
    >>> (model_kind(model), model.cfg.n_layers, model_dtype(model))
    ('bridge', 2, torch.float32)
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

__all__ = [
    "check_compatible",
    "get_tokenizer",
    "load_model",
    "model_device",
    "model_architecture",
    "model_dtype",
    "model_kind",
]

Wrapper = Literal["bridge", "hooked"]
# What load_model returns. TransformerBridge is not a HookedRootModule subclass in TL 3.9, but
# both expose the same hook points, `.cfg` and `.tokenizer`.
HookedModel = Union["HookedTransformer", "TransformerBridge"]
ModelKind = Literal["bridge", "hooked"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Substrings that make TransformerLens' config conversion take a name-based shortcut instead of
# reading the config we wrote; the scratch folder we hand it must not contain them.
_TL_NAME_SHORTCUTS = ("llama", "gemma", "codellama")


# --------------------------------------------------------------------------------------------
# Introspection helpers (used by other modules)
# --------------------------------------------------------------------------------------------


def model_kind(model: Any) -> ModelKind:
    """``"bridge"`` for a ``TransformerBridge``, ``"hooked"`` for a ``HookedTransformer``.

    ``HookedSAETransformer`` counts as ``"hooked"``. Anything else raises ``TypeError``.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_kind(tiny_hooked_transformer())
        'hooked'
    """
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, TransformerBridge):
        return "bridge"
    if isinstance(model, HookedTransformer):
        return "hooked"
    raise TypeError(
        f"expected a TransformerLens HookedTransformer or TransformerBridge, got "
        f"{type(model).__name__}; turn it into one with modeldiff.load_model(...)."
    )


def get_tokenizer(model: Any) -> Any:
    """The transformers tokenizer attached to ``model`` (``model.tokenizer``).

    Raises ``ValueError`` naming the fix when the model has none.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> get_tokenizer(tiny_hooked_transformer()).bos_token
        '<s>'
    """
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(
            f"this {type(model).__name__} has no tokenizer attached; attach one with "
            "model.set_tokenizer(tokenizer), or build the model with "
            "modeldiff.load_model(<folder or transformers model>, tokenizer=...)."
        )
    return tok


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's parameters (that of its first floating parameter).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_dtype(tiny_hooked_transformer())
        torch.float32
    """
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    raise ValueError(f"{type(model).__name__} has no floating-point parameters")


def model_device(model: Any) -> torch.device:
    """The device of the model's input embedding (where token ids must be sent).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_device(tiny_hooked_transformer()).type
        'cpu'
    """
    embed = None
    try:
        embed = model.get_input_embeddings() if model_kind(model) == "bridge" else None
    except (AttributeError, NotImplementedError, TypeError):
        embed = None
    if embed is None:
        embed = getattr(model, "embed", None)
    for module in (embed, model):
        if module is None:
            continue
        for p in module.parameters():
            return p.device
    raise ValueError(f"{type(model).__name__} has no parameters")


def model_architecture(model: Any) -> str:
    """The architecture name of a hooked model (``"LlamaForCausalLM"``, ...; ``"unknown"``).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_architecture(tiny_hooked_transformer())
        'unknown'
    """
    cfg = model.cfg
    for attr in ("architecture", "original_architecture"):
        value = getattr(cfg, attr, None)
        if value:
            return str(value)
    return "unknown"


# --------------------------------------------------------------------------------------------
# load_model
# --------------------------------------------------------------------------------------------


def load_model(
    source: Any,
    *,
    tokenizer: Any | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    wrapper: Wrapper | None = None,
    like: HookedModel | None = None,
    compatibility_mode: bool | None = None,
    name: str | None = None,
) -> HookedModel:
    """Load ``source`` as a TransformerLens hooked model with its tokenizer at ``.tokenizer``.

    Args:
        source: an existing ``HookedTransformer`` / ``HookedSAETransformer`` /
            ``TransformerBridge`` (returned unchanged); a transformers ``PreTrainedModel``
            (deep-copied, never modified); a folder written by ``save_pretrained``; a ``.gguf``
            file (or a folder holding exactly one); a hub name like
            ``"HuggingFaceTB/SmolLM2-135M-Instruct"``; or ``"glassllm"`` / ``"glassllm:<lang>"``.
        tokenizer: a transformers tokenizer, or a folder / hub name to load one from. Defaults
            to the tokenizer stored with the source.
        dtype, device: where the weights live (default ``torch.float32`` on ``"cpu"``). For an
            existing TransformerLens model they may only restate what it already has.
        wrapper: ``"bridge"`` (``TransformerBridge``, the default for transformers sources) or
            ``"hooked"`` (``HookedTransformer``; glassllm is always ``"hooked"``).
        like: a model this one must be comparable with (e.g. the base of a fine-tune): the
            architecture, ``d_model``, ``n_layers`` and tokenizer vocabulary must agree, and
            one ``ValueError`` lists every difference.
        compatibility_mode: ``False`` (default): unprocessed weights, residual activations equal
            the transformers hidden states. ``True``: TransformerLens' processed weights (folded
            norms, centred writing weights and unembedding), as ``HookedTransformer.
            from_pretrained`` gives by default. Leave ``None`` for an existing TL model.
        name: the model name recorded in ``cfg.model_name`` (default: from the source).

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer`` in eval mode.

    Example:
        >>> import tempfile
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> folder = save_tiny_hf_model("gpt2", tempfile.mkdtemp())
        >>> base = load_model(folder, wrapper="hooked")
        >>> tuned = load_model(folder, like=base)
        >>> (model_kind(base), model_kind(tuned))
        ('hooked', 'bridge')
    """
    if wrapper not in (None, "bridge", "hooked"):
        raise ValueError(f"wrapper must be 'bridge' or 'hooked', got {wrapper!r}")
    if compatibility_mode not in (None, True, False):
        raise ValueError(f"compatibility_mode must be True or False, got {compatibility_mode!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if _is_tl_model(source):
        _check_existing(source, dtype=dtype, device=device)
    model = _load(
        source,
        tokenizer=tokenizer,
        dtype=dtype if dtype is not None else torch.float32,
        device=torch.device(device if device is not None else "cpu"),
        wrapper=wrapper,
        compatibility_mode=compatibility_mode,
        name=name,
    )
    if like is not None:
        check_compatible(like, model)
    return model


def _is_tl_model(obj: Any) -> bool:
    try:
        model_kind(obj)
    except TypeError:
        return False
    return True


def _check_existing(model: Any, *, dtype: torch.dtype | None, device: Any) -> None:
    if dtype is not None and model_dtype(model) != dtype:
        raise ValueError(
            f"dtype={dtype} was asked for but this existing {type(model).__name__} is "
            f"{model_dtype(model)}, and load_model returns existing models unchanged; convert it "
            f"yourself (model.to({dtype})) or leave dtype unset."
        )
    if device is not None:
        want, have = torch.device(device), model_device(model)
        if want.type != have.type or (want.index is not None and want.index != have.index):
            raise ValueError(
                f"device={str(want)!r} was asked for but this existing {type(model).__name__} is "
                f"on {str(have)!r}, and load_model returns existing models unchanged; move it "
                f"yourself (model.to({str(want)!r})) or leave device unset."
            )


def _load(
    source: Any,
    *,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    wrapper: Wrapper | None,
    compatibility_mode: bool | None,
    name: str | None,
) -> Any:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    # 1. An existing TransformerLens model: returned as is.
    if isinstance(source, (HookedTransformer, TransformerBridge)):
        kind = model_kind(source)
        if wrapper is not None and wrapper != kind:
            raise ValueError(
                f"source is already a {type(source).__name__} ({kind!r}) but wrapper={wrapper!r} "
                "was asked for; modeldiff returns existing TransformerLens models unchanged. "
                "Pass the transformers model or its folder to get the other wrapper."
            )
        if compatibility_mode is not None:
            raise ValueError(
                "compatibility_mode only applies when modeldiff builds the model; this "
                f"{type(source).__name__} is returned unchanged. Leave compatibility_mode=None "
                "(call bridge.enable_compatibility_mode() yourself if you need processed weights)."
            )
        if tokenizer is not None:
            raise ValueError(
                "tokenizer= cannot be combined with an existing TransformerLens model "
                "(it is returned unchanged); call model.set_tokenizer(tokenizer) yourself."
            )
        get_tokenizer(source)
        return source

    processed = bool(compatibility_mode)

    # 2. A transformers model object: work on a deep copy (booting a Bridge around an HF model
    # object patches that object; its own generate() would then change).
    if _is_hf_model(source):
        tok = _resolve_tokenizer(tokenizer, fallback=getattr(source, "name_or_path", None))
        hf = copy.deepcopy(source)
        return _wrap_hf(hf, tok, dtype, device, wrapper, processed, name or _hf_name(source))

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            f"cannot load a model from a {type(source).__name__}; pass a TransformerLens model, "
            "a transformers model, a folder, a .gguf file, a hub name or 'glassllm'."
        )

    # 3. glassllm.
    from modeldiff._glassllm import load_glassllm, parse_glassllm_source

    lang = parse_glassllm_source(source)
    if lang is not None and not Path(source).exists():
        if wrapper == "bridge":
            raise ValueError(
                "glassllm is only available as a HookedTransformer; use wrapper='hooked' or "
                "leave wrapper unset."
            )
        if tokenizer is not None:
            raise ValueError("glassllm brings its own tokenizer; do not pass tokenizer=.")
        model = load_glassllm(lang, dtype=dtype, device=device)
        if processed:
            model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        return model

    path = Path(source).expanduser()
    # 4. A GGUF file, or a folder with exactly one GGUF file and no config.json.
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, tokenizer, dtype, device, wrapper, processed, name)
    if path.is_dir():
        if (path / "config.json").is_file():
            # 5. A save_pretrained folder.
            return _load_hf_dir(path, tokenizer, dtype, device, wrapper, processed, name)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], tokenizer, dtype, device, wrapper, processed, name)
        if ggufs:
            raise ValueError(
                f"folder {str(path)!r} holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
                "pass the path of the one you want."
            )
        raise FileNotFoundError(
            f"folder {str(path)!r} has no config.json and no .gguf file, so it is not a model "
            "checkpoint; pass the folder written by model.save_pretrained(...), a .gguf file, "
            "or a hub name."
        )
    if path.exists():
        raise ValueError(
            f"{str(path)!r} is a file but not a .gguf checkpoint; pass the folder written by "
            "save_pretrained (the one with config.json) or a .gguf file."
        )

    # 6. Not on disk: a hub name, or a mistyped path.
    if _looks_like_path(source) or not _HUB_ID.match(source):
        raise FileNotFoundError(
            f"model path {source!r} does not exist. Check the spelling, or pass a folder written "
            "by save_pretrained, a .gguf file, a hub name such as "
            "'HuggingFaceTB/SmolLM2-135M-Instruct', or 'glassllm'."
        )
    return _load_hub(source, tokenizer, dtype, device, wrapper, processed, name)


# --------------------------------------------------------------------------------------------
# Source kinds
# --------------------------------------------------------------------------------------------


def _is_hf_model(obj: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(obj, PreTrainedModel)


def _hf_name(hf: Any) -> str:
    name = getattr(hf, "name_or_path", "") or getattr(hf.config, "_name_or_path", "")
    return str(name) or type(hf).__name__


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or source.lower().endswith((".gguf", ".safetensors", ".bin", ".json", ".pt"))
    )


def _hf_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    # Eager attention: hooks may read attention patterns, and it is the path TL validates.
    return {"dtype": dtype, "attn_implementation": "eager"}


def _load_hf_dir(
    path: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    wrapper: Wrapper | None,
    processed: bool,
    name: str | None,
) -> Any:
    from transformers import AutoModelForCausalLM

    tok = _resolve_tokenizer(tokenizer, fallback=str(path))
    hf = AutoModelForCausalLM.from_pretrained(str(path), **_hf_kwargs(dtype))
    return _wrap_hf(hf, tok, dtype, device, wrapper, processed, name or str(path))


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "reading a GGUF checkpoint needs the `gguf` package, which is not installed. "
            "Install it with `pip install gguf` (or `pip install 'modeldiff[gguf]'`), or convert "
            "the checkpoint with save_pretrained and pass that folder instead."
        ) from err


def _load_gguf(
    path: Path,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    wrapper: Wrapper | None,
    processed: bool,
    name: str | None,
) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    folder, file = str(path.parent), path.name
    if tokenizer is None:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    else:
        tok = _resolve_tokenizer(tokenizer, fallback=None)
    hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **_hf_kwargs(dtype))
    return _wrap_hf(hf, tok, dtype, device, wrapper, processed, name or path.stem)


def _hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` and friends)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except (ImportError, AttributeError):  # pragma: no cover
        return False


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    found = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(found, str)


def _load_hub(
    repo_id: str,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    wrapper: Wrapper | None,
    processed: bool,
    name: str | None,
) -> Any:
    from transformers import AutoModelForCausalLM

    cached = _hub_cached(repo_id)
    if not cached and _hub_offline():
        # Checked before any hub call: an offline lookup would otherwise wait ~25 s to fail.
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub is offline "
            "(HF_HUB_OFFLINE is set), and no local path of that name exists. Pass a local folder "
            "written by save_pretrained or a .gguf file instead, e.g. "
            f"load_model('/path/to/{repo_id.split('/')[-1]}'), or download it first while online "
            f"(`huggingface-cli download {repo_id}`)."
        )
    extra = {"local_files_only": True} if cached and _hub_offline() else {}
    tok = _resolve_tokenizer(tokenizer, fallback=repo_id, **extra)
    hf = AutoModelForCausalLM.from_pretrained(repo_id, **_hf_kwargs(dtype), **extra)
    return _wrap_hf(hf, tok, dtype, device, wrapper, processed, name or repo_id)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _resolve_tokenizer(tokenizer: Any, *, fallback: str | None, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return _on_disk(tokenizer)
    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), **kwargs)
    if tokenizer is not None:
        raise TypeError(
            f"tokenizer must be a transformers tokenizer or a folder / hub name, got "
            f"{type(tokenizer).__name__}"
        )
    if fallback:
        try:
            return AutoTokenizer.from_pretrained(fallback, **kwargs)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"could not load a tokenizer from {fallback!r} ({err}); pass one with "
                "load_model(..., tokenizer=AutoTokenizer.from_pretrained(...)) or tokenizer='<folder>'."
            ) from err
    raise ValueError(
        "this model comes without a tokenizer; pass one with load_model(model, tokenizer=...)."
    )


def _on_disk(tokenizer: Any) -> Any:
    """Return ``tokenizer`` if it can be re-loaded from its ``name_or_path``, else a saved twin.

    TransformerLens re-loads the tokenizer from ``name_or_path`` (to make a BOS-adding twin); a
    tokenizer built in memory has no such folder, so save it to a scratch folder first.
    """
    where = getattr(tokenizer, "name_or_path", "") or ""
    if where and (Path(where).is_dir() or (_HUB_ID.match(where) and _hub_cached(where))):
        return tokenizer
    from transformers import AutoTokenizer

    folder = Path(tempfile.mkdtemp(prefix="modeldiff-tokenizer-"))
    tokenizer.save_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------
# Wrapping a transformers model
# --------------------------------------------------------------------------------------------


def _prepare_hf(hf: Any, dtype: torch.dtype, device: torch.device) -> Any:
    cfg = hf.config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(hf).__name__]  # GGUF and from_config models lack it
    if getattr(cfg, "model_type", None) == "gpt2" and getattr(cfg, "n_ctx", None) is None:
        cfg.n_ctx = cfg.n_positions  # transformers 5 dropped n_ctx; TL still reads it
    if hasattr(hf, "set_attn_implementation"):
        # Some exotic models cannot switch; their default attention is still correct.
        with contextlib.suppress(ValueError, ImportError, AttributeError):
            hf.set_attn_implementation("eager")
    hf.to(device=device, dtype=dtype)
    hf.eval()
    return hf


def _wrap_hf(
    hf: Any,
    tokenizer: Any,
    dtype: torch.dtype,
    device: torch.device,
    wrapper: Wrapper | None,
    processed: bool,
    name: str,
) -> Any:
    hf = _prepare_hf(hf, dtype, device)
    if wrapper in (None, "bridge"):
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=tokenizer, device=device, dtype=dtype
        )
        if processed:
            bridge.enable_compatibility_mode(disable_warnings=True)
        bridge.eval()
        return bridge
    return _hooked_from_hf(hf, tokenizer, dtype, device, processed, name)


def _scratch_config_dir(config: Mapping[str, Any]) -> Path:
    """A folder holding ``config.json`` whose path avoids TL's name-based shortcuts."""
    base = Path(tempfile.mkdtemp(prefix="modeldiff-"))
    if any(word in str(base).lower() for word in _TL_NAME_SHORTCUTS):
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(
            f"the temporary folder {str(base)!r} contains a model-family name that "
            "TransformerLens treats as a shortcut; set TMPDIR to a neutral folder."
        )
    folder = base / "hfconfig"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, default=str))
    return folder


def _gemma2_config(
    hf_config: Any, *, processed: bool, device: torch.device, dtype: torch.dtype
) -> Any:
    """A HookedTransformerConfig for any Gemma2 checkpoint, read from its transformers config.

    TransformerLens 3.9 knows Gemma2 only through hard-coded configs keyed by hub name (2b, 9b,
    27b); this reads the same fields from the checkpoint itself, so local and resized Gemma2
    models work too.
    """
    from transformer_lens import HookedTransformerConfig

    c = hf_config
    n_layers = c.num_hidden_layers
    layer_types = getattr(c, "layer_types", None) or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    rope = getattr(c, "rope_parameters", None) or {}
    rope_theta = getattr(c, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    return HookedTransformerConfig(
        d_model=c.hidden_size,
        d_head=head_dim,
        n_heads=c.num_attention_heads,
        n_key_value_heads=c.num_key_value_heads,
        d_mlp=c.intermediate_size,
        n_layers=n_layers,
        n_ctx=c.max_position_embeddings,
        eps=c.rms_norm_eps,
        d_vocab=c.vocab_size,
        act_fn=getattr(c, "hidden_activation", None) or "gelu_pytorch_tanh",
        initializer_range=c.initializer_range,
        normalization_type="RMSPre" if processed else "RMS",
        rotary_base=float(rope_theta),
        rotary_dim=head_dim,
        positional_embedding_type="rotary",
        use_attn_scale=True,
        attn_scale=float(c.query_pre_attn_scalar) ** 0.5,
        window_size=c.sliding_window,
        use_local_attn=True,
        attn_types=["local" if t == "sliding_attention" else "global" for t in layer_types],
        attn_scores_soft_cap=float(c.attn_logit_softcapping or -1.0),
        output_logits_soft_cap=float(c.final_logit_softcapping or -1.0),
        gated_mlp=True,
        final_rms=True,
        use_normalization_before_and_after=True,
        original_architecture="Gemma2ForCausalLM",
        init_weights=False,
        device=str(device),
        dtype=dtype,
        default_prepend_bos=True,
    )


def _hooked_from_hf(
    hf: Any, tokenizer: Any, dtype: torch.dtype, device: torch.device, processed: bool, name: str
) -> Any:
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    config = hf.config.to_dict()
    arch = config["architectures"][0]
    folder = _scratch_config_dir(config)
    try:
        try:
            if arch == "Gemma2ForCausalLM":
                cfg = _gemma2_config(hf.config, processed=processed, device=device, dtype=dtype)
            else:
                cfg = loading.get_pretrained_model_config(
                    str(folder), hf_cfg=config, fold_ln=processed, device=str(device), dtype=dtype
                )
        except NotImplementedError as err:
            raise NotImplementedError(
                f"wrapper='hooked' cannot build {arch} from a local checkpoint with "
                f"TransformerLens' HookedTransformer (it says: {err}). Use wrapper='bridge' "
                "(the default); call it with compatibility_mode=True if you need "
                "HookedTransformer-style processed weights."
            ) from err
        cfg.model_name = name.rstrip("/").split("/")[-1]
        state = loading.get_pretrained_state_dict(str(folder), cfg, hf, dtype=dtype)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)
    model = HookedTransformer(cfg, tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state,
        fold_ln=processed,
        center_writing_weights=processed,
        # Centring the unembedding is not invariant under a logit softcap (Gemma2): skip it.
        center_unembed=processed and cfg.output_logits_soft_cap <= 0,
        fold_value_biases=processed,
        refactor_factored_attn_matrices=False,
    )
    model.to(device, print_details=False)
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# like=
# --------------------------------------------------------------------------------------------


def check_compatible(base: Any, tuned: Any) -> None:
    """Raise one ``ValueError`` listing every way ``tuned`` is not comparable with ``base``.

    Checked: architecture, ``d_model``, ``n_layers`` and the tokenizer vocabulary (token ->
    id mapping). Weight processing (compatibility mode) must also agree, since it changes the
    residual stream.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> check_compatible(tiny_hooked_transformer(), tiny_hooked_transformer(seed=1))
    """
    model_kind(base)
    model_kind(tuned)
    problems: list[str] = []
    a_arch, b_arch = model_architecture(base), model_architecture(tuned)
    if a_arch != b_arch:
        problems.append(f"architecture: base {a_arch}, fine-tuned {b_arch}")
    for field in ("d_model", "n_layers"):
        a, b = getattr(base.cfg, field), getattr(tuned.cfg, field)
        if a != b:
            problems.append(f"{field}: base {a}, fine-tuned {b}")
    a_vocab = get_tokenizer(base).get_vocab()
    b_vocab = get_tokenizer(tuned).get_vocab()
    if a_vocab != b_vocab:
        changed = sum(1 for t, i in a_vocab.items() if b_vocab.get(t) != i)
        added = len(set(b_vocab) - set(a_vocab))
        problems.append(
            f"tokenizer vocabulary: base {len(a_vocab)} tokens, fine-tuned {len(b_vocab)} tokens "
            f"({changed} base tokens missing or renumbered, {added} new)"
        )
    a_proc, b_proc = _weights_processed(base), _weights_processed(tuned)
    if a_proc != b_proc:
        problems.append(
            f"weight processing (compatibility mode): base {a_proc}, fine-tuned {b_proc}"
        )
    if problems:
        raise ValueError(
            "the fine-tuned model is not comparable with the base model:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad the fine-tune of this very base model, with the base's tokenizer and the "
            "same compatibility_mode."
        )


def _weights_processed(model: Any) -> bool:
    if model_kind(model) == "bridge":
        return bool(getattr(model, "compatibility_mode", False))
    return str(model.cfg.normalization_type).endswith("Pre")
