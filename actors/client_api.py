"""ClientApiActor: the endpoint where clients submit jobs to this node.

The ROUTER lives on the node's job loop (a :class:`SocketLoop` shared with the worker
pool and the relay client). On the job path the loop thread decodes a submission and
hands it to the job book (or the relay client) directly, the job carrying its way back
as data (``ToClient``); its end comes back through ``Answers`` and goes out on the same
socket, on the same thread (actors/client_answers.py holds what a client does not read).
Requests that need answers from several actors (``status``) come to the actor itself,
which may wait without holding up the socket.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator

from actors.answers import Answers
from actors.base import NodeActor
from actors.client_answers import AnswerDelivery, client_tag
from actors.job_queue import JobBook
from actors.messages import CancelJob, ClientRequest, Drain, PingThere, QueryPeers, RunThere
from meshnet.endpoints import bind_failure, is_local_endpoint
from meshnet.errors import ConfigError, ProtocolError, StartupError
from meshnet.identity import Identity, curve_public_z85
from meshnet.jobs.model import REFUSED_DRAINING, JobSpec, Outcome, ToClient
from meshnet.listener_guard import ListenerGuard, guard_listener
from meshnet.log_budget import LogBudget
from meshnet.memory_budget import MemoryBudget
from meshnet.node.effects import PeersAnswered, PingAnswered
from meshnet.outbox import API_SEND_HWM, DEFAULT_MAX_UNREAD_BYTES
from meshnet.protocol import (
    CLIENT_TO_NODE,
    MAX_FRAMES,
    Cancel,
    Error,
    PeersReply,
    PeersRequest,
    PingPeer,
    PingReply,
    Result,
    StatusReply,
    StatusRequest,
    Submit,
    decode,
    encode,
    frame_limit,
)
from meshnet.socket_loop import SocketLoop, recv_message

log = structlog.get_logger("meshnet.api")

RECV_BATCH = 256
#: A ``ping_peer`` without a timeout waits this long for its peer; none waits longer
#: than the max (each holds a timer and an entry on the node until it ends).
PING_TIMEOUT = 5.0
PING_TIMEOUT_MAX = 60.0


@dataclass(frozen=True)
class StatusFor:
    """Gather the node's status (asking other actors) and send it to client ``conn``."""

    conn: bytes
    seq: int | None = None


def client_origin(conn: bytes) -> str:
    """The origin of jobs submitted on client connection ``conn``."""
    return f"client:{conn.hex()}"


#: What the log calls the handshakes ZAP refused: one source, however many keys (a
#: stranger makes up a key per handshake).
REFUSED_KEYS = "handshakes with keys not allowed"


class _AllowClients:
    """ZAP credentials provider (the ZAP thread); a refused key goes to ``refused``."""

    def __init__(self, keys: set[bytes], refused: Callable[[bytes], None]):
        self.keys = keys
        self.refused = refused

    def callback(self, domain: str, key: bytes) -> bool:
        if key not in self.keys:
            self.refused(key)
            return False
        return True


