"""Keep a node's memory close to what it holds now, not what it once held."""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Buffers of at least this size (payloads, results, their frames) get pages of their own.
MMAP_THRESHOLD = 256 * 1024


def return_large_buffers_to_the_system() -> bool:
    """Have glibc map each large allocation separately and unmap it on free.

    By default glibc raises its mmap threshold after the first large buffers are freed
    (up to 32 MiB), so later 8 MiB payloads are carved from the heap and their memory
    is kept when freed: measured here, a node's RSS went from 38 MB to over 200 MB after
    a few 8 MiB jobs and stayed there. A fixed threshold turns that dynamic behaviour
    off. Returns False where there is no glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
        )
    except (OSError, AttributeError):
        return False
