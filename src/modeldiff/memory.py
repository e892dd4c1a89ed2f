"""Keep a long streaming run's resident memory flat under glibc's allocator (opt-in).

``diff_latents`` holds O(d_sae + n_prompts·k) numbers whatever the number of tokens, but the
process's peak resident memory can still creep up, fastest over the first tens of batches. The cause
is glibc, not data: after the first large block is freed, glibc raises its *mmap threshold* to that
block's size, so later large tensors (activations, attention patterns, encoder outputs) come from
the heap, where a few small long-lived blocks allocated mid-batch (on GELU models mostly oneDNN's
per-shape GELU kernels) pin free space under them. On the memory benchmark the peak grew +5%
(benchmark model) to +11% (a small model with large per-batch activations) from 10k to 200k tokens
for that reason (medians of three runs; benchmarks/README.md).

:func:`limit_heap_growth` fixes the threshold, so every block at least that large is mapped on its
own and returned to the system when freed. It is process-wide and cannot be undone (glibc has no
way back to the dynamic threshold), and every large allocation then costs fresh, zeroed pages from
the kernel: on the benchmark models it takes 1.8-2.5x the time at the default 1 MiB threshold and
1.4x at 4 MiB. So modeldiff never calls it by itself: call it once at the start of a long run where
a flat memory ceiling matters more than speed, or set the same thing before Python starts with
``MALLOC_MMAP_THRESHOLD_=1048576``. On a C library other than
glibc (macOS, musl) it does nothing and returns ``False``.

Example (the first line of a long run's script or notebook)::

    from modeldiff.memory import limit_heap_growth
    limit_heap_growth()  # True on glibc: large blocks are now returned to the system when freed
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from .errors import ArgumentError

__all__ = ["limit_heap_growth"]

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_heap_growth(mmap_threshold_mb: float = 1.0) -> bool:
    """Map every allocation of at least ``mmap_threshold_mb`` MiB on its own (glibc only).

    Args:
        mmap_threshold_mb: the fixed threshold, between 4 KiB and 32 MiB (glibc's limits). On the
            small memory-benchmark model (10k -> 200k tokens) the peak grew 1.3-2.5% at 1 MiB,
            3.8-6.8% at 4 MiB, 5.6% at 8 MiB and 13% at 16 MiB (about 11% without the call);
            smaller thresholds cost more time.

    Returns:
        ``True`` if glibc accepted the setting, ``False`` on another C library.

    Raises:
        ValueError: a threshold outside glibc's range.

    Example:
        >>> limit_heap_growth(64)
        Traceback (most recent call last):
        ...
        modeldiff.errors.ArgumentError: mmap_threshold_mb=64 is outside glibc's range; use a value from 0.004 to 32 (MiB)
    """
    n = int(mmap_threshold_mb * 2**20)
    if not 4096 <= n <= 32 * 2**20:
        raise ArgumentError(
            f"mmap_threshold_mb={mmap_threshold_mb} is outside glibc's range; use a value from "
            "0.004 to 32 (MiB)"
        )
    libc = _glibc()
    if libc is None:
        return False
    # Fixing the mmap threshold also fixes the trim threshold (both stop adapting); keep the top of
    # the heap returned once twice the threshold is free there, as glibc's dynamic rule would.
    ok = libc.mallopt(_M_MMAP_THRESHOLD, n) == 1
    return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * n) == 1
