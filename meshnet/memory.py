"""How a MeshNet process uses the C allocator: large buffers reused under load, and
given back to the system once the process is quiet.

Both only where the C library is glibc (Linux); elsewhere they do nothing and say so.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any

#: ``mallopt`` parameters, from glibc's ``malloc.h``.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
#: Buffers up to this size come from the heap and are reused once freed: glibc's own
#: ceiling for the threshold it adjusts by itself (``DEFAULT_MMAP_THRESHOLD_MAX``), so a
#: payload of up to 32 MiB is served as glibc would serve it once warmed up.
MMAP_THRESHOLD = 32 * 1024 * 1024
#: Free memory at the top of a heap is kept up to this much while the process works
#: (it only ever holds what the process once used at the same time); the quiet-time
#: ``release_free_memory`` gives it back.
TRIM_THRESHOLD = 1024 * 1024 * 1024


@functools.cache
def _libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 - absent where the C library is not glibc
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_buffers() -> bool:
    """Have glibc keep freed buffers for reuse while this process works, rather than
    give them back to the system at once and fault fresh pages in for the next one.
    For processes MeshNet owns (nodes, relays, pool workers), called once at start,
    before the process starts threads: it changes the allocator of the whole process.
    Returns False where there is no glibc.

    Why: glibc's default hands free memory at the top of a heap back to the system as
    soon as it exceeds twice the largest buffer freed so far. An 8 MiB message through
    CurveZMQ has several buffers of its size alive at once (received, decrypted,
    encrypted), so under that default nearly every such message came from fresh pages:
    3,533 page faults and 47-51 ms of CPU per 8 MiB round trip over a CurveZMQ socket
    pair in one process, against 69 faults and 43 ms with these settings (measured).

    - Both thresholds are set, since setting either one stops glibc adjusting the other.
    - One arena for all threads: ``malloc_trim`` gives back the free top of the main
      arena only, so memory freed at the top of a thread's own arena (ZeroMQ's I/O
      thread, where every message buffer is made) would stay with the process for good
      (its RSS stayed 25 MB higher after the trim than under glibc's default). The
      threads' small allocations come from their own caches (tcache) all the same.
    """
    libc = _libc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([libc.mallopt(param, value) == 1 for param, value in settings])


def release_free_memory() -> bool:
    """Give the memory freed since the last call back to the system (glibc's
    ``malloc_trim``, which also releases free pages inside the heap, whatever
    :func:`keep_freed_buffers` set). Returns False where there is no glibc.

    Processes call this once they have been quiet for a moment: buffers are reused under
    load and not kept afterwards (a node's RSS went from 38 MB to over 200 MB after a few
    8 MiB jobs when nothing gave them back). Why not have glibc map each large buffer
    separately (a low fixed mmap threshold), as this project first did: every 8 MiB
    payload then came from fresh pages, and the page faults made a relayed 8 MiB job
    cost 238 ms of CPU instead of 142 (measured across the relay and both nodes).
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
