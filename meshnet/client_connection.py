"""The I/O side of a :class:`~meshnet.client.MeshClient`: its one connection to a node.

Everything here runs on the client's private :class:`SocketLoop` thread, which owns
the DEALER and its monitor, except :meth:`NodeConnection.add_job` and
:meth:`NodeConnection.close`, which any thread may call: the jobs awaiting answers are
shared with the threads that submit them, under one lock. What the socket's events mean
is :class:`~meshnet.client_link.NodeLinkWatch`'s to say, and what each answer ends a
future with is :mod:`meshnet.client_results`'.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshnet.client_link import LINK_EVENTS, LinkChange, NodeLinkWatch
from meshnet.client_results import job_outcome, reply_outcome
from meshnet.errors import MeshError, NodeUnreachable, ProtocolError
from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol import (
    MAX_FRAMES,
    NODE_TO_CLIENT,
    Error,
    PeersReply,
    PingReply,
    Result,
    Results,
    StatusReply,
    decode,
    encode,
)
from meshnet.socket_loop import SocketLoop, TimerHandle, recv_message
from meshnet.watched import close_watched, watch

#: How long past a job's timeout the client waits for its node before giving up on it.
CLIENT_GRACE = 5.0


class NodeConnection:
    """One client's DEALER to ``endpoint``, with the jobs and requests awaiting answers."""

    def __init__(
        self,
        loop: SocketLoop,
        endpoint: str,
        *,
        identity: Identity | None,
        max_payload: int,
        connect_timeout: float,
    ):
        self.loop = loop
        self.endpoint = endpoint
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self.identity = identity
        self.context = zmq.Context()
        #: Jobs in flight: their future and the timer that gives up on them.
        self.pending: dict[bytes, tuple[concurrent.futures.Future[Any], TimerHandle | None]] = {}
        #: Status, peers and ping requests in flight, by the seq they carry (loop thread).
        self.requests: dict[int, tuple[type, concurrent.futures.Future[Any]]] = {}
        self.lock = threading.Lock()
        self.closed = False
        self.refused: MeshError | None = None
        #: Why the node cannot be reached, while it cannot (set and cleared on the loop
        #: thread, under the lock; read by submit).
        self.unreachable: str | None = None
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._link = NodeLinkWatch(endpoint, connect_timeout, curve=identity is not None)
        self._link_timer: TimerHandle | None = None

    # -- any thread --

    def add_job(self, job_id: bytes, future: concurrent.futures.Future[Any]) -> None:
        """Await job ``job_id``'s answer; raise at once when none could come."""
        with self.lock:
            if self.closed:
                raise MeshError("the client is closed")
            if self.refused is not None:
                raise self.refused
            if self.unreachable is not None:
                raise NodeUnreachable(self.unreachable)
            self.pending[job_id] = (future, None)

    def close(self) -> bool:
        """Mark the connection closed (the loop closes its sockets); False if it was."""
        with self.lock:
            if self.closed:
                return False
            self.closed = True
        self.loop.call_soon(self.io_close)
        return True

    # -- loop thread --

    def io_open(self, node_peer_id: str | None, opened: concurrent.futures.Future[Any]) -> None:
        try:
            sock = self.context.socket(zmq.DEALER)
            if self.identity is not None and node_peer_id is not None:
                public, secret = self.identity.zmq_curve_keys()
                sock.curve_publickey = public
                sock.curve_secretkey = secret
                sock.curve_serverkey = curve_public_z85(node_peer_id)
            # Whether the node is there at all (and, with CurveZMQ, whether it refuses our
            # key) shows only as socket events: watch them.
            self._monitor = watch(sock, LINK_EVENTS, "meshclient")
            self.loop.add_reader(self._monitor, self._io_monitor)
            sock.setsockopt(zmq.LINGER, 0)
            # A routing id of our own survives reconnections: results of jobs submitted
            # before a reconnect still find us, and we can still cancel them. (libzmq
            # reserves ids that start with a zero byte.)
            sock.setsockopt(zmq.ROUTING_ID, b"mc" + os.urandom(14))
            sock.connect(self.endpoint)
        except (zmq.ZMQError, MeshError) as exc:
            opened.set_exception(MeshError(f"cannot connect to {self.endpoint!r}: {exc}"))
            return
        self._sock = sock
        self.loop.add_reader(sock, self._io_readable)
        self._link_timer = self.loop.call_later(self.connect_timeout, self._io_link_timed_out)
        opened.set_result(None)

    def io_send(self, frames: list[Any]) -> bool:
        """Send without blocking; False when the node is not taking messages (it is down
        or slow and the queue towards it is full). Blocking here would stop this thread,
        and with it every timer that ends a job the node never answers."""
        if self._sock is None:
            return False
        try:
            self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return False
        return True

    def io_submit(self, job_id: bytes, frames: list[Any], timeout: float) -> None:
        with self.lock:
            entry = self.pending.get(job_id)
            if entry is None:
                return  # failed or closed meanwhile
            timer = self.loop.call_later(timeout + CLIENT_GRACE, self._io_give_up, job_id, timeout)
            self.pending[job_id] = (entry[0], timer)
        if not self.io_send(frames):
            self._io_give_up(job_id, None)

    def io_request(self, request: Any, reply_type: type, future: concurrent.futures.Future[Any]) -> None:
        if self.refused is not None:
            _settle(future, exception=self.refused)
            return
        if self.unreachable is not None:
            _settle(future, exception=NodeUnreachable(self.unreachable))
            return
        self.requests[request.seq] = (reply_type, future)
        if not self.io_send(encode(request)):
            self.requests.pop(request.seq, None)
            _settle(future, exception=NodeUnreachable(f"the node at {self.endpoint} is not taking messages"))

    def io_close(self) -> None:
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        close_watched(self.loop, self._sock, self._monitor)
        self._monitor = self._sock = None
        self._io_fail_all(MeshError("the client was closed before the job ended"))

    def _io_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            change = self._link.on_event(event)
            if change is LinkChange.LINKED:
                if self._link_timer is not None:
                    self._link_timer.cancel()
                    self._link_timer = None
                with self.lock:
                    self.unreachable = None
            elif change is LinkChange.LOST:
                self._link_timer = self.loop.call_later(self.connect_timeout, self._io_link_timed_out)
            elif change is LinkChange.REFUSED:
                self._io_refused()

    def _io_link_timed_out(self) -> None:
        """No connection for ``connect_timeout``: fail what is pending, and what comes
        until a connection does."""
        self._link_timer = None
        self._io_monitor()  # a handshake may have succeeded just now: its event decides
        if self._link.linked or self._sock is None:
            return
        why = self._link.unreachable()
        with self.lock:
            self.unreachable = why
        self._io_fail_all(NodeUnreachable(why))
        # What is still queued for the node belongs to jobs that have just failed: a node
        # that comes up later must not run them. Reconnecting drops the queue (LINGER 0).
        self._sock.disconnect(self.endpoint)
        self._sock.connect(self.endpoint)

    def _io_refused(self) -> None:
        peer_id = self.identity.peer_id if self.identity else "?"
        refused = MeshError(
            f"the node at {self.endpoint} refused this client's key; add {peer_id} to its api.allowed_clients"
        )
        with self.lock:
            self.refused = refused
        self._io_fail_all(refused)

    def _io_fail_all(self, error: MeshError) -> None:
        with self.lock:
            pending, self.pending = self.pending, {}
        for future, timer in pending.values():
            if timer is not None:
                timer.cancel()
            _settle(future, exception=error)
        requests, self.requests = self.requests, {}
        for _, future in requests.values():
            _settle(future, exception=error)

    def _io_give_up(self, job_id: bytes, timeout: float | None) -> None:
        with self.lock:
            entry = self.pending.pop(job_id, None)
        if entry is None:
            return
        future, timer = entry
        if timer is not None:
            timer.cancel()
        if timeout is None:
            error = NodeUnreachable(f"the node at {self.endpoint} is not taking messages (down, or overloaded)")
        else:
            error = NodeUnreachable(
                f"no answer from the node at {self.endpoint} within the job's timeout ({timeout:g} s) "
                f"plus {CLIENT_GRACE:g} s"
            )
        _settle(future, exception=error)

    def _io_readable(self) -> None:
        sock = self._sock
        while sock is not None:
            try:
                frames = recv_message(sock, MAX_FRAMES, copied=1)
            except zmq.Again:
                return
            if frames is None:
                continue
            try:
                message = decode(frames, NODE_TO_CLIENT, max_body=self.max_payload)
            except ProtocolError:
                continue  # a node that speaks garbage cannot answer any particular future
            if isinstance(message, Result):
                self._io_result(message)
            elif isinstance(message, Results):
                for result in message.results:
                    self._io_result(result)
            elif isinstance(message, (StatusReply, PeersReply, PingReply, Error)):
                request = self.requests.pop(message.seq, None) if message.seq is not None else None
                if request is None:
                    continue  # an answer to a request that gave up, or to none of ours
                reply, error = reply_outcome(request[0], message)
                _settle(request[1], result=reply, exception=error)

    def _io_result(self, message: Result) -> None:
        with self.lock:
            entry = self.pending.pop(message.id, None)
        if entry is None:
            return
        future, timer = entry
        if timer is not None:
            timer.cancel()
        future.device = message.peer  # type: ignore[attr-defined]  # which device it went to
        value, error = job_outcome(message)
        _settle(future, result=value, exception=error)


def _settle(
    future: concurrent.futures.Future[Any], *, result: Any = None, exception: BaseException | None = None
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
