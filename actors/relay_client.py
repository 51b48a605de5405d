"""RelayClientActor: the node's link to its relay, and the jobs it forwards through it.

The DEALER socket and all of this actor's state live on one :class:`SocketLoop` (the
node's job loop, shared with the client API and the worker pool): it decodes, seals and
opens messages there and drives two cores: :class:`RelayLink` (registration, heartbeat,
reconnect with capped backoff) and :class:`ForwardLedger` (forwarded jobs until each
has one terminal status). Other threads hand it messages with :meth:`post`; on the
loop they are handled at once. So a relayed job crosses no thread on either node: a
client's submission is sealed and sent, and a peer's job reaches a worker, in the
wake-up that read it. After a relay loss the socket is replaced, so the relay sees a
fresh connection and the node registers again.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.base import NodeActor, log_job_end
from actors.job_queue import JobBook
from actors.messages import (
    Abort,
    CancelJob,
    Drain,
    QueryPeers,
    Reconnect,
    ReplyToPeer,
    RunThere,
    SendFailed,
    Tick,
)
from actors.socket_loop import SocketLoop, recv_message, send_message
from meshnet.config import DEFAULT_RELAY_QUEUE_BYTES
from meshnet.errors import ProtocolError, SealError
from meshnet.flow import DEFAULT_WINDOW, LinkFlow, Queued, SendQueue, frames_size
from meshnet.identity import Identity, Sealer, curve_public_z85
from meshnet.jobs.ledger import DEADLINE_GRACE, ForwardedJob, ForwardLedger
from meshnet.jobs.model import JobSpec, Outcome, job_id_text
from meshnet.protocol import (
    BODY_SLACK,
    JOB_ID_BYTES,
    MAX_FRAMES,
    NODE_TO_NODE,
    NONCE_BYTES,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    Error,
    Job,
    JobCancel,
    JobResult,
    PeerDown,
    PeersReply,
    PeersRequest,
    Ping,
    Pong,
    Register,
    Registered,
    Send,
    Unroutable,
    decode,
    decode_inner,
    encode,
    encode_inner_parts,
    frame_limit,
)
from meshnet.rejections import RejectionLog, log_summaries
from meshnet.relay_link import RelayLink

log = structlog.get_logger("meshnet.relay_client")

RECV_BATCH = 256
#: Shorter than a client's own wait (10 s), so that the client hears why.
PEERS_QUERY_TIMEOUT = 5.0
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
#: Results kept after sending, to send again if the relay bounces them because it
#: restarted and did not know this node yet: a finished job's answer is not thrown away.
RESEND_BUDGET_BYTES = 32 * 1024 * 1024
#: A result bounced ``relay_busy`` (its submitter had a window of bytes unread at the
#: relay: a burst of large results) is sent again after each of these delays in turn,
#: about 13 s in all, then given up (logged ``undeliverable``).
RESULT_RETRY_DELAYS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4)
#: Results whose bounces are counted at once (the oldest counts are forgotten first).
MAX_RESULT_RETRIES = 4096


@dataclass(frozen=True)
class HandshakeFailed:
    generation: int
    auth: bool
    status: int


@dataclass(frozen=True)
class ResendResult:
    """Send the result of job ``job_id`` again (the relay bounced it ``relay_busy``)."""

    job_id: bytes


@dataclass(frozen=True)
class Reconnected:
    """libzmq re-established the socket's connection by itself (the relay came back
    before this node noticed it was gone): the relay may not know this node."""

    generation: int


class RelayClientActor(NodeActor):
    def __init__(
        self,
        *,
        identity: Identity,
        sealer: Sealer,
        endpoint: str,
        relay_peer_id: str,
        book: JobBook,
        heartbeat: float,
        liveness: int,
        backoff_min: float,
        backoff_max: float,
        max_payload: int,
        capabilities: dict[str, Any],
        listen: list[str],
        context: zmq.Context,
        loop: SocketLoop | None = None,
        max_queued_bytes: int = DEFAULT_RELAY_QUEUE_BYTES,
    ):
        super().__init__()
        self.identity = identity
        self.peer_id = identity.peer_id
        self.sealer = sealer
        self.endpoint = endpoint
        self.relay_peer_id = relay_peer_id
        self.book = book
        self.link = RelayLink(heartbeat=heartbeat, liveness=liveness, backoff_min=backoff_min, backoff_max=backoff_max)
        self.ledger = ForwardLedger()
        self.max_payload = max_payload
        #: The largest deliver body this node decodes: told to the relay, which refuses
        #: larger sends to us (our socket would drop the connection past it).
        self.max_deliver_body = max_payload + BODY_SLACK
        #: Bytes in flight each way on the link (meshnet.flow), and what waits for room.
        self.flow = LinkFlow()
        self.queue = SendQueue(budget=max_queued_bytes)
        #: The largest send body the relay takes (from its ``registered``).
        self.relay_max_body: int | None = None
        self.capabilities = capabilities
        self.listen = listen
        self.context = context
        self._owns_loop = loop is None
        self.loop = loop or SocketLoop("relay-client")
        self.generation = 0
        #: Peers queries waiting for the relay's answer, by the seq they were sent with.
        self.pending_peers: dict[int, Any] = {}
        self.peers_seq = 0
        self.ping_seq = 0
        self.draining = False
        #: Set while no forwarded job awaits its answer (the supervisor waits on it to drain).
        self.ledger_idle = threading.Event()
        self.ledger_idle.set()
        self.log = log.bind(peer_id=self.peer_id, relay=self.endpoint)
        self._refusal_logged = -1
        self.rejections = RejectionLog()
        #: Answers sent lately (job id -> (peer, result)), oldest first, within a byte
        #: budget; and answers waiting for the relay to know this node again.
        self.sent_results: OrderedDict[bytes, tuple[str, JobResult]] = OrderedDict()
        self.sent_bytes = 0
        self.unsent_results: OrderedDict[bytes, tuple[str, JobResult]] = OrderedDict()
        self.unsent_bytes = 0
        #: Results bounced relay_busy: how often each was sent again.
        self.result_retries: OrderedDict[bytes, int] = OrderedDict()
        # loop-thread state
        self._monitor: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None
        self._handshakes = 0
        self._sock_generation = -1
        self._stopped = False

    # -- life cycle --

    def on_start(self) -> None:
        if self._owns_loop:
            self.loop.start()
        self.loop.run_sync(self._start_link)

    def _start_link(self) -> None:
        self._connect()
        self._schedule_tick()

    def on_stop(self) -> None:
        if self.loop.running:
            self.loop.run_sync(self._shut_down)
        if self._owns_loop:
            self.loop.stop()

    def _shut_down(self) -> None:
        try:
            for job in list(self.ledger.jobs.values()):
                self._settle(job.id, Outcome("cancelled", error_type="Cancelled", message="the node is shutting down"))
        finally:
            self._io_close()
            self._stopped = True

    def post(self, message: Any) -> None:
        """Hand this relay client a message (thread-safe); on its loop, handled now."""
        if self.loop.in_loop():
            self._handle(message)
        else:
            self.loop.call_soon(self._handle, message)

    def poster(self) -> Any:
        """:meth:`post`, for those that hold only this actor's ref."""
        return self.post

    def status(self) -> dict[str, Any]:
        return self.loop.run_sync(self._status, timeout=5)

    def _status(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "relay_peer_id": self.relay_peer_id,
            "state": self.link.state.value,
            "observed": self.link.observed,
            "connects": self.link.connects,
            "forwarded_in_flight": len(self.ledger.jobs),
            "forwarded": dict(self.ledger.counts),
            "unacknowledged_bytes": self.flow.in_flight,
            "queued_bytes": self.queue.size,
        }

    # -- messages --

    def handle(self, message: Any) -> Any:
        """Messages sent to the actor (``tell``/``ask``) are handled on the loop."""
        if isinstance(message, Drain):
            return self.loop.run_sync(self._handle, message)
        self.post(message)

    def _handle(self, message: Any) -> Any:
        """Loop thread."""
        if self._stopped:
            return None
        if isinstance(message, RunThere):
            for job, peer in message.jobs:
                self._forward(job, peer)
        elif isinstance(message, ReplyToPeer):
            self._reply_to_peer(message)
        elif isinstance(message, Tick):
            self._on_tick()
        elif isinstance(message, CancelJob):
            job = self.ledger.jobs.get(message.job_id)
            if job is not None and message.requester == job.origin:
                self._send_cancel(job.peer, job.id)
        elif isinstance(message, QueryPeers):
            if not self.link.registered:
                message.reply(None, f"not connected to the relay at {self.endpoint}")
            else:
                self.peers_seq += 1
                self.pending_peers[self.peers_seq] = (message.reply, time.monotonic() + PEERS_QUERY_TIMEOUT)
                self._send_control(encode(PeersRequest(seq=self.peers_seq)))
        elif isinstance(message, SendFailed):
            if message.generation == self.generation:
                self._settle(message.ref, Outcome.refused("relay_busy", "the link to the relay is congested"))
        elif isinstance(message, Reconnect):
            self._connect()
        elif isinstance(message, HandshakeFailed):
            self._on_handshake_failed(message)
        elif isinstance(message, Reconnected):
            if message.generation == self.generation:
                self.log.info("relay_reconnected", action="registering again")
                # A new connection to a relay that may not know us: registering anew, and
                # its silence is counted from now (a liveness expiry measured from before
                # would drop this connection just as it registers).
                self.link.connecting(time.monotonic())
                self._register()
        elif isinstance(message, ResendResult):
            held = self.sent_results.pop(message.job_id, None)
            if held is not None:
                self.sent_bytes -= len(held[1].result or b"")
                self._send_result(*held)
        elif isinstance(message, Drain):
            self.draining = True
        elif isinstance(message, Abort):
            for job in list(self.ledger.jobs.values()):
                if self.link.registered:
                    self._send_cancel(job.peer, job.id)
                self._settle(job.id, Outcome("cancelled", error_type="Cancelled", message=message.reason))
        self._update_ledger_idle()
        return True

    def _update_ledger_idle(self) -> None:
        if self.ledger.jobs:
            self.ledger_idle.clear()
        else:
            self.ledger_idle.set()

    # -- outgoing jobs --

    def _forward(self, job: JobSpec, peer: str) -> None:
        if not self.link.registered:
            job.reply(Outcome.refused("no_relay", f"this node is not connected to its relay ({self.endpoint}) now"))
            return
        now = time.monotonic()
        entry = ForwardedJob(
            id=job.id,
            peer=peer,
            deadline=now + job.timeout + DEADLINE_GRACE,
            reply=job.reply,
            kind=job.kind,
            origin=job.origin,
        )
        if not self.ledger.add(entry):
            job.reply(Outcome.refused("duplicate", f"job {job_id_text(job.id)} is already in flight"))
            return
        # The payload (a client's frame) is copied once: into the sealed message.
        inner = Job(id=job.id, kind=job.kind, timeout=job.timeout, payload=job.payload)
        sealed = self.sealer.seal_parts(peer, encode_inner_parts(inner))
        entry.nonce = bytes(sealed[:NONCE_BYTES])
        if self.relay_max_body is not None and len(sealed) > self.relay_max_body:
            too_large = f"the sealed job is {len(sealed)} bytes; the relay takes at most {self.relay_max_body}"
            self._settle(job.id, Outcome.refused("too_large", too_large))
            return
        if not self._send_flowed(encode(Send(to=peer, ref=job.id, op="job", body=sealed)), job.id, "job", peer):
            busy = (
                f"{self.queue.size} bytes of jobs and results already wait for the link to the relay "
                f"(relay.max_queued_bytes is {self.queue.budget})"
            )
            self._settle(job.id, Outcome.refused("relay_busy", busy))

    def _settle(self, job_id: bytes, outcome: Outcome, *, peer: str | None = None) -> None:
        job = self.ledger.settle(job_id, outcome.status, peer=peer)
        if job is None:
            return
        self._withdraw(job_id)
        log_job_end(self.log, job_id, job.kind, outcome, to=job.peer)
        job.reply(outcome)

    def _withdraw(self, job_id: bytes) -> bool:
        """A job that ended is not sent if it still waits for room on the link: True
        when it was waiting (its peer never saw it). What waited behind it may go now."""
        if not self.queue.entries or self.queue.withdraw(job_id, "job") is None:
            return False
        self._drain_queue()
        return True

    def _send_cancel(self, peer: str, job_id: bytes) -> None:
        sealed = self.sealer.seal_parts(peer, encode_inner_parts(JobCancel(id=job_id)))
        if not self._send_flowed(encode(Send(to=peer, ref=job_id, op="cancel", body=sealed)), job_id, "cancel", peer):
            self.log.warning("cancel_not_sent", job_id=job_id.hex(), to=peer, reason="the queue to the relay is full")

    def _send_flowed(self, frames: list[Any], ref: bytes, op: str, peer: str, result: Any = None) -> bool:
        """Send a job, result or cancel (about job ``ref``) if the link's window has room
        and nothing waits before it; else queue it (False when the queue's budget is
        spent). ``result``: the ``JobResult`` a result message carries, kept to hold it
        again should the link be lost while it waits."""
        size = frames_size(frames)
        if not self.queue.entries and self.flow.may_send(size):
            self.flow.on_sent(size)
            self._io_send(self.generation, frames, ref if op == "job" else None, size)
            return True
        if not self.queue.fits(size):
            return False
        self.queue.push(Queued(frames, size, ref, op, peer, result))
        return True

    def _drain_queue(self) -> None:
        """Send what waits, as far as the window now allows."""
        for item in self.queue.pop_sendable(self.flow):
            self._io_send(self.generation, item.frames, item.ref if item.op == "job" else None, item.size)
        if not self.queue.entries and self.unsent_results and self.link.registered:
            self._flush_results()

    # -- incoming --

    def _on_frames(self, frames: list[Any]) -> None:
        generation, frames = frames[0], frames[1:]
        if generation != self.generation:
            return  # from a socket replaced since
        self.link.on_heard(time.monotonic())
        try:
            message = decode(frames, RELAY_TO_NODE, max_body=self.max_deliver_body)
        except ProtocolError as exc:
            self._count_received(frames)
            self._rejected("relay", "relay_message_rejected", str(exc))
            return
        if isinstance(message, Ack):
            self.flow.on_ack(message.received)
            self._drain_queue()
            return
        self._count_received(frames)
        if isinstance(message, Deliver):
            self._on_deliver(message)
        elif isinstance(message, Pong):
            pass
        elif isinstance(message, Registered):
            self.link.on_registered(message.observed, message.heartbeat, time.monotonic())
            # Both ends count the link's bytes from the message after this one.
            self.flow.reset(message.window or DEFAULT_WINDOW)
            self.relay_max_body = message.max_body
            self.log.info("relay_registered", observed=message.observed)
            self._drain_queue()
            self._flush_results()
        elif isinstance(message, Unroutable):
            self._on_unroutable(message)
        elif isinstance(message, PeerDown):
            for job in self.ledger.jobs_on(message.peer_id):
                self._settle(
                    job.id,
                    Outcome("peer_lost", error_type="PeerLost", message=f"peer {message.peer_id} left the relay"),
                )
        elif isinstance(message, PeersReply):
            query = self.pending_peers.pop(message.seq, None) if message.seq is not None else None
            if query is not None:
                query[0](message.peers, "")
        elif isinstance(message, Error):
            self._on_error(message)

    def _count_received(self, frames: list[Any]) -> None:
        """Count a message read from the relay; acknowledge when a quarter window is in."""
        if not self.link.registered:
            return
        self._send_ack(self.flow.on_received(frames_size(frames)))

    def _send_ack(self, received: int | None) -> None:
        """Acknowledge ``received`` bytes read from the relay (None: nothing to say)."""
        if received is not None:
            self._io_send(self.generation, encode(Ack(received=received)), None, 0)

    def _on_unroutable(self, message: Unroutable) -> None:
        if message.op == "job":  # never delivered: the peer never saw it
            self._settle(message.ref, Outcome.refused(message.reason, message.message), peer=message.to)
        elif message.op == "cancel" and message.reason == "peer_not_connected":  # its peer has gone since
            lost = f"peer {message.to} is gone ({message.message})"
            self._settle(message.ref, Outcome("peer_lost", error_type="PeerLost", message=lost), peer=message.to)
        elif message.op == "result" and message.reason == "no_relay":  # the relay restarted
            held = self.sent_results.pop(message.ref, None)
            if held is not None:
                self.sent_bytes -= len(held[1].result or b"")
                self._hold_result(*held)
        elif message.op == "result" and message.reason == "too_large" and self._is_sent_success(message.ref):
            # The result is more than its submitter takes: tell it so, in a few bytes,
            # rather than leave its job to time out.
            peer, result = self.sent_results.pop(message.ref)
            self.sent_bytes -= len(result.result or b"")
            why = f"the result could not be delivered: {message.message}"
            self._send_result(peer, self._result_too_large(result, peer, why))
        elif message.op == "result" and message.reason == "relay_busy" and self._retry_result(message.ref):
            pass  # its submitter has more unread than the relay holds for it: sent again shortly
        else:  # an answer whose asker is gone, or a cancel the relay could not pass on now
            self.log.warning(
                "undeliverable", op=message.op, job_id=message.ref.hex(), to=message.to, reason=message.reason
            )

    def _retry_result(self, job_id: bytes) -> bool:
        """Send a result again after a delay (growing with each bounce); False when it is
        not kept any more, or has been bounced too often."""
        attempt = self.result_retries.pop(job_id, 0)
        if job_id not in self.sent_results or attempt >= len(RESULT_RETRY_DELAYS):
            return False
        self.result_retries[job_id] = attempt + 1
        while len(self.result_retries) > MAX_RESULT_RETRIES:
            self.result_retries.popitem(last=False)
        delay = RESULT_RETRY_DELAYS[attempt]
        peer = self.sent_results[job_id][0]
        self.log.info("result_held_back", job_id=job_id.hex(), to=peer, attempt=attempt + 1, retry_in_s=delay)
        self.loop.call_later(delay, self._handle, ResendResult(job_id))
        return True

    def _result_too_large(self, result: JobResult, peer: str, why: str) -> JobResult:
        """What goes to ``peer`` in place of a result too large to reach it: a failure
        that says so, in a few bytes, rather than a job left to time out."""
        self.log.warning("result_too_large", job_id=result.id.hex(), to=peer, error=why)
        failure = Outcome("failed", error_type="ResultTooLarge", message=why)
        return JobResult(id=result.id, status="failed", error=failure.error)

    def _is_sent_success(self, job_id: bytes) -> bool:
        held = self.sent_results.get(job_id)
        return held is not None and held[1].status == "succeeded"

    def _on_error(self, message: Error) -> None:
        if message.code == "not_registered":
            if self.link.on_not_registered(time.monotonic()):
                self.log.info("relay_forgot_us", message=message.message, action="registering again")
                self._fail_peer_queries("the relay did not know this node; it is registering again")
                self._register()
        else:
            self.log.error("relay_error", code=message.code, message=message.message)

    def _on_deliver(self, message: Deliver) -> None:
        sender = message.sender
        try:
            plaintext = self.sealer.open(sender, message.body)
            inner = decode_inner(plaintext, NODE_TO_NODE, max_size=self.max_deliver_body)
        except (SealError, ProtocolError) as exc:
            self._on_unreadable(message, str(exc))
            return
        expected = {"job": Job, "result": JobResult, "cancel": JobCancel}[message.op]
        if inner.id != message.ref or not isinstance(inner, expected):
            self._on_unreadable(message, "the sealed message does not match its clear ref and op")
            return
        if isinstance(inner, Job):
            self._on_job(sender, inner)
        elif isinstance(inner, JobResult):
            job = self.ledger.jobs.get(inner.id)
            if inner.nonce is not None and (job is None or job.nonce != inner.nonce):
                # B refused a sealed job that would not open, but not the one we sent:
                # the relay forged it to make B refuse our job id. Ours may still run.
                self.log.warning("forged_refusal_ignored", job_id=inner.id.hex(), sender=sender)
                return
            outcome = Outcome(
                inner.status,
                result=inner.result,
                error_type=(inner.error or {}).get("type", ""),
                message=(inner.error or {}).get("message", ""),
                reason=(inner.error or {}).get("reason", ""),
            )
            self._settle(inner.id, outcome, peer=sender)
        elif isinstance(inner, JobCancel):
            self.book.cancel(inner.id, sender)

    def _on_unreadable(self, message: Deliver, error: str) -> None:
        """A sealed message failed to open (altered in transit, or not sealed by its
        claimed sender). A job is refused back to its sender; an unreadable answer ends
        our own job, and is never answered, so that no exchange can loop."""
        self._rejected(message.sender, "sealed_message_rejected", error, job_id=message.ref.hex())
        if message.op == "job" and len(message.ref) == JOB_ID_BYTES:
            refusal = Outcome.refused("invalid", f"the job's sealed message was rejected by {self.peer_id}: {error}")
            nonce = bytes(memoryview(message.body)[:NONCE_BYTES])
            self._reply_to_peer(ReplyToPeer(message.sender, message.ref, refusal, nonce))
        elif message.op == "result":
            refusal = Outcome.refused("invalid", f"the answer from {message.sender} was rejected: {error}")
            self._settle(message.ref, refusal, peer=message.sender)

    def _on_job(self, sender: str, job: Job) -> None:
        post = self.post

        def reply(outcome: Outcome) -> None:
            # Called by whichever thread ended the job (on the loop: sent at once).
            post(ReplyToPeer(sender, job.id, outcome))

        spec = JobSpec(id=job.id, kind=job.kind, payload=job.payload, timeout=job.timeout, reply=reply, origin=sender)
        if self.draining:
            reply(Outcome.refused("draining", "the node is shutting down and takes no new jobs"))
            return
        self.book.submit([spec])  # at once: a free worker starts it while the batch is read on

    def _reply_to_peer(self, message: ReplyToPeer) -> None:
        outcome = message.outcome
        result = JobResult(
            id=message.job_id,
            status=outcome.status,
            error=outcome.error,
            result=outcome.result,
            nonce=message.nonce,
        )
        self._send_result(message.peer, result)

    def _send_result(self, peer: str, result: JobResult) -> None:
        if not self.link.registered:
            self._hold_result(peer, result)
            return
        sealed = self.sealer.seal_parts(peer, encode_inner_parts(result))
        if self.relay_max_body is not None and len(sealed) > self.relay_max_body and result.status == "succeeded":
            # Past the relay's limit the relay would refuse it (or past its frame cap drop
            # this node's link): the submitter is told so, in a few bytes.
            why = f"the result is {len(sealed)} bytes sealed; the relay takes at most {self.relay_max_body}"
            result = self._result_too_large(result, peer, why)
            sealed = self.sealer.seal_parts(peer, encode_inner_parts(result))
        frames = encode(Send(to=peer, ref=result.id, op="result", body=sealed))
        if not self._send_flowed(frames, result.id, "result", peer, result):
            self._hold_result(peer, result)  # sent once the queue has room again
            return
        self.sent_results[result.id] = (peer, result)
        self.sent_bytes += len(result.result or b"")
        while self.sent_bytes > RESEND_BUDGET_BYTES or len(self.sent_results) > 4096:
            _, (_, old) = self.sent_results.popitem(last=False)
            self.sent_bytes -= len(old.result or b"")

    def _hold_result(self, peer: str, result: JobResult) -> None:
        """Keep an answer until the relay knows this node again (bounded like sent ones)."""
        self.unsent_results[result.id] = (peer, result)
        self.unsent_bytes += len(result.result or b"")
        while self.unsent_bytes > RESEND_BUDGET_BYTES or len(self.unsent_results) > 4096:
            job_id, (_, old) = self.unsent_results.popitem(last=False)
            self.unsent_bytes -= len(old.result or b"")
            self.log.warning("result_dropped", job_id=job_id.hex(), reason="too many answers waiting for the relay")

    def _flush_results(self) -> None:
        held, self.unsent_results = self.unsent_results, OrderedDict()
        self.unsent_bytes = 0
        for peer, result in held.values():
            self._send_result(peer, result)

    def _rejected(self, source: str, event: str, error: str, **fields: Any) -> None:
        """Log a rejected message if it is the first from ``source`` lately; count it
        otherwise (summed up on the tick): a peer or relay sending garbage in a loop
        must not fill the node's log."""
        if self.rejections.on_rejected(source, error, time.monotonic()):
            self.log.warning(event, source=source, error=error, **fields)

    # -- link --

    def _on_tick(self) -> None:
        now = time.monotonic()
        log_summaries(self.log, "messages_rejected", self.rejections.flush(now), now)
        action = self.link.on_tick(now)
        if action == "ping":
            self.ping_seq += 1
            self._send_control(encode(Ping(seq=self.ping_seq)))
        elif action == "lost":
            self._on_lost()
        for seq in [s for s, (_, deadline) in self.pending_peers.items() if deadline <= now]:
            self.pending_peers.pop(seq)[0](None, f"the relay did not answer within {PEERS_QUERY_TIMEOUT:g} s")
        for job in self.ledger.expired(now):
            outcome = Outcome(
                "timed_out",
                error_type="TimedOut",
                message=f"no answer from peer {job.peer} within the job's timeout plus {DEADLINE_GRACE:g} s",
            )
            log_job_end(self.log, job.id, job.kind, outcome, to=job.peer)
            job.reply(outcome)
            never_sent = self._withdraw(job.id)
            if self.link.registered and not never_sent:  # the peer may still be running it: it need not
                self._send_cancel(job.peer, job.id)
        if self.link.registered:
            # Whatever was read since the last ack, acknowledged on each heartbeat: on a
            # quiet link less than a quarter window would otherwise stay unacknowledged.
            self._send_ack(self.flow.ack_all())
            self._drain_queue()
        self._schedule_tick()

    def _on_handshake_failed(self, message: HandshakeFailed) -> None:
        if message.generation != self.generation or self._refusal_logged == self.generation:
            return
        self._refusal_logged = self.generation
        if message.auth:
            self.log.error(
                "relay_refused_us",
                reason=f"the relay did not admit this node's key (ZAP status {message.status})",
                fix=f"add {self.peer_id} to allowed_peers in the relay's config",
            )
        else:
            self.log.error(
                "relay_handshake_failed",
                reason="CurveZMQ handshake failed",
                fix=f"check that relay.peer_id ({self.relay_peer_id}) is the relay's peer id (`meshnet id --relay`)",
            )

    def _fail_peer_queries(self, why: str) -> None:
        pending, self.pending_peers = self.pending_peers, {}
        for reply, _ in pending.values():
            reply(None, why)

    def _on_lost(self) -> None:
        delay = self.link.on_lost()
        self.log.warning("relay_lost", reconnect_in_s=round(delay, 2))
        for job in list(self.ledger.jobs.values()):
            self._settle(
                job.id,
                Outcome("peer_lost", error_type="PeerLost", message="the node lost its connection to the relay"),
            )
        self._fail_peer_queries("the node lost its connection to the relay")
        for item in self.queue.clear():
            if item.op == "result":  # sent again once registered anew
                self._hold_result(item.peer, item.result)
        self.generation += 1
        self._io_close()
        self.loop.call_later(delay, self._handle, Reconnect())

    def _connect(self) -> None:
        self.generation += 1
        self.link.connecting(time.monotonic())
        self._io_open(self.generation)
        self._register()

    def _register(self) -> None:
        register = Register(
            peer_id=self.peer_id, caps=self.capabilities, listen=self.listen, max_body=self.max_deliver_body
        )
        self._io_send(self.generation, encode(register), None, 0)  # counting starts after it

    def _schedule_tick(self) -> None:
        self.loop.call_later(min(self.link.heartbeat, 1.0), self._handle, Tick())

    def _send_control(self, frames: list[Any]) -> None:
        """A small message outside the window's gate (ping, peers): counted, never held."""
        size = frames_size(frames) if self.link.registered else 0
        self.flow.on_sent(size)
        self._io_send(self.generation, frames, None, size)

    # -- loop thread --

    def _io_open(self, generation: int) -> None:
        self._io_close()
        sock = self.context.socket(zmq.DEALER)
        public, secret = self.identity.zmq_curve_keys()
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = curve_public_z85(self.relay_peer_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, frame_limit(self.max_deliver_body))
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        # The relay refusing our key shows only as a socket event: watch for it.
        monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._handshakes = 0
        sock.connect(self.endpoint)
        self._sock = sock
        self._monitor = monitor
        self._sock_generation = generation
        self.loop.add_reader(sock, self._io_readable)
        self.loop.add_reader(monitor, self._io_monitor)

    def _io_close(self) -> None:
        self.loop.close_socket(self._monitor)
        self.loop.close_socket(self._sock)
        self._monitor = self._sock = None

    def _io_monitor(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
                if self._handshakes > 1:
                    self._handle(Reconnected(self._sock_generation))
                continue
            self._handle(
                HandshakeFailed(
                    self._sock_generation, event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, event["value"]
                )
            )

    def _io_send(self, generation: int, frames: list[Any], ref: bytes | None, counted: int) -> None:
        """Send ``frames``; ``counted`` is what they were counted for in the window, taken
        back if they cannot be sent. A failed job (``ref``) is handled after the step that
        sent it (which may still be recording it)."""
        sock = self._sock
        if sock is None or generation != self._sock_generation:
            if ref is not None:
                self.loop.call_soon(self._handle, SendFailed(ref, generation))
            return
        try:
            send_message(sock, frames)
        except zmq.ZMQError as exc:
            self.flow.on_unsent(counted)
            self.log.warning("relay_send_failed", error=str(exc))
            if ref is not None:
                self.loop.call_soon(self._handle, SendFailed(ref, generation))

    def _io_readable(self) -> None:
        sock = self._sock
        generation = self._sock_generation
        try:
            for _ in range(RECV_BATCH):
                if sock is None or self._sock is not sock:  # closed or replaced meanwhile
                    return
                try:
                    frames = recv_message(sock, MAX_FRAMES, copied=1)
                except zmq.Again:
                    return
                if frames is None:
                    self._rejected("relay", "relay_message_rejected", f"a message of more than {MAX_FRAMES} frames")
                    continue
                # Each message is handled as it is read: a job from a peer reaches a free
                # worker before the rest of the batch is read.
                self._on_frames([generation, *frames])
        finally:
            self._update_ledger_idle()


def node_capabilities(executors: int, kinds: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """What a node tells the relay it can do; config values win over detected ones."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {"cores": os.cpu_count() or 1, "memory_bytes": memory, "executors": executors, "kinds": kinds, **extra}
