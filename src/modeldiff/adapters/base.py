"""The one place that knows how to run a family of models: the :class:`ModelAdapter` protocol.

Everything in modeldiff that runs a model (capture, diffing, interventions, generation, the judges,
the contrastive score, the organisms) asks :func:`adapter_for` for the model's adapter and goes
through it: one batched forward path that can stop after the deepest site, one answer to "which
device and dtype", one way to hook a :class:`~modeldiff.sites.Site`, one KV-cached decoding step.

An adapter wraps one model object; it holds no state the model does not (hooks live on the model's
own modules and are removed through the handles it returns). Adapters are found by asking each
registered class, newest first, whether it :meth:`~ModelAdapter.matches` the model; the first that
does is cached per model.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .._hooks import HookFn, HookHandle, Hooks, StopForward
from ..errors import ArgumentError, ModeldiffError, UnsupportedError
from ..sites import KINDS, Site, SiteError

__all__ = [
    "AdapterError",
    "DecodeState",
    "ModelAdapter",
    "NormFold",
    "adapter_for",
    "probe_norm",
    "register_adapter",
    "registered_adapters",
]


class AdapterError(ModeldiffError, TypeError):
    """No adapter knows how to run this model, or an adapter was configured wrongly.

    Example:
        >>> try:
        ...     adapter_for(object())
        ... except AdapterError as err:
        ...     print(str(err).splitlines()[0])
        modeldiff cannot run a object: no model adapter matches it.
    """


class DecodeState:
    """What an adapter keeps between decoding steps (its KV cache); opaque to callers.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> a = adapter_for(tiny_hooked_transformer())
        >>> logits, state = a.prefill(torch.tensor([[1, 5, 6]]), torch.ones(1, 3, dtype=torch.long))
        >>> type(state).__name__
        'DecodeState'
        >>> a.step(state, torch.tensor([[7]]), torch.ones(1, 4, dtype=torch.long)).shape
        torch.Size([1, 1, 474])
    """

    __slots__ = ("cache",)

    def __init__(self, cache: Any = None) -> None:
        self.cache = cache


@dataclass(frozen=True)
class NormFold:
    """What the final norm does to a *direction* before the unembedding reads it.

    A final norm computes ``scale ⊙ P(x) / r(x) + bias``: ``P`` centres ``x`` (LayerNorm) or
    leaves it (RMSNorm), ``r(x) > 0`` is one number per token and ``scale`` is the stored weight
    ``γ`` (Gemma-style RMSNorm stores ``w`` and scales by ``1 + w``: ``offset``). A direction ``d``
    added to the residual moves the logits along ``W_U^T (scale ⊙ P(d))``; ``r`` only rescales
    them all by one positive number and the bias terms do not depend on ``d``, so both are left out.

    Example:
        >>> import torch
        >>> fold = NormFold("layernorm", torch.tensor([2.0, 1.0]), offset=False, where="ln_f")
        >>> fold.apply(torch.tensor([3.0, 1.0]))
        tensor([ 2., -1.])
        >>> fold.describe()
        'ln_f: LayerNorm, folded as γ⊙(d − mean d)'
    """

    kind: Literal["rms", "layernorm", "none"]
    scale: Tensor | None  # the effective elementwise scale (1 + w for offset norms); None: ones
    offset: bool = False
    where: str = ""

    def apply(self, direction: Float[Tensor, "*n d_model"]) -> Float[Tensor, "*n d_model"]:
        """``scale ⊙ P(direction)`` in float32."""
        d = direction.float()
        if self.kind == "layernorm":
            d = d - d.mean(-1, keepdim=True)
        if self.scale is not None:
            d = d * self.scale.detach().float().to(d.device)
        return d

    def describe(self) -> str:
        """One line naming the norm and the rule used, for result tables."""
        if self.kind == "none":
            return f"{self.where or 'no final norm'}: nothing to fold"
        if self.kind == "layernorm":
            rule = "(1+w)⊙(d − mean d)" if self.offset else "γ⊙(d − mean d)"
            name = "LayerNorm"
        else:
            rule = "(1+w)⊙d" if self.offset else "γ⊙d"
            name = "Gemma-style RMSNorm" if self.offset else "RMSNorm"
        if self.scale is None:
            rule = "d − mean d" if self.kind == "layernorm" else "d"
            name += " without weights"
        return f"{self.where}: {name}, folded as {rule}"


_WEIGHT_NAMES = ("weight", "w", "scale", "gamma", "g")
_BIAS_NAMES = ("bias", "b", "beta")
_EPS_NAMES = ("eps", "variance_epsilon", "epsilon", "layer_norm_eps")


def _vector_attr(module: Any, names: Sequence[str], size: int | None) -> Tensor | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, Tensor) and v.ndim == 1 and (size is None or v.numel() == size):
            return v
    return None


def probe_norm(
    module: Any,
    *,
    d_model: int,
    where: str = "final norm",
    device: torch.device | None = None,
) -> NormFold:
    """Work out which norm ``module`` is by checking its output against each known form.

    The stored weight (``weight`` / ``w`` / ...) and bias are read from the module; the forms
    tried are RMSNorm and LayerNorm, each with the weight used as it is or as ``1 + w`` (Gemma).
    The one whose prediction matches ``module(x)`` on a random probe is returned, so a family's
    convention never has to be listed by name. ``None`` or ``nn.Identity`` means no norm.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(8)
        >>> probe_norm(ln, d_model=8, where="ln_f").kind
        'layernorm'
    """
    if module is None or isinstance(module, torch.nn.Identity):
        return NormFold("none", None, where=where if module is not None else "")
    weight = _vector_attr(module, _WEIGHT_NAMES, d_model)
    bias = _vector_attr(module, _BIAS_NAMES, d_model)
    eps = 1e-5
    for n in _EPS_NAMES:
        v = getattr(module, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            eps = float(v)
            break
    ref = weight if weight is not None else next(iter(_params(module)), None)
    dtype = ref.dtype if isinstance(ref, Tensor) and ref.is_floating_point() else torch.float32
    dev = ref.device if isinstance(ref, Tensor) else (device or torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    # a non-zero mean tells RMSNorm from LayerNorm; a norm of ~3 per entry makes eps negligible
    x = torch.randn(1, 4, d_model, generator=gen) * 3.0 + 0.7
    try:
        with torch.no_grad():
            y = module(x.to(device=dev, dtype=dtype))
    except Exception as err:
        raise UnsupportedError(
            f"cannot probe the final norm {where} ({type(module).__name__}): {err}. Pass "
            "fold_norm=False to read the unembedding without it."
        ) from err
    y = y[0] if isinstance(y, (tuple, list)) else y
    y = y.detach().float().cpu()
    x = x.to(dtype).float()
    w = None if weight is None else weight.detach().float().cpu()
    b = None if bias is None else bias.detach().float().cpu()
    forms: list[tuple[str, Tensor | None, bool]] = []
    for kind in ("rms", "layernorm"):
        if w is None:
            forms.append((kind, None, False))
        else:
            forms += [(kind, w, False), (kind, 1.0 + w, True)]
    best: tuple[float, str, Tensor | None, bool] | None = None
    for kind, scale, offset in forms:
        p = x - x.mean(-1, keepdim=True) if kind == "layernorm" else x
        pred = p / (p.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if scale is not None:
            pred = pred * scale
        if b is not None:
            pred = pred + b
        err = float((pred - y).abs().max() / y.abs().max().clamp_min(1e-12))
        if best is None or err < best[0]:
            best = (err, kind, scale, offset)
    tol = 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2
    assert best is not None
    if not best[0] < tol:
        raise UnsupportedError(
            f"the final norm {where} ({type(module).__name__}) is none of the forms modeldiff "
            "folds into a direction (RMSNorm γ⊙x/rms, Gemma's (1+w)⊙x/rms, LayerNorm "
            f"γ⊙(x − mean)/std + β; closest misses by {best[0]:.2g}). Pass fold_norm=False to "
            "read the unembedding without it, or fold the norm into the direction yourself."
        )
    _, kind, scale, offset = best
    if scale is not None:
        scale = scale.to(dev)
    return NormFold(kind, scale, offset=offset, where=where)  # type: ignore[arg-type]


def _params(module: Any) -> list[Tensor]:
    params = getattr(module, "parameters", None)
    return list(params()) if callable(params) else []


class ModelAdapter:
    """How modeldiff runs one family of models. Subclass it and :func:`register_adapter` it.

    The defaults here are written in terms of a few primitives, so a new family implements only:
    :meth:`matches`, :attr:`n_layers`, :attr:`d_model`, :meth:`add_hook` and :meth:`logits`
    (see docs/adapters.md for a complete adapter in under 50 lines). Override :meth:`prefill` /
    :meth:`step` to decode with a KV cache (the default recomputes the whole sequence each step).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> a = adapter_for(tiny_hooked_transformer())
        >>> (a.name, a.n_layers, a.d_model, str(a.input_device))
        ('hooked', 2, 64, 'cpu')
    """

    #: Short name shown in errors and ``load_model(wrapper=...)``.
    name: ClassVar[str] = "custom"
    #: Whether :meth:`prefill` / :meth:`step` use a KV cache.
    supports_cache: ClassVar[bool] = False

    def __init__(self, model: Any) -> None:
        self.model = model

    # -- to implement ---------------------------------------------------------------------------
    @classmethod
    def matches(cls, model: Any) -> bool:  # pragma: no cover - abstract
        """Whether this adapter can run ``model``."""
        raise NotImplementedError

    @property
    def n_layers(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def d_model(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_hook(self, site: Site, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        """Register ``fn(activation, hook) -> activation | None`` at ``site``; return its handle.

        ``fn`` sees the activation as ``[batch, seq, d_model]`` and may return a replacement. The
        handle removes exactly this hook (and nothing a user registered).
        """
        raise NotImplementedError  # pragma: no cover - abstract

    def logits(
        self, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"] | None
    ) -> Float[Tensor, "batch seq vocab"]:  # pragma: no cover - abstract
        """One plain forward pass over token ids (already on :attr:`input_device`)."""
        raise NotImplementedError

    # -- what the model is ----------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        tok = getattr(self.model, "tokenizer", None)
        if tok is None:
            raise ArgumentError(
                f"this {type(self.model).__name__} has no tokenizer attached; load it with "
                "modeldiff.load_model(<model>, tokenizer=...), or set model.tokenizer = tokenizer."
            )
        return tok

    @property
    def d_vocab(self) -> int:
        return len(self.tokenizer)

    @property
    def n_ctx(self) -> int | None:
        """The context window, or None when the model does not say."""
        return None

    @property
    def default_prepend_bos(self) -> bool:
        """Whether plain-string prompts get the tokenizer's BOS by default."""
        return False

    @property
    def architecture(self) -> str:
        return type(self.model).__name__

    @property
    def model_name(self) -> str:
        """A short name recorded in results (``load_model(..., name=...)`` sets it)."""
        name = getattr(self.model, "modeldiff_name", None) or getattr(
            self.model, "name_or_path", ""
        )
        return str(name or type(self.model).__name__).rstrip("/").split("/")[-1]

    @property
    def weights_processed(self) -> bool:
        """True when the weights were rewritten (TransformerLens' folded norms and centring)."""
        return False

    @property
    def input_device(self) -> torch.device:
        """Where token ids must be sent (the device of the first parameter by default)."""
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")  # pragma: no cover - a model without parameters

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the model's parameters (its first floating parameter)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        raise ArgumentError(f"{type(self.model).__name__} has no floating-point parameters")

    def site_device(self, site: Site) -> torch.device:
        """The device the activations at ``site`` live on (differs when the model is spread)."""
        return self.input_device

    def eos_ids(self) -> set[int]:
        """Token ids that end a generated answer."""
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return set() if eos is None else {int(eos)}

    # -- sites ----------------------------------------------------------------------------------
    def site_kinds(self, layer: int) -> tuple[str, ...]:
        """The site kinds this model exposes at ``layer`` (all five by default)."""
        return KINDS

    def sites(self) -> list[Site]:
        """Every site of the model, in execution order."""
        return sorted(Site(L, k) for L in range(self.n_layers) for k in self.site_kinds(L))  # type: ignore[arg-type]

    def check_site(self, site: Site) -> Site:
        """``site`` if the model has it, else a :class:`SiteError` listing the valid ones."""
        n = self.n_layers
        if site.layer < n and self.has_site(site):
            return site
        kinds = sorted({k for L in range(n) for k in self.site_kinds(L)}, key=KINDS.index)
        listing = f"Valid sites: {', '.join(kinds)} at layers 0..{n - 1}."
        if site.layer >= n:
            raise SiteError(
                f"layer {site.layer} is out of range: the model has {n} layers (0..{n - 1}). {listing}"
            )
        why = self.why_no_site(site)
        raise SiteError(f"the model has no hook {site.hook_name!r}{why}. {listing}")

    def has_site(self, site: Site) -> bool:
        """Whether the model has ``site`` (``site.layer`` is known to be in range)."""
        return site.kind in self.site_kinds(site.layer)

    def why_no_site(self, site: Site) -> str:
        """A short reason a site kind is missing (appended to the error)."""
        return ""

    # -- running --------------------------------------------------------------------------------
    def run(
        self,
        tokens: Int[Tensor, "batch seq"],
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        *,
        hooks: Iterable[tuple[Site, HookFn]] = (),
        stop_at: Site | None = None,
    ) -> Float[Tensor, "batch seq vocab"] | None:
        """The one forward path: ``hooks`` added, the pass ended right after ``stop_at``.

        Returns the logits, or ``None`` when the pass was stopped. Every hook is removed on every
        exit path.
        """
        with Hooks(self.model) as group:
            for site, fn in hooks:
                group.add(site, fn)
            if stop_at is not None:
                group.add(stop_at, _raise_stop)
            try:
                return self.logits(tokens, attention_mask)
            except StopForward:
                return None

    def prefill(
        self, tokens: Int[Tensor, "batch seq"], attention_mask: Int[Tensor, "batch seq"]
    ) -> tuple[Float[Tensor, "batch seq vocab"], DecodeState]:
        """First decoding forward over left-padded prompts: logits and the state for :meth:`step`."""
        return self.logits(tokens, attention_mask), DecodeState((tokens, attention_mask))

    def step(
        self,
        state: DecodeState,
        new_tokens: Int[Tensor, "batch 1"],
        attention_mask: Int[Tensor, "batch seq_so_far"],
    ) -> Float[Tensor, "batch 1 vocab"]:
        """Logits of ``new_tokens`` appended to the sequence; ``attention_mask`` covers all of it."""
        tokens, _ = state.cache
        tokens = torch.cat([tokens, new_tokens], dim=1)
        state.cache = (tokens, attention_mask)
        return self.logits(tokens, attention_mask)[:, -1:]

    # -- reading directions through the unembedding -------------------------------------------
    def final_norm(self) -> tuple[Any, str]:
        """The module applied to the last residual stream before the unembedding, and its name.

        ``(None, "")`` when the model has none. Override with :meth:`unembedding_weight` to give
        a family :meth:`unembed_direction` (and so :func:`modeldiff.logit_lens`).
        """
        raise UnsupportedError(
            f"the {self.name} adapter does not say where {type(self.model).__name__}'s final norm "
            "is; implement final_norm() and unembedding_weight() on its adapter (docs/adapters.md)."
        )

    def unembedding_weight(self) -> Float[Tensor, "d_model vocab"]:
        """The unembedding matrix ``W_U`` (residual → logits), as stored (a view, no copy)."""
        raise UnsupportedError(
            f"the {self.name} adapter does not expose {type(self.model).__name__}'s unembedding; "
            "implement unembedding_weight() and final_norm() on its adapter (docs/adapters.md)."
        )

    def final_norm_fold(self) -> NormFold:
        """How the final norm acts on a direction (found by probing it: see :func:`probe_norm`)."""
        module, where = self.final_norm()
        return probe_norm(module, d_model=self.d_model, where=where, device=self.input_device)

    def unembed_direction(
        self, direction: Float[Tensor, "*n d_model"], *, fold_norm: bool = True
    ) -> Float[Tensor, "*n vocab"]:
        """The logits a residual-stream direction writes: ``W_U^T (scale ⊙ P(d))``.

        The final norm's elementwise scale is folded into the direction (RMSNorm ``γ⊙d``,
        Gemma-style ``(1+w)⊙d``, LayerNorm ``γ⊙(d − mean d)``; see :class:`NormFold`); the
        norm's bias, the unembedding bias, the per-token ``1/rms`` and any logit soft-cap or
        scale are left out (none depends on the direction's orientation). Where weights were
        processed (TransformerLens' folded norms, centred unembedding) the fold is already in
        ``W_U`` and the logits are centred over the vocabulary. Returns float32 on ``W_U``'s device.

        Example:
            >>> import torch
            >>> from modeldiff.testing import tiny_hooked_transformer
            >>> a = adapter_for(tiny_hooked_transformer())
            >>> a.unembed_direction(torch.zeros(64)).shape == (a.d_vocab,)
            True
        """
        w_u = self.unembedding_weight()
        fold = self.final_norm_fold() if fold_norm else NormFold("none", None)
        x = fold.apply(torch.as_tensor(direction).to(w_u.device))
        # W_U is read in its own dtype: a float32 copy of a large half-precision vocabulary is GBs
        return (x.to(w_u.dtype) @ w_u).float()

    def forward_hooks_for_tracking(self, on_forward: Callable[..., None]) -> list[Any]:
        """Install what lets interventions learn the token positions of forwards they did not start.

        ``on_forward(x, offset, cached, attention_mask)`` must be called before every forward with
        its input ``x`` (ids or embeddings), the number of tokens already in its KV cache, whether
        a cache was passed, and the attention mask. Returns removable handles. The default watches
        the root module's call and reads a transformers-style ``past_key_values``.
        """

        def pre(module: Any, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else kwargs.get("input", kwargs.get("input_ids"))
            if x is None:
                x = kwargs.get("inputs_embeds")
            # transformers >= 5.2x calls it `cache`; older versions and the Bridge `past_key_values`
            cache = kwargs.get("past_key_values", kwargs.get("cache"))
            offset = 0
            if cache is not None and hasattr(cache, "get_seq_length"):
                offset = int(cache.get_seq_length())
            on_forward(x, offset, cache is not None, kwargs.get("attention_mask"))

        return [self.model.register_forward_pre_hook(pre, with_kwargs=True)]

    def prefix_state(self, prefix: Sequence[int]) -> tuple[Float[Tensor, " vocab"], Any]:
        """The logits after ``prefix`` and a state to score many continuations of it with
        :meth:`continuation_logits` (by default the prefix itself, recomputed each time)."""
        toks = torch.tensor([list(prefix)], device=self.input_device)
        return self.logits(toks, None)[0, -1], list(prefix)

    def continuation_logits(
        self, state: Any, rows: Int[Tensor, "n length"]
    ) -> Float[Tensor, "n length vocab"]:
        """Logits at each token of ``rows``, each continuing the prefix of :meth:`prefix_state`."""
        prefix = torch.tensor([state], device=rows.device).expand(rows.shape[0], -1)
        return self.logits(torch.cat([prefix, rows], 1), None)[:, len(state) :]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} for {type(self.model).__name__}>"


