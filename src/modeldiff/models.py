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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Union

import torch

from .adapters import AdapterError, adapter_for
from .errors import (
    ArgumentError,
    ArgumentTypeError,
    MissingDependencyError,
    MissingFileError,
    UnsupportedError,
    reading,
)

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

Wrapper = Literal["bridge", "hooked", "native"]
# What load_model returns: a TransformerLens model, or a transformers model / torch module run by
# the native adapter. All carry their tokenizer at `.tokenizer`.
HookedModel = Union["HookedTransformer", "TransformerBridge", torch.nn.Module]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Substrings that make TransformerLens' config conversion take a name-based shortcut instead of
# reading the config we wrote; the scratch folder we hand it must not contain them.
_TL_NAME_SHORTCUTS = ("llama", "gemma", "codellama")


# --------------------------------------------------------------------------------------------
# Introspection helpers (used by other modules)
# --------------------------------------------------------------------------------------------


def model_kind(model: Any) -> str:
    """The name of the adapter that runs ``model``: ``"bridge"``, ``"hooked"``, ``"native"``, ...

    ``HookedSAETransformer`` counts as ``"hooked"``, any transformers causal LM (or a torch decoder
    loaded with ``layers=``) as ``"native"``. A model no adapter runs raises
    :class:`~modeldiff.adapters.AdapterError` (a ``TypeError``) naming the fix.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_kind(tiny_hooked_transformer())
        'hooked'
    """
    return adapter_for(model).name


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
        raise ArgumentError(
            f"this {type(model).__name__} has no tokenizer attached; attach one with "
            "model.set_tokenizer(tokenizer) (TransformerLens) or model.tokenizer = tokenizer, or "
            "build the model with modeldiff.load_model(<folder or transformers model>, tokenizer=...)."
        )
    return tok


def model_dtype(model: Any) -> torch.dtype:
    """The floating dtype of the model's parameters (that of its first floating parameter).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_dtype(tiny_hooked_transformer())
        torch.float32
    """
    return adapter_for(model).dtype


def model_device(model: Any) -> torch.device:
    """The device of the model's input embedding (where token ids must be sent).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_device(tiny_hooked_transformer()).type
        'cpu'
    """
    return adapter_for(model).input_device


