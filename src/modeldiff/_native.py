"""Optional compiled kernels: a C file shipped with the package, built on first use.

PyTorch has no reduction that returns several statistics of a block in one read, so the dense path
of :class:`modeldiff.stats.LatentStats` costs about ten passes over each block of latents (a float64
copy, sums, squares, firing flags, maxima and their rows). ``_csrc/dense_stats.c`` does all of it in
one pass, 4-5x faster on a 2-core CPU. It is compiled once per machine with the system's C compiler
(``$CC``, else ``cc``, ``gcc`` or ``clang``) into ``$MODELDIFF_CACHE/native`` (default
``~/.cache/modeldiff/native``), named by a hash of the source, compiler and flags, and loaded with
:mod:`ctypes` (which releases the GIL during the call).

Everything degrades to PyTorch: no compiler, a failed build or ``MODELDIFF_NATIVE=0`` all give
``None`` here, and the callers' PyTorch paths compute the same statistics (tested against each
other). Nothing is left half-written: the library is built under a temporary name and renamed.

Example:
    >>> status = native_status()
    >>> status["enabled"] in (True, False) and isinstance(status["reason"], str)
    True
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["dense_stats_library", "native_status"]

_SOURCE = Path(__file__).with_name("_csrc") / "dense_stats.c"
# target_clones: an AVX2 build beside the baseline one, chosen when the library loads (so one cached
# file is safe on any x86-64 CPU); other platforms, or compilers without it, get the plain build.
_FLAG_SETS = (
    ["-O3", "-shared", "-fPIC", "-DMD_CLONES"],
    ["-O3", "-shared", "-fPIC"],
)
_why_not = "not loaded yet"


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _build(cc: str, flags: list[str], source: bytes, folder: Path) -> Path:
    tag = hashlib.sha256(
        b"\0".join([source, cc.encode(), " ".join(flags).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    lib = folder / f"dense_stats-{tag}{suffix}"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".dense_stats-{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        subprocess.run(
            [cc, *flags, "-o", str(tmp), str(_SOURCE)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, lib)  # atomic: a concurrent build of the same file is harmless
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return lib


@functools.lru_cache(maxsize=1)
def dense_stats_library() -> Any | None:
    """The compiled ``md_dense_stats`` function, or ``None`` (then use the PyTorch path).

    Built and loaded once per process; see the module docstring. ``MODELDIFF_NATIVE=0`` turns it
    off.

    Example:
        >>> fn = dense_stats_library()
        >>> fn is None or callable(fn)
        True
    """
    global _why_not
    if os.environ.get("MODELDIFF_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        _why_not = "turned off by MODELDIFF_NATIVE=0"
        return None
    cc = _compiler()
    if cc is None:
        _why_not = "no C compiler found ($CC, cc, gcc or clang)"
        return None
    from .organisms.build import cache_dir

    try:
        source = _SOURCE.read_bytes()
    except OSError as e:
        _why_not = f"kernel source missing: {e}"
        return None
    errors = []
    for flags in _FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(cc, flags, source, cache_dir() / "native")))
            fn = lib.md_dense_stats
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            detail = getattr(e, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {e} {detail.decode(errors='replace')[-300:]}")
            continue
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes = [p, i64, p, i64, p, p, p, p, p]
        fn.restype = None
        _why_not = ""
        return fn
    _why_not = "build failed: " + " | ".join(errors)
    return None


def native_status() -> dict[str, Any]:
    """Whether the compiled kernels are in use, and if not, why (for bug reports and docs).

    Example:
        >>> sorted(native_status())
        ['enabled', 'reason']
    """
    fn = dense_stats_library()
    return {"enabled": fn is not None, "reason": "" if fn is not None else _why_not}
