"""Adding and removing forward hooks, and putting a model in eval mode for a call.

Every hook modeldiff adds goes through a model adapter (:mod:`modeldiff.adapters`), which returns a
:class:`HookHandle` remembering exactly the hook it registered. Removing the handle removes that hook
and no other, so hooks a user registered before or after ours are never touched. On TransformerLens
models :func:`add_hook` registers through ``HookPoint.add_hook`` (so a TransformerBridge's hook
conversions still apply) and keeps TransformerLens' own bookkeeping in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

from .errors import NotFoundError

__all__ = [
    "HookHandle",
    "Hooks",
    "StopForward",
    "add_hook",
    "add_lens_hook",
    "eval_mode",
    "restore_training",
    "hook_point",
    "run_until",
    "torch_handles",
]

HookFn = Callable[..., "Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; :func:`run_until` swallows it."""


def _all_modules(model: Any) -> list[Any]:
    # A TransformerBridge keeps the model it wraps outside its registered submodules (its own
    # train() propagates to it), so that model's modules are listed too.
    found = list(model.modules())
    wrapped = getattr(model, "__dict__", {}).get("original_model")
    if wrapped is not None and hasattr(wrapped, "modules"):
        seen = {id(m) for m in found}
        found += [m for m in wrapped.modules() if id(m) not in seen]
    return found


def eval_mode(model: Any) -> tuple[Any, list[tuple[Any, bool]]]:
    """Put ``model`` in eval mode for a call; :func:`restore_training` gives every submodule its
    own mode back.

    A model already in eval mode (the usual case) costs one pass over its modules instead of two
    recursive ``train()`` walks that set an attribute on each (measured: ~6 ms per walk on a
    12-layer TransformerLens model, run per batch and per model in a diff). Otherwise the model's
    own ``eval()`` runs (overrides included), and afterwards a model that was wholly training gets
    its own ``train()`` back, while a model in mixed modes gets each submodule's flag back exactly
    (``model.train(was_training)`` would set every part alike).

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
        >>> m[0].eval()  # mixed modes
        Linear(in_features=2, out_features=2, bias=True)
        >>> state = eval_mode(m)
        >>> m.training, m[1].training
        (False, False)
        >>> restore_training(state)
        >>> m.training, m[0].training, m[1].training
        (True, False, True)
    """
    if not hasattr(model, "modules"):
        return model, []
    modes = [(m, m.training) for m in _all_modules(model)]
    if any(was for _, was in modes):
        model.eval()
        return model, modes
    return model, []


def restore_training(state: tuple[Any, list[tuple[Any, bool]]]) -> None:
    """Give back the modes :func:`eval_mode` found."""
    model, modes = state
    if not modes:
        return
    if all(was for _, was in modes):
        model.train(True)
        return
    for m, was in modes:
        m.training = was


def hook_point(model: Any, name: str) -> Any:
    """The ``HookPoint`` called ``name`` on ``model``, or a ``KeyError`` listing close names.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> hook_point(tiny_hooked_transformer(), "blocks.0.hook_resid_post").name
        'blocks.0.hook_resid_post'
    """
    points = getattr(model, "hook_dict", None)
    if points is None:
        raise NotFoundError(
            f"hook point {name!r}: this {type(model).__name__} is not a TransformerLens model and "
            "has no named hook points; hook a Site instead (e.g. Site.resid_post(3))."
        )
    if name in points:
        return points[name]
    stem = name.rsplit(".", 1)[-1]
    near = [n for n in points if n.endswith(stem)][:8]
    hint = f" Similar names: {', '.join(near)}." if near else ""
    raise NotFoundError(f"the model has no hook point {name!r}.{hint}")


class HookHandle:
    """One forward hook we added. ``remove()`` takes off exactly that hook; calling it twice is fine.

    Example:
        >>> removed = []
        >>> h = HookHandle(lambda: removed.append("hook"))
        >>> h.active
        True
        >>> h.remove(); h.remove()
        >>> h.active, removed
        (False, ['hook'])
        >>> with HookHandle(lambda: removed.append("again")):
        ...     pass
        >>> removed
        ['hook', 'again']
    """

    __slots__ = ("_undo",)

    def __init__(self, undo: Callable[[], None]) -> None:
        self._undo: Callable[[], None] | None = undo

    @property
    def active(self) -> bool:
        return self._undo is not None

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def torch_handles(*handles: Any) -> HookHandle:
    """One :class:`HookHandle` removing the given ``torch.utils.hooks.RemovableHandle`` objects."""

    def undo() -> None:
        for h in handles:
            h.remove()

    return HookHandle(undo)