def model_architecture(model: Any) -> str:
    """The architecture name of a model (``"LlamaForCausalLM"``, ...; ``"unknown"``).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> model_architecture(tiny_hooked_transformer())
        'unknown'
    """
    return adapter_for(model).architecture


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
    layers: Any = None,
    adapter: str | os.PathLike | None = None,
    device_map: Any = None,
) -> HookedModel:
    """Load ``source`` as a model modeldiff can run, with its tokenizer at ``.tokenizer``.

    Args:
        source: an existing ``HookedTransformer`` / ``HookedSAETransformer`` /
            ``TransformerBridge`` (returned unchanged); a transformers ``PreTrainedModel`` (a
            ``peft`` ``PeftModel`` too); a folder written by ``save_pretrained``; a PEFT adapter
            folder (with ``adapter_config.json``); a ``.gguf`` file (or a folder holding exactly
            one); a hub name like ``"HuggingFaceTB/SmolLM2-135M-Instruct"``;
            ``"glassllm"`` / ``"glassllm:<lang>"``; or any torch decoder module with ``layers=``.
        tokenizer: a transformers tokenizer, or a folder / hub name to load one from. Defaults
            to the tokenizer stored with the source (for a PEFT adapter: its base's).
        dtype, device: where the weights live (default ``torch.float32`` on ``"cpu"``; an existing
            model object is left where it is). For an existing TransformerLens model they may only
            restate what it already has.
        wrapper: how to run it: ``"bridge"`` (``TransformerBridge``), ``"hooked"``
            (``HookedTransformer``; glassllm is always ``"hooked"``) or ``"native"`` (the
            transformers model itself, hooked with plain torch hooks; any architecture). Default:
            ``"bridge"`` for families the TransformerBridge knows, ``"native"`` for the rest, for
            PEFT adapters and for torch modules.
        like: a model this one must be comparable with (e.g. the base of a fine-tune): the
            architecture, ``d_model``, ``n_layers`` and tokenizer vocabulary must agree, and
            one ``ValueError`` lists every difference. For a PEFT adapter ``like`` is also the
            base it is applied to (sharing the base's weights: no second full copy).
        compatibility_mode: ``False`` (default): unprocessed weights, residual activations equal
            the transformers hidden states. ``True``: TransformerLens' processed weights (folded
            norms, centred writing weights and unembedding), as ``HookedTransformer.
            from_pretrained`` gives by default (TransformerLens wrappers only).
        name: the model name recorded in ``cfg.model_name`` (default: from the source).
        layers: for the native wrapper, where the decoder-layer list is (``"model.layers"``) or a
            callable returning it; found by convention when left out (required for a custom torch
            module).
        adapter: a PEFT adapter folder to apply to ``source`` (the explicit form of passing the
            adapter folder as ``source``).
        device_map: passed to transformers' ``from_pretrained`` to spread a model over devices
            (``"auto"``, a dict); native wrapper only.

    Returns:
        A ``TransformerBridge`` or ``HookedTransformer`` in eval mode, or (native) the transformers
        model / torch module itself with ``.tokenizer`` attached.

    Example:
        >>> import tempfile
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> folder = save_tiny_hf_model("gpt2", tempfile.mkdtemp())
        >>> base = load_model(folder, wrapper="hooked")
        >>> tuned = load_model(folder, like=base)
        >>> native = load_model(folder, wrapper="native")
        >>> (model_kind(base), model_kind(tuned), model_kind(native))
        ('hooked', 'bridge', 'native')
    """
    if wrapper not in (None, "bridge", "hooked", "native"):
        raise ArgumentError(f"wrapper must be 'bridge', 'hooked' or 'native', got {wrapper!r}")
    if compatibility_mode not in (None, True, False):
        raise ArgumentError(f"compatibility_mode must be True or False, got {compatibility_mode!r}")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ArgumentError(
            f"dtype must be a floating torch.dtype such as torch.float32, got {dtype!r}"
        )
    if compatibility_mode and wrapper == "native":
        raise ArgumentError(
            "compatibility_mode=True rewrites weights the TransformerLens way and needs "
            "wrapper='bridge' or 'hooked'; the native wrapper runs the model's own weights."
        )
    if (layers is not None or device_map is not None) and wrapper not in (None, "native"):
        raise ArgumentError(
            f"layers= and device_map= apply to the native wrapper, not wrapper={wrapper!r}; "
            "leave wrapper unset or pass wrapper='native'."
        )
    if _is_tl_model(source):
        _check_existing(source, dtype=dtype, device=device)
    opts = _Opts(
        tokenizer=tokenizer,
        dtype=dtype,
        device=None if device is None else torch.device(device),
        wrapper=wrapper,
        processed=compatibility_mode,
        name=name,
        layers=layers,
        device_map=device_map,
    )
    if adapter is not None:
        model = _load_peft(Path(os.fspath(adapter)).expanduser(), base=source, like=like, opts=opts)
    else:
        model = _load(source, opts, like=like)
    if like is not None:
        check_compatible(like, model)
    return model


