"""A thread that owns ZeroMQ sockets and sleeps in ``zmq.Poller`` until there is work.

ZeroMQ sockets are not thread-safe, so each lives in one loop. Other threads never
touch them: they hand the loop a callable with :meth:`SocketLoop.call_soon`, which
appends to a deque and wakes the poller through a pipe. (An ``inproc`` PAIR would
also wake it, but a PAIR has one writer, and results arrive from several threads:
actors, the relay client's loop. A deque plus a pipe byte takes any number.) The
pipe is written only when the loop is not already due to wake, so a burst of
messages costs one wake-up. An idle loop blocks in ``poll`` with no timeout unless
a timer is due: no busy polling.

A loop made with ``trim_after`` hands the memory its process freed back to the system
once its sockets have been quiet for that many seconds after some traffic: the buffers
of large payloads do not stay with the process, a loop without traffic sleeps without a
timer, and a loop under load keeps its freed buffers for reuse (trimming under load
made every new large buffer fault its pages in again: measured, a third more CPU in a
node moving 4 MiB payloads to its workers). Traffic that never pauses that long still
gets a trim every ``TRIM_AT_LEAST_EVERY`` windows.

A turn of the loop runs the timers that are due, polls, calls the readers of every
socket that has something, then the queued calls, then what asked to run at the turn's
end (:meth:`SocketLoop.at_turn_end`): the batches of messages a turn gathered for one
destination leave there, after everything the turn read, and before the loop sleeps.
"""

from __future__ import annotations

import concurrent.futures
import heapq
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog
import zmq

from meshnet.memory import release_free_memory

log = structlog.get_logger("meshnet.loop")

#: Set to a directory, each loop writes a cProfile of its thread there when it stops.
PROFILE_ENV = "MESHNET_PROFILE_DIR"
PROFILE_CLOCK_ENV = "MESHNET_PROFILE_CLOCK"
#: zmq_poll takes a C int of milliseconds; a timer further off wakes the loop once an hour.
MAX_POLL_MS = 3_600_000
#: A loop that trims memory does so at least once per this many quiet-window lengths of
#: traffic (see ``trim_after``).
TRIM_AT_LEAST_EVERY = 20

# pyzmq's flags are enum members, and every | or & on them goes through the enum
# machinery: on the per-message path these plain ints are measurably cheaper.
_NOBLOCK = int(zmq.NOBLOCK)
_SEND_MORE = int(zmq.NOBLOCK | zmq.SNDMORE)
_READABLE = int(zmq.POLLIN | zmq.POLLERR)
_WRITABLE = int(zmq.POLLOUT)


