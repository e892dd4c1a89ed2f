"""Adding and removing forward hooks on TransformerLens hook points, and nothing else.

Every hook modeldiff adds goes through :func:`add_hook`, which registers it with
``HookPoint.add_hook`` (so a TransformerBridge's hook conversions still apply) and remembers the exact
``LensHandle`` it created. Removing a :class:`HookHandle` removes that handle and no other, so hooks a
user registered before or after ours are never touched, whatever ``reset_hooks`` bookkeeping says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor

__all__ = ["HookHandle", "Hooks", "StopForward", "add_hook", "hook_point", "run_until"]

HookFn = Callable[..., "Tensor | None"]


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; :func:`run_until` swallows it."""


def hook_point(model: Any, name: str) -> Any:
    """The ``HookPoint`` called ``name`` on ``model``, or a ``KeyError`` listing close names.

    Example:
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> hook_point(tiny_hooked_transformer(), "blocks.0.hook_resid_post").name
        'blocks.0.hook_resid_post'
    """
    points = model.hook_dict
    if name in points:
        return points[name]
    stem = name.rsplit(".", 1)[-1]
    near = [n for n in points if n.endswith(stem)][:8]
    hint = f" Similar names: {', '.join(near)}." if near else ""
    raise KeyError(f"the model has no hook point {name!r}.{hint}")


class HookHandle:
    """One forward hook we added. ``remove()`` takes off exactly that hook; calling it twice is fine."""

    __slots__ = ("_lens_handle", "_point")

    def __init__(self, point: Any, lens_handle: Any) -> None:
        self._point = point
        self._lens_handle = lens_handle

    @property
    def active(self) -> bool:
        return self._lens_handle is not None

    def remove(self) -> None:
        handle, self._lens_handle = self._lens_handle, None
        if handle is None:
            return
        handle.hook.remove()
        # Keep TransformerLens' own list in step, dropping only our entry (compared by identity).
        self._point.fwd_hooks = [h for h in self._point.fwd_hooks if h is not handle]

    def __enter__(self) -> HookHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def add_hook(model: Any, name: str, fn: HookFn, *, prepend: bool = False) -> HookHandle:
    """Register ``fn(activation, hook) -> activation | None`` at hook point ``name``.

    Example:
        >>> import torch
        >>> from modeldiff.testing import tiny_hooked_transformer
        >>> m = tiny_hooked_transformer()
        >>> seen = []
        >>> h = add_hook(m, "blocks.1.hook_resid_post", lambda x, hook: seen.append(x.shape))
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
    return HookHandle(point, ours[0])


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

    def add(self, name: str, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        handle = add_hook(self.model, name, fn, prepend=prepend)
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


def stop_after(name: str) -> tuple[str, HookFn]:
    """A (name, hook) pair that ends the forward pass once ``name`` has run."""

    def _stop(x: Tensor, hook: Any) -> None:
        raise StopForward

    return name, _stop


def run_until(
    model: Any,
    tokens: Tensor,
    *,
    hooks: list[tuple[str, HookFn]],
    stop_at: str | None,
    **forward_kwargs: Any,
) -> Tensor | None:
    """Run ``model(tokens, **forward_kwargs)`` with ``hooks``, ending early after hook ``stop_at``.

    Returns the logits when the pass ran to the end, ``None`` when it was stopped. All hooks are removed
    on every exit path.
    """
    with Hooks(model) as group:
        for name, fn in hooks:
            group.add(name, fn)
        if stop_at is not None:
            group.add(*stop_after(stop_at))
        try:
            return model(tokens, **forward_kwargs)
        except StopForward:
            return None