@dataclass(frozen=True)
class _Opts:
    """What the caller asked for, passed to every loader."""

    tokenizer: Any
    dtype: torch.dtype | None
    device: torch.device | None
    wrapper: Wrapper | None
    processed: bool | None
    name: str | None
    layers: Any
    device_map: Any

    @property
    def dtype_or_default(self) -> torch.dtype:
        return self.dtype if self.dtype is not None else torch.float32

    @property
    def device_or_default(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")


def _is_tl_model(obj: Any) -> bool:
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(obj, (HookedTransformer, TransformerBridge))


def _check_existing(model: Any, *, dtype: torch.dtype | None, device: Any) -> None:
    if dtype is not None and model_dtype(model) != dtype:
        raise ArgumentError(
            f"dtype={dtype} was asked for but this existing {type(model).__name__} is "
            f"{model_dtype(model)}, and load_model returns existing models unchanged; convert it "
            f"yourself (model.to({dtype})) or leave dtype unset."
        )
    if device is not None:
        want, have = torch.device(device), model_device(model)
        if want.type != have.type or (want.index is not None and want.index != have.index):
            raise ArgumentError(
                f"device={str(want)!r} was asked for but this existing {type(model).__name__} is "
                f"on {str(have)!r}, and load_model returns existing models unchanged; move it "
                f"yourself (model.to({str(want)!r})) or leave device unset."
            )


def _load(source: Any, opts: _Opts, *, like: Any = None) -> Any:
    # 1. An existing TransformerLens model: returned as is.
    if _is_tl_model(source):
        kind = model_kind(source)
        if opts.wrapper is not None and opts.wrapper != kind:
            raise ArgumentError(
                f"source is already a {type(source).__name__} ({kind!r}) but wrapper="
                f"{opts.wrapper!r} was asked for; modeldiff returns existing TransformerLens models "
                "unchanged. Pass the transformers model or its folder to get another wrapper."
            )
        if opts.processed is not None:
            raise ArgumentError(
                "compatibility_mode only applies when modeldiff builds the model; this "
                f"{type(source).__name__} is returned unchanged. Leave compatibility_mode=None "
                "(call bridge.enable_compatibility_mode() yourself if you need processed weights)."
            )
        if opts.tokenizer is not None:
            raise ArgumentError(
                "tokenizer= cannot be combined with an existing TransformerLens model "
                "(it is returned unchanged); call model.set_tokenizer(tokenizer) yourself."
            )
        get_tokenizer(source)
        return source

    # 2. A peft PeftModel object: run its LoRA-injected transformers model natively.
    inner = _unwrap_peft(source)
    if inner is not None:
        if opts.wrapper not in (None, "native"):
            raise ArgumentError(
                f"a PeftModel object runs with the native wrapper; for wrapper={opts.wrapper!r} "
                "merge it first (peft_model.merge_and_unload()) and pass the merged model."
            )
        tok = opts.tokenizer if opts.tokenizer is not None else getattr(source, "tokenizer", None)
        return _native_object(inner, replace(opts, tokenizer=tok))

    # 3. A transformers model object.
    if _is_hf_model(source):
        if _choose_wrapper(source, opts.wrapper) == "native":
            return _native_object(source, opts)
        # Work on a deep copy: booting a Bridge around an HF model object patches that object
        # (its own generate() would then change).
        tok = _source_tokenizer(source, opts.tokenizer)
        hf = copy.deepcopy(source)
        return _wrap_hf(hf, tok, opts, opts.name or _hf_name(source))

    # 4. A custom torch decoder: the native adapter, with the layers named by the user.
    if isinstance(source, torch.nn.Module):
        if opts.wrapper not in (None, "native"):
            raise ArgumentError(
                f"a plain torch module runs with the native wrapper, not wrapper={opts.wrapper!r}."
            )
        if opts.layers is None:
            raise AdapterError(
                f"modeldiff cannot run a {type(source).__name__}: it is not a transformers or "
                "TransformerLens model, so name its decoder-layer list: "
                f"load_model(module, layers='<path>', tokenizer=tok). Module lists found: "
                f"{', '.join(_module_lists(source)) or 'none'}."
            )
        return _native_object(source, opts)

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise AdapterError(
            f"cannot load a model from a {type(source).__name__}; pass a TransformerLens model, "
            "a transformers model, a torch decoder module with layers=, a folder, a .gguf file, "
            "a PEFT adapter folder, a hub name or 'glassllm'."
        )

    # 5. glassllm.
    from modeldiff._glassllm import load_glassllm, parse_glassllm_source

    lang = parse_glassllm_source(source)
    if lang is not None and not Path(source).exists():
        if opts.wrapper in ("bridge", "native"):
            raise ArgumentError(
                "glassllm is only available as a HookedTransformer; use wrapper='hooked' or "
                "leave wrapper unset."
            )
        if opts.tokenizer is not None:
            raise ArgumentError("glassllm brings its own tokenizer; do not pass tokenizer=.")
        model = load_glassllm(lang, dtype=opts.dtype_or_default, device=opts.device_or_default)
        if opts.processed:
            model.process_weights_(fold_ln=True, center_writing_weights=True, center_unembed=True)
        return model

    path = Path(source).expanduser()
    # 6. A GGUF file, or a folder with exactly one GGUF file and no config.json.
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _load_gguf(path, opts)
    if path.is_dir():
        if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
            # 7. A PEFT adapter folder: applied to `like`, or to the base it names.
            return _load_peft(path, base=None, like=like, opts=opts)
        if (path / "config.json").is_file():
            # 8. A save_pretrained folder.
            return _load_hf_dir(path, opts)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], opts)
        if ggufs:
            raise ArgumentError(
                f"folder {str(path)!r} holds several GGUF files ({', '.join(g.name for g in ggufs)}); "
                "pass the path of the one you want."
            )
        raise MissingFileError(
            f"folder {str(path)!r} has no config.json, adapter_config.json or .gguf file, so it is "
            "not a model checkpoint; pass the folder written by model.save_pretrained(...), a PEFT "
            "adapter folder, a .gguf file, or a hub name."
        )
    if path.exists():
        raise ArgumentError(
            f"{str(path)!r} is a file but not a .gguf checkpoint; pass the folder written by "
            "save_pretrained (the one with config.json) or a .gguf file."
        )

    # 9. Not on disk: a hub name, or a mistyped path.
    if _looks_like_path(source) or not _HUB_ID.match(source):
        raise MissingFileError(
            f"model path {source!r} does not exist. Check the spelling, or pass a folder written "
            "by save_pretrained, a .gguf file, a hub name such as "
            "'HuggingFaceTB/SmolLM2-135M-Instruct', or 'glassllm'."
        )
    return _load_hub(source, opts)


