"""Interventions that test whether a direction *causes* a behaviour: steer, ablate, project out.

Each intervention is a small frozen description (what to change, where, by how much). ``apply(model)``
adds its hooks and returns an :class:`InterventionHandle`; ``handle.remove()`` takes exactly those hooks
off again and is safe to call twice. Using an intervention in a ``with`` block is the same thing:
``__enter__`` calls ``apply`` on the model it was built for and ``__exit__`` removes the handle, so the
manual and the scoped form share one code path. Interventions compose (``compose(a, b)`` or ``a + b``)
and nest, on one site or several.

Positions. ``positions="prompt" | "generated" | [indices]`` restrict an intervention to some tokens of
each sequence. A mask computed from the shape of each forward pass would be wrong as soon as a KV cache
makes every decoding step one token long (steering silently stops after the first step). Instead the
absolute position of every token in every forward is known:

* while :func:`modeldiff.generation.generate` runs, it publishes them (see :func:`forward_positions`);
* otherwise a position tracker, installed once per model while a position-restricted intervention is
  active, reads the offset of each forward from the KV cache passed in (HookedTransformer's
  ``past_kv_cache``, a Hugging Face cache elsewhere: the adapter says where to look) and each row's
  padding from the attention mask. A forward without a cache that extends the previous forward by
  exactly one token, with every token that was real before still real (what
  ``generate(use_past_kv_cache=False)`` does), is treated as the next decoding step of the same
  prompt; any other forward starts a new prompt. The rule is the same on every adapter.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ._hooks import Hooks
from .adapters import adapter_for
from .directions import resolve_direction
from .errors import ModeldiffError
from .saes import nonfinite_parameters, sae_d_in, sae_d_sae
from .sites import Site, SiteError

__all__ = [
    "Ablate",
    "Composed",
    "ForwardPositions",
    "Intervention",
    "InterventionError",
    "InterventionHandle",
    "ProjectOut",
    "Steer",
    "SweepResult",
    "ablate",
    "compose",
    "forward_positions",
    "median_residual_norm",
    "project_out",
    "publish_positions",
    "steer",
    "sweep",
]

PositionSpec = Union[Literal["all", "prompt", "generated"], Sequence[int], Tensor]


class InterventionError(ModeldiffError, ValueError):
    """An intervention that cannot be built or applied as asked; the message names the fix.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> try:
        ...     steer(m, torch.ones(64), site="blocks.0.hook_resid_post", coefficient=float("nan"))
        ... except InterventionError as err:
        ...     print(err)
        coefficient must be finite, got nan; pass an ordinary number.
    """


# ------------------------------------------------------------------------------------------------
# Where each token of the current forward sits in its sequence
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardPositions:
    """Token positions of one forward pass.

    ``positions[b, j]`` is the index of token ``j`` of this forward within row ``b``'s own token ids
    (padding not counted; pad tokens are ``-1``). ``prompt_lengths[b]`` is the number of prompt tokens
    of row ``b``: tokens at positions ``>= prompt_lengths[b]`` were generated.

    Example:
        >>> import torch
        >>> fp = ForwardPositions(torch.tensor([[-1, 0, 1, 2]]), torch.tensor([2]))
        >>> (fp.positions >= fp.prompt_lengths[:, None]).tolist()  # which tokens were generated
        [[False, False, False, True]]
    """

    positions: Int[Tensor, "batch seq"]
    prompt_lengths: Int[Tensor, " batch"]


_PUBLISHED: ContextVar[ForwardPositions | None] = ContextVar(
    "modeldiff_forward_positions", default=None
)


def forward_positions() -> ForwardPositions | None:
    """The positions a decoding loop published for the forward now running, if any.

    Example:
        >>> import torch
        >>> forward_positions() is None
        True
        >>> fp = ForwardPositions(torch.tensor([[7]]), torch.tensor([5]))
        >>> with publish_positions(fp):
        ...     forward_positions().positions.tolist()
        [[7]]
    """
    return _PUBLISHED.get()


@contextmanager
def publish_positions(fp: ForwardPositions) -> Iterator[ForwardPositions]:
    """Publish ``fp`` as the positions of the forward passes run inside the block.

    A decoding loop wraps each forward in this so that position-restricted interventions know which
    tokens are prompt and which are generated, whatever the cache does to the shapes.

    Example:
        >>> import torch
        >>> with publish_positions(ForwardPositions(torch.tensor([[0, 1]]), torch.tensor([2]))) as fp:
        ...     fp.prompt_lengths.tolist()
        [2]
    """
    token = _PUBLISHED.set(fp)
    try:
        yield fp
    finally:
        _PUBLISHED.reset(token)


class _PositionTracker:
    """Learns each forward's token positions from the KV cache and attention mask passed to it.

    One per model, shared by every position-restricted intervention on it, removed with the last.
    Where to watch is the model adapter's business (``forward_hooks_for_tracking``): block 0 on a
    HookedTransformer (``HookedTransformer.generate`` calls ``forward`` directly, which root-module
    hooks never see), the root module's call elsewhere.
    """

    def __init__(self, model: Any) -> None:
        self.users = 0
        self.state: ForwardPositions | None = None
        self._seen: Tensor | None = None  # real tokens per row seen so far in this sequence
        self._prev: Tensor | None = None  # last uncached forward's input, to recognise a next step
        self._prompt: Tensor | None = None  # prompt length per row of the current sequence
        self._prev_mask: Tensor | None = None  # the last uncached forward's real-token mask
        self.cached = False  # whether the last forward came with a KV cache
        self._handles = adapter_for(model).forward_hooks_for_tracking(self._observe)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.state = self._seen = self._prev = self._prompt = self._prev_mask = None

    def _observe(self, x: Any, offset: int, cached: bool, mask: Tensor | None) -> None:
        if _PUBLISHED.get() is not None:
            return
        self.cached = cached
        if not isinstance(x, Tensor) or x.ndim < 2:
            self.state = None  # strings etc.: unknown; a position-restricted hook will say so
            return
        b, s = int(x.shape[0]), int(x.shape[1])
        chunk = torch.ones(b, s, dtype=torch.long, device=x.device)
        full = None
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == b:
            if mask.shape[1] == offset + s:
                full = mask.long()
                chunk = full[:, -s:]
            elif mask.shape[1] == s:
                chunk = mask.long()
        step = False
        if not cached and offset == 0 and self._prev is not None:
            prev = self._prev
            step = (
                prev.shape[0] == b
                and prev.shape[1] + 1 == s
                and prev.shape[2:] == x.shape[2:]
                and torch.equal(x[:, :-1].detach(), prev)
                # one rule on every adapter: a real token that became padding starts a new prompt
                and self._prev_mask is not None
                and torch.equal(chunk[:, :-1], self._prev_mask)
            )
        if offset > 0:
            if full is not None:
                pos = full.cumsum(-1)[:, -s:] - 1
            elif self._seen is not None and self._seen.shape[0] == b:
                pos = self._seen[:, None] + chunk.cumsum(-1) - 1
            else:
                self.state = None
                return
            self._seen = pos.max(dim=1).values + 1
            prompt = self._prompt
            if prompt is None or prompt.shape[0] != b:
                self.state = None
                return
        else:
            pos = chunk.cumsum(-1) - 1
            self._seen = chunk.sum(-1)
            prompt = self._prompt
            if not step or prompt is None or prompt.shape[0] != b:
                prompt = chunk.sum(-1)
        pos = pos.masked_fill(chunk == 0, -1)
        self._prompt = prompt
        self.state = ForwardPositions(pos, prompt)
        self._prev = None if cached else x.detach().clone()
        self._prev_mask = None if cached else chunk.clone()


_TRACKERS: weakref.WeakKeyDictionary[Any, _PositionTracker] = weakref.WeakKeyDictionary()


def _acquire_tracker(model: Any) -> _PositionTracker:
    tracker = _TRACKERS.get(model)
    if tracker is None:
        tracker = _TRACKERS[model] = _PositionTracker(model)
    tracker.users += 1
    return tracker


def _release_tracker(model: Any, tracker: _PositionTracker) -> None:
    tracker.users -= 1
    if tracker.users <= 0:
        tracker.remove()
        if _TRACKERS.get(model) is tracker:
            del _TRACKERS[model]


def _check_positions(positions: Any) -> PositionSpec:
    if isinstance(positions, str):
        if positions not in ("all", "prompt", "generated"):
            raise InterventionError(
                f"unknown positions {positions!r}; use 'all', 'prompt', 'generated' or a list of "
                "token indices"
            )
        return positions  # type: ignore[return-value]
    idx = torch.as_tensor(positions)
    if idx.ndim != 1 or idx.is_floating_point() or idx.dtype == torch.bool or idx.numel() == 0:
        raise InterventionError(
            "explicit positions must be a non-empty list of integer token indices, e.g. [0, 3, 4]"
        )
    if bool((idx < 0).any()):
        raise InterventionError(
            "explicit positions count from the start of each sequence and must be >= 0; "
            f"got {idx.tolist()}"
        )
    return tuple(int(i) for i in idx.tolist())


def _position_mask(
    spec: PositionSpec, act: Tensor, tracker: _PositionTracker | None
) -> Bool[Tensor, "batch seq"] | None:
    """Which tokens of ``act`` to change, or None for all of them."""
    if isinstance(spec, str) and spec == "all":
        return None
    fp = _PUBLISHED.get() or (tracker.state if tracker is not None else None)
    if fp is None or tuple(fp.positions.shape) != tuple(act.shape[:2]):
        raise InterventionError(
            f"positions={spec!r} needs to know where each token sits, and this forward pass gave no "
            "usable information (its input was not a token/embedding tensor of the activation's "
            "shape). Call the model on token tensors, use modeldiff.generate, or positions='all'."
        )
    pos = fp.positions.to(act.device)
    if spec == "prompt":
        return (pos >= 0) & (pos < fp.prompt_lengths.to(act.device)[:, None])
    if spec == "generated":
        return pos >= fp.prompt_lengths.to(act.device)[:, None]
    wanted = torch.tensor(spec, device=act.device)
    mask = torch.isin(pos, wanted)
    if (
        tracker is not None
        and _PUBLISHED.get() is None
        and not tracker.cached
        and min(spec) > int(pos.max())
    ):
        # a whole forward of its own (no KV cache, no decoding loop) that no position reaches
        warnings.warn(
            f"positions {list(spec)} lie beyond every sequence of this forward (the longest has "
            f"{int(pos.max()) + 1} tokens), so the intervention changed nothing; positions count "
            "from 0 within each sequence.",
            UserWarning,
            stacklevel=2,
        )
    return mask


# ------------------------------------------------------------------------------------------------
# Handles and the shared base class
# ------------------------------------------------------------------------------------------------


class InterventionHandle:
    """What ``apply`` returns: ``remove()`` undoes exactly that application (idempotent).

    Also a context manager, so ``with intervention.apply(model):`` works too.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> h = steer(m, torch.ones(64), site="blocks.0.hook_resid_post", coefficient=1.0).apply()
        >>> h.active
        True
        >>> h.remove(); h.remove(); h.active
        False
    """

    def __init__(self, undo: Callable[[], None], description: str = "") -> None:
        self._undo: Callable[[], None] | None = undo
        self.description = description

    @property
    def active(self) -> bool:
        """True until ``remove()`` has been called."""
        return self._undo is not None

    def remove(self) -> None:
        """Take the intervention's hooks off the model. Calling it again does nothing."""
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> InterventionHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<InterventionHandle {self.description} ({state})>"


