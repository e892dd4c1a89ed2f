"""Atomic writes: a file appears complete at its final path, or not at all.

A save writes to a temporary file beside the target (named after the target and the writing
process), flushes it to disk (``fsync``), renames it onto the target and syncs the folder. Killed
half-way, it leaves at most that temporary file, which the next save to the same folder removes
once its writer is gone. Files get the permissions the process umask gives, like ``open()``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import ModeldiffError

__all__ = ["SaveError", "atomic_path", "write_json_atomic", "write_text_atomic"]

_TMP = re.compile(r"^\..+\.modeldiff-(\d+)-[0-9a-f]+\.tmp$")


class SaveError(ModeldiffError, OSError):
    """A save that cannot happen where it was asked to; the message names the path and the fix."""


def _umask() -> int:
    try:  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:  # pragma: no cover - other systems
        pass
    mask = os.umask(0o022)  # pragma: no cover
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def _check_parent(path: Path) -> None:
    for parent in [path.parent, *path.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise SaveError(
                    f"cannot save to {str(path)!r}: {str(parent)!r} is a file, not a folder. "
                    "Choose a path inside a folder (or remove that file)."
                )
            return


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files left in ``folder`` by saves whose process is gone; return them."""
    removed = []
    with suppress(OSError):
        for entry in folder.iterdir():
            m = _TMP.match(entry.name)
            if m and not _alive(int(m.group(1))):
                with suppress(OSError):
                    entry.unlink()
                    removed.append(entry)
    return removed


def _fsync_dir(folder: Path) -> None:
    with suppress(OSError):  # not every file system lets a folder be opened for syncing
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success sync and rename it onto ``path``.

    On an exception the temporary file is deleted and ``path`` is left as it was.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> target = Path(tempfile.mkdtemp()) / "out.txt"
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text(), oct(target.stat().st_mode & 0o777) != "0o600"
        ('done', True)
    """
    path = Path(path)
    _check_parent(path)
    if path.is_dir():
        raise SaveError(f"cannot save to {str(path)!r}: it is a folder; pass a file path.")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = path.parent / f".{path.name}.modeldiff-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # a writer may have replaced the file we created
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json_atomic(path: str | Path, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as strict JSON (no NaN/inf) to ``path`` atomically and return the path."""
    return write_text_atomic(path, json.dumps(obj, indent=indent, allow_nan=False))


def read_json(path: str | Path, what: str) -> Any:
    """Load a JSON file; a damaged or wrong-kind file raises one error naming it and ``what``.

    Example:
        >>> import tempfile
        >>> p = write_json_atomic(Path(tempfile.mkdtemp()) / "x.json", {"a": 1})
        >>> read_json(p, "a test file")
        {'a': 1}
    """
    from .errors import reading

    with reading(path, what), open(path, encoding="utf-8") as f:
        return json.load(f)