def _module_lists(model: Any) -> list[str]:
    return [
        f"{n!r} ({len(m)})" for n, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
    ]


def _native_object(model: Any, opts: _Opts) -> Any:
    """Run an existing transformers model / torch module natively: used as it is (no copy).

    Only ``.tokenizer`` is attached; dtype/device may only restate what it has.
    """
    from .adapters import NativeAdapter, set_adapter

    if opts.processed:
        raise ArgumentError(
            "compatibility_mode=True needs a TransformerLens wrapper; pass wrapper='bridge'."
        )
    if opts.device_map is not None:
        raise ArgumentError(
            "device_map= applies when modeldiff loads the weights (a folder or hub name); this "
            "model object is already placed. Dispatch it yourself (accelerate) or pass its folder."
        )
    for p in model.parameters():
        if opts.dtype is not None and p.is_floating_point() and p.dtype != opts.dtype:
            raise ArgumentError(
                f"dtype={opts.dtype} was asked for but this {type(model).__name__} is {p.dtype}, "
                f"and load_model uses model objects as they are; convert it yourself "
                f"(model.to({opts.dtype})) or leave dtype unset."
            )
        if opts.device is not None and p.device.type != opts.device.type:
            raise ArgumentError(
                f"device={str(opts.device)!r} was asked for but this {type(model).__name__} is on "
                f"{str(p.device)!r}; move it yourself (model.to(...)) or leave device unset."
            )
        break
    tok = _source_tokenizer(model, opts.tokenizer, required=not _is_hf_model(model))
    if tok is not None:
        model.tokenizer = tok
    if opts.layers is not None:
        model.modeldiff_layers = opts.layers  # found again by the adapter, also on copies
    if opts.name is not None:
        model.modeldiff_name = opts.name
    set_adapter(model, NativeAdapter(model, layers=opts.layers))
    return model


