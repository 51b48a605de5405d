"""How a node's answers reach its clients: the results of one loop turn as one
``results`` to a client that reads batches, held in bytes while a client does not read,
followed while ZeroMQ holds large ones, a client that never reads dropped, the slowest
readers cut when the node is over its memory budget.

:class:`AnswerDelivery` runs on the job loop and sends on the client API's ROUTER (which
the API owns, reads and gives it once bound: one socket, one thread). Small answers go
straight to ZeroMQ (its queue per client is API_SEND_HWM messages); one it cannot take
waits in :class:`meshnet.outbox.Outboxes`, counted in bytes, and is tried again on a
backed-off timer. Answers of TRACK_BYTES or more are followed with MessageTrackers until
ZeroMQ lets go of them, and count against the node's one memory budget meanwhile.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
from collections import OrderedDict
from typing import Any

import zmq

from meshnet.flow import frames_size
from meshnet.listener_guard import ListenerGuard
from meshnet.memory_budget import MemoryBudget, Reader, readers_to_cut
from meshnet.outbox import MAX_DROPPED, Outboxes
from meshnet.protocol import BATCH_RESULT_BYTES, MAX_RESULTS, Result, Results, encode
from meshnet.socket_loop import SocketLoop, TimerHandle, send_message, send_tracked

#: Answers of at least this many bytes are followed until ZeroMQ lets go of them, and
#: count against the node's memory budget meanwhile. Smaller ones cost at most
#: API_SEND_HWM x this (256 KiB) per connection, unfollowed: a tracker costs more than
#: they do.
TRACK_BYTES = 4 * 1024
#: Followed answers ZeroMQ may hold for one connection at once; past it the next waits
#: here, counted in bytes (one answer always goes, however large).
ZMQ_BYTES_PER_CLIENT = 32 * 1024 * 1024
#: How often answers followed in ZeroMQ are looked at while some are (doubling from the
#: first to the longest while none is let go: a client that reads frees them within
#: milliseconds; one that does not costs a wake-up a second).
FIRST_SWEEP_S = 0.005
LONGEST_SWEEP_S = 1.0

_TAG_KEY = os.urandom(16)


def client_tag(conn: bytes) -> str:
    """How logs name client connection ``conn``: a keyed hash of its routing id, never
    the id itself, which is what another client would need to take its results over
    (docs/protocol.md §10)."""
    return "client-" + hashlib.blake2s(conn, key=_TAG_KEY, digest_size=4).hexdigest()


class AnswerDelivery:
    """Loop thread only."""

    def __init__(self, *, loop: SocketLoop, logger: Any, memory: MemoryBudget, max_unread: int):
        self.loop = loop
        self.log = logger
        self.memory = memory
        self.outboxes = Outboxes(max_unread)
        #: The API's ROUTER and its listener guard, once bound (None: not, or closed).
        self.router: zmq.Socket | None = None
        self.guard: ListenerGuard | None = None
        self._retry_timer: TimerHandle | None = None
        #: Large answers ZeroMQ holds for clients: (tracker, conn, bytes, when sent),
        #: oldest first, and their bytes in all.
        self._tracked: list[tuple[zmq.MessageTracker, bytes, int, float]] = []
        #: Bytes of followed answers in ZeroMQ's queue, per connection.
        self._in_zmq: dict[bytes, int] = {}
        self.tracked_bytes = 0
        #: Clients cut whose connection could not be closed.
        self._unclosable: OrderedDict[bytes, None] = OrderedDict()
        self._sweep_timer: TimerHandle | None = None
        self._sweep_delay = FIRST_SWEEP_S
        #: The results of this loop turn for each client that reads batches, sent as one
        #: ``results`` when the turn has read what it had; and whether that is asked.
        self._results: dict[bytes, list[Result]] = {}
        self._results_flush_asked = False
        memory.add_part("answers", lambda: self.outboxes.total + self.tracked_bytes)
        memory.add_reliever(self.make_room)

    def attach(self, router: zmq.Socket, guard: ListenerGuard) -> None:
        self.router, self.guard = router, guard

    def close(self) -> None:
        """The API closes its ROUTER: the results gathered this turn go out first (the
        socket's linger sends them), then nothing more is sent or looked at."""
        self._flush_results()
        for timer in (self._sweep_timer, self._retry_timer):
            if timer is not None:
                timer.cancel()
        self._sweep_timer = self._retry_timer = None
        self.router = self.guard = None

    def result(self, conn: bytes, result: Result, batch: bool) -> None:
        """A job's one result for client ``conn``. To a client that reads batches
        (``batch``), a small one waits for the turn's end, with the others of the turn
        (an idle client waits for nothing: its turn ends now)."""
        body = result.body
        waiting = self._results.get(conn)
        if batch and (body is None or len(body) < BATCH_RESULT_BYTES):
            if waiting is None:
                waiting = self._results[conn] = []
            waiting.append(result)
            if len(waiting) >= MAX_RESULTS:
                self._send_results(conn, self._results.pop(conn))
            elif not self._results_flush_asked:
                self._results_flush_asked = True
                self.loop.at_turn_end(self._flush_results)
            return
        if waiting is not None:  # what waits goes first
            self._send_results(conn, self._results.pop(conn))
        self.send(conn, encode(result))

    def _flush_results(self) -> None:
        self._results_flush_asked = False
        results, self._results = self._results, {}
        for conn, waiting in results.items():
            self._send_results(conn, waiting)

    def _send_results(self, conn: bytes, results: list[Result]) -> None:
        self.send(conn, encode(results[0] if len(results) == 1 else Results(results=tuple(results))))

    def send(self, conn: bytes, frames: list[Any]) -> None:
        """Send one answer to client ``conn``, or hold it (in bytes) while ZeroMQ cannot take it."""
        router = self.router
        if router is None:
            return
        outboxes = self.outboxes
        if outboxes.backlogs and outboxes.holds(conn):  # behind what already waits for it
            self._hold(conn, frames)
            return
        # Dropped before this answer (not by the room its tracking made just now).
        was_dropped = bool(outboxes.dropped) and conn in outboxes.dropped
        try:
            sent = self._try_send(router, conn, frames)
        except zmq.Again:  # ZeroMQ's queue for this client is full: it is not reading
            sent = False
        except zmq.ZMQError as exc:
            if exc.errno != errno.EHOSTUNREACH:
                raise
            outboxes.discarded += 1  # the client went away; its answers have nowhere to go
            return
        if not sent:
            self._hold(conn, frames)
        elif was_dropped and outboxes.reading_again(conn):
            self.log.info("client_reading_again", client=client_tag(conn))

    def _try_send(self, router: zmq.Socket[Any], conn: bytes, frames: list[Any]) -> bool:
        """Hand one answer to ZeroMQ: False if it would put more than ZMQ_BYTES_PER_CLIENT
        of followed answers in its queue for ``conn`` (then it waits here); ``zmq.Again``
        when that queue is full of messages."""
        size = len(frames[-1]) if len(frames) > 1 else 0
        if size < TRACK_BYTES:
            send_message(router, [conn, *frames])
            return True
        queued = self._in_zmq.get(conn, 0)
        if queued and queued + size > ZMQ_BYTES_PER_CLIENT:
            return False
        self._track(conn, send_tracked(router, [conn, *frames]), size)
        return True

    def _hold(self, conn: bytes, frames: list[Any]) -> None:
        now = time.monotonic()
        size = frames_size(frames)
        waiting = self.outboxes.unread(conn) + size
        queued = self._in_zmq.get(conn, 0)  # unread too, in ZeroMQ's queue for it
        state = self.outboxes.hold(conn, frames, size, now, queued)
        if state == "pushed_back":
            self.log.warning(
                "client_pushed_back",
                client=client_tag(conn),
                unread_bytes=self.outboxes.unread(conn) + queued,
                action="its new jobs are refused busy until it reads",
            )
        elif state == "dropped":
            self._log_dropped(conn, waiting)
        if self.memory.over():
            self.make_room(0)
        if self._retry_timer is None and self.outboxes.backlogs:
            self._retry_timer = self.loop.call_later(self.outboxes.next_retry() or 0.0, self._retry_held)

    def _track(self, conn: bytes, tracker: zmq.MessageTracker, size: int) -> None:
        """A large answer went to ZeroMQ: counted until ZeroMQ lets go of it."""
        if tracker.done:
            return
        self._tracked.append((tracker, conn, size, time.monotonic()))
        self.tracked_bytes += size
        self._in_zmq[conn] = self._in_zmq.get(conn, 0) + size
        if self._sweep_timer is None:
            self._sweep_delay = FIRST_SWEEP_S
            self._sweep_timer = self.loop.call_later(self._sweep_delay, self._sweep)
        if self.memory.over():
            self.make_room(0)

    def _sweep(self) -> None:
        """Forget the followed answers ZeroMQ has let go of; look again while any is held."""
        self._sweep_timer = None
        kept = [entry for entry in self._tracked if not entry[0].done]
        freed = len(kept) < len(self._tracked)
        self.tracked_bytes = sum(entry[2] for entry in kept)
        self._tracked = kept
        in_zmq: dict[bytes, int] = {}
        for _, conn, size, _ in kept:
            in_zmq[conn] = in_zmq.get(conn, 0) + size
        room = [conn for conn in self._in_zmq if in_zmq.get(conn, 0) < self._in_zmq[conn]]
        self._in_zmq = in_zmq
        if any(conn in self.outboxes.backlogs for conn in room) and self.router is not None:
            # Room in ZeroMQ's queue for answers held back by ZMQ_BYTES_PER_CLIENT: now,
            # not at the retry timer's next (backed-off) turn.
            if self._retry_timer is not None:
                self._retry_timer.cancel()
            self._retry_timer = self.loop.call_later(0.0, self._retry_held)
        if kept and self.router is not None:
            self._sweep_delay = FIRST_SWEEP_S if freed else min(LONGEST_SWEEP_S, self._sweep_delay * 2)
            self._sweep_timer = self.loop.call_later(self._sweep_delay, self._sweep)

    def make_room(self, size: int) -> None:
        """The node is over its memory budget, or new work of ``size`` bytes does not fit:
        cut the clients whose answers have waited longest unread (past READ_GRACE), as
        many as it takes, if cutting them makes it fit (meshnet.memory_budget)."""
        self._sweep_now()
        now = time.monotonic()
        for conn in readers_to_cut(self._readers(), self.memory.used(), self.memory.limit, size, now):
            self._cut(conn, now)

    def _sweep_now(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
        self._sweep()

    def _readers(self) -> list[Reader]:
        """The clients with unread answers, here or in ZeroMQ, but those cut already whose
        connection could not be closed (what ZeroMQ holds for them, nothing frees)."""
        readers: dict[bytes, Reader] = {}
        for _, conn, size, sent_at in self._tracked:
            if conn not in self._unclosable:
                old = readers.get(conn)
                readers[conn] = Reader(conn, old.since if old else sent_at, size + (old.unread if old else 0))
        for conn, backlog in self.outboxes.backlogs.items():
            old = readers.get(conn)
            since = min(backlog.progress_at, old.since) if old else backlog.progress_at
            readers[conn] = Reader(conn, since, backlog.size + (old.unread if old else 0))
        return list(readers.values())

    def _cut(self, conn: bytes, now: float) -> None:
        """Drop client ``conn``: what waits for it here is discarded, and its connection
        closed, which makes ZeroMQ drop what it queued for it."""
        held = self.outboxes.cut(conn, now)
        queued = self._in_zmq.get(conn, 0)
        closed = self.guard is not None and self.guard.disconnect(conn)
        if closed:
            self._tracked = [entry for entry in self._tracked if entry[1] != conn]
            self.tracked_bytes -= queued
            self._in_zmq.pop(conn, None)
        else:
            # Not known or gone (ipc, or it left): what ZeroMQ holds for it goes when it
            # does; it is not tried again meanwhile.
            self._unclosable[conn] = None
            while len(self._unclosable) > MAX_DROPPED:
                self._unclosable.popitem(last=False)
            if not held:
                return
        self.memory.cut += 1
        self.log.warning(
            "client_cut",
            client=client_tag(conn),
            unread_bytes=held + queued,
            reason=f"the node holds more than its memory budget ({self.memory.limit} bytes), and this client "
            "has left its answers unread longest",
            action="its answers were discarded" + (" and its connection closed" if closed else ""),
        )

    def _log_dropped(self, conn: bytes, unread: int) -> None:
        self.log.warning(
            "client_dropped",
            client=client_tag(conn),
            reason=f"it stopped reading: {unread} bytes of answers waited for it (api.max_unread_bytes is "
            f"{self.outboxes.budget})",
            action="its waiting answers were discarded; its jobs are refused until it reads",
        )

    def _retry_held(self) -> None:
        """Send what waits for slow clients, as far as ZeroMQ takes it."""
        self._retry_timer = None
        router = self.router
        if router is None:
            return
        outboxes = self.outboxes
        now = time.monotonic()
        for conn in list(outboxes.backlogs):
            while (frames := outboxes.head(conn)) is not None:
                try:
                    if not self._try_send(router, conn, frames):
                        break
                except zmq.Again:
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    outboxes.gone(conn)
                    break
                if outboxes.head(conn) is not frames:
                    break  # following it made room by cutting this very client: its backlog is gone
                outboxes.sent_head(conn, now)
        for conn, unread in outboxes.drop_stalled(now):
            self._log_dropped(conn, unread)
        delay = outboxes.next_retry()
        if delay is not None and self._retry_timer is None:  # (a sweep above may have set one)
            self._retry_timer = self.loop.call_later(delay, self._retry_held)
