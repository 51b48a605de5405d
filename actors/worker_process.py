"""A worker process as the node's pool sees it: the process, its Unix socket pair, and
the state of that socket; how workers are started, read from, and reaped; and how
multiprocessing's helpers are stopped. Which job a worker runs is decided and kept by
the pool's ``JobDispatch`` (meshnet/jobs/dispatch.py), to which a worker is a handle.

Workers are started by a ``forkserver``: forking the node itself, which runs threads
holding locks (pykka, ZeroMQ), could deadlock a child.
"""

from __future__ import annotations

import multiprocessing
import socket
import time
from collections.abc import Callable
from typing import Any

from meshnet.jobs.framing import FrameReader
from meshnet.jobs.model import Outcome
from meshnet.jobs.worker import serve
from meshnet.socket_loop import SocketLoop, TimerHandle

#: Socket buffer asked for each worker's socket pair (the kernel caps it): fewer
#: wake-ups per large payload.
SOCKET_BUFFER_BYTES = 1024 * 1024
#: The most a worker's status line can be: status, and error type and message clipped
#: to the wire's text limits, in UTF-8.
STATUS_LINE_BYTES = 64 * 1024


#: A success's status line (meshnet.jobs.worker): compared whole, not parsed.
SUCCEEDED_LINE = b"succeeded\0\0"


def outcome_of(status_line: bytes | bytearray, result: bytes | bytearray) -> Outcome:
    """The outcome a worker's two reply frames stand for."""
    if status_line == SUCCEEDED_LINE:
        return Outcome.succeeded(result)
    status, error_type, message = status_line.decode("utf-8", "replace").split("\0", 2)
    if status == "succeeded":
        return Outcome.succeeded(result)
    return Outcome(status, error_type=error_type, message=message)


class Worker:
    """One worker process, as the pool sees it (loop thread only)."""

    __slots__ = ("process", "sock", "sentinel", "reader", "frames", "outbox", "timer", "dead")

    def __init__(self, process: Any, sock: socket.socket, max_frame: int):
        self.process = process
        self.sock = sock
        self.sentinel: int = process.sentinel
        self.reader = FrameReader(max_frame)
        self.frames: list[bytes | bytearray] = []
        self.outbox: list[memoryview] = []
        #: The timer of the job it runs (it kills the worker at the job's timeout).
        self.timer: TimerHandle | None = None
        #: Its socket reached its end (or refused a write): it takes no more jobs.
        self.dead = False

    def receive(self) -> int:
        """Read once from its socket into ``frames``: the bytes read, 0 at the socket's
        end (the worker exited), -1 when nothing is there now. ``ProtocolError``: the
        stream is corrupt."""
        try:
            n = self.sock.recv_into(self.reader.buffer())
        except BlockingIOError:
            return -1
        except OSError:
            return 0
        if n:
            self.frames += self.reader.received(n)
        return n

    def disarm(self) -> None:
        """Cancel its job's timer: the job is no longer its (it ended, or went back to the
        queue), and the timer must not kill the worker."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def worker_context() -> Any:
    """The multiprocessing context that starts workers: a forkserver, which imports as
    it starts the workers' code, and what makes it (and so every worker) ignore the
    node's stop signals (meshnet.jobs.forkserver)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["meshnet.jobs.forkserver", "meshnet.jobs.worker"])
    return context


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


def spawn_workers(spawn: Callable[[], Worker], count: int) -> list[Worker]:
    """Start ``count`` workers with ``spawn``: all of them, or none (and raise)."""
    started: list[Worker] = []
    try:
        for _ in range(count):
            started.append(spawn())
    except BaseException:
        for worker in started:
            worker.sock.close()
            _reap(worker)
        raise
    return started


def discard(loop: SocketLoop, worker: Worker) -> None:
    """Stop watching a worker's descriptors on ``loop`` and release them, and its process
    (killed if it has not exited)."""
    loop.remove_reader(worker.sentinel)
    loop.close_socket(worker.sock)
    _reap(worker)


def end_workers(loop: SocketLoop, workers: list[Worker], timeout: float) -> None:
    """Close the workers' sockets, which ends an idle worker's loop, and wait at most
    ``timeout`` in all for their processes to exit."""
    for worker in workers:
        loop.close_socket(worker.sock)
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.process.join(max(0.0, deadline - time.monotonic()))


def _reap(worker: Worker) -> None:
    if worker.process.exitcode is None:
        worker.process.kill()
    worker.process.join()
    worker.process.close()


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
