"""ClientApiActor: the endpoint where clients submit jobs to this node.

The ROUTER lives on the node's job loop (a :class:`SocketLoop` shared with the worker
pool and the relay client). On the job path the loop thread decodes a submission and
hands it to the job book (or the relay client) directly, the job carrying its way back
as data (``ToClient``); its end comes back through ``Answers`` and goes out on the same
socket, on the same thread (actors/client_answers.py holds what a client does not read).
Requests that need answers from several actors (``status``) come to the actor itself,
which may wait without holding up the socket.

A shell: the listening socket's set-up and tear-down are actors/client_endpoint.py's,
and what to do with a submission, a ping or an answer is decided without I/O by
meshnet/admission.py. What stays here reads, acts on those decisions, and answers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import zmq

from actors.answers import Answers
from actors.base import NodeActor
from actors.client_answers import AnswerDelivery, client_tag
from actors.client_endpoint import ClientEndpoint
from actors.job_queue import JobBook
from actors.messages import CancelJob, ClientRequest, Drain, PingThere, PlaceJobs, QueryPeers, RunThere, StatusFor
from meshnet.admission import RUN_HERE, SEND_TO_PEER, Admission, Duplicate, client_reply, ping_timeout
from meshnet.capabilities import read_capabilities
from meshnet.errors import ProtocolError, StartupError
from meshnet.identity import Identity
from meshnet.jobs.model import JobSpec, Outcome, ToClient
from meshnet.listener_guard import ListenerGuard
from meshnet.log_budget import LogBudget
from meshnet.memory_budget import MemoryBudget
from meshnet.node.effects import PeersAnswered, PingAnswered
from meshnet.outbox import DEFAULT_MAX_UNREAD_BYTES
from meshnet.protocol import (
    CLIENT_TO_NODE,
    MAX_FRAMES,
    Cancel,
    Error,
    PeersRequest,
    PingPeer,
    Result,
    StatusReply,
    StatusRequest,
    Submit,
    decode,
    encode,
)
from meshnet.requirements import describe, unmet
from meshnet.socket_loop import SocketLoop, recv_message

log = structlog.get_logger("meshnet.api")

RECV_BATCH = 256


def client_origin(conn: bytes) -> str:
    """The origin of jobs submitted on client connection ``conn``."""
    return f"client:{conn.hex()}"


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
        capabilities: dict[str, Any] | None = None,
    ):
        super().__init__()
        #: What this node can do (meshnet.capabilities): a job's requirements are checked
        #: against it here when no relay can place the job elsewhere.
        self.own_caps = read_capabilities(capabilities or {})
        # First: an endpoint reachable from other machines without allowed clients is
        # refused (ConfigError) before anything is made.
        self.listener = ClientEndpoint(context, identity, endpoint, allowed_clients, max_payload, config_path)
        self.peer_id = identity.peer_id
        self.book = book
        if answers is not None:  # the results of this node's clients' jobs come here
            answers.serve_clients(self._io_answer)
            answers.serve_requests(self._io_replied)
        #: Where jobs for other peers go; None: no relay configured. Set by :meth:`serve`.
        self.relay: Callable[[Any], None] | None = None
        self.gather_status = status
        self.default_timeout = default_timeout
        self.max_payload = max_payload
        # The node's job loop, shared with the worker pool: a local job reaches a worker
        # and its result comes back without changing threads. (Its own loop if none.)
        self._owns_loop = loop is None
        self.loop = loop or SocketLoop("client-api")
        self.endpoint = ""
        #: The last frame read (recv_message's ``last``), for its connection's descriptor.
        self._last: list[Any] = [None]
        self.log = log.bind(peer_id=self.peer_id)
        self.rejections = LogBudget(self.loop, self.log, "client_messages_rejected", "client")
        self.memory = memory or MemoryBudget()
        #: Answers to clients: held while they do not read, within the memory budget.
        self.delivery = AnswerDelivery(loop=self.loop, logger=self.log, memory=self.memory, max_unread=max_unread)
        #: Send one answer to a client (loop thread): the delivery's, called directly.
        self._io_send = self.delivery.send
        #: What becomes of each submission (loop thread only), and the ids in flight.
        self.admission = Admission(
            peer_id=self.peer_id, max_timeout=max_timeout, outboxes=self.delivery.outboxes, memory=self.memory
        )
        self._decide = self.admission.decide  # (bound once: it is called for every job)

    def bind(self) -> str:
        """Bind the endpoint, without reading from it yet (:meth:`serve` does); raise
        ``StartupError`` (to the asker) if it cannot be bound.

        The supervisor binds before the relay client connects: a node that cannot serve
        its clients (a second node on the same endpoint) stops before it registers
        anywhere, and so never displaces a running node of the same identity."""
        self.listener.start_auth(self.loop, self.rejections, self.log)
        if self._owns_loop:
            self.loop.start()
        try:
            self.endpoint = self.loop.run_sync(self._io_bind)
        except StartupError:
            if self._owns_loop:
                self.loop.stop()
            self.listener.stop_auth()
            raise
        return self.endpoint

    def serve(self, relay: Callable[[Any], None] | None) -> None:
        """Start reading the bound endpoint; jobs for other peers go to ``relay`` (None
        when no relay is configured)."""
        self.loop.run_sync(self._io_serve, relay)
        self.log.info("api_listening", endpoint=self.endpoint, curve=self.listener.curve)

    def on_stop(self) -> None:
        if self._owns_loop:
            self.loop.call_soon(self._io_close)
            self.loop.stop()
        elif self.loop.running:
            self.loop.run_sync(self._io_close)
        self.listener.stop_auth()

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
        self.admission.draining = True

    def _io_bind(self) -> str:
        self.delivery.attach(*self.listener.open(self.loop, self.log))
        return self.listener.address

    def _io_serve(self, relay: Callable[[Any], None] | None) -> None:
        self.relay = relay
        if self.listener.router is not None:
            self.loop.add_reader(self.listener.router, self._io_readable)

    def _io_close(self) -> None:
        self.rejections.close()
        self.delivery.close()  # what this turn gathered goes out before the socket closes
        self.listener.close()

    def _io_readable(self) -> None:
        listener, last = self.listener, self._last
        try:
            self._io_read_batch(listener.router, listener.guard, last)
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
                message = decode(frames[1:], CLIENT_TO_NODE, max_body=self.max_payload)
            except ProtocolError as exc:
                self._io_rejected(conn, str(exc))
                reply = self.admission.undecodable(exc.code, str(exc), getattr(exc, "ref", None))
                self._io_send(conn, encode(reply))
                continue
            self._io_dispatch(conn, message)

    def _io_rejected(self, conn: bytes, error: str) -> None:
        """Log a client's rejected message if it is that client's first lately; count it
        otherwise, for a summary line (a client sending garbage in a loop must not fill
        the node's log; new connections past a few an interval are counted together)."""
        client = client_tag(conn)
        if self.rejections.allow(client, error):
            self.log.warning("client_message_rejected", client=client, error=error)

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
            self._io_peers(conn, message)
        elif isinstance(message, PingPeer):
            self._io_ping(conn, message)

    def _io_submit(self, conn: bytes, message: Submit) -> None:
        job_id, relay = message.id, self.relay
        peer = message.to if message.to != self.peer_id else None
        timeout = message.timeout or self.default_timeout
        decision = self._decide(conn, job_id, peer, timeout, message.body, relay is not None)
        # Built before the decision is looked at, so that an admitted job (nearly every
        # one) is told apart with ``is`` alone; a duplicate's is thrown away.
        back = ToClient(conn, peer or self.peer_id, bool(message.batch))
        job = JobSpec(
            id=job_id, kind=message.kind, payload=message.body, timeout=timeout, back=back, origin=client_origin(conn)
        )
        if decision is RUN_HERE:
            placed = message.to is None  # to = this node: pinned here
            if placed and relay is not None and (message.requires is not None or not self.book.has_free_executor()):
                # No target, and this node is busy or the job has requirements: the node
                # places it (here, or on the device that fits best: meshnet.placement).
                relay(PlaceJobs([(job, message.requires or {})]))
            elif placed and message.requires and (missed := unmet(self.own_caps, message.requires)) is not None:
                why = f"no device meets {describe(message.requires)}: this node lacks {missed}, and has no relay"
                self._io_answer(job, back, Outcome.refused("no_device", why))
            else:
                # At once, not after the rest of this batch is read: a free worker starts
                # it while the loop reads on.
                self.book.submit([job])
        elif decision is SEND_TO_PEER:
            assert relay is not None and peer is not None  # (admitted for a peer only with a relay)
            relay(RunThere([(job, peer)]))
        elif isinstance(decision, Duplicate):
            self._io_send(conn, encode(Error(code=decision.code, message=decision.text, id=job_id)))
        else:
            self._io_answer(job, back, decision.outcome())

    def _io_answer(self, job: JobSpec, back: ToClient, outcome: Outcome) -> None:
        """Job ``job`` of client ``back.conn`` ended with ``outcome``: its one result."""
        self.admission.in_flight.discard(job.id)
        result = Result(id=job.id, status=outcome.status, error=outcome.error, body=outcome.result, peer=back.peer)
        self.delivery.result(back.conn, result, back.batch)

    def _io_ping(self, conn: bytes, message: PingPeer) -> None:
        request = ClientRequest(conn, message.seq, message.peer)
        refusal = self.admission.ping_refusal(message.peer, self.relay is not None)
        if refusal is not None:
            self._io_replied(PingAnswered(request, None, refusal.code, refusal.text))
        elif self.relay is not None:
            self.relay(PingThere(message.peer, ping_timeout(message.timeout), request))

    def _io_peers(self, conn: bytes, message: PeersRequest) -> None:
        request = ClientRequest(conn, message.seq)
        if self.relay is None:
            self._io_replied(PeersAnswered(request, []))  # a node alone has no peers: an answer, not an error
        else:
            self.relay(QueryPeers(request, message.requires, message.after, message.limit))

    def _io_replied(self, reply: PingAnswered | PeersAnswered) -> None:
        """The answer to a client's ping or peers query (from the relay client, by Answers)."""
        request = reply.request
        assert isinstance(request, ClientRequest)
        self._io_send(request.conn, encode(client_reply(reply, request.seq, request.peer)))