def _source_tokenizer(source: Any, tokenizer: Any, *, required: bool = True) -> Any:
    """The tokenizer for a model object: the one given, the one attached, or its checkpoint's."""
    if tokenizer is not None:
        return _resolve_tokenizer(tokenizer, fallback=None)
    attached = getattr(source, "tokenizer", None)
    if attached is not None:
        return attached
    where = getattr(source, "name_or_path", None) or ""
    if where and Path(where).is_dir() and getattr(source, "quantization_method", None) == "gguf":
        # a GGUF-loaded model: its tokenizer lives in the GGUF file, not beside a config
        ggufs = sorted(Path(where).glob("*.gguf"))
        if len(ggufs) == 1:
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(where, gguf_file=ggufs[0].name)
    if not where and not required:
        return None
    return _resolve_tokenizer(None, fallback=where or None)


def _choose_wrapper(hf: Any, wrapper: Wrapper | None) -> Wrapper:
    if wrapper is not None:
        return wrapper
    arch = (getattr(hf.config, "architectures", None) or [type(hf).__name__])[0]
    return "bridge" if _bridge_knows(arch) else "native"


def _bridge_knows(arch: str) -> bool:
    try:
        from transformer_lens.factories.architecture_adapter_factory import (
            SUPPORTED_ARCHITECTURES,
        )
    except ImportError:  # pragma: no cover - another TransformerLens layout
        return True
    return arch in SUPPORTED_ARCHITECTURES


def _unwrap_peft(obj: Any) -> Any:
    """The LoRA-injected transformers model inside a peft ``PeftModel``, else None."""
    try:
        from peft import PeftModel
    except ImportError:
        return None
    if isinstance(obj, PeftModel):
        inner = obj.base_model.model
        object.__setattr__(inner, "_modeldiff_peft", obj)
        return inner
    return None


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


def _hf_kwargs(opts: _Opts) -> dict[str, Any]:
    # Eager attention: hooks may read attention patterns, and it is the path TL validates.
    kw: dict[str, Any] = {"dtype": opts.dtype_or_default, "attn_implementation": "eager"}
    if opts.device_map is not None:
        kw["device_map"] = opts.device_map
    return kw


def _load_hf_dir(path: Path, opts: _Opts) -> Any:
    from transformers import AutoModelForCausalLM

    with reading(path, "a transformers checkpoint folder (config.json, weights, tokenizer)"):
        hf = AutoModelForCausalLM.from_pretrained(str(path), **_hf_kwargs(opts))
        tok = _resolve_tokenizer(opts.tokenizer, fallback=str(path))
    return _wrap_hf(hf, tok, opts, opts.name or str(path))


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            "reading a GGUF checkpoint needs the `gguf` package, which is not installed. "
            "Install it with `pip install gguf` (or `pip install 'modeldiff[gguf]'`), or convert "
            "the checkpoint with save_pretrained and pass that folder instead."
        ) from err


def _load_gguf(path: Path, opts: _Opts) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require_gguf()
    folder, file = str(path.parent), path.name
    with reading(path, "a GGUF checkpoint"):
        if opts.tokenizer is None:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        else:
            tok = _resolve_tokenizer(opts.tokenizer, fallback=None)
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, **_hf_kwargs(opts))
    return _wrap_hf(hf, tok, opts, opts.name or path.stem)


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