def send_message(sock: zmq.Socket[Any], frames: list[Any]) -> None:
    """``sock.send_multipart(frames, zmq.NOBLOCK, copy=False)``, without its per-frame
    flag arithmetic. Small frames are copied by pyzmq anyway (below its copy threshold)."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        sock.send(frame, _SEND_MORE if i < last else _NOBLOCK, copy=False)


def send_tracked(sock: zmq.Socket[Any], frames: list[Any]) -> zmq.MessageTracker:
    """:func:`send_message`, tracking the last frame: the tracker is done once ZeroMQ has
    let go of it (written to the kernel, or dropped with its connection)."""
    last = len(frames) - 1
    for frame in frames[:last]:
        sock.send(frame, _SEND_MORE, copy=False)
    tracker: zmq.MessageTracker = sock.send(frames[last], _NOBLOCK, copy=False, track=True)
    return tracker


class TimerHandle:
    """A timer's callback; cancelling it drops the callback and its arguments at once
    (a job's timer must not keep its payload alive until the timeout it no longer
    needs), and the heap entry later."""

    __slots__ = ("cancelled", "fn", "args", "_loop")

    def __init__(self, loop: SocketLoop, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.cancelled = False
        self.fn: Callable[..., Any] | None = fn
        self.args = args
        self._loop = loop

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.fn, self.args = None, ()
            loop = self._loop
            if loop.in_loop():
                loop._timer_cancelled()
            else:  # the count is the loop's: changed on its thread only
                loop.call_soon(loop._timer_cancelled)


def recv_message(
    sock: zmq.Socket[Any], max_frames: int, copied: int = 0, last: list[Any] | None = None
) -> list[Any] | None:
    """Receive one message frame by frame without blocking (``zmq.Again`` when none).

    ``MAXMSGSIZE`` bounds each frame, not a message: a peer could send a message of a
    thousand large frames, all held in memory by ``recv_multipart`` before anything
    could look at them. Past ``max_frames`` the rest is received one frame at a time
    and dropped, and None is returned.

    The first ``copied`` frames (routing ids, headers: small) come as bytes, the rest
    (bodies, possibly megabytes) as ``zmq.Frame`` without a copy: a Frame object costs
    more than copying a few bytes. ``last``: a list whose item 0 becomes the last frame
    as a ``zmq.Frame``, for its metadata (a ROUTER's routing id frame has none).
    """
    # Each frame comes as a Frame, whose ``more`` is an attribute: asking the socket
    # (getsockopt RCVMORE) costs a microsecond or two per frame more.
    frame = sock.recv(_NOBLOCK, copy=False)
    frames: list[Any] = [frame.bytes if copied >= 1 else frame]
    while frame.more:
        frame = sock.recv(copy=False)  # the rest of a message is already here
        if len(frames) >= max_frames:
            while frame.more:
                frame = sock.recv(copy=False)
            return None
        frames.append(frame.bytes if len(frames) < copied else frame)
    if last is not None:
        last[0] = frame
    return frames


def _pollable(sock: Any) -> Any:
    """What the poller is given, and answers with: a ZeroMQ socket itself, anything
    else (a Python socket, a pipe) as its file descriptor."""
    if isinstance(sock, (zmq.Socket, int)):
        return sock
    return sock.fileno()


class SocketLoop:
    """Runs callbacks, timers and socket readers on one thread."""

    def __init__(self, name: str, trim_after: float | None = None):
        self.name = name
        self._trim_delay = trim_after
        self._trim_armed = False
        self._busy_since_armed = False
        self._trim_armed_at = 0.0
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        #: What runs once this turn has read and called what it had (loop thread only).
        self._turn_end: list[Callable[[], None]] = []
        self._wake_pending = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._poller = zmq.Poller()
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._readers: dict[Any, Callable[[], None]] = {}
        self._writers: dict[Any, Callable[[], None]] = {}
        self._ident: int | None = None
        self._timers: list[tuple[float, int, TimerHandle]] = []
        self._seq = itertools.count()
        self._running = True
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = threading.Event()
        self._pipe_lock = threading.Lock()
        self._cancelled_timers = 0
        self._compacting = False

    # -- any thread --

    def start(self) -> SocketLoop:
        self._thread.start()
        return self

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread. Thread-safe, never blocks."""
        self._calls.append((fn, args))  # append before reading the flag: see module doc
        if threading.get_ident() == self._ident:
            return  # the loop runs queued calls before it next sleeps: no wake-up needed
        if not self._wake_pending:
            self._wake_pending = True
            with self._pipe_lock:  # never write to a closed (or reused) descriptor
                if not self._closed.is_set():
                    try:
                        os.write(self._wake_w, b"\0")
                    except BlockingIOError:
                        pass  # pipe full: a wake-up is pending anyway

    def at_turn_end(self, fn: Callable[[], None]) -> None:
        """Loop thread: run ``fn()`` once this turn has called its readers and queued
        calls (and before the loop sleeps): after the rest of what the turn read, not
        a whole poll later. A caller asks once per turn (it keeps its own flag)."""
        self._turn_end.append(fn)

    def run_sync(self, fn: Callable[..., Any], *args: Any, timeout: float = 10.0) -> Any:
        """Run ``fn(*args)`` on the loop thread and return its result, or raise what it
        raised; at once if called on the loop thread. ``TimeoutError`` past ``timeout``."""
        if threading.get_ident() == self._ident:
            return fn(*args)
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        self.call_soon(call)
        return done.result(timeout)

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` on the loop thread after ``delay`` seconds. Thread-safe."""
        handle = TimerHandle(self, fn, args)
        when = time.monotonic() + max(0.0, delay)
        if threading.get_ident() == self._ident:
            heapq.heappush(self._timers, (when, next(self._seq), handle))
        else:
            self.call_soon(lambda: heapq.heappush(self._timers, (when, next(self._seq), handle)))
        return handle

    def stop(self, timeout: float = 5.0) -> None:
        """Stop after the callbacks already queued have run; wait for the thread."""
        self.call_soon(self._halt)
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._ident

    # -- loop thread only --

    def add_reader(self, sock: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` when ``sock`` (a ZeroMQ socket, or anything with a file
        descriptor) is readable."""
        sock = _pollable(sock)
        self._readers[sock] = callback
        self._watch(sock)

    def remove_reader(self, sock: Any) -> None:
        sock = _pollable(sock)
        if self._readers.pop(sock, None) is not None:
            self._watch(sock)

    def add_writer(self, sock: Any, callback: Callable[[], None]) -> None:
        """Call ``callback`` when ``sock`` is writable (for a send that did not fit)."""
        sock = _pollable(sock)
        self._writers[sock] = callback
        self._watch(sock)

    def remove_writer(self, sock: Any) -> None:
        sock = _pollable(sock)
        if self._writers.pop(sock, None) is not None:
            self._watch(sock)

    def _watch(self, sock: Any) -> None:
        events = (zmq.POLLIN if sock in self._readers else 0) | (zmq.POLLOUT if sock in self._writers else 0)
        if events:
            self._poller.register(sock, events)
        else:
            self._poller.unregister(sock)

    def close_socket(self, sock: Any, linger: int = 0) -> None:
        """Stop watching ``sock`` and close it (nothing for None). Loop thread only."""
        if sock is not None:
            self.remove_reader(sock)
            self.remove_writer(sock)
            if isinstance(sock, zmq.Socket):
                sock.close(linger=linger)
            else:
                sock.close()

    def _timer_cancelled(self) -> None:
        """Count cancelled timers; when they are most of the heap, drop them (on the
        loop thread), so that timers cancelled long before they are due (a client's
        give-up timer, once its job has answered) do not pile up."""
        self._cancelled_timers += 1
        if self._cancelled_timers > 64 and self._cancelled_timers > len(self._timers) // 2 and not self._compacting:
            self._compacting = True  # one compaction queued at a time
            self.call_soon(self._compact_timers)

    def _compact_timers(self) -> None:
        self._timers = [entry for entry in self._timers if not entry[2].cancelled]
        heapq.heapify(self._timers)
        self._cancelled_timers = 0
        self._compacting = False

    def _trim_if_quiet(self) -> None:
        assert self._trim_delay is not None
        # Steady small traffic (many nodes' heartbeats at a relay) may never leave a quiet
        # window: past TRIM_AT_LEAST_EVERY windows the memory is given back anyway.
        overdue = time.monotonic() - self._trim_armed_at > TRIM_AT_LEAST_EVERY * self._trim_delay
        if self._busy_since_armed and not overdue:
            self._busy_since_armed = False
            self.call_later(self._trim_delay, self._trim_if_quiet)
            return
        self._trim_armed = False
        release_free_memory()

    def _halt(self) -> None:
        self._running = False

    def _run_calls(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        self._wake_pending = False
        calls = self._calls
        while calls:
            fn, args = calls.popleft()
            self._guard(fn, args)

    def _run_turn_end(self) -> None:
        # What these ask for at the turn's end (a flush that ended a job, say) runs in
        # the next turn, which does not sleep while any is waiting.
        waiting, self._turn_end = self._turn_end, []
        for fn in waiting:
            self._guard(fn, ())

    def _guard(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("loop_callback_failed", loop=self.name, callback=getattr(fn, "__qualname__", repr(fn)))

    def _run_timers(self) -> int | None:
        """Run due timers; return milliseconds until the next, None when there is none."""
        timers = self._timers
        while timers:
            when, _, handle = timers[0]
            if handle.cancelled:
                heapq.heappop(timers)
                self._cancelled_timers = max(0, self._cancelled_timers - 1)
                continue
            delay = when - time.monotonic()
            if delay > 0:
                # Round up: zmq.Poller takes whole milliseconds, and rounding down would
                # spin through zero-timeout polls for the last fraction of one.
                return min(math.ceil(delay * 1000.0), MAX_POLL_MS)
            heapq.heappop(timers)
            fn, args = handle.fn, handle.args
            handle.cancelled, handle.fn, handle.args = True, None, ()  # fired: cancel() is a no-op now
            if fn is not None:  # None only if cancelled from another thread as it fired
                self._guard(fn, args)
        return None

    def _run(self) -> None:
        profile_dir = os.environ.get(PROFILE_ENV)
        if not profile_dir:
            self._serve()
            return
        # A profile of this loop's thread (cProfile sees one thread only), written when
        # the loop stops: how MeshNet's figures in `make bench` are explained.
        import cProfile

        # MESHNET_PROFILE_CLOCK=cpu counts this thread's CPU time, not wall time: on a
        # machine whose cores are all busy, wall time also counts the time others ran.
        cpu = os.environ.get(PROFILE_CLOCK_ENV) == "cpu"
        profiler = cProfile.Profile(time.thread_time) if cpu else cProfile.Profile()  # its own clock: cheaper
        profiler.enable()
        try:
            self._serve()
        finally:
            profiler.disable()
            profiler.dump_stats(os.path.join(profile_dir, f"{self.name}-{os.getpid()}.prof"))

    def _serve(self) -> None:
        self._ident = threading.get_ident()
        try:
            while self._running:
                timeout = self._run_timers()
                if self._calls or self._turn_end:
                    timeout = 0
                woken = bool(self._calls)
                for sock, events in self._poller.poll(timeout):
                    if sock == self._wake_r:
                        woken = True
                        continue
                    # A callback may stop watching a socket that is later in this batch.
                    # A hung-up descriptor (a pipe whose writer exited) polls as POLLERR
                    # alone: its reader is called, and finds the end of the stream.
                    if events & _READABLE and (callback := self._readers.get(sock)) is not None:
                        self._guard(callback, ())
                    if events & _WRITABLE and (callback := self._writers.get(sock)) is not None:
                        self._guard(callback, ())
                    if self._trim_delay is not None:
                        if self._trim_armed:
                            self._busy_since_armed = True
                        else:
                            self._trim_armed, self._busy_since_armed = True, False
                            self._trim_armed_at = time.monotonic()
                            self.call_later(self._trim_delay, self._trim_if_quiet)
                if woken:
                    self._run_calls()
                if self._turn_end:
                    self._run_turn_end()
        finally:
            for sock in list(self._readers):
                self.remove_reader(sock)
            for sock in list(self._writers):
                self.remove_writer(sock)
            with self._pipe_lock:
                self._closed.set()
                os.close(self._wake_r)
                os.close(self._wake_w)
            self._calls.clear()
            self._turn_end.clear()
            self._ident = None  # thread ids are reused: no later thread is "in" this loop