def _raise_stop(x: Tensor, hook: Any) -> None:
    raise StopForward


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

_REGISTRY: list[type[ModelAdapter]] = []
# The adapter of a model is cached on the model object itself. A WeakKeyDictionary cannot hold it:
# its value (the adapter) references its key (the model), so no model would ever be freed. On the
# model, the pair is one reference cycle the garbage collector frees with the model.
_ATTR = "_modeldiff_adapter"
_CACHED: weakref.WeakSet[Any] = weakref.WeakSet()  # models holding one (for unregister_adapter)


def _cached(model: Any) -> ModelAdapter | None:
    d = getattr(model, "__dict__", None)
    found = d.get(_ATTR) if isinstance(d, dict) else None
    # a copied model (copy.deepcopy) carries a copy of the adapter: keep it only if it is its own
    return found if found is not None and found.model is model else None


def _cache(model: Any, adapter: ModelAdapter) -> None:
    d = getattr(model, "__dict__", None)
    if isinstance(d, dict):
        d[_ATTR] = adapter
        with contextlib.suppress(TypeError):
            _CACHED.add(model)


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Register an adapter class (usable as a decorator). Later registrations are tried first.

    Example:
        >>> class Mine(ModelAdapter):
        ...     name = "mine"
        ...     @classmethod
        ...     def matches(cls, model):
        ...         return False
        >>> register_adapter(Mine) is Mine and registered_adapters()[0] == "mine"
        True
        >>> unregister_adapter(Mine)
    """
    if not (isinstance(cls, type) and issubclass(cls, ModelAdapter)):
        raise AdapterError(f"register_adapter takes a ModelAdapter subclass, got {cls!r}")
    if cls in _REGISTRY:
        _REGISTRY.remove(cls)
    _REGISTRY.insert(0, cls)
    return cls


def unregister_adapter(cls: type[ModelAdapter]) -> None:
    """Remove an adapter class registered with :func:`register_adapter` (and its cached uses).

    Example:
        >>> class Mine(ModelAdapter):
        ...     name = "mine"
        ...     @classmethod
        ...     def matches(cls, model):
        ...         return False
        >>> _ = register_adapter(Mine)
        >>> unregister_adapter(Mine)
        >>> "mine" in registered_adapters()
        False
    """
    if cls in _REGISTRY:
        _REGISTRY.remove(cls)
    for model in list(_CACHED):
        adapter = model.__dict__.get(_ATTR)
        if type(adapter) is cls:
            del model.__dict__[_ATTR]
            _CACHED.discard(model)


def registered_adapters() -> list[str]:
    """Names of the registered adapters, in the order they are tried.

    Example:
        >>> registered_adapters()
        ['native', 'hooked', 'bridge']
    """
    return [c.name for c in _REGISTRY]


def set_adapter(model: Any, adapter: ModelAdapter) -> ModelAdapter:
    """Use ``adapter`` for ``model`` from now on (what ``load_model(..., layers=...)`` does).

    The adapter is kept on the model object, so it lives exactly as long as the model.

    Example:
        >>> from modeldiff.adapters import HookedAdapter
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> mine = set_adapter(m, HookedAdapter(m))
        >>> adapter_for(m) is mine
        True
    """
    if not isinstance(getattr(model, "__dict__", None), dict):
        raise AdapterError(
            f"cannot attach an adapter to a {type(model).__name__} (it has no __dict__); wrap the "
            "model in a torch module"
        )
    _cache(model, adapter)
    return adapter


def adapter_for(model: Any) -> ModelAdapter:
    """The adapter that runs ``model`` (cached per model object).

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> adapter_for(tiny_hooked_transformer()).name
        'hooked'
    """
    if isinstance(model, ModelAdapter):
        return model
    found = _cached(model)
    if found is not None:
        return found
    for cls in _REGISTRY:
        if cls.matches(model):
            adapter = cls(model)
            _cache(model, adapter)
            return adapter
    tried = ", ".join(registered_adapters())
    raise AdapterError(
        f"modeldiff cannot run a {type(model).__name__}: no model adapter matches it.\n"
        f"Tried: {tried}.\n"
        "Fix: load it with modeldiff.load_model(source) (a transformers model, folder, GGUF file or "
        "TransformerLens model), or for a custom torch decoder name its layer list: "
        "load_model(module, layers='model.layers', tokenizer=tok). To add a family, see "
        "docs/adapters.md."
    )