def add_lens_hook(model: Any, name: str, fn: HookFn, *, prepend: bool = False) -> HookHandle:
    """Register ``fn(activation, hook) -> activation | None`` at TransformerLens hook point ``name``.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> seen = []
        >>> h = add_lens_hook(m, "blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape))
        >>> _ = m(torch.tensor([[1, 5, 6]]))
        >>> h.remove(); seen
        [torch.Size([1, 3, 64])]
    """
    point = hook_point(model, name)
    before = list(point.fwd_hooks)
    point.add_hook(fn, dir="fwd", prepend=prepend)
    ours = [h for h in point.fwd_hooks if all(h is not b for b in before)]
    if len(ours) != 1:  # pragma: no cover - would mean TransformerLens changed add_hook
        raise RuntimeError(f"could not identify the hook just added at {name!r}")
    lens_handle = ours[0]

    def undo() -> None:
        lens_handle.hook.remove()
        # Keep TransformerLens' own list in step, dropping only our entry (compared by identity).
        point.fwd_hooks = [h for h in point.fwd_hooks if h is not lens_handle]

    return HookHandle(undo)


def add_hook(model: Any, where: Any, fn: HookFn, *, prepend: bool = False) -> HookHandle:
    """Register ``fn(activation, hook) -> activation | None`` at ``where`` on any model.

    ``where`` is a :class:`~modeldiff.sites.Site` or site name (hooked through the model's adapter),
    or, on a TransformerLens model, any other hook-point name (``"hook_embed"``).

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> seen = []
        >>> h = add_hook(m, "resid_post:1", lambda x, hook: seen.append(x.shape))
        >>> _ = m(torch.tensor([[1, 5, 6]]))
        >>> h.remove(); seen
        [torch.Size([1, 3, 64])]
    """
    from .adapters import adapter_for
    from .sites import Site, SiteError

    try:
        site = Site.parse(where)
    except SiteError:
        return add_lens_hook(model, str(where), fn, prepend=prepend)
    return adapter_for(model).add_hook(site, fn, prepend=prepend)


class Hooks:
    """A group of hooks removed together: on ``remove()``, or when the ``with`` block exits.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> with Hooks(m) as hooks:
        ...     _ = hooks.add("blocks.0.hook_resid_post", lambda x, hook: x * 0)
        ...     len(m.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
        1
        >>> len(m.hook_dict["blocks.0.hook_resid_post"].fwd_hooks)
        0
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self._handles: list[HookHandle] = []

    def add(self, where: Any, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        """Hook ``where`` (a site, or a TransformerLens hook-point name), see :func:`add_hook`."""
        handle = add_hook(self.model, where, fn, prepend=prepend)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        # Reverse order, and keep going if one removal fails, so none is left behind.
        errors: list[BaseException] = []
        while self._handles:
            try:
                self._handles.pop().remove()
            except BaseException as err:  # pragma: no cover - defensive
                errors.append(err)
        if errors:  # pragma: no cover
            raise errors[0]

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_until(
    model: Any,
    tokens: Tensor,
    *,
    hooks: list[tuple[Any, HookFn]],
    stop_at: Any | None,
    attention_mask: Tensor | None = None,
) -> Tensor | None:
    """Run the model over ``tokens`` with ``hooks``, ending early after site ``stop_at``.

    Returns the logits when the pass ran to the end, ``None`` when it was stopped. All hooks are
    removed on every exit path. The forward itself is the adapter's (:meth:`ModelAdapter.run`).
    """
    from .adapters import adapter_for
    from .sites import Site

    return adapter_for(model).run(
        tokens,
        attention_mask,
        hooks=[(Site.parse(w), fn) for w, fn in hooks],
        stop_at=None if stop_at is None else Site.parse(stop_at),
    )
