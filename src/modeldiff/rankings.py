"""Rankings: how a :class:`~modeldiff.diff.LatentDiff` orders latents, one registered function each.

A ranking is ``fn(stats, sae) -> scores``: ``stats`` is the ``(base, fine-tuned)`` pair of
:class:`~modeldiff.stats.SiteStats`, ``sae`` the SAE (or ``None``), and ``scores`` one float per
latent, larger = moved up more in the fine-tune. Every registered ranking becomes a column of each
diff computed afterwards, and ``LatentDiff.ranked_by(name)`` sorts by it; a diff that kept its
statistics computes a ranking registered after it was made on demand. A new ranking is one
function:

Example:
    >>> import torch
    >>> @register_ranking("delta_max")
    ... def delta_max(stats, sae):
    ...     base, tuned = stats
    ...     return tuned.latents.max - base.latents.max
    >>> "delta_max" in RANKINGS
    True
    >>> unregister_ranking("delta_max")
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from .errors import ArgumentError

__all__ = ["RANKINGS", "RankingFn", "compute_ranking", "register_ranking", "unregister_ranking"]

RankingFn = Callable[[tuple[Any, Any], Any], Float[Tensor, " d_sae"]]

#: The registered rankings by name (built-ins first). Read it; change it with register_ranking.
RANKINGS: dict[str, RankingFn] = {}
_BUILTIN: set[str] = set()


def register_ranking(name: str, fn: RankingFn | None = None, *, overwrite: bool = False) -> Any:
    """Register ``fn(stats, sae) -> scores`` as ranking ``name`` (also usable as a decorator).

    Example:
        >>> def fires_more(stats, sae):  # firing count fine-tuned − base
        ...     return (stats[1].latents.fire - stats[0].latents.fire).double()
        >>> register_ranking("fires_more", fires_more) is fires_more
        True
        >>> register_ranking("delta", fires_more)
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: a ranking 'delta' is registered already; pass overwrite=True to replace it (it is a built-in)
        >>> unregister_ranking("fires_more")
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ArgumentError(
            f"a ranking name must be an identifier such as 'delta_max', got {name!r}"
        )

    def add(f: RankingFn) -> RankingFn:
        if not callable(f):
            raise ArgumentError(f"ranking {name!r} must be a function fn(stats, sae), got {f!r}")
        if name in RANKINGS and not overwrite:
            raise ArgumentError(
                f"a ranking {name!r} is registered already; pass overwrite=True to replace it"
                + (" (it is a built-in)" if name in _BUILTIN else "")
            )
        RANKINGS[name] = f
        return f

    return add if fn is None else add(fn)


def unregister_ranking(name: str) -> None:
    """Remove a ranking added with :func:`register_ranking` (built-ins stay).

    Example:
        >>> _ = register_ranking("zeros", lambda stats, sae: torch.zeros(stats[0].latents.d_sae))
        >>> unregister_ranking("zeros")
        >>> "zeros" in RANKINGS
        False
        >>> unregister_ranking("delta")
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: 'delta' is a built-in ranking and cannot be removed
    """
    if name in _BUILTIN:
        raise ArgumentError(f"{name!r} is a built-in ranking and cannot be removed")
    RANKINGS.pop(name, None)


def compute_ranking(name: str, stats: tuple[Any, Any], sae: Any) -> Float[Tensor, " d_sae"]:
    """The scores of ranking ``name``, checked: one float64 per latent.

    Example:
        >>> from modeldiff.stats import SiteStats
        >>> base, tuned = SiteStats(d_sae=3, d_model=2), SiteStats(d_sae=3, d_model=2)
        >>> where = dict(prompt_index=torch.tensor([0]), position=torch.tensor([0]))
        >>> base.update(torch.tensor([[0.0, 1.0, 0.0]]), torch.zeros(1, 2), **where)
        >>> tuned.update(torch.tensor([[2.0, 1.0, 0.0]]), torch.zeros(1, 2), **where)
        >>> compute_ranking("delta", (base, tuned), sae=None)
        tensor([2., 0., 0.], dtype=torch.float64)
    """
    if name not in RANKINGS:
        raise ArgumentError(f"unknown ranking {name!r}; choose one of {', '.join(RANKINGS)}")
    scores = torch.as_tensor(RANKINGS[name](stats, sae)).detach().to("cpu", torch.float64)
    d_sae = stats[0].latents.d_sae
    if scores.shape != (d_sae,):
        raise ArgumentError(
            f"ranking {name!r} returned shape {tuple(scores.shape)}; it must give one score per "
            f"latent, shape ({d_sae},)"
        )
    return scores


def _builtin(name: str) -> Callable[[RankingFn], RankingFn]:
    def add(fn: RankingFn) -> RankingFn:
        RANKINGS[name] = fn
        _BUILTIN.add(name)
        return fn

    return add


@_builtin("delta")
def delta(stats: tuple[Any, Any], sae: Any) -> Tensor:
    """Mean activation fine-tuned − base (the paper's ranking)."""
    lb, lf = stats[0].latents, stats[1].latents
    return lf.sum / lf.count - lb.sum / lb.count


@_builtin("delta_freq")
def delta_freq(stats: tuple[Any, Any], sae: Any) -> Tensor:
    """Firing frequency fine-tuned − base."""
    return stats[1].latents.freq - stats[0].latents.freq


@_builtin("effect_size")
def effect_size(stats: tuple[Any, Any], sae: Any) -> Tensor:
    """Δ mean over the pooled standard deviation (±inf when a latent is constant but moved)."""
    lb, lf = stats[0].latents, stats[1].latents
    d = delta(stats, sae)
    sd = ((lb.var + lf.var) / 2).sqrt()
    out = torch.where(sd > 0, d / sd.clamp_min(1e-300), torch.sign(d) * math.inf)
    return torch.where(d == 0, 0.0, out.nan_to_num(nan=0.0))


@_builtin("relative_change")
def relative_change(stats: tuple[Any, Any], sae: Any) -> Tensor:
    """Δ mean over the base mean's magnitude (±inf from a zero base)."""
    d = delta(stats, sae)
    mb = stats[0].latents.mean
    out = torch.where(mb != 0, d / mb.abs().clamp_min(1e-300), torch.sign(d) * math.inf)
    return torch.where(d == 0, 0.0, out)


@_builtin("cosine")
def cosine(stats: tuple[Any, Any], sae: Any) -> Tensor:
    """Cosine of each decoder row with the mean residual shift (Arditi & Chen); NaN without SAE."""
    d_sae = stats[0].latents.d_sae
    if sae is None:
        return torch.full((d_sae,), math.nan, dtype=torch.float64)
    shift = stats[1].resid.mean - stats[0].resid.mean
    w = sae.W_dec.detach().to("cpu", torch.float64)
    norm = shift.norm()
    if norm == 0:
        return torch.zeros(d_sae, dtype=torch.float64)
    return (w @ shift) / (w.norm(dim=1).clamp_min(1e-300) * norm)