class ClientApiActor(NodeActor):
    def __init__(
        self,
        *,
        identity: Identity,
        endpoint: str,
        allowed_clients: list[str],
        book: JobBook,
        status: Callable[[], dict[str, Any]],
        default_timeout: float,
        max_timeout: float,
        max_payload: int,
        context: zmq.Context,
        loop: SocketLoop | None = None,
        config_path: Path | None = None,
        max_unread: int = DEFAULT_MAX_UNREAD_BYTES,
        memory: MemoryBudget | None = None,
        answers: Answers | None = None,
    ):
        super().__init__()
        if not is_local_endpoint(endpoint) and not allowed_clients:
            raise ConfigError(
                f"api.endpoint = {endpoint!r} is reachable from other machines: set api.allowed_clients "
                "to the peer ids of the clients that may submit jobs (they connect with CurveZMQ)"
            )
        self.identity = identity
        self.peer_id = identity.peer_id
        self.requested_endpoint = endpoint
        self.allowed_clients = allowed_clients
        self.book = book
        if answers is not None:  # the results of this node's clients' jobs come here
            answers.serve_clients(self._io_answer)
            answers.serve_requests(self._io_replied)
        #: Where jobs for other peers go; None: no relay configured. Set by :meth:`serve`.
        self.relay: Callable[[Any], None] | None = None
        self.config_path = config_path
        self.gather_status = status
        self.default_timeout = default_timeout
        self.max_timeout = max_timeout
        self.max_payload = max_payload
        self.context = context
        # The node's job loop, shared with the worker pool: a local job reaches a worker
        # and its result comes back without changing threads. (Its own loop if none.)
        self._owns_loop = loop is None
        self.loop = loop or SocketLoop("client-api")
        self.endpoint = ""
        self.draining = False
        self._auth: ThreadAuthenticator | None = None
        self._router: zmq.Socket | None = None
        self._guard: ListenerGuard | None = None
        #: The last frame read (recv_message's ``last``), for its connection's descriptor.
        self._last: list[Any] = [None]
        #: Ids of the jobs submitted here that have no result yet (loop thread only): a
        #: submit reusing one is refused with an ``error``, never a ``result``.
        self.in_flight: set[bytes] = set()
        self.log = log.bind(peer_id=self.peer_id)
        self.rejections = LogBudget(self.loop, self.log, "client_messages_rejected", "client")
        self.memory = memory or MemoryBudget()
        #: Answers to clients: held while they do not read, within the memory budget.
        self.delivery = AnswerDelivery(loop=self.loop, logger=self.log, memory=self.memory, max_unread=max_unread)
        self.outboxes = self.delivery.outboxes
        #: Send one answer to a client (loop thread): the delivery's, called directly.
        self._io_send = self.delivery.send

    def bind(self) -> str:
        """Bind the endpoint, without reading from it yet (:meth:`serve` does); raise
        ``StartupError`` (to the asker) if it cannot be bound.

        The supervisor binds before the relay client connects: a node that cannot serve
        its clients (a second node on the same endpoint) stops before it registers
        anywhere, and so never displaces a running node of the same identity."""
        if self.allowed_clients:
            self._auth = ThreadAuthenticator(self.context)
            self._auth.start()
            keys = {curve_public_z85(p) for p in self.allowed_clients}
            refused = functools.partial(self.loop.call_soon, self._io_key_refused)
            self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowClients(keys, refused))
        if self._owns_loop:
            self.loop.start()
        try:
            self.endpoint = self.loop.run_sync(self._io_bind)
        except StartupError:
            if self._owns_loop:
                self.loop.stop()
            if self._auth is not None:
                self._auth.stop()
                self._auth = None
            raise
        return self.endpoint

    def serve(self, relay: Callable[[Any], None] | None) -> None:
        """Start reading the bound endpoint; jobs for other peers go to ``relay`` (None
        when no relay is configured)."""
        self.loop.run_sync(self._io_serve, relay)
        self.log.info("api_listening", endpoint=self.endpoint, curve=bool(self.allowed_clients))

    def on_stop(self) -> None:
        if self._owns_loop:
            self.loop.call_soon(self._io_close)
            self.loop.stop()
        elif self.loop.running:
            self.loop.run_sync(self._io_close)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def handle(self, message: Any) -> Any:
        if isinstance(message, Drain):
            # On the loop, which reads it for every submission (answered once it is set).
            if self.loop.running:
                self.loop.run_sync(self._io_drain)
            else:
                self._io_drain()
            return True
        elif isinstance(message, StatusFor):
            try:
                reply: Any = StatusReply(info=self.gather_status(), seq=message.seq)
            except Exception as exc:  # an actor did not answer: say so rather than go silent
                self.log.exception("status_failed")
                reply = Error(code="unavailable", message=f"status unavailable: {exc}", seq=message.seq)
            self.loop.call_soon(self._io_send, message.conn, encode(reply))

    # -- loop thread --

    def _io_drain(self) -> None:
        self.draining = True

    def _io_bind(self) -> str:
        try:
            router = self.context.socket(zmq.ROUTER)
            if self.allowed_clients:
                public, secret = self.identity.zmq_curve_keys()
                router.curve_server = True
                router.curve_publickey = public
                router.curve_secretkey = secret
            router.setsockopt(zmq.LINGER, 1000)
            # A client that reconnects (same routing id) takes its old identity over, so
            # the results of jobs it submitted before still reach it.
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # A full queue for a client is an error (EAGAIN), not a silent drop: the answer
            # waits in self.outboxes, counted in bytes, and ZeroMQ's own queue per client
            # stays a few messages long (see meshnet.outbox).
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.SNDHWM, API_SEND_HWM)
            router.setsockopt(zmq.MAXMSGSIZE, frame_limit(self.max_payload))
            guard_listener(router)
            router.bind(self.requested_endpoint)
        except zmq.ZMQError as exc:
            number = exc.errno or errno.EINVAL
            cause = zmq.strerror(number)
            raise bind_failure("api.endpoint", self.requested_endpoint, number, cause, self.config_path) from None
        self._router = router
        # Connections that sent nothing yet are closed past a cap: idle ones cannot hold
        # the node's descriptors (meshnet.conn_guard).
        self._guard = ListenerGuard(self.loop, router, name="api", logger=self.log)
        self.delivery.attach(router, self._guard)
        return router.getsockopt_string(zmq.LAST_ENDPOINT)

    def _io_serve(self, relay: Callable[[Any], None] | None) -> None:
        self.relay = relay
        if self._router is not None:
            self.loop.add_reader(self._router, self._io_readable)

    def _io_close(self) -> None:
        self.rejections.close()
        self.delivery.close()
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        try:
            self.loop.close_socket(self._router, linger=1000)  # the last results still go out
        finally:
            self._router = None

    def _io_readable(self) -> None:
        router, guard, last = self._router, self._guard, self._last
        try:
            self._io_read_batch(router, guard, last)
        finally:
            last[0] = None  # not kept while the node is idle (it may be a whole payload)

    def _io_read_batch(self, router: zmq.Socket | None, guard: ListenerGuard | None, last: list[Any]) -> None:
        for _ in range(RECV_BATCH):
            if router is None:
                return
            try:
                frames = recv_message(router, MAX_FRAMES + 1, copied=2, last=last)
            except zmq.Again:
                return
            if frames is None:
                # Its routing id went with the frames dropped unread: counted under no client.
                self._io_rejected(b"", f"a message of more than {MAX_FRAMES} frames")
                continue
            conn = frames[0]
            if guard is not None:
                guard.seen(conn, last[0])
            try:
                message = decode(
                    frames[1:],
                    CLIENT_TO_NODE,
                    max_body=self.max_payload,
                )
            except ProtocolError as exc:
                self._io_rejected(conn, str(exc))
                ref = getattr(exc, "ref", None)
                if ref is not None and ref in self.in_flight:
                    # Its id is a job in flight: that job keeps its id and its one result.
                    self._io_send(conn, encode(Error(code=exc.code, message=str(exc), id=ref)))
                elif ref is not None:  # a submit whose job we can name: it gets its terminal status
                    refusal = Outcome.refused(exc.code, str(exc))
                    self._io_send(conn, encode(Result(id=ref, status="refused", error=refusal.error)))
                else:
                    self._io_send(conn, encode(Error(code=exc.code, message=str(exc))))
                continue
            self._io_dispatch(conn, message)

    def _io_key_refused(self, key: bytes) -> None:
        """ZAP refused a CurveZMQ handshake with ``key`` (handed here from its thread)."""
        curve_key = key.decode("ascii", "replace")
        self._io_rejected(b"", "key not in api.allowed_clients", source=REFUSED_KEYS, curve_key=curve_key)

    def _io_rejected(self, conn: bytes, error: str, *, source: str = "", **fields: Any) -> None:
        """Log a client's rejected message if it is that client's first lately; count it
        otherwise, for a summary line (a client sending garbage in a loop must not fill
        the node's log; new connections past a few an interval are counted together)."""
        client = source or client_tag(conn)
        if self.rejections.allow(client, error):
            event = "client_refused" if source == REFUSED_KEYS else "client_message_rejected"
            self.log.warning(event, client=client, error=error, **fields)

    def _io_dispatch(self, conn: bytes, message: Any) -> None:
        if isinstance(message, Submit):
            self._io_submit(conn, message)
            return
        if isinstance(message, Cancel):
            # Only the connection that submitted a job may cancel it.
            self.book.cancel(message.id, client_origin(conn))
            if self.relay is not None:
                self.relay(CancelJob(message.id, requester=client_origin(conn)))
        elif isinstance(message, StatusRequest):
            self.actor_ref.tell(StatusFor(conn, message.seq))
        elif isinstance(message, PeersRequest):
            self._io_peers(conn, message.seq)
        elif isinstance(message, PingPeer):
            self._io_ping(conn, message)

    def _io_submit(self, conn: bytes, message: Submit) -> None:
        job_id = message.id
        peer = message.to if message.to != self.peer_id else None
        if job_id in self.in_flight:
            # Refused with an error, not a result: a result with this id would be taken
            # for the terminal status of the job in flight under it.
            duplicate = f"job {job_id.hex()} is in flight already; its result will come; use a new id for a new job"
            self._io_send(conn, encode(Error(code="duplicate", message=duplicate, id=job_id)))
            return
        self.in_flight.add(job_id)
        timeout = message.timeout or self.default_timeout
        back = ToClient(conn, peer, bool(message.batch))
        job = JobSpec(
            id=job_id, kind=message.kind, payload=message.body, timeout=timeout, back=back, origin=client_origin(conn)
        )
        if self.draining:
            self._io_answer(job, back, REFUSED_DRAINING)
        elif (self.outboxes.backlogs or self.outboxes.dropped) and self.outboxes.refuses(conn):
            unread = (
                f"this client has not read {self.outboxes.unread(conn)} bytes of answers"
                if self.outboxes.holds(conn)
                else "this client stopped reading its answers and they were discarded"
            )
            limit = f"api.max_unread_bytes is {self.outboxes.budget}"
            self._io_answer(job, back, Outcome.refused("busy", f"{unread} ({limit}); read them first"))
        elif timeout > self.max_timeout:
            why = f"timeout {timeout:g} s exceeds this node's jobs.max_timeout"
            self._io_answer(job, back, Outcome.refused("invalid", why))
        elif peer is None:
            # At once, not after the rest of this batch is read: a free worker starts it
            # while the loop reads on.
            self.book.submit([job])
        elif self.relay is None:
            why = "this node has no relay configured, so it cannot reach other peers"
            self._io_answer(job, back, Outcome.refused("no_relay", why))
        elif not self.memory.admits(size := len(memoryview(message.body))):
            self._io_answer(job, back, Outcome.refused("busy", self.memory.why(size)))
        else:
            self.relay(RunThere([(job, peer)]))

    def _io_answer(self, job: JobSpec, back: ToClient, outcome: Outcome) -> None:
        """Job ``job`` of client ``back.conn`` ended with ``outcome``: its one result."""
        self.in_flight.discard(job.id)
        result = Result(id=job.id, status=outcome.status, error=outcome.error, body=outcome.result, peer=back.peer)
        self.delivery.result(back.conn, result, back.batch)

    def _io_ping(self, conn: bytes, message: PingPeer) -> None:
        peer = message.peer
        request = ClientRequest(conn, message.seq, peer)
        if peer == self.peer_id:
            why = f"{peer} is this node's own peer id; name another node's"
            self._io_replied(PingAnswered(request, None, "invalid", why))
        elif self.relay is None:
            why = "this node has no relay configured, so it reaches no other peers"
            self._io_replied(PingAnswered(request, None, "no_relay", why))
        else:
            self.relay(PingThere(peer, min(message.timeout or PING_TIMEOUT, PING_TIMEOUT_MAX), request))

    def _io_peers(self, conn: bytes, seq: int | None) -> None:
        request = ClientRequest(conn, seq)
        if self.relay is None:
            self._io_replied(PeersAnswered(request, []))  # a node alone has no peers: an answer, not an error
        else:
            self.relay(QueryPeers(request))

    def _io_replied(self, reply: PingAnswered | PeersAnswered) -> None:
        """The answer to a client's ping or peers query (from the relay client, by Answers)."""
        request = reply.request
        assert isinstance(request, ClientRequest)
        if isinstance(reply, PeersAnswered):
            if reply.peers is None:
                frames = encode(Error(code="no_relay", message=reply.error, seq=request.seq))
            else:
                frames = encode(PeersReply(peers=reply.peers, seq=request.seq))
        elif reply.answer is None:
            frames = encode(Error(code=reply.code, message=reply.why, seq=request.seq))
        else:
            answer = {**reply.answer, "rtt": max(reply.answer["rtt"], 1e-9)}
            frames = encode(PingReply(peer=request.peer, seq=request.seq, **answer))
        self._io_send(request.conn, frames)
