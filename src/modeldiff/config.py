"""Small typed option groups accepted beside the flat keywords of the main functions.

``diff_latents(base, tuned, sae, prompts, tokens=TokenSelection(positions="user"),
uncertainty=Uncertainty(n_bootstrap=200))`` is the same call as spelling the options out one by
one; a group keeps the settings of an experiment in one value that can be reused and printed.

Example:
    >>> TokenSelection(positions="user").positions
    'user'
    >>> Uncertainty(latents=50).latents
    50
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal, Union

from .errors import ArgumentError

__all__ = ["TokenSelection", "Uncertainty", "unpack"]

PositionName = Literal["all", "prompt", "response", "last_prompt", "user", "assistant"]
TestName = Literal["permutation", "t"]


@dataclass(frozen=True)
class TokenSelection:
    """Which tokens a diff reads: see :func:`~modeldiff.diff_latents` for each field.

    Example:
        >>> TokenSelection(positions="user", include_bos=True)
        TokenSelection(positions='user', include_bos=True, outlier_factor=10.0, prepend_bos=None, truncate=False)
    """

    positions: Union[PositionName, Any] = "prompt"
    include_bos: bool = False
    outlier_factor: float | None = 10.0
    prepend_bos: bool | None = None
    truncate: bool = False


@dataclass(frozen=True)
class Uncertainty:
    """Prompt-level intervals and tests: ``latents`` is ``"all"``, a top/bottom ``k``, or None.

    Example:
        >>> u = Uncertainty(latents=50, n_bootstrap=200)
        >>> u.latents, u.test, u.n_bootstrap, u.confidence
        (50, 'permutation', 200, 0.95)
    """

    latents: Union[Literal["all"], int, None] = "all"
    test: TestName = "permutation"
    n_bootstrap: int = 1000
    n_permutations: int = 10_000
    confidence: float = 0.95
    seed: int = 0


def unpack(
    group: Any, cls: type, given: dict[str, Any], rename: dict[str, str] | None = None
) -> dict[str, Any]:
    """The flat keywords ``group`` (an instance of ``cls``) stands for, merged with ``given``.

    A flat keyword that differs from its default alongside a group that sets it too is refused:
    one call must not say two things.

    Example:
        >>> unpack(TokenSelection(positions="user"), TokenSelection, {"positions": "prompt"})
        {'positions': 'user', 'include_bos': False, 'outlier_factor': 10.0, 'prepend_bos': None, 'truncate': False}
        >>> unpack(None, TokenSelection, {"positions": "prompt"})  # no group: the keywords as given
        {'positions': 'prompt'}
        >>> unpack(TokenSelection(positions="user"), TokenSelection, {"positions": "all"})
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: positions='all' and TokenSelection(positions='user') disagree; set it in one place
    """
    if group is None:
        return given
    if not isinstance(group, cls):
        raise ArgumentError(f"expected a {cls.__name__}, got {type(group).__name__}")
    rename = rename or {}
    out = dict(given)
    for f in fields(cls):
        key = rename.get(f.name, f.name)
        if key in given and given[key] != f.default and given[key] != getattr(group, f.name):
            raise ArgumentError(
                f"{key}={given[key]!r} and {cls.__name__}({f.name}={getattr(group, f.name)!r}) "
                "disagree; set it in one place"
            )
        out[key] = getattr(group, f.name)
    return out
