"""TransformerLens models: ``HookedTransformer`` (glassllm and the organisms among them) and
``TransformerBridge``. Both expose ``blocks.{L}.hook_{kind}`` hook points for every site."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .._hooks import HookFn, HookHandle, add_lens_hook
from ..sites import KINDS, Site
from .base import DecodeState, ModelAdapter, register_adapter

__all__ = ["BridgeAdapter", "HookedAdapter"]


class _LensAdapter(ModelAdapter):
    """What HookedTransformer and TransformerBridge share: ``.cfg`` and named hook points."""

    @property
    def n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.cfg.d_model)

    @property
    def d_vocab(self) -> int:
        return int(self.model.cfg.d_vocab)

    @property
    def n_ctx(self) -> int | None:
        return int(getattr(self.model.cfg, "n_ctx", 0) or 0) or None

    @property
    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.model.cfg, "default_prepend_bos", False))

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", "") or "")

    @property
    def architecture(self) -> str:
        cfg = self.model.cfg
        for attr in ("architecture", "original_architecture"):
            value = getattr(cfg, attr, None)
            if value:
                return str(value)
        return "unknown"

    def site_kinds(self, layer: int) -> tuple[str, ...]:
        points = self.model.hook_dict
        return tuple(k for k in KINDS if f"blocks.{layer}.hook_{k}" in points)

    def add_hook(self, site: Site, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        return add_lens_hook(self.model, site.hook_name, fn, prepend=prepend)

    def logits(self, tokens: Tensor, attention_mask: Tensor | None) -> Tensor:
        if attention_mask is None:
            return self.model(tokens)
        return self.model(tokens, attention_mask=attention_mask)

    def unembedding_weight(self) -> Tensor:
        # processed weights (folded norms, centred unembedding) are what W_U holds then
        return self.model.W_U

    def final_norm(self) -> tuple[Any, str]:
        ln = getattr(self.model, "ln_final", None)
        if ln is None:
            return None, ""
        # on the Bridge, the transformers module it wraps (what runs; folding resets its weight)
        inner = getattr(ln, "original_component", None)
        return (ln if inner is None else inner), "ln_final"


@register_adapter
class BridgeAdapter(_LensAdapter):
    """A TransformerLens 3.x ``TransformerBridge`` around a transformers model.

    Decodes without a KV cache: TL 3.9's Bridge cache gives wrong tokens for rotary models and
    left-padded batches (see docs/generation.md), and recomputing matches transformers exactly.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> BridgeAdapter.name, BridgeAdapter.supports_cache
        ('bridge', False)
        >>> BridgeAdapter.matches(tiny_hooked_transformer())  # a HookedTransformer is not a Bridge
        False
    """

    name = "bridge"

    @classmethod
    def matches(cls, model: Any) -> bool:
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError:  # pragma: no cover
            return False
        return isinstance(model, TransformerBridge)

    @property
    def weights_processed(self) -> bool:
        return bool(getattr(self.model, "compatibility_mode", False))

    @property
    def input_device(self) -> torch.device:
        try:
            embed = self.model.get_input_embeddings()
        except (AttributeError, NotImplementedError, TypeError):
            embed = None
        for module in (embed, self.model):
            if module is not None:
                for p in module.parameters():
                    return p.device
        return torch.device("cpu")  # pragma: no cover

    def eos_ids(self) -> set[int]:
        ids = super().eos_ids()
        gen_cfg = getattr(getattr(self.model, "original_model", None), "generation_config", None)
        ids |= _as_id_set(getattr(gen_cfg, "eos_token_id", None))
        return ids


@register_adapter
class HookedAdapter(_LensAdapter):
    """A TransformerLens ``HookedTransformer`` (or ``HookedSAETransformer``), with TL's KV cache.

    Example:
        >>> from modeldiff.adapters import adapter_for
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> a = adapter_for(tiny_hooked_transformer())
        >>> type(a).__name__, a.supports_cache, a.weights_processed
        ('HookedAdapter', True, False)
    """

    name = "hooked"
    supports_cache = True

    @classmethod
    def matches(cls, model: Any) -> bool:
        from transformer_lens import HookedTransformer

        return isinstance(model, HookedTransformer)

    @property
    def weights_processed(self) -> bool:
        return str(self.model.cfg.normalization_type).endswith("Pre")

    @property
    def input_device(self) -> torch.device:
        for module in (getattr(self.model, "embed", None), self.model):
            if module is not None:
                for p in module.parameters():
                    return p.device
        return torch.device("cpu")  # pragma: no cover

    def site_device(self, site: Site) -> torch.device:
        block = self.model.blocks[site.layer]
        for p in block.parameters():
            return p.device
        return self.input_device  # pragma: no cover

    def prefill(self, tokens: Tensor, attention_mask: Tensor) -> tuple[Tensor, DecodeState]:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        kv = TransformerLensKeyValueCache.init_cache(self.model.cfg, tokens.device, tokens.shape[0])
        logits = self.model(tokens, attention_mask=attention_mask, past_kv_cache=kv)
        return logits, DecodeState(kv)

    def step(self, state: DecodeState, new_tokens: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(
            new_tokens, attention_mask=attention_mask[:, -1:], past_kv_cache=state.cache
        )

    def forward_hooks_for_tracking(self, on_forward: Callable[..., None]) -> list[Any]:
        # HookedTransformer.generate calls forward directly, which root-module hooks never see, so
        # watch block 0; a call through the root forgets the last state first, so a forward that
        # skips block 0 (start_at_layer > 0) finds no stale positions.
        def forget(module: Any, args: tuple) -> None:
            on_forward(None, 0, False, None)  # no usable input: forget the last state

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("resid_pre")
            entry = kwargs.get("past_kv_cache_entry")
            offset = 0 if entry is None else int(entry.past_keys.shape[1])
            on_forward(x, offset, entry is not None, kwargs.get("attention_mask"))

        return [
            self.model.register_forward_pre_hook(forget),
            self.model.blocks[0].register_forward_pre_hook(pre, with_kwargs=True),
        ]

    def prefix_state(self, prefix: Sequence[int]) -> tuple[Tensor, Any]:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

        device = self.input_device
        cache = TransformerLensKeyValueCache.init_cache(self.model.cfg, device, 1)
        logits = self.model(torch.tensor([list(prefix)], device=device), past_kv_cache=cache)
        cache.freeze()  # continuations read the prefix's keys/values without appending
        return logits[0, -1], cache

    def continuation_logits(self, state: Any, rows: Tensor) -> Tensor:
        from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
        from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

        n = rows.shape[0]
        shared = TransformerLensKeyValueCache(
            entries=[
                TransformerLensKeyValueCacheEntry(
                    e.past_keys.expand(n, -1, -1, -1),
                    e.past_values.expand(n, -1, -1, -1),
                    frozen=True,
                )
                for e in state.entries
            ],
            previous_attention_mask=state.previous_attention_mask.expand(n, -1),
            frozen=True,
        )
        return self.model(rows, past_kv_cache=shared)


def _as_id_set(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, (list, tuple)):
        return {int(e) for e in value}
    return set()
