"""A worker process as the node's pool sees it: the process, its Unix socket pair, and
what it is doing; how one is started; and how multiprocessing's helpers are stopped.

Workers are started by a ``forkserver``: forking the node itself, which runs threads
holding locks (pykka, ZeroMQ), could deadlock a child.
"""

from __future__ import annotations

import socket
from typing import Any

from meshnet.jobs.framing import FrameReader
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.jobs.worker import serve
from meshnet.socket_loop import TimerHandle

#: Socket buffer asked for each worker's socket pair (the kernel caps it): fewer
#: wake-ups per large payload.
SOCKET_BUFFER_BYTES = 1024 * 1024
#: The most a worker's status line can be: status, and error type and message clipped
#: to the wire's text limits, in UTF-8.
STATUS_LINE_BYTES = 64 * 1024


def outcome_of(status_line: bytes | bytearray, result: bytes | bytearray) -> Outcome:
    """The outcome a worker's two reply frames stand for."""
    status, error_type, message = status_line.decode("utf-8", "replace").split("\0", 2)
    if status == "succeeded":
        return Outcome(status, result=result)
    return Outcome(status, error_type=error_type, message=message)


class Worker:
    """One worker process, as the pool sees it (loop thread only)."""

    __slots__ = ("process", "sock", "sentinel", "reader", "frames", "outbox", "job", "timer", "ending", "dead", "ran")

    def __init__(self, process: Any, sock: socket.socket, max_frame: int):
        self.process = process
        self.sock = sock
        self.sentinel: int = process.sentinel
        self.reader = FrameReader(max_frame)
        self.frames: list[bytes | bytearray] = []
        self.outbox: list[memoryview] = []
        self.job: JobSpec | None = None
        self.timer: TimerHandle | None = None
        #: Set when the pool kills the worker: the outcome its job ends with.
        self.ending: Outcome | None = None
        #: Its socket reached its end (or refused a write): it takes no more jobs.
        self.dead = False
        #: It has finished a job: it started fine.
        self.ran = False


def spawn_worker(context: Any, enabled: list[str], max_payload: int) -> Worker:
    """Start a worker process (from multiprocessing ``context``) for the ``enabled`` kinds."""
    ours, theirs = socket.socketpair()
    for end in (ours, theirs):
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            end.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
    process = context.Process(target=serve, args=(theirs, enabled, max_payload), name="meshnet-worker", daemon=True)
    try:
        process.start()
    finally:
        theirs.close()
    ours.setblocking(False)
    # A frame is a result (at most max_payload: the worker fails larger ones) or a
    # status line (clipped texts: a few KiB at most).
    return Worker(process, ours, max_frame=max(max_payload, STATUS_LINE_BYTES))


def stop_helper_processes(log: Any) -> None:
    """Stop multiprocessing's forkserver and resource tracker now, and wait for them.

    Both would exit on their own once this process is gone, but a moment later: a
    supervisor that checks, right after the node exits, that nothing it started is
    left would find them. These ``_stop`` methods are private but have been stable
    since Python 3.8 (the standard library's own tests use them); a new pool restarts
    both on demand."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except (OSError, ChildProcessError) as exc:
                log.warning("helper_stop_failed", helper=type(helper).__name__, error=str(exc))