def _load_hub(repo_id: str, opts: _Opts) -> Any:
    from transformers import AutoModelForCausalLM

    cached = _hub_cached(repo_id)
    if not cached and _hub_offline():
        # Checked before any hub call: an offline lookup would otherwise wait ~25 s to fail.
        raise MissingFileError(
            f"model {repo_id!r} is not in the local Hugging Face cache and the hub is offline "
            "(HF_HUB_OFFLINE is set), and no local path of that name exists. Pass a local folder "
            "written by save_pretrained or a .gguf file instead, e.g. "
            f"load_model('/path/to/{repo_id.split('/')[-1]}'), or download it first while online "
            f"(`huggingface-cli download {repo_id}`)."
        )
    extra = {"local_files_only": True} if cached and _hub_offline() else {}
    tok = _resolve_tokenizer(opts.tokenizer, fallback=repo_id, **extra)
    hf = AutoModelForCausalLM.from_pretrained(repo_id, **_hf_kwargs(opts), **extra)
    return _wrap_hf(hf, tok, opts, opts.name or repo_id)


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def _resolve_tokenizer(tokenizer: Any, *, fallback: str | None, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(os.fspath(tokenizer), **kwargs)
    if tokenizer is not None:
        raise ArgumentTypeError(
            f"tokenizer must be a transformers tokenizer or a folder / hub name, got "
            f"{type(tokenizer).__name__}"
        )
    if fallback:
        try:
            return AutoTokenizer.from_pretrained(fallback, **kwargs)
        except (OSError, ValueError) as err:
            raise ArgumentError(
                f"could not load a tokenizer from {fallback!r} ({err}); pass one with "
                "load_model(..., tokenizer=AutoTokenizer.from_pretrained(...)) or tokenizer='<folder>'."
            ) from err
    raise ArgumentError(
        "this model comes without a tokenizer; pass one with load_model(model, tokenizer=...)."
    )


def _on_disk(tokenizer: Any) -> Any:
    """A twin of ``tokenizer`` saved to (and re-loaded from) a scratch folder.

    TransformerLens re-loads the tokenizer from its ``name_or_path`` (to make a BOS-adding twin),
    which would silently drop in-memory changes (a new chat template, pad token, added tokens),
    so the tokenizer as it is now is written out first and the twin is loaded from there. The
    folder is named by a hash of what was written, so loading the same tokenizer again reuses it.
    """
    import hashlib

    from transformers import AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix="modeldiff-tokenizer-staging-"))
    try:
        tokenizer.save_pretrained(str(staging))
        digest = hashlib.sha256()
        for f in sorted(staging.iterdir()):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
        folder = staging.parent / f"modeldiff-tokenizer-{digest.hexdigest()[:16]}"
        if not folder.is_dir():
            with contextlib.suppress(OSError):  # another process may win the race: same content
                staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(str(folder))


# --------------------------------------------------------------------------------------------
# Wrapping a transformers model
# --------------------------------------------------------------------------------------------


def _prepare_hf(hf: Any, opts: _Opts) -> Any:
    cfg = hf.config
    if not getattr(cfg, "architectures", None):
        cfg.architectures = [type(hf).__name__]  # GGUF and from_config models lack it
    if getattr(cfg, "model_type", None) == "gpt2" and getattr(cfg, "n_ctx", None) is None:
        cfg.n_ctx = cfg.n_positions  # transformers 5 dropped n_ctx; TL still reads it
    if hasattr(hf, "set_attn_implementation"):
        # Some exotic models cannot switch; their default attention is still correct.
        with contextlib.suppress(ValueError, ImportError, AttributeError):
            hf.set_attn_implementation("eager")
    if opts.device_map is None:
        hf.to(device=opts.device_or_default, dtype=opts.dtype_or_default)
    hf.eval()
    return hf


