"""limit_heap_growth: glibc really maps large blocks on their own afterwards (checked in a child
process, since the setting is process-wide and cannot be undone)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from modeldiff.memory import limit_heap_growth

CHILD = r"""
import ctypes, sys, torch
class MI2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MI2
big = torch.empty(8 * 2**20, dtype=torch.uint8)
del big  # freeing a mapped 8 MiB block raises glibc's dynamic threshold to 8 MiB
if sys.argv[1] == "limit":
    from modeldiff.memory import limit_heap_growth
    assert limit_heap_growth(1.0) is True
before = libc.mallinfo2().hblks
x = torch.empty(3 * 2**20, dtype=torch.uint8)  # 3 MiB: mapped on its own only under the limit
print(libc.mallinfo2().hblks - before)
"""


def _mapped_blocks(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc-only allocator setting")
def test_large_blocks_are_mapped_on_their_own_after_the_call():
    assert _mapped_blocks("default") == 0  # glibc's dynamic threshold: 3 MiB comes from the heap
    assert _mapped_blocks("limit") == 1


def test_out_of_range_threshold_is_named():
    with pytest.raises(ValueError, match=r"mmap_threshold_mb=0\.001 is outside glibc's range"):
        limit_heap_growth(0.001)
