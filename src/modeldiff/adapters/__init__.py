"""Model adapters: the one place that knows how to run each family of models.

Registered here, tried newest first: ``native`` (any transformers causal LM, or a torch decoder
whose layer list is named), ``hooked`` (TransformerLens ``HookedTransformer``, glassllm and the
organisms) and ``bridge`` (TransformerLens ``TransformerBridge``). Add a family with
:func:`register_adapter`; see docs/adapters.md.

Example:
    >>> from modeldiff.testing import tiny_hooked_transformer
    >>> adapter_for(tiny_hooked_transformer()).name
    'hooked'
    >>> registered_adapters()
    ['native', 'hooked', 'bridge']
"""

from __future__ import annotations

from .._hooks import HookHandle
from .base import (
    AdapterError,
    DecodeState,
    ModelAdapter,
    adapter_for,
    register_adapter,
    registered_adapters,
    set_adapter,
    unregister_adapter,
)
from .lens import BridgeAdapter, HookedAdapter
from .native import LAYER_PATHS, NativeAdapter, find_layers

__all__ = [
    "LAYER_PATHS",
    "AdapterError",
    "BridgeAdapter",
    "DecodeState",
    "HookHandle",
    "HookedAdapter",
    "ModelAdapter",
    "NativeAdapter",
    "adapter_for",
    "find_layers",
    "register_adapter",
    "registered_adapters",
    "set_adapter",
    "unregister_adapter",
]
