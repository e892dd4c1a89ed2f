"""One base class for every error modeldiff raises on purpose, so callers can catch them all.

Each specific error also derives from the built-in exception it has always been (``ValueError``,
``TypeError``, ...), so existing ``except ValueError`` code keeps working.

Example:
    >>> from modeldiff import Site
    >>> try:
    ...     Site.parse("nowhere")
    ... except ModeldiffError as err:
    ...     type(err).__name__, isinstance(err, ValueError)
    ('SiteError', True)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "FileFormatError",
    "MissingDependencyError",
    "MissingFileError",
    "ModeldiffError",
    "NotFoundError",
    "OutOfRangeError",
    "UnsupportedError",
    "damaged_file",
    "reading",
]


class ModeldiffError(Exception):
    """Base class of modeldiff's own errors; every message names the problem and the fix."""


class FileFormatError(ModeldiffError, ValueError):
    """A file that is damaged, cut short or of another kind than expected."""


class ArgumentError(ModeldiffError, ValueError):
    """An argument with a value that cannot work (the message says which and what would)."""


class ArgumentTypeError(ModeldiffError, TypeError):
    """An argument of a type that cannot work."""


class MissingFileError(ModeldiffError, FileNotFoundError):
    """A path that does not exist."""


class OutOfRangeError(ModeldiffError, IndexError):
    """An index (a rank, a latent) outside its range."""


class NotFoundError(ModeldiffError, KeyError):
    """A name (a column, a hook point) that does not exist."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


class UnsupportedError(ModeldiffError, NotImplementedError):
    """Something this model, wrapper or version cannot do; the message names what can."""


class MissingDependencyError(ModeldiffError, ImportError):
    """An optional package that a feature needs is not installed."""


def damaged_file(
    path: str | Path, expected: str, err: BaseException | None = None
) -> FileFormatError:
    """The error for a file that cannot be read as ``expected`` (e.g. "a LatentDiff file").

    Example:
        >>> str(damaged_file("x.safetensors", "a LatentDiff file", ValueError("header too large")))
        "'x.safetensors' cannot be read as a LatentDiff file (header too large): it is damaged, cut short or of another kind. Re-create it (save it again), or pass the right file."
    """
    why = f" ({_short(err)})" if err is not None else ""
    return FileFormatError(
        f"{str(path)!r} cannot be read as {expected}{why}: it is damaged, cut short or of another "
        "kind. Re-create it (save it again), or pass the right file."
    )


def _short(err: Any) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


@contextmanager
def reading(path: str | Path, expected: str) -> Iterator[None]:
    """Turn the raw errors of reading a damaged or wrong-kind file into one that names the file.

    Example:
        >>> import json
        >>> with reading("cfg.json", "an SAE config"):
        ...     json.loads("{cut")
        Traceback (most recent call last):
        ...
        modeldiff.errors.FileFormatError: 'cfg.json' cannot be read as an SAE config (Expecting property name enclosed in double quotes: line 1 column 2 (char 1)): it is damaged, cut short or of another kind. Re-create it (save it again), or pass the right file.
    """
    import json
    import struct

    from safetensors import SafetensorError

    try:
        yield
    except (
        SafetensorError,
        json.JSONDecodeError,
        UnicodeDecodeError,
        struct.error,
        EOFError,
    ) as err:
        raise damaged_file(path, expected, err) from err
    except (OSError, ValueError) as err:
        text = str(err)
        markers = ("not a valid JSON", "magic", "deserializ", "header", "unpack", "truncated")
        if isinstance(err, (FileNotFoundError, PermissionError)) or not any(
            m in text for m in markers
        ):
            raise
        raise damaged_file(path, expected, err) from err