def _d_model(model: Any) -> int:
    return adapter_for(model).d_model


def _site_of(model: Any, site: Site | str | None, direction: Any = None) -> Site:
    if site is None:
        site = _site_of_direction(direction)
    try:
        parsed = Site.parse(site)
    except SiteError as err:
        raise InterventionError(str(err)) from None
    try:
        return parsed.validate(model)
    except SiteError as err:
        raise InterventionError(f"{err} Pick a site of this model for the intervention.") from None


def _site_of_direction(direction: Any) -> Site:
    """The site a direction belongs to: a ``LatentDiff`` row's ``site``, or an SAE's hook."""
    site = getattr(direction, "site", None)
    if site is not None:
        return Site.parse(site)
    if isinstance(direction, tuple) and len(direction) == 2 and hasattr(direction[0], "W_dec"):
        try:
            return Site.from_sae(direction[0])
        except SiteError as err:
            raise InterventionError(str(err)) from None
    raise InterventionError(
        "site is missing: a plain vector does not say where it belongs; pass site=Site.resid_post(L)"
    )


class Intervention:
    """Base class: a description of a change to a model's activations.

    Subclasses say which hooks they add (``_hooks_for``); everything else (applying, removing, the
    ``with`` form, composing) lives here, so every intervention behaves the same way.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> iv = project_out(m, torch.ones(64), site="blocks.1.hook_resid_pre")
        >>> isinstance(iv, Intervention), isinstance(iv + iv, Intervention)
        (True, True)
    """

    model: Any
    positions: PositionSpec = "all"

    # -- to implement ---------------------------------------------------------------------------
    def _hooks_for(
        self, model: Any, tracker: _PositionTracker | None
    ) -> list[tuple[str, Callable[..., Tensor]]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def _attach(self, model: Any) -> Callable[[], None] | None:
        """Bookkeeping beside the hooks while applied; returns its undo (default: none)."""
        return None

    def _needs_positions(self) -> bool:
        return not (isinstance(self.positions, str) and self.positions == "all")

    def _check_model(self, model: Any) -> None:
        if model is not self.model and _d_model(model) != _d_model(self.model):
            raise InterventionError(
                f"this intervention was built for a model with d_model {_d_model(self.model)}, but the "
                f"model it is applied to has d_model {_d_model(model)}; build it for that model."
            )

    # -- shared behaviour -----------------------------------------------------------------------
    def apply(self, model: Any | None = None) -> InterventionHandle:
        """Add this intervention's hooks to ``model`` (default: the model it was built for).

        Returns a handle whose ``remove()`` takes exactly these hooks off again.
        """
        model = self.model if model is None else model
        self._check_model(model)
        tracker = _acquire_tracker(model) if self._needs_positions() else None
        group = Hooks(model)
        detach: Callable[[], None] | None = None
        try:
            for name, fn in self._hooks_for(model, tracker):
                group.add(name, fn)
            detach = self._attach(model)
        except BaseException:
            group.remove()
            if tracker is not None:
                _release_tracker(model, tracker)
            raise

        def undo() -> None:
            try:
                group.remove()
            finally:
                if detach is not None:
                    detach()
                if tracker is not None:
                    _release_tracker(model, tracker)

        return InterventionHandle(undo, repr(self))

    def __enter__(self) -> InterventionHandle:
        handle = self.apply()
        self._stack().append(handle)
        return handle

    def __exit__(self, *exc: object) -> None:
        self._stack().pop().remove()

    def _stack(self) -> list[InterventionHandle]:
        stack = self.__dict__.get("_handles")
        if stack is None:
            stack = []
            object.__setattr__(self, "_handles", stack)
        return stack

    def __add__(self, other: Intervention) -> Composed:
        return compose(self, other)


def _check_coefficient(value: Any, name: str = "coefficient") -> float:
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)
    ):
        raise InterventionError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise InterventionError(f"{name} must be finite, got {value}; pass an ordinary number.")
    return value


