"""glibc's malloc, told to keep the memory a training step frees for the next step.

A step frees and allocates the same tensors every time. By default glibc hands the free top of its
heap back to the kernel beyond a trim threshold (twice its mmap threshold: 128 KB at first, raised
as large blocks are freed, at most 32 MB), so a pack whose step holds tens of megabytes of
attention tensors (token families: [runs, batch, heads, T, T] of 100 positions) gets them back as
fresh pages at every step, and pays a page fault and the kernel's zeroing for each. With the mmap
threshold at its maximum and no trimming the pages stay mapped: the same allocations and arithmetic
(byte-identical tables), the same peak memory, which a process then keeps until it exits
(docs/performance.md). Without glibc's mallopt (macOS; musl's does nothing) nothing changes.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's largest on 64-bit systems: bigger blocks are always mapped afresh
NEVER_TRIM = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> None:
    """Raise this process's mmap threshold to its maximum and stop trimming its heap (idempotent)."""
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
