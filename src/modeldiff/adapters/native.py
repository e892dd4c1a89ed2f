"""Any transformers ``AutoModelForCausalLM``, or a custom torch decoder, without TransformerLens.

Sites map onto the decoder-layer list (found by convention, or named by the user):

* ``resid_pre(L)`` is the input of layer ``L`` and ``resid_post(L)`` its output (HF
  ``hidden_states[L]`` and ``hidden_states[L + 1]``, the last one before the final norm);
* ``attn_out(L)`` / ``mlp_out(L)`` are the outputs of the layer's attention and MLP modules, and
  ``resid_mid(L) = resid_pre(L) + attn_out(L)``, offered only where a probe forward shows that the
  block really writes ``resid_pre + attn_out + mlp_out`` into the stream (no extra norms or scales)
  and the config does not declare parallel attention.

Each (layer, kind) has one dispatcher holding our hook functions in order (like a TransformerLens
``HookPoint``), installed as plain torch hooks while it has any and removed with the last one. Hooks
a user registered on the same modules are never touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._hooks import HookFn, HookHandle, eval_mode, restore_training
from ..errors import UnsupportedError
from ..sites import KINDS, Site
from .base import AdapterError, DecodeState, ModelAdapter, register_adapter

__all__ = ["LAYER_PATHS", "NativeAdapter", "find_layers"]

#: Where transformers families keep their decoder-layer list, tried in order.
LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "gpt_neox_japanese.layers",
    "biogpt.layers",
    "decoder.layers",
    "layers",
    "blocks",
    "h",
)
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")
# Families whose attention and MLP both read resid_pre: resid_mid does not exist there.
_PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn", "parallel_block")
_PARALLEL_TYPES = {"gptj", "codegen", "phi", "cohere", "cohere2"}
# Names of the norm after the last decoder layer, looked up beside the layer list, then on the root.
_FINAL_NORM_NAMES = (
    "norm",
    "ln_f",
    "final_layer_norm",
    "final_layernorm",
    "final_norm",
    "norm_f",
    "ln_final",
    "layer_norm",
    "final_ln",
    "ln_out",
)
_HEAD_NAMES = ("lm_head", "unembed", "embed_out", "output", "head")

LayerSpec = str | Callable[[nn.Module], Sequence[nn.Module]] | None


def _get_path(model: Any, path: str) -> Any:
    obj = model
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_layers(model: nn.Module, layers: LayerSpec = None) -> tuple[Sequence[nn.Module], str]:
    """The decoder-layer list of ``model`` and where it was found.

    ``layers`` names it (``"model.layers"``) or is a callable returning it; by default the
    conventional paths (:data:`LAYER_PATHS`) are tried, then the one ``nn.ModuleList`` whose length
    is the config's ``num_hidden_layers``.

    Example:
        >>> import tempfile
        >>> from transformers import AutoModelForCausalLM
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> hf = AutoModelForCausalLM.from_pretrained(save_tiny_hf_model("gpt2", tempfile.mkdtemp()))
        >>> layers, where = find_layers(hf)
        >>> (len(layers), where)
        (2, 'transformer.h')
    """
    if callable(layers) and not isinstance(layers, str):
        found = layers(model)
        where = getattr(layers, "__name__", "a callable")
    elif isinstance(layers, str):
        found = _get_path(model, layers)
        where = layers
        if found is None:
            raise AdapterError(
                f"layers={layers!r}: {type(model).__name__} has no attribute path {layers!r}. "
                f"Its module lists are: {', '.join(_module_lists(model)) or 'none'}."
            )
    else:
        found, where = None, ""
        for path in LAYER_PATHS:
            cand = _get_path(model, path)
            if isinstance(cand, nn.ModuleList) and len(cand) > 0:
                found, where = cand, path
                break
        if found is None:
            n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
            lists = [
                (name, m)
                for name, m in model.named_modules()
                if isinstance(m, nn.ModuleList) and n is not None and len(m) == n
            ]
            if len(lists) == 1:
                where, found = lists[0]
        if found is None:
            raise AdapterError(
                f"cannot find the decoder-layer list of {type(model).__name__} (tried "
                f"{', '.join(LAYER_PATHS)}). Name it: load_model(model, layers='<path>'), one of: "
                f"{', '.join(_module_lists(model)) or 'no nn.ModuleList found'}."
            )
    if not isinstance(found, Sequence | nn.ModuleList) or len(found) == 0:
        raise AdapterError(
            f"layers={where!r} is not a non-empty list of modules (got {type(found).__name__})"
        )
    if not all(isinstance(m, nn.Module) for m in found):
        raise AdapterError(f"layers={where!r} must list torch modules (the decoder blocks)")
    return found, where


def _module_lists(model: nn.Module) -> list[str]:
    return [f"{n!r} ({len(m)})" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]


def _first_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, Tensor):
        return hidden
    raise AdapterError(f"a hooked module returned {type(out).__name__}, not a tensor or tuple")


def _replace_first(out: Any, x: Tensor) -> Any:
    if isinstance(out, Tensor):
        return x
    if isinstance(out, tuple):
        return (x, *out[1:])
    if isinstance(out, list):
        return [x, *out[1:]]
    out.last_hidden_state = x  # pragma: no cover - ModelOutput-returning blocks
    return out


class _Point:
    """Our ordered hook functions at one site (a TransformerLens ``HookPoint`` lookalike)."""

    __slots__ = ("fns", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fns: list[HookFn] = []

    def __call__(self, x: Tensor) -> Tensor:
        for fn in list(self.fns):
            out = fn(x, self)
            if out is not None:
                x = out
        return x


@register_adapter
class NativeAdapter(ModelAdapter):
    """A transformers causal LM (any family) or a custom torch decoder, run as it is.

    Forward passes are the model's own; generation decodes with transformers' KV cache
    (``cache`` / ``past_key_values``) on transformers models, and by recomputation on custom modules.

    Example:
        >>> import tempfile
        >>> from modeldiff import load_model
        >>> from modeldiff.adapters import adapter_for
        >>> from modeldiff.testing import save_tiny_hf_model
        >>> m = load_model(save_tiny_hf_model("llama", tempfile.mkdtemp()), wrapper="native")
        >>> a = adapter_for(m)
        >>> (a.name, a.n_layers, a.d_model, a.layers_path)
        ('native', 2, 64, 'model.layers')
    """

    name = "native"

    def __init__(
        self,
        model: nn.Module,
        *,
        layers: LayerSpec = None,
        attn: str | None = None,
        mlp: str | None = None,
    ) -> None:
        super().__init__(model)
        if layers is None:
            layers = getattr(model, "modeldiff_layers", None)
        self.layers, self.layers_path = find_layers(model, layers)
        self._attn_name, self._mlp_name = attn, mlp
        self._hf = _is_pretrained(model)
        self._points: dict[tuple[int, str], _Point] = {}
        self._torch_handles: dict[tuple[int, str], list[Any]] = {}
        self._pre_seen: dict[int, Tensor] = {}
        self._kinds: dict[int, tuple[str, ...]] | None = None
        self._why: str = ""
        params = _forward_params(model)
        self._takes = {
            k: k in params or "kwargs" in params for k in ("attention_mask", "position_ids")
        }
        self._ids_kw = "input_ids" in params
        # transformers >= 5.2x renamed the KV-cache argument from past_key_values to cache
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def supports_cache(self) -> bool:  # type: ignore[override]
        return self._hf

    @classmethod
    def matches(cls, model: Any) -> bool:
        if isinstance(model, nn.Module) and hasattr(model, "modeldiff_layers"):
            return True
        if not _is_pretrained(model):
            return False
        try:
            find_layers(model)
        except AdapterError:
            return False
        return True

    # -- what the model is ----------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    def _cfg(self, *names: str) -> Any:
        for n in names:
            v = getattr(self.config, n, None)
            if v is not None:
                return v
        return None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        v = self._cfg("hidden_size", "n_embd", "d_model", "dim")
        if v is not None:
            return int(v)
        emb = self._input_embeddings()
        if emb is not None and hasattr(emb, "embedding_dim"):
            return int(emb.embedding_dim)
        return int(self._probe()[0][0].shape[-1])

    @property
    def d_vocab(self) -> int:
        v = self._cfg("vocab_size", "n_vocab")
        if v is not None:
            return int(v)
        emb = self._input_embeddings()
        if emb is not None and hasattr(emb, "num_embeddings"):
            return int(emb.num_embeddings)
        return super().d_vocab

    @property
    def n_ctx(self) -> int | None:
        v = self._cfg("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len")
        return int(v) if v else None

    @property
    def default_prepend_bos(self) -> bool:
        # what the model's own tokenizer does with a plain string
        tok = getattr(self.model, "tokenizer", None)
        bos = getattr(tok, "bos_token_id", None)
        if tok is None or bos is None:
            return False
        ids = tok("a")["input_ids"]
        return bool(ids) and ids[0] == bos

    @property
    def architecture(self) -> str:
        archs = getattr(self.config, "architectures", None)
        return str(archs[0]) if archs else type(self.model).__name__

    def _input_embeddings(self) -> Any:
        get = getattr(self.model, "get_input_embeddings", None)
        if get is None:
            return None
        try:
            return get()
        except (NotImplementedError, AttributeError):
            return None

    @property
    def input_device(self) -> torch.device:
        emb = self._input_embeddings()
        for module in (emb, self.model):
            if isinstance(module, nn.Module):
                for p in module.parameters():
                    return p.device
        return torch.device("cpu")  # pragma: no cover

    def site_device(self, site: Site) -> torch.device:
        for p in self.layers[site.layer].parameters():
            return p.device
        return self.input_device  # pragma: no cover

    def eos_ids(self) -> set[int]:
        ids = super().eos_ids() if getattr(self.model, "tokenizer", None) is not None else set()
        for cfg in (getattr(self.model, "generation_config", None), self.config):
            value = getattr(cfg, "eos_token_id", None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(e) for e in value)
        return ids

    # -- sites ----------------------------------------------------------------------------------
    def _sub(self, layer: int, kind: str) -> nn.Module | None:
        block = self.layers[layer]
        names = (
            ((self._attn_name,) if self._attn_name else _ATTN_NAMES)
            if kind == "attn_out"
            else ((self._mlp_name,) if self._mlp_name else _MLP_NAMES)
        )
        for n in names:
            m = _get_path(block, n)
            if isinstance(m, nn.Module):
                return m
        return None

    def site_kinds(self, layer: int) -> tuple[str, ...]:
        if self._kinds is None:
            self._kinds = self._find_kinds()
        return self._kinds.get(layer, ("resid_pre", "resid_post"))

    def has_site(self, site: Site) -> bool:
        # the residual stream around each layer always exists: no probe forward needed for it
        return site.kind in ("resid_pre", "resid_post") or super().has_site(site)

    def why_no_site(self, site: Site) -> str:
        return f" ({self._why})" if self._why else ""

    def _find_kinds(self) -> dict[int, tuple[str, ...]]:
        """Which sub-block sites hold, checked once on a probe forward."""
        out: dict[int, tuple[str, ...]] = {}
        has = {
            L: {k for k in ("attn_out", "mlp_out") if self._sub(L, k) is not None}
            for L in range(self.n_layers)
        }
        if not any(has.values()):
            self._why = "no attention/MLP submodule found by name in the decoder layers"
            return {L: ("resid_pre", "resid_post") for L in range(self.n_layers)}
        try:
            pre, attn, mlp, post = self._probe()
        except Exception as err:  # a model that cannot run a 3-token probe: keep resid sites only
            self._why = f"a probe forward to check the block layout failed: {err}"
            return {L: ("resid_pre", "resid_post") for L in range(self.n_layers)}
        parallel = any(bool(self._cfg(f)) for f in _PARALLEL_FLAGS) or (
            getattr(self.config, "model_type", None) in _PARALLEL_TYPES
        )
        for L in range(self.n_layers):
            kinds = ["resid_pre"]
            if (
                has[L] == {"attn_out", "mlp_out"}
                and attn.get(L) is not None
                and mlp.get(L) is not None
            ):
                total = pre[L] + attn[L] + mlp[L]
                scale = post[L].abs().max().clamp_min(1e-6)
                if bool(((total - post[L]).abs().max() / scale) < 1e-4):
                    kinds += ["attn_out"] + ([] if parallel else ["resid_mid"]) + ["mlp_out"]
                else:
                    self._why = (
                        "this family's block does not add its attention and MLP outputs to the "
                        "residual stream as they are (extra norms or scales), so only resid_pre / "
                        "resid_post are exact sites"
                    )
            elif has[L] != {"attn_out", "mlp_out"}:
                self._why = "the decoder layers have no attention or MLP submodule of a known name"
            if parallel:
                self._why = self._why or "attention and MLP run in parallel: there is no resid_mid"
            kinds.append("resid_post")
            out[L] = tuple(k for k in KINDS if k in kinds)
        return out

    @torch.no_grad()
    def _probe(
        self,
    ) -> tuple[dict[int, Tensor], dict[int, Tensor], dict[int, Tensor], dict[int, Tensor]]:
        pre: dict[int, Tensor] = {}
        attn: dict[int, Tensor] = {}
        mlp: dict[int, Tensor] = {}
        post: dict[int, Tensor] = {}
        handles = []

        def keep(store: dict[int, Tensor], L: int, x: Tensor) -> None:
            store[L] = x.detach().double()

        for L, block in enumerate(self.layers):
            handles.append(
                block.register_forward_pre_hook(
                    lambda m, a, k, L=L: keep(pre, L, a[0] if a else k["hidden_states"]),
                    with_kwargs=True,
                )
            )
            handles.append(
                block.register_forward_hook(lambda m, a, o, L=L: keep(post, L, _first_tensor(o)))
            )
            for kind, store in (("attn_out", attn), ("mlp_out", mlp)):
                sub = self._sub(L, kind)
                if sub is not None:
                    handles.append(
                        sub.register_forward_hook(
                            lambda m, a, o, L=L, store=store: keep(store, L, _first_tensor(o))
                        )
                    )
        in_training = eval_mode(self.model)
        try:
            n = max(3, min(self.d_vocab_safe(), 5))
            toks = (
                torch.arange(1, n + 1)
                .clamp(max=self.d_vocab_safe() - 1)[None]
                .to(self.input_device)
            )
            self.logits(toks, torch.ones_like(toks))
        finally:
            for h in handles:
                h.remove()
            restore_training(in_training)
        return pre, attn, mlp, post

    def d_vocab_safe(self) -> int:
        v = self._cfg("vocab_size", "n_vocab")
        if v is not None:
            return int(v)
        emb = self._input_embeddings()
        return int(getattr(emb, "num_embeddings", 8))

    # -- hooks ----------------------------------------------------------------------------------
    def add_hook(self, site: Site, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        self.check_site(site)
        key = (site.layer, site.kind)
        point = self._points.get(key)
        if point is None:
            point = self._points[key] = _Point(site.hook_name)
        if prepend:
            point.fns.insert(0, fn)
        else:
            point.fns.append(fn)
        self._sync(site.layer)

        def undo() -> None:
            for i, f in enumerate(point.fns):
                if f is fn:
                    del point.fns[i]
                    break
            self._sync(site.layer)

        return HookHandle(undo)

    def _active(self, layer: int, kind: str) -> _Point | None:
        p = self._points.get((layer, kind))
        return p if p is not None and p.fns else None

    def _sync(self, layer: int) -> None:
        """Install exactly the torch hooks layer ``layer``'s active points need; remove the rest."""
        want = {
            "pre": self._active(layer, "resid_pre") or self._active(layer, "resid_mid"),
            "post": self._active(layer, "resid_post"),
            "attn": self._active(layer, "attn_out") or self._active(layer, "resid_mid"),
            "mlp": self._active(layer, "mlp_out"),
        }
        for what, needed in want.items():
            key = (layer, what)
            have = self._torch_handles.get(key)
            if needed and not have:
                self._torch_handles[key] = [self._install(layer, what)]
            elif not needed and have:
                for h in self._torch_handles.pop(key):
                    h.remove()
        if not want["pre"]:
            self._pre_seen.pop(layer, None)

    def _install(self, layer: int, what: str) -> Any:
        block = self.layers[layer]
        if what == "pre":

            def pre_hook(module: Any, args: tuple, kwargs: dict) -> Any:
                from_args = bool(args)
                x = args[0] if from_args else kwargs["hidden_states"]
                point = self._active(layer, "resid_pre")
                if point is not None:
                    x = point(x)
                if self._active(layer, "resid_mid") is not None:
                    self._pre_seen[layer] = x
                if point is None:
                    return None
                if from_args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": x}

            return block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if what == "post":

            def post_hook(module: Any, args: Any, out: Any) -> Any:
                point = self._active(layer, "resid_post")
                if point is None:
                    return None
                return _replace_first(out, point(_first_tensor(out)))

            return block.register_forward_hook(post_hook)
        sub = self._sub(layer, "attn_out" if what == "attn" else "mlp_out")
        assert sub is not None
        if what == "attn":

            def attn_hook(module: Any, args: Any, out: Any) -> Any:
                x = _first_tensor(out)
                point = self._active(layer, "attn_out")
                if point is not None:
                    x = point(x)
                mid = self._active(layer, "resid_mid")
                if mid is not None:
                    resid = self._pre_seen.pop(layer)
                    x = mid(resid + x) - resid
                return _replace_first(out, x)

            return sub.register_forward_hook(attn_hook)

        def mlp_hook(module: Any, args: Any, out: Any) -> Any:
            point = self._active(layer, "mlp_out")
            if point is None:
                return None
            return _replace_first(out, point(_first_tensor(out)))

        return sub.register_forward_hook(mlp_hook)

    # -- the unembedding ------------------------------------------------------------------------
    def final_norm(self) -> tuple[Any, str]:
        """The norm beside the decoder-layer list (``model.norm``, ``transformer.ln_f``, ...).

        Set ``model.modeldiff_final_norm`` to a module path (or ``""`` for none) where the name
        is not a conventional one.
        """
        given = getattr(self.model, "modeldiff_final_norm", None)
        if isinstance(given, nn.Module):
            return given, type(given).__name__
        if isinstance(given, str):
            if not given:
                return None, ""
            found = _get_path(self.model, given)
            if not isinstance(found, nn.Module):
                raise AdapterError(
                    f"modeldiff_final_norm={given!r}: {type(self.model).__name__} has no module there"
                )
            return found, given
        parent = self.layers_path.rpartition(".")[0] if "." in self.layers_path else ""
        for prefix in dict.fromkeys((parent, "")):
            holder = _get_path(self.model, prefix) if prefix else self.model
            for name in _FINAL_NORM_NAMES:
                m = getattr(holder, name, None) if holder is not None else None
                if isinstance(m, nn.Module) and not isinstance(m, nn.ModuleList):
                    return m, f"{prefix}.{name}" if prefix else name
        raise UnsupportedError(
            f"cannot find the final norm of {type(self.model).__name__} (looked for "
            f"{', '.join(_FINAL_NORM_NAMES)} beside {self.layers_path!r}). Name it: "
            "model.modeldiff_final_norm = '<path>' ('' if the model has none), or pass "
            "fold_norm=False."
        )

    def unembedding_weight(self) -> Tensor:
        head = None
        get = getattr(self.model, "get_output_embeddings", None)
        if callable(get):
            try:
                head = get()
            except (NotImplementedError, AttributeError):
                head = None
        if head is None:
            head = next(
                (getattr(self.model, n) for n in _HEAD_NAMES if hasattr(self.model, n)), None
            )
        weight = getattr(head, "weight", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2 or weight.shape[1] != self.d_model:
            raise UnsupportedError(
                f"cannot find the unembedding of {type(self.model).__name__}: no "
                "get_output_embeddings() nor lm_head with a [vocab, d_model] weight. Compute the "
                "logits yourself: (direction @ W_U)."
            )
        return weight.T  # transformers stores [vocab, d_model]

    # -- running --------------------------------------------------------------------------------
    def _call(self, tokens: Tensor, attention_mask: Tensor | None, **extra: Any) -> Any:
        kwargs: dict[str, Any] = dict(extra)
        if attention_mask is not None and self._takes["attention_mask"]:
            kwargs["attention_mask"] = attention_mask
            if self._takes["position_ids"] and "position_ids" not in kwargs:
                # left padding: positions count real tokens only, as transformers' generate does
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        if self._hf:
            kwargs.setdefault("use_cache", False)
        if self._ids_kw:
            return self.model(input_ids=tokens, **kwargs)
        return self.model(tokens, **kwargs)

    def logits(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        return _logits_of(self._call(tokens, attention_mask))

    def prefill(self, tokens: Tensor, attention_mask: Tensor) -> tuple[Tensor, DecodeState]:
        if not self._hf:
            return super().prefill(tokens, attention_mask)
        out = self._call(tokens, attention_mask, use_cache=True)
        return _logits_of(out), DecodeState(_cache_of(out))

    def step(self, state: DecodeState, new_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        if not self._hf:
            return super().step(state, new_tokens, attention_mask)
        position = attention_mask.long().sum(-1, keepdim=True) - 1
        out = self._call(
            new_tokens,
            attention_mask,
            use_cache=True,
            position_ids=position,
            **{self._cache_kw: state.cache},
        )
        state.cache = _cache_of(out)
        return _logits_of(out)


def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise AdapterError(
        f"the model's forward returned {type(out).__name__}; modeldiff needs logits (a tensor, a "
        "tuple starting with them, or an object with .logits). Wrap the module so it returns them."
    )


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _forward_params(model: Any) -> set[str]:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):  # pragma: no cover
        return set()
    return {("kwargs" if p.kind is p.VAR_KEYWORD else name) for name, p in sig.parameters.items()}


def _is_pretrained(model: Any) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PreTrainedModel)