# ------------------------------------------------------------------------------------------------
# Calibration helpers
# ------------------------------------------------------------------------------------------------


def _site_activations(
    model: Any, prompts: Sequence[Any], site: Site, *, batch_size: int = 8
) -> Iterator[Float[Tensor, "n d_model"]]:
    """The activations at ``site`` of every non-pad, non-BOS token of ``prompts``, batch by batch.

    The BOS residual is an outlier (attention sink) in many models, so it is left out.
    """
    from .capture import capture

    if isinstance(prompts, (str, bytes)) or len(prompts) == 0:
        raise InterventionError(
            "calibration_prompts must be a non-empty list of prompts, e.g. a few dozen chat questions"
        )
    stream = capture(
        model, list(prompts), site, batch_size=batch_size, truncate=True, progress=False
    )
    for batch in stream:
        yield batch.acts[site]


def median_residual_norm(
    model: Any, prompts: Sequence[Any], site: Site | str, *, batch_size: int = 8
) -> float:
    """The median L2 norm of the activation at ``site`` over every token of ``prompts`` (BOS excluded).

    This is the unit of ``steer(..., scale="residual_norm")``.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> median_residual_norm(m, ["Hello world", "The fox"], "blocks.1.hook_resid_post") > 0
        True
    """
    site = _site_of(model, site)
    norms = torch.cat(
        [
            a.float().norm(dim=-1)
            for a in _site_activations(model, prompts, site, batch_size=batch_size)
        ]
    )
    if norms.numel() == 0:
        raise InterventionError("the calibration prompts produced no tokens; pass longer prompts")
    return float(norms.median())


