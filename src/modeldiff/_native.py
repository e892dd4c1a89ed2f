"""Optional compiled kernels: C files shipped with the package, built on first use.

Three hot loops have no PyTorch operation that does their work in one read:

- ``_csrc/dense_stats.c``: the dense path of :class:`modeldiff.stats.LatentStats` costs about ten
  PyTorch passes over each block of latents (a float64 copy, sums, squares, firing flags, maxima and
  their rows); the kernel does all of it in one pass, 4-5x faster on a 2-core CPU.
- ``_csrc/sign_hits.c``: the sign-flip test of :mod:`modeldiff.uncertainty` counts, per latent,
  the random sign rows whose statistic reaches the observed one; PyTorch writes the whole
  ``[draws, latents]`` matrix of statistics and reads it back three times, the kernel keeps each
  statistic in a register.
- ``_csrc/boot_tails.c``: the bootstrap interval needs four order statistics of each latent's
  replicates; PyTorch writes and sorts them all, the kernel makes them in cache and selects.

The uncertainty kernels run on column ranges in parallel threads, for runs of up to 80 prompts
(:mod:`modeldiff.uncertainty` measured them faster there, PyTorch's blocked products beyond).

All three are compiled once per machine with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``) into one library in ``$MODELDIFF_CACHE/native`` (default
``~/.cache/modeldiff/native``), named by a hash of the sources, compiler and flags, and loaded with
:mod:`ctypes` (which releases the GIL during a call, so calls on different columns run in parallel
threads).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["Kernels", "kernel", "kernels", "native_status"]

_SOURCES = (
    Path(__file__).with_name("_csrc") / "dense_stats.c",
    Path(__file__).with_name("_csrc") / "sign_hits.c",
    Path(__file__).with_name("_csrc") / "boot_tails.c",
)
# target_clones: vector builds (AVX2, AVX2 with FMA, AVX-512) beside the baseline one, chosen when
# the library loads (so one cached file is safe on any x86-64 CPU); other platforms, or compilers
# without it, get the plain build.
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


def _build(cc: str, flags: list[str], sources: list[bytes], folder: Path) -> Path:
    tag = hashlib.sha256(
        b"\0".join([*sources, cc.encode(), " ".join(flags).encode(), platform.machine().encode()])
    ).hexdigest()[:16]
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    lib = folder / f"kernels-{tag}{suffix}"
    if lib.exists():
        return lib
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".kernels-{tag}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"
    try:
        subprocess.run(
            [cc, *flags, "-o", str(tmp), *(str(src) for src in _SOURCES)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(tmp, lib)  # atomic: a concurrent build of the same file is harmless
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return lib


@dataclass(frozen=True)
class Kernels:
    """The loaded library's functions, with their ctypes signatures set."""

    #: per-column statistics of a dense float32 block (see ``_csrc/dense_stats.c``)
    dense_stats: Any
    #: sign-flip hit counts (see ``_csrc/sign_hits.c``); None where only its slow baseline build
    #: would run on this CPU
    sign_hits: Any | None
    #: the order statistics of bootstrap replicates (see ``_csrc/boot_tails.c``)
    boot_tails: Any


@functools.lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The compiled kernels, or ``None`` (then every caller uses its PyTorch path).

    Built and loaded once per process; see the module docstring. ``MODELDIFF_NATIVE=0`` turns
    them off.

    Example:
        >>> k = kernels()
        >>> k is None or callable(k.dense_stats)
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
        sources = [src.read_bytes() for src in _SOURCES]
    except OSError as e:
        _why_not = f"kernel source missing: {e}"
        return None
    errors = []
    for flags in _FLAG_SETS:
        try:
            lib = ctypes.CDLL(str(_build(cc, flags, sources, cache_dir() / "native")))
            dense, sign, boot = lib.md_dense_stats, lib.md_sign_hits, lib.md_boot_tails
            vectorised = lib.md_sign_hits_vectorised
        except (OSError, subprocess.SubprocessError, AttributeError) as e:
            detail = getattr(e, "stderr", b"") or b""
            errors.append(f"{' '.join(flags)}: {e} {detail.decode(errors='replace')[-300:]}")
            continue
        p, i64 = ctypes.c_void_p, ctypes.c_int64
        dense.argtypes = [p, i64, p, p, i64, p, p, p, p, p]
        dense.restype = None
        sign.argtypes = [p, i64, i64, i64, p, i64, i64, i64, p, p, p, p]
        sign.restype = None
        f64 = ctypes.c_double
        boot.argtypes = [p, i64, i64, p, i64, p, i64, i64, i64, i64, f64, f64, p]
        boot.restype = i64
        vectorised.argtypes = []
        vectorised.restype = i64
        _why_not = ""
        return Kernels(dense_stats=dense, sign_hits=sign if vectorised() else None, boot_tails=boot)
    _why_not = "build failed: " + " | ".join(errors)
    return None


def kernel(name: Literal["dense_stats", "sign_hits", "boot_tails"]) -> Any | None:
    """The compiled function ``name`` (a field of :class:`Kernels`), or ``None``: then the caller
    uses its PyTorch path, which computes the same thing.

    Example:
        >>> fn = kernel("dense_stats")
        >>> fn is None or callable(fn)
        True
    """
    k = kernels()
    return None if k is None else getattr(k, name)


def native_status() -> dict[str, Any]:
    """Whether the compiled kernels are in use, and if not, why (for bug reports and docs).

    Example:
        >>> sorted(native_status())
        ['enabled', 'reason']
    """
    k = kernels()
    return {"enabled": k is not None, "reason": "" if k is not None else _why_not}
