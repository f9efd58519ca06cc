"""Fixed glibc malloc thresholds, so memory freed after a large transient buffer goes back.

glibc raises its mmap threshold each time a large mmap'd block is freed (up to 32 MiB): after
one 16 MiB body or 64 MiB dump, buffers of that size come from the heap, whose freed space is
rarely returned. Under the adversary's hostile inputs the agent's RSS climbed from 76 to
~228 MiB that way (peaks of one case to 271 MiB), against the chart's 256 MiB limit. Fixed
thresholds (what the MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ variables do) keep it at
~115 MiB (peaks 165 MiB). At 1 MiB, not glibc's 128 KiB start: a cycle's own buffers (a 50 KB
body, a 100 KB plugin file) stay on the heap, fast; only large ones are mapped and given back.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 1024 * 1024  # a cycle's own buffers stay below; a hostile input's go back


def fix_malloc_thresholds() -> bool:
    """Fix both thresholds at THRESHOLD_BYTES; False where the C library has no mallopt (musl,
    macOS): there the allocator's own policy stays."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
    )