# ------------------------------------------------------------------------------------------------
# steer
# ------------------------------------------------------------------------------------------------


class _CastCache:
    """A vector cast lazily to the dtype/device of the activations it meets (cached per pair)."""

    def __init__(self, vec: Tensor) -> None:
        self.vec = vec
        self._cache: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.dtype, x.device)
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = self.vec.to(device=x.device, dtype=x.dtype)
        return v


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``coefficient × direction`` at ``site``; build it with :func:`steer`.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> iv = steer(tiny_hooked_transformer(), torch.ones(64), site="resid_post:0", coefficient=2.0)
        >>> iv
        Steer(site=Site.resid_post(0), coefficient=2.0, positions='all', scale='absolute', unit=1.0)
    """

    model: Any = field(repr=False)
    direction: Float[Tensor, " d_model"] = field(repr=False)
    site: Site
    coefficient: float
    positions: PositionSpec = "all"
    scale: Literal["absolute", "residual_norm"] = "absolute"
    unit: float = 1.0  # the median residual norm under scale="residual_norm", else 1
    _delta: _CastCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_delta", _CastCache(self.coefficient * self.unit * self.direction)
        )

    def _hooks_for(self, model: Any, tracker: _PositionTracker | None) -> list:
        site = _site_of(model, self.site)
        delta, spec = self._delta, self.positions

        if self._needs_positions():

            def hook(x: Tensor, hook: Any) -> Tensor:
                mask = _position_mask(spec, x, tracker)
                return x + mask.unsqueeze(-1).to(x.dtype) * delta.like(x)

        else:

            def hook(x: Tensor, hook: Any) -> Tensor:
                return x + delta.like(x)

        return [(site.hook_name, hook)]


def steer(
    model: Any,
    direction: Any,
    *,
    site: Site | str | None = None,
    coefficient: float,
    positions: PositionSpec = "all",
    scale: Literal["absolute", "residual_norm"] = "absolute",
    calibration_prompts: Sequence[Any] | None = None,
) -> Steer:
    """Add ``coefficient × direction`` to the activation at ``site``.

    ``direction`` is a vector, an ``(sae, latent)`` pair (the latent's decoder row) or an object with
    ``as_direction()`` (a ``LatentDiff`` row). ``site`` may be left out for the latter two: it is
    the row's site, or the SAE's own hook. With ``scale="absolute"`` the direction is used as
    given. With ``scale="residual_norm"`` it is normalised to unit length and the coefficient counts
    in units of the median norm of the activation at ``site``, measured once now on
    ``calibration_prompts`` (the paper's follow-up steers with 0.4). ``positions`` is ``"all"``,
    ``"prompt"``, ``"generated"`` or a list of token indices; it stays correct under KV-cached
    generation.

    Use it as a context manager, or ``h = steer(...).apply(); ...; h.remove()``.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> toks = torch.tensor([[5, 6, 7]])
        >>> plain = m(toks)
        >>> d = torch.randn(64, generator=torch.Generator().manual_seed(0))
        >>> with steer(m, d, site="blocks.0.hook_resid_post", coefficient=4.0):
        ...     steered = m(toks)
        >>> bool((steered - plain).abs().max() > 0), torch.equal(m(toks), plain)
        (True, True)
    """
    coefficient = _check_coefficient(coefficient)
    site_ = _site_of(model, site, direction)
    positions = _check_positions(positions)
    d_model = _d_model(model)
    if scale == "absolute":
        vec = resolve_direction(direction, d_model=d_model)
        unit = 1.0
    elif scale == "residual_norm":
        if calibration_prompts is None:
            raise InterventionError(
                "scale='residual_norm' measures the median activation norm at the site on "
                "calibration prompts, and none were given: pass calibration_prompts=[...] (a few "
                "dozen typical prompts) or use scale='absolute'."
            )
        vec = resolve_direction(direction, d_model=d_model, normalize=True)
        unit = median_residual_norm(model, calibration_prompts, site_)
    else:
        raise InterventionError(f"unknown scale {scale!r}; use 'absolute' or 'residual_norm'")
    return Steer(
        model=model,
        direction=vec,
        site=site_,
        coefficient=coefficient,
        positions=positions,
        scale=scale,
        unit=unit,
    )


# ------------------------------------------------------------------------------------------------
# project_out
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """Remove the component along ``direction`` (or in a subspace) at ``site``; build it with
    :func:`project_out`.

    ``basis`` holds orthonormal rows spanning what is removed (one row, ``direction``, for a
    single direction).

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> project_out(tiny_hooked_transformer(), torch.ones(64), site="resid_pre:1")
        ProjectOut(site=Site.resid_pre(1), positions='all', rank=1)
    """

    model: Any = field(repr=False)
    direction: Float[Tensor, " d_model"] = field(repr=False)
    site: Site
    positions: PositionSpec = "all"
    basis: Float[Tensor, "k d_model"] | None = field(default=None, repr=False)
    _basis: _CastCache = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        basis = self.basis if self.basis is not None else self.direction.unsqueeze(0)
        object.__setattr__(self, "basis", basis)
        object.__setattr__(self, "_basis", _CastCache(basis))

    @property
    def rank(self) -> int:
        """The dimension of the subspace removed."""
        return int(self.basis.shape[0])  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"ProjectOut(site={self.site!r}, positions={self.positions!r}, rank={self.rank})"

    def _hooks_for(self, model: Any, tracker: _PositionTracker | None) -> list:
        site = _site_of(model, self.site)
        basis, spec = self._basis, self.positions

        def hook(x: Tensor, hook: Any) -> Tensor:
            b = basis.like(x)
            removed = (x @ b.T) @ b
            mask = _position_mask(spec, x, tracker)
            if mask is not None:
                removed = removed * mask.unsqueeze(-1).to(x.dtype)
            return x - removed

        return [(site.hook_name, hook)]


def _orthonormal_rows(rows: Tensor) -> Tensor:
    """Orthonormal rows spanning the rows given (numerically dependent ones dropped)."""
    a = rows.detach().double()
    if not bool(torch.isfinite(a).all()):
        raise InterventionError(
            "the subspace contains NaN or inf entries; check how it was computed"
        )
    _u, sv, vh = torch.linalg.svd(a, full_matrices=False)
    if sv.numel() == 0 or float(sv[0]) == 0.0:
        raise InterventionError("cannot project out a zero subspace; pass non-zero directions")
    keep = sv > sv[0] * 1e-6
    return vh[keep].to(rows.dtype if rows.is_floating_point() else torch.float32)


def project_out(
    model: Any, direction: Any, *, site: Site | str | None = None, positions: PositionSpec = "all"
) -> ProjectOut:
    """Directional ablation: remove the component of the activation at ``site`` along ``direction``.

    ``x ← x − (x·u) u`` with ``u`` the unit direction, at every token (or only at ``positions``).
    ``direction`` may also span a subspace: a :class:`~modeldiff.latent_sets.LatentSet` (the span
    of its decoder rows) or a 2-D tensor whose rows span it; then ``x ← x − P x`` with ``P`` the
    orthogonal projection onto that span.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> d = torch.randn(64)
        >>> seen = []
        >>> _ = m.add_hook("blocks.1.hook_resid_pre", lambda x, hook: seen.append(x @ d / d.norm()))
        >>> with project_out(m, d, site="blocks.0.hook_resid_post", positions="all"):
        ...     _ = m(torch.tensor([[5, 6, 7]]))
        >>> m.reset_hooks()
        >>> bool(seen[0].abs().max() < 1e-4)
        True
    """
    site_ = _site_of(model, site, direction)
    positions = _check_positions(positions)
    d_model = _d_model(model)
    rows = None
    if hasattr(direction, "as_subspace") and callable(direction.as_subspace):
        rows = torch.as_tensor(direction.as_subspace())
    elif isinstance(direction, Tensor) and direction.ndim == 2:
        rows = direction
    if rows is not None:
        if rows.ndim != 2 or rows.shape[1] != d_model or rows.shape[0] == 0:
            raise InterventionError(
                f"a subspace to project out is a [k, d_model={d_model}] stack of directions, got "
                f"shape {tuple(rows.shape)}; build it at this model's site"
            )
        basis = _orthonormal_rows(rows)
        return ProjectOut(
            model=model, direction=basis[0], site=site_, positions=positions, basis=basis
        )
    vec = resolve_direction(direction, d_model=d_model, normalize=True)
    return ProjectOut(model=model, direction=vec, site=site_, positions=positions)


# ------------------------------------------------------------------------------------------------
# ablate
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Ablate(Intervention):
    """Set chosen SAE latents to targets, keeping everything else; build it with :func:`ablate`.

    Example:
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=32)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> ablate(tiny_hooked_transformer(), StandardSAE(cfg), [1, 2])
        Ablate(latents=(1, 2), mode='zero', site=Site.resid_post(0), positions='all')
    """

    model: Any = field(repr=False)
    sae: Any = field(repr=False)
    latents: tuple[int, ...]
    mode: Literal["zero", "mean", "clamp"]
    targets: Float[Tensor, " k"] = field(repr=False)
    site: Site
    positions: PositionSpec = "all"
    _entries: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _check_model(self, model: Any) -> None:
        super()._check_model(model)
        if sae_d_in(self.sae) != _d_model(model):
            raise InterventionError(
                f"the SAE reads {sae_d_in(self.sae)}-dimensional activations but the model's d_model "
                f"is {_d_model(model)}; use an SAE trained on this model."
            )

    def _attach(self, model: Any) -> Callable[[], None] | None:
        if not self.latents:
            return None
        # the entry _hooks_for just bound its hook to (apply calls the two back to back)
        entry = self._entries.pop("building")
        active = _ACTIVE_ABLATIONS.setdefault(model, [])
        active.append(entry)

        def detach() -> None:
            if entry in active:
                active.remove(entry)

        return detach

    def _hooks_for(self, model: Any, tracker: _PositionTracker | None) -> list:
        site = _site_of(model, self.site)
        if not self.latents:
            return []  # ablating nothing: no hook at all, so the model is bit-identical
        sae, spec = self.sae, self.positions
        w = sae.W_dec
        all_idx = torch.tensor(self.latents, device=w.device)
        all_targets = self.targets.to(device=w.device, dtype=w.dtype)
        norm = getattr(getattr(sae, "cfg", None), "normalize_activations", "none")
        linear = norm in (None, "none")
        entry = self._entries["building"] = _AblationEntry(self, site)

        def hook(x: Tensor, hook: Any) -> Tensor:
            # A latent that an ablation applied earlier (and still active) already set to the same
            # target is left alone: ablating it again from the edited stream would move it again.
            idx, targets = all_idx, all_targets
            done = _already_ablated(model, entry, site)
            if done:
                keep = [
                    j
                    for j, (lat, t) in enumerate(
                        zip(self.latents, self.targets.tolist(), strict=True)
                    )
                    if done.get(lat) != t
                ]
                if not keep:
                    return x
                idx, targets = all_idx[keep], all_targets[keep]
            xs = x.to(device=w.device, dtype=w.dtype)
            feats = sae.encode(xs)
            current = feats[..., idx]
            if linear:
                delta = (targets - current) @ w[idx]
            else:  # let the SAE undo its own input scaling: difference of two decodes
                edited = feats.clone()
                edited[..., idx] = targets.expand_as(current)
                delta = sae.decode(edited) - sae.decode(feats)
            mask = _position_mask(spec, x, tracker)
            if mask is not None:
                delta = delta * mask.to(device=delta.device, dtype=delta.dtype).unsqueeze(-1)
            return x + delta.to(device=x.device, dtype=x.dtype)

        return [(site.hook_name, hook)]


class _AblationEntry:
    """An applied ablation, in application order: which latents of which SAE, set to what."""

    __slots__ = ("ablation", "site", "targets")

    def __init__(self, ablation: Ablate, site: Site) -> None:
        self.ablation, self.site = ablation, site
        self.targets = dict(zip(ablation.latents, ablation.targets.tolist(), strict=True))


_ACTIVE_ABLATIONS: weakref.WeakKeyDictionary[Any, list[_AblationEntry]] = (
    weakref.WeakKeyDictionary()
)


def _already_ablated(model: Any, mine: _AblationEntry | None, site: Site) -> dict[int, float]:
    """Latents (with targets) that ablations applied before ``mine`` set at ``site`` with its SAE.

    Only ablations with the same positions count: their hook edited exactly the tokens ours would.
    """
    active = _ACTIVE_ABLATIONS.get(model)
    if not active or mine is None or mine not in active:
        return {}
    out: dict[int, float] = {}
    for entry in active[: active.index(mine)]:
        a = entry.ablation
        if (
            entry.site == site
            and a.sae is mine.ablation.sae
            and a.positions == mine.ablation.positions
        ):
            out.update(entry.targets)
    return out


def _latent_list(latents: Any, d_sae: int) -> tuple[int, ...]:
    if isinstance(latents, bool):
        raise InterventionError("latents must be integer indices, got a bool")
    if isinstance(latents, int):
        latents = [latents]
    idx = torch.as_tensor(list(latents) if not isinstance(latents, Tensor) else latents)
    if idx.numel() and (idx.is_floating_point() or idx.dtype == torch.bool):
        raise InterventionError(f"latents must be integer indices, got {idx.tolist()}")
    out = [int(i) for i in idx.reshape(-1).tolist()]
    bad = [i for i in out if not 0 <= i < d_sae]
    if bad:
        raise InterventionError(
            f"latent(s) {bad} out of range: the SAE has {d_sae} latents (0..{d_sae - 1}); use indices "
            "of this SAE."
        )
    if len(set(out)) != len(out):
        raise InterventionError(f"latents {out} repeat an index; list each latent once")
    return tuple(out)


def _means_from(means: Any, latents: tuple[int, ...], d_sae: int) -> Tensor:
    source = means
    for attr in ("mean_base", "base_mean", "base_means"):  # LatentDiff.mean_base first
        if hasattr(means, attr):
            source = getattr(means, attr)
            break
    t = torch.as_tensor(source).detach().float().reshape(-1)
    if t.numel() == d_sae:
        t = t[list(latents)]
    elif t.numel() != len(latents):
        raise InterventionError(
            f"means has {t.numel()} entries; give one per SAE latent ({d_sae}) or one per ablated "
            f"latent ({len(latents)}), or a LatentDiff (its base means are used)."
        )
    if not bool(torch.isfinite(t).all()):
        raise InterventionError("means contain NaN or inf; check how they were computed")
    return t


def ablate(
    model: Any,
    sae: Any,
    latents: int | Sequence[int] | Tensor | None = None,
    *,
    mode: Literal["zero", "mean", "clamp"] = "zero",
    value: float | Sequence[float] | None = None,
    means: Any = None,
    calibration_prompts: Sequence[Any] | None = None,
    site: Site | str | None = None,
    positions: PositionSpec = "all",
) -> Ablate:
    """Change only the chosen SAE latents' contribution at the SAE's site, keeping the SAE's error.

    ``x ← x + Σ_i (target_i − f_i(x)) · d_i`` with ``f`` the SAE's encoding of ``x`` and ``d_i`` its
    decoder rows, so whatever the SAE does not reconstruct stays in place and ablating no latents
    leaves the model bit-identical. ``mode="zero"`` targets 0; ``mode="mean"`` targets the latents'
    mean activation, from ``means`` (a ``d_sae`` vector, one value per latent, or a ``LatentDiff``
    whose base means are used) or measured now on ``calibration_prompts``; ``mode="clamp"`` targets
    ``value`` (one number or one per latent; large values steer positively).

    ``sae`` may be a :class:`~modeldiff.latent_sets.LatentSet` instead (``ablate(model, s)``): its
    SAE, latents and site are used.

    Example:
        >>> import torch
        >>> from sae_lens import StandardSAE, StandardSAEConfig
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> cfg = StandardSAEConfig(d_in=64, d_sae=128)
        >>> cfg.metadata.hook_name = "blocks.0.hook_resid_post"
        >>> sae = StandardSAE(cfg)
        >>> toks = torch.tensor([[5, 6, 7]])
        >>> plain = m(toks)
        >>> with ablate(m, sae, []):
        ...     same = torch.equal(m(toks), plain)
        >>> with ablate(m, sae, [3, 4], mode="clamp", value=5.0):
        ...     changed = not torch.equal(m(toks), plain)
        >>> same, changed
        (True, True)
    """
    from .latent_sets import LatentSet

    if isinstance(sae, LatentSet):
        if latents is not None:
            raise InterventionError(
                "pass either a LatentSet or an SAE with latents, not both: ablate(model, latent_set)"
            )
        if site is None:
            site = sae.site
        sae, latents = sae.sae, list(sae.latents)
    elif latents is None:
        raise InterventionError(
            "which latents? pass ablate(model, sae, [latents]) or ablate(model, LatentSet(...))"
        )
    d_model, d_in, d_sae = _d_model(model), sae_d_in(sae), sae_d_sae(sae)
    broken = nonfinite_parameters(sae)
    if broken:
        raise InterventionError(
            f"the SAE's weights are not finite ({', '.join(broken)} hold NaN/inf), so ablating "
            "through it would write NaN into the model. Re-train or re-load the SAE."
        )
    if d_in != d_model:
        raise InterventionError(
            f"the SAE reads {d_in}-dimensional activations but the model's d_model is {d_model}; use "
            "an SAE trained on this model (and at this site)."
        )
    if site is None:
        try:
            site = Site.from_sae(sae)
        except SiteError as err:
            raise InterventionError(str(err)) from None
    site_ = _site_of(model, site)
    idx = _latent_list(latents, d_sae)
    positions = _check_positions(positions)
    if mode == "zero":
        targets = torch.zeros(len(idx))
    elif mode == "clamp":
        if value is None:
            raise InterventionError("mode='clamp' needs value=<number> (or one number per latent)")
        vals = torch.as_tensor(value, dtype=torch.float32).reshape(-1)
        if vals.numel() == 1:
            vals = vals.expand(len(idx)).clone()
        if vals.numel() != len(idx):
            raise InterventionError(
                f"value has {vals.numel()} entries for {len(idx)} latents; give one number or one per latent"
            )
        for v in vals.tolist():
            _check_coefficient(v, "value")
        targets = vals
    elif mode == "mean":
        if means is not None:
            targets = _means_from(means, idx, d_sae)
        elif calibration_prompts is not None:
            targets = _calibrated_means(model, sae, site_, idx, calibration_prompts)
        else:
            raise InterventionError(
                "mode='mean' needs the latents' mean activations: pass means=<LatentDiff or d_sae "
                "vector> or calibration_prompts=[...]"
            )
    else:
        raise InterventionError(f"unknown mode {mode!r}; use 'zero', 'mean' or 'clamp'")
    return Ablate(
        model=model,
        sae=sae,
        latents=idx,
        mode=mode,
        targets=targets.float(),
        site=site_,
        positions=positions,
    )


def _calibrated_means(
    model: Any, sae: Any, site: Site, latents: tuple[int, ...], prompts: Sequence[Any]
) -> Tensor:
    total = torch.zeros(len(latents), dtype=torch.float64)
    count = 0
    w = sae.W_dec
    with torch.no_grad():
        for acts in _site_activations(model, prompts, site):
            feats = sae.encode(acts.to(device=w.device, dtype=w.dtype))[:, list(latents)]
            total += feats.double().sum(0).cpu()
            count += feats.shape[0]
    if count == 0:
        raise InterventionError("the calibration prompts produced no tokens; pass longer prompts")
    return (total / count).float()


# ------------------------------------------------------------------------------------------------
# composing
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Composed(Intervention):
    """Several interventions applied together, in order, and removed together in reverse order.

    Build it with :func:`compose` or ``a + b``.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> a = steer(m, torch.ones(64), site="resid_post:0", coefficient=1.0)
        >>> len((a + a + a).parts)
        3
    """

    parts: tuple[Intervention, ...]

    @property
    def model(self) -> Any:  # type: ignore[override]
        return self.parts[0].model

    def _needs_positions(self) -> bool:
        return False

    def apply(self, model: Any | None = None) -> InterventionHandle:
        handles: list[InterventionHandle] = []
        try:
            for part in self.parts:
                handles.append(part.apply(model))
        except BaseException:
            for h in reversed(handles):
                h.remove()
            raise

        def undo() -> None:
            errors = []
            for h in reversed(handles):
                try:
                    h.remove()
                except BaseException as err:  # pragma: no cover - defensive
                    errors.append(err)
            if errors:  # pragma: no cover
                raise errors[0]

        return InterventionHandle(undo, repr(self))

    def __repr__(self) -> str:
        return "compose(" + ", ".join(repr(p) for p in self.parts) + ")"


def compose(*interventions: Intervention) -> Composed:
    """Apply several interventions as one (same or different sites); removed in reverse order.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> both = compose(
        ...     steer(m, torch.ones(64), site="blocks.0.hook_resid_post", coefficient=1.0),
        ...     project_out(m, torch.ones(64), site="blocks.1.hook_resid_pre"),
        ... )
        >>> with both:
        ...     n = len(m.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
        >>> n, len(m.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
        (1, 0)
    """
    flat: list[Intervention] = []
    for iv in interventions:
        if isinstance(iv, Composed):
            flat.extend(iv.parts)
        elif isinstance(iv, Intervention):
            flat.append(iv)
        else:
            raise InterventionError(
                f"compose() takes interventions (steer/ablate/project_out), got {type(iv).__name__}"
            )
    if not flat:
        raise InterventionError("compose() needs at least one intervention")
    return Composed(tuple(flat))


# ------------------------------------------------------------------------------------------------
# dose-response sweeps
# ------------------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """One record per coefficient: ``{"coefficient": c, <score name>: value, ...}``.

    ``plot(metric)`` draws the dose-response curve with plotly; in a notebook the result shows
    as a table, one row per coefficient.

    Example:
        >>> res = SweepResult([{"coefficient": 0.0, "score": 1.0}, {"coefficient": 1.0, "score": 3.0}])
        >>> res.metrics, res.column("score"), len(res.plot().data)
        (['score'], [1.0, 3.0], 1)
    """

    records: list[dict[str, float]]

    @property
    def metrics(self) -> list[str]:
        """The score names (every key but ``coefficient``)."""
        names: list[str] = []
        for r in self.records:
            names.extend(k for k in r if k != "coefficient" and k not in names)
        return names

    def column(self, name: str) -> list[float]:
        """All values of one column, in coefficient order."""
        return [r.get(name, float("nan")) for r in self.records]

    def plot(self, metric: str | None = None, *, title: str | None = None) -> Any:
        """A plotly line chart of ``metric`` (default: every score) against the coefficient."""
        import plotly.graph_objects as go

        from .views import as_figure

        names = [metric] if metric is not None else self.metrics
        fig = go.Figure()
        xs = self.column("coefficient")
        for name in names:
            fig.add_trace(go.Scatter(x=xs, y=self.column(name), mode="lines+markers", name=name))
        fig.update_layout(
            title=title or f"Dose-response: {', '.join(names)} against the coefficient",
            xaxis_title="coefficient",
            yaxis_title=names[0] if len(names) == 1 else "score",
            template="plotly_white",
        )
        return as_figure(fig)

    def _repr_html_(self) -> str:
        from .views import sweep_html

        return sweep_html(self)


def sweep(
    model: Any,
    intervention_factory: Callable[[float], Intervention],
    coefficients: Sequence[float],
    score_fn: Callable[[Any], float | dict[str, float]],
    *,
    progress: bool = True,
) -> SweepResult:
    """Score ``model`` under ``intervention_factory(c)`` for each coefficient ``c``.

    ``score_fn(model)`` is any callable returning a number (recorded as ``score``) or a dict of named
    numbers: a misalignment eval, a logit difference. Each intervention is removed before the next.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> toks = torch.tensor([[5, 6, 7]])
        >>> res = sweep(
        ...     m,
        ...     lambda c: steer(m, torch.randn(64), site="blocks.1.hook_resid_pre", coefficient=c),
        ...     [0.0, 1.0, 2.0],
        ...     lambda model: model(toks)[0, -1, 0].item(),
        ...     progress=False,
        ... )
        >>> [r["coefficient"] for r in res.records], res.metrics
        ([0.0, 1.0, 2.0], ['score'])
    """
    from tqdm.auto import tqdm

    records: list[dict[str, float]] = []
    # every coefficient is checked before the first one runs: no half-finished sweep to discard
    checked = [_check_coefficient(c) for c in coefficients]
    if not checked:
        raise InterventionError("coefficients is empty; pass e.g. [0, 2, 4, 8]")
    for coefficient in tqdm(checked, desc="sweep", disable=not progress):
        iv = intervention_factory(coefficient)
        if not isinstance(iv, Intervention):
            raise InterventionError(
                "intervention_factory must return an intervention (e.g. lambda c: steer(model, d, "
                f"site=s, coefficient=c)), got {type(iv).__name__}"
            )
        with iv.apply(model):
            score = score_fn(model)
        row: dict[str, float] = {"coefficient": coefficient}
        if isinstance(score, dict):
            row.update({str(k): float(v) for k, v in score.items()})
        else:
            row["score"] = float(score)
        records.append(row)
    return SweepResult(records)
