"""``MeshClient``: submit jobs to a node and get their results as futures.

One DEALER socket on a private :class:`SocketLoop` thread; any number of threads may
call :meth:`MeshClient.submit` at once. Every future ends: with the job's result, with
the :class:`~meshnet.errors.JobError` for its terminal status, or with
:class:`~meshnet.errors.NodeUnreachable`: when the client has no connection to its node
for ``connect_timeout`` seconds (none came up, or one was lost and did not come back),
or when a connected node does not answer within the job's timeout plus a grace.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import cbor2
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshnet.config import DEFAULT_API_ENDPOINT, DEFAULT_MAX_PAYLOAD_BYTES
from meshnet.errors import (
    JOB_ERRORS_BY_STATUS,
    JobFailed,
    LocalProtocolError,
    MeshError,
    NodeUnreachable,
    PingFailed,
    ProtocolError,
)
from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol import (
    JOB_ID_BYTES,
    MAX_FRAMES,
    NODE_TO_CLIENT,
    Cancel,
    Error,
    PeersReply,
    PeersRequest,
    PingPeer,
    PingReply,
    Result,
    Results,
    StatusReply,
    StatusRequest,
    Submit,
    decode,
    encode,
    strict_cbor,
    validate,
)
from meshnet.socket_loop import SocketLoop, TimerHandle, recv_message
from meshnet.watched import close_watched, watch

#: A reply type of the client API (``StatusReply``, ``PeersReply``).
_Reply = TypeVar("_Reply")

DEFAULT_TIMEOUT = 60.0
#: How long past a job's timeout the client waits for its node before giving up on it.
CLIENT_GRACE = 5.0
REQUEST_TIMEOUT = 10.0
#: How long a client goes without a connection to its node (at first, or after losing
#: one) before it fails what is pending with ``NodeUnreachable``. A running node accepts
#: within milliseconds on a LAN (libzmq retries a refused connection every 0.1-0.2 s),
#: so a few seconds tells "not running" from "slow to answer" without waiting out a
#: job's timeout.
DEFAULT_CONNECT_TIMEOUT = 3.0
#: Socket events that tell whether the client is connected to its node. Success is the
#: ZeroMQ handshake (libzmq reports it for plain TCP as for CurveZMQ), not the TCP
#: connection: a port held by another program accepts TCP and never completes one.
LINK_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_DISCONNECTED
)
#: What the client saw of its node when it gives up on it: the cause, and what to check.
NOTHING_THERE = ("no connection", "is `meshnet node` running there?")
CONNECTION_LOST = ("the connection was lost and not re-established", "is `meshnet node` running there?")
NOT_ZEROMQ = ("a TCP connection opened but no ZeroMQ handshake completed", "is it `meshnet node` that listens there?")
HANDSHAKE_FAILED = ("the ZeroMQ handshake failed", "is it `meshnet node` that listens there?")
CURVE_FAILED = ("the CurveZMQ handshake failed", "is `meshnet node` running there, and is node_peer_id its peer id?")
#: Jobs ``map`` keeps in flight: half the default queue, leaving room for others.
DEFAULT_MAP_WINDOW = 32


class MeshClient:
    """A connection to one node's client API.

    ``identity`` and ``node_peer_id`` are needed only when the node's endpoint is not
    loopback (it then requires CurveZMQ and admits the client's peer id).

    ``connect_timeout``: seconds without a connection to the node (none yet, or the one
    there was is lost) after which every pending job and request fails with
    ``NodeUnreachable``, and :meth:`submit`, :meth:`status` and :meth:`peers` fail the
    same way at once until a connection comes up again. While connected, a job waits for
    its node up to its timeout plus ``CLIENT_GRACE``.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_API_ENDPOINT,
        *,
        identity: Identity | None = None,
        node_peer_id: str | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ):
        if (identity is None) != (node_peer_id is None):
            raise LocalProtocolError("pass both identity and node_peer_id for CurveZMQ, or neither")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be a positive number of seconds")
        self.endpoint = endpoint
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self._context = zmq.Context()
        self._loop = SocketLoop("mesh-client")
        #: Jobs in flight: their future and the timer that gives up on them.
        self._pending: dict[bytes, tuple[concurrent.futures.Future[Any], TimerHandle | None]] = {}
        #: Status and peers requests in flight, by the seq they carry (loop thread only).
        self._requests: dict[int, tuple[type, concurrent.futures.Future[Any]]] = {}
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False
        self._refused: MeshError | None = None
        #: Why the node cannot be reached, while it cannot (set and cleared on the loop
        #: thread, under the lock; read by submit).
        self._unreachable: str | None = None
        self._identity = identity
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        # loop thread: the state of the connection to the node
        self._linked = False
        self._link_timer: TimerHandle | None = None
        #: What the last connection attempt came to, for the error if none comes up.
        self._link_trouble = NOTHING_THERE
        self._loop.start()
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.call_soon(self._io_open, identity, node_peer_id, opened)
        try:
            opened.result(timeout=10)
        except BaseException:
            self.close()
            raise

    # -- public API --

    def submit(
        self, kind: str, payload: Any = None, *, to: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> concurrent.futures.Future[Any]:
        """Submit one job; the future resolves to its decoded result.

        Raises ``NodeUnreachable`` at once while the client knows it cannot reach its
        node (see ``connect_timeout``)."""
        body = cbor2.dumps(payload)
        if len(body) > self.max_payload:
            raise LocalProtocolError(f"payload is {len(body)} bytes encoded; the limit is {self.max_payload}")
        job_id = os.urandom(JOB_ID_BYTES)
        submit = Submit(id=job_id, kind=kind, body=body, to=to, timeout=timeout, batch=True)
        validate(submit)
        frames = encode(submit)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.job_id = job_id.hex()  # type: ignore[attr-defined]
        with self._lock:
            if self._closed:
                raise MeshError("the client is closed")
            if self._refused is not None:
                raise self._refused
            if self._unreachable is not None:
                raise NodeUnreachable(self._unreachable)
            self._pending[job_id] = (future, None)
        self._loop.call_soon(self._io_submit, job_id, frames, timeout)
        return future

    def run(self, kind: str, payload: Any = None, *, to: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> Any:
        """Submit one job and wait for its result (raises its ``JobError``)."""
        return self.submit(kind, payload, to=to, timeout=timeout).result()

    def map(
        self,
        kind: str,
        payloads: Iterable[Any],
        *,
        to: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        window: int = DEFAULT_MAP_WINDOW,
    ) -> Iterator[Any]:
        """Run a job per payload; yield results in payload order.

        At most ``window`` jobs are in flight at once, so that a long iterable does not
        overflow the node's queue (which would refuse the excess as ``busy``). The first
        job that does not succeed raises its ``JobError`` here.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        in_flight: deque[concurrent.futures.Future[Any]] = deque()
        for payload in payloads:
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
            in_flight.append(self.submit(kind, payload, to=to, timeout=timeout))
        while in_flight:
            yield in_flight.popleft().result()

    def cancel(self, future: concurrent.futures.Future[Any]) -> None:
        """Ask the node to cancel the job behind ``future``; it ends as ``cancelled``
        unless it finished first."""
        self._loop.call_soon(self._io_send, encode(Cancel(id=bytes.fromhex(future.job_id))))  # type: ignore[attr-defined]

    def status(self, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """The node's status: id, relay link, queue, executors, job counts."""
        return self._request(StatusRequest(seq=next(self._seq)), StatusReply, timeout).info

    def peers(self, timeout: float = REQUEST_TIMEOUT) -> list[dict[str, Any]]:
        """The peers the node's relay knows; none for a node that runs alone (no relay)."""
        return self._request(PeersRequest(seq=next(self._seq)), PeersReply, timeout).peers

    def ping(self, peer: str, timeout: float = 5.0) -> dict[str, Any]:
        """One round trip to ``peer`` through this node, on the node's current path to it
        (and a direct link asked for, as a job does): ``rtt`` (seconds), ``path`` the
        answer came on (``relay``, ``direct`` or ``lan``), ``sent`` the path the ping went
        on, and ``address``, the peer's end of a direct link. Raises ``PingFailed`` when
        the peer does not answer within ``timeout``, or cannot be asked."""
        request = PingPeer(peer=peer, seq=next(self._seq), timeout=timeout)
        validate(request)
        reply = self._request(request, PingReply, timeout + REQUEST_TIMEOUT)
        return {"peer": reply.peer, "rtt": reply.rtt, "path": reply.path, "sent": reply.sent, "address": reply.address}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._loop.call_soon(self._io_close)
        self._loop.stop()
        if not self._loop.running:  # never destroy a context under a thread still using it
            self._context.destroy(linger=0)

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _request(self, request: Any, reply_type: type[_Reply], timeout: float) -> _Reply:
        future: concurrent.futures.Future[_Reply] = concurrent.futures.Future()
        self._loop.call_soon(self._io_request, request, reply_type, future)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._loop.call_soon(self._requests.pop, request.seq, None)
            raise NodeUnreachable(
                f"no answer from the node at {self.endpoint} within {timeout:g} s; is it running?"
            ) from None

    def _io_open(
        self, identity: Identity | None, node_peer_id: str | None, opened: concurrent.futures.Future[Any]
    ) -> None:
        try:
            sock = self._context.socket(zmq.DEALER)
            if identity is not None and node_peer_id is not None:
                public, secret = identity.zmq_curve_keys()
                sock.curve_publickey = public
                sock.curve_secretkey = secret
                sock.curve_serverkey = curve_public_z85(node_peer_id)
            # Whether the node is there at all (and, with CurveZMQ, whether it refuses our
            # key) shows only as socket events: watch them.
            self._monitor = watch(sock, LINK_EVENTS, "meshclient")
            self._loop.add_reader(self._monitor, self._io_monitor)
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
        self._loop.add_reader(sock, self._io_readable)
        self._link_timer = self._loop.call_later(self.connect_timeout, self._io_link_timed_out)
        opened.set_result(None)

    def _io_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._io_linked()
            elif event == zmq.EVENT_DISCONNECTED:
                if self._linked:
                    self._linked = False
                    self._link_trouble = CONNECTION_LOST
                    self._link_timer = self._loop.call_later(self.connect_timeout, self._io_link_timed_out)
            elif event == zmq.EVENT_CONNECTED:
                if not self._linked:
                    self._link_trouble = NOT_ZEROMQ
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._io_refused()
            else:  # a handshake failed otherwise: a wrong server key, or not ZeroMQ at all
                self._link_trouble = CURVE_FAILED if self._identity is not None else HANDSHAKE_FAILED

    def _io_linked(self) -> None:
        self._linked = True
        self._link_trouble = NOTHING_THERE
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        with self._lock:
            self._unreachable = None

    def _io_link_timed_out(self) -> None:
        """No connection for ``connect_timeout``: fail what is pending, and what comes
        until a connection does."""
        self._link_timer = None
        self._io_monitor()  # a handshake may have succeeded just now: its event decides
        if self._linked or self._sock is None:
            return
        cause, hint = self._link_trouble
        why = f"cannot reach the node at {self.endpoint}: {cause} within {self.connect_timeout:g} s; {hint}"
        with self._lock:
            self._unreachable = why
        self._io_fail_all(NodeUnreachable(why))
        # What is still queued for the node belongs to jobs that have just failed: a node
        # that comes up later must not run them. Reconnecting drops the queue (LINGER 0).
        self._sock.disconnect(self.endpoint)
        self._sock.connect(self.endpoint)

    def _io_refused(self) -> None:
        peer_id = self._identity.peer_id if self._identity else "?"
        refused = MeshError(
            f"the node at {self.endpoint} refused this client's key; add {peer_id} to its api.allowed_clients"
        )
        with self._lock:
            self._refused = refused
        self._io_fail_all(refused)

    def _io_close(self) -> None:
        if self._link_timer is not None:
            self._link_timer.cancel()
            self._link_timer = None
        close_watched(self._loop, self._sock, self._monitor)
        self._monitor = self._sock = None
        self._io_fail_all(MeshError("the client was closed before the job ended"))

    def _io_fail_all(self, error: MeshError) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for future, timer in pending.values():
            if timer is not None:
                timer.cancel()
            _settle(future, exception=error)
        requests, self._requests = self._requests, {}
        for _, future in requests.values():
            _settle(future, exception=error)

    def _io_send(self, frames: list[Any]) -> bool:
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

    def _io_submit(self, job_id: bytes, frames: list[Any], timeout: float) -> None:
        with self._lock:
            entry = self._pending.get(job_id)
            if entry is None:
                return  # failed or closed meanwhile
            timer = self._loop.call_later(timeout + CLIENT_GRACE, self._io_give_up, job_id, timeout)
            self._pending[job_id] = (entry[0], timer)
        if not self._io_send(frames):
            self._io_give_up(job_id, None)

    def _io_request(self, request: Any, reply_type: type, future: concurrent.futures.Future[Any]) -> None:
        if self._refused is not None:
            _settle(future, exception=self._refused)
            return
        if self._unreachable is not None:
            _settle(future, exception=NodeUnreachable(self._unreachable))
            return
        self._requests[request.seq] = (reply_type, future)
        if not self._io_send(encode(request)):
            self._requests.pop(request.seq, None)
            _settle(future, exception=NodeUnreachable(f"the node at {self.endpoint} is not taking messages"))

    def _io_give_up(self, job_id: bytes, timeout: float | None) -> None:
        with self._lock:
            entry = self._pending.pop(job_id, None)
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
                request = self._requests.pop(message.seq, None) if message.seq is not None else None
                if request is None:
                    continue  # an answer to a request that gave up, or to none of ours
                reply_type, future = request
                if isinstance(message, reply_type):
                    _settle(future, result=message)
                elif isinstance(message, Error) and reply_type is PingReply:
                    _settle(future, exception=PingFailed(message.message, message.code))
                else:
                    error = message.message if isinstance(message, Error) else "unexpected reply"
                    _settle(future, exception=MeshError(error))

    def _io_result(self, message: Result) -> None:
        with self._lock:
            entry = self._pending.pop(message.id, None)
        if entry is None:
            return
        future, timer = entry
        if timer is not None:
            timer.cancel()
        if message.status == "succeeded":
            try:
                value = strict_cbor.loads_value(message.body, "the job's result") if message.body is not None else None
            except ProtocolError as exc:
                _settle(future, exception=JobFailed(f"{exc} (results are plain CBOR data)", job_id=message.id.hex()))
            else:
                _settle(future, result=value)
            return
        error = message.error or {}
        cls = JOB_ERRORS_BY_STATUS.get(message.status, JobFailed)
        text = error.get("message") or message.status
        if error.get("type") and message.status == "failed":
            text = f"{error['type']}: {text}"
        _settle(
            future,
            exception=cls(
                text, job_id=message.id.hex(), reason=error.get("reason", ""), error_type=error.get("type", "")
            ),
        )


def _settle(
    future: concurrent.futures.Future[Any], *, result: Any = None, exception: BaseException | None = None
) -> None:
    if future.done():
        return
    if exception is not None:
        future.set_exception(exception)
    else:
        future.set_result(result)