def _wrap_hf(hf: Any, tokenizer: Any, opts: _Opts, name: str) -> Any:
    """Run a transformers model we loaded (or copied) with the wrapper asked for."""
    hf = _prepare_hf(hf, opts)
    wrapper = _choose_wrapper(hf, opts.wrapper)
    arch = hf.config.architectures[0]
    if wrapper == "bridge" and not _bridge_knows(arch):
        raise ArgumentError(
            f"TransformerLens' TransformerBridge does not support {arch}. Use wrapper='native' "
            "(the default for this family): it runs any transformers causal LM as it is."
        )
    if wrapper == "native" or opts.device_map is not None:
        if opts.processed:
            raise ArgumentError(
                f"compatibility_mode=True needs a TransformerLens wrapper, and "
                f"{hf.config.architectures[0]} runs natively here"
                + (" (device_map= is native-only)" if opts.device_map is not None else "")
                + "; leave compatibility_mode unset."
            )
        return _native_object(
            hf,
            replace(opts, tokenizer=tokenizer, dtype=None, device=None, device_map=None, name=name),
        )
    device, dtype, processed = opts.device_or_default, opts.dtype_or_default, bool(opts.processed)
    tokenizer = _on_disk(tokenizer)
    if wrapper == "bridge":
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
            fix = (
                "Use wrapper='bridge' (the default for this family); call it with "
                "compatibility_mode=True if you need HookedTransformer-style processed weights."
                if _bridge_knows(arch)
                else "Use wrapper='native' (the default for this family): it runs any "
                "transformers causal LM as it is."
            )
            raise UnsupportedError(
                f"wrapper='hooked' cannot build {arch} from a local checkpoint with "
                f"TransformerLens' HookedTransformer ({str(err)[:120]}). {fix}"
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
    problems: list[str] = []
    a_arch, b_arch = model_architecture(base), model_architecture(tuned)
    if a_arch != b_arch:
        problems.append(f"architecture: base {a_arch}, fine-tuned {b_arch}")
    ab, at = adapter_for(base), adapter_for(tuned)
    for field in ("d_model", "n_layers"):
        a, b = getattr(ab, field), getattr(at, field)
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
    a_proc, b_proc = adapter_for(base).weights_processed, adapter_for(tuned).weights_processed
    if a_proc != b_proc:
        problems.append(
            f"weight processing (compatibility mode): base {a_proc}, fine-tuned {b_proc}"
        )
    if problems:
        raise ArgumentError(
            "the fine-tuned model is not comparable with the base model:\n  - "
            + "\n  - ".join(problems)
            + "\nLoad the fine-tune of this very base model, with the base's tokenizer and the "
            "same compatibility_mode."
        )


# --------------------------------------------------------------------------------------------
# LoRA / PEFT fine-tunes
# --------------------------------------------------------------------------------------------


def _require_peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise MissingDependencyError(
            "loading a LoRA / PEFT adapter needs the `peft` package, which is not installed. "
            "Install it with `pip install peft` (or `pip install 'modeldiff[lora]'`), or merge the "
            "adapter elsewhere and pass the merged model's folder."
        ) from err
    return peft


def _load_peft(path: Path, *, base: Any, like: Any, opts: _Opts) -> Any:
    """A PEFT adapter applied to a base model.

    With a native base (``like=`` or ``base``) the fine-tune shares the base's weight tensors: its
    module tree is a copy with the LoRA layers injected, so the base is not changed and no second
    full copy of the weights is held. With a TransformerLens base the adapter is merged into a
    fresh copy of the base checkpoint and wrapped like the base.
    """
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise MissingFileError(
            f"{str(path)!r} is not a PEFT adapter folder (no adapter_config.json); pass the folder "
            "written by peft_model.save_pretrained(...)."
        )
    peft = _require_peft()
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArgumentError(
            f"{str(config_file)!r} is not valid JSON ({err}); re-save the adapter."
        ) from err
    base_model = like if base is None else base
    named_base = config.get("base_model_name_or_path")
    if base_model is None:
        if not named_base:
            raise ArgumentError(
                f"the adapter {str(path)!r} does not name its base model; pass it: "
                "load_model(adapter_folder, like=base) or load_model(base, adapter=adapter_folder)."
            )
        base_model = named_base
    if not _is_tl_model(base_model) and not (
        isinstance(base_model, torch.nn.Module) and _is_hf_model(base_model)
    ):
        # a source (folder, hub name, ...): load the base natively, then apply
        base_model = _load(base_model, replace(opts, wrapper="native", name=None))
    tok = opts.tokenizer if opts.tokenizer is not None else getattr(base_model, "tokenizer", None)
    if _is_tl_model(base_model):
        if opts.wrapper == "native":
            raise ArgumentError(
                "the base is a TransformerLens model, so the adapter's fine-tune is built the same "
                "way; load the base with wrapper='native' to run the adapter natively."
            )
        if not named_base or not Path(named_base).expanduser().exists():
            raise ArgumentError(
                f"applying a PEFT adapter to a {type(base_model).__name__} needs the base's "
                f"transformers checkpoint, and the adapter names {named_base!r}, which is not a "
                "local folder. Load the base with wrapper='native' (shares weights), or pass "
                "load_model(<base folder>, adapter=..., wrapper='bridge')."
            )
        hf = _load(named_base, replace(opts, wrapper="native", name=None))
        merged = peft.PeftModel.from_pretrained(hf, str(path)).merge_and_unload()
        kind = opts.wrapper or model_kind(base_model)
        merged_opts = replace(opts, wrapper=kind, tokenizer=None)
        return _wrap_hf(
            merged, _resolve_tokenizer(tok, fallback=None), merged_opts, opts.name or path.name
        )
    tuned = _share_weights(base_model)
    flags = [(p, p.requires_grad) for p in base_model.parameters()]
    try:
        peft_model = peft.PeftModel.from_pretrained(tuned, str(path))
    finally:
        for p, flag in flags:  # peft freezes the (shared) base weights; leave the base as it was
            p.requires_grad_(flag)
    inner = peft_model.base_model.model
    inner.eval()
    # kept outside nn.Module's registry (the PeftModel contains `inner`: no module cycle)
    object.__setattr__(inner, "_modeldiff_peft", peft_model)
    return _native_object(
        inner, replace(opts, tokenizer=tok, dtype=None, device=None, wrapper="native")
    )


def _share_weights(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s modules that shares its parameter and buffer tensors (and tokenizer)."""
    memo: dict[int, Any] = {}
    for t in (*model.parameters(), *model.buffers()):
        memo[id(t)] = t
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        memo[id(tok)] = tok
    return copy.deepcopy(model, memo)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_model(model: Any, path: str | os.PathLike, *, merge: bool = False) -> Path:
    """Save a model that ``load_model(path)`` loads back: weights (safetensors) and tokenizer.

    Works for transformers models run natively, including ones loaded from a GGUF file (whose
    weights transformers de-quantized; ``save_pretrained`` alone refuses them as "quantized with
    gguf"), and for LoRA fine-tunes loaded with ``load_model(adapter_folder, like=base)``: those
    save as a PEFT adapter folder (small), or as a full merged model with ``merge=True``. A
    TransformerBridge saves its transformers model.

    Example:
        >>> import tempfile
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> m = load_model(save_tiny_hf_model("llama", tempfile.mkdtemp()), wrapper="native")
        >>> again = load_model(save_model(m, tempfile.mkdtemp()))
        >>> model_kind(again)
        'bridge'
    """
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        raise ArgumentError(
            "a HookedTransformer has no transformers checkpoint to save; save its state_dict with "
            "safetensors, or load the model with wrapper='native' or 'bridge' to save it."
        )
    hf = getattr(model, "original_model", model)
    if not _is_hf_model(hf):
        raise ArgumentError(
            f"save_model saves transformers models; this {type(model).__name__} is not one. Save "
            "its state_dict with safetensors.torch.save_file instead."
        )
    out = Path(os.fspath(path)).expanduser()
    if out.exists() and not out.is_dir():
        raise ArgumentError(f"{str(out)!r} is a file; pass a folder to save the model in.")
    peft_model = _peft_owner(hf)
    out.mkdir(parents=True, exist_ok=True)
    if peft_model is not None and not merge:
        peft_model.save_pretrained(str(out))
    else:
        target = hf
        if peft_model is not None:
            target = copy.deepcopy(peft_model).merge_and_unload()
        with _not_quantized(target):
            target.save_pretrained(str(out))
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        tok.save_pretrained(str(out))
    return out


def _peft_owner(hf: Any) -> Any:
    """The PeftModel whose LoRA layers live in ``hf`` (recorded when it was loaded), or None."""
    return hf.__dict__.get("_modeldiff_peft")


@contextlib.contextmanager
def _not_quantized(hf: Any) -> Any:
    """Let ``save_pretrained`` write a GGUF-loaded model, whose weights are plain floats already."""
    if getattr(hf, "quantization_method", None) != "gguf":
        yield hf
        return
    saved = {
        k: getattr(hf, k, None) for k in ("hf_quantizer", "is_quantized", "quantization_method")
    }
    qc = getattr(hf.config, "quantization_config", None)
    try:
        hf.hf_quantizer = None
        hf.is_quantized = False
        hf.quantization_method = None
        if qc is not None:
            del hf.config.quantization_config
        yield hf
    finally:
        for k, v in saved.items():
            setattr(hf, k, v)
        if qc is not None:
            hf.config.quantization_config = qc
