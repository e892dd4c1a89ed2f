"""Directions in activation space, from whatever a user has at hand.

Interventions take a *direction*: a plain vector, an ``(sae, latent)`` pair (that latent's decoder row)
or any object with an ``as_direction()`` method (a row of a ``LatentDiff`` has one). This module turns
each of those into one checked 1-D tensor, so the interventions never have to care where it came from.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import ModeldiffError
from .saes import sae_d_in, sae_d_sae

__all__ = ["DirectionError", "resolve_direction"]


class DirectionError(ModeldiffError, ValueError):
    """A direction that cannot be used: wrong size, not finite, or an unknown kind of object.

    Example:
        >>> try:
        ...     resolve_direction([float("inf")], d_model=1)
        ... except DirectionError as err:
        ...     print(err)
        the direction contains NaN or inf entries; check how it was computed.
    """


def _is_sae_pair(obj: Any) -> bool:
    # any integer type names a latent: int, numpy.int64, a one-element integer tensor, ...
    return (
        isinstance(obj, tuple)
        and len(obj) == 2
        and hasattr(obj[0], "W_dec")
        and not isinstance(obj[1], bool)
        and (isinstance(obj[1], (numbers.Integral, Tensor)) or _is_numpy_integer(obj[1]))
    )


def _is_numpy_integer(x: Any) -> bool:
    return (
        type(x).__module__ == "numpy"
        and getattr(x, "dtype", None) is not None
        and x.dtype.kind in "iu"
    )


def _latent_index(latent: Any, d_sae: int) -> int:
    if isinstance(latent, Tensor):
        if latent.numel() != 1 or latent.is_floating_point():
            raise DirectionError(f"a latent index must be one integer, got a tensor {latent!r}")
        latent = int(latent.item())
    latent = int(latent)
    if not 0 <= latent < d_sae:
        raise DirectionError(
            f"latent {latent} is out of range: the SAE has {d_sae} latents (0..{d_sae - 1}). "
            "Use an index from that SAE (e.g. a LatentDiff ranking of the same SAE)."
        )
    return int(latent)


def resolve_direction(
    obj: Any,
    *,
    d_model: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    normalize: bool = False,
) -> Float[Tensor, " d_model"]:
    """One checked direction vector of length ``d_model`` from a vector, an (sae, latent) or a diff row.

    ``obj`` is a 1-D tensor / numpy array / list of floats; an ``(sae, latent)`` pair, giving the
    latent's decoder row ``sae.W_dec[latent]``; or any object with ``as_direction() -> Tensor``. The
    result is detached, on ``device`` with ``dtype`` when given, and scaled to unit length when
    ``normalize`` is true.

    Example:
        >>> resolve_direction([3.0, 4.0], d_model=2, normalize=True)
        tensor([0.6000, 0.8000])
        >>> resolve_direction([1.0, 2.0, 3.0], d_model=2)
        Traceback (most recent call last):
        ...
        modeldiff.directions.DirectionError: the direction has 3 entries but the model's d_model is 2; build it at the same site of the same model (or pick the SAE trained on this model).
    """
    if _is_sae_pair(obj):
        sae, latent = obj
        d_in = sae_d_in(sae)
        if d_in != d_model:
            raise DirectionError(
                f"the SAE reads {d_in}-dimensional activations but the model's d_model is {d_model}; "
                "use an SAE trained on this model."
            )
        vec = sae.W_dec[_latent_index(latent, sae_d_sae(sae))]
    elif hasattr(obj, "as_direction") and callable(obj.as_direction):
        vec = obj.as_direction()
    elif isinstance(obj, (str, bytes)) or obj is None:
        raise DirectionError(
            f"cannot use {type(obj).__name__} as a direction; pass a 1-D tensor, an (sae, latent) pair "
            "or an object with as_direction()."
        )
    else:
        try:
            vec = torch.as_tensor(obj)
        except (TypeError, ValueError, RuntimeError) as err:
            raise DirectionError(
                f"cannot use {type(obj).__name__} as a direction ({err}); pass a 1-D tensor, an "
                "(sae, latent) pair or an object with as_direction()."
            ) from None
    vec = torch.as_tensor(vec).detach()
    if not vec.is_floating_point():
        vec = vec.to(torch.get_default_dtype())
    if vec.ndim != 1:
        raise DirectionError(
            f"a direction must be one vector, got shape {tuple(vec.shape)}; pick one row "
            "(e.g. directions[i]) or average them first."
        )
    if vec.shape[0] != d_model:
        raise DirectionError(
            f"the direction has {vec.shape[0]} entries but the model's d_model is {d_model}; build it "
            "at the same site of the same model (or pick the SAE trained on this model)."
        )
    if not bool(torch.isfinite(vec).all()):
        raise DirectionError(
            "the direction contains NaN or inf entries; check how it was computed."
        )
    if normalize:
        norm = float(vec.float().norm())
        if norm == 0.0 or not math.isfinite(norm):
            raise DirectionError("cannot normalise a zero direction; pass a non-zero vector.")
        vec = vec / norm
    return vec.to(device=device if device is not None else vec.device, dtype=dtype or vec.dtype)
