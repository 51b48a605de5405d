"""RelayClientActor: the node's link to its relay, and its sessions with peers over it.

The DEALER socket and all of this actor's state live on one :class:`SocketLoop` (the
node's job loop, shared with the client API and the worker pool): it decodes, seals and
opens messages there and drives two cores: :class:`RelayLink` (registration, heartbeat,
reconnect with capped backoff) and :class:`SessionCore` (the node-to-node protocol:
jobs sent to peers and run for them, acknowledged and sent again until each has one
terminal status). The relay is one path to every peer: its loss delays jobs, it does
not end them. Other threads hand it messages with :meth:`post`; on the loop they are
handled at once. So a relayed job crosses no thread on either node: a client's
submission is sealed and sent, and a peer's job reaches a worker, in the wake-up that
read it. After a relay loss the socket is replaced, so the relay sees a fresh
connection and the node registers again.
"""

from __future__ import annotations

import functools
import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, cast

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.answers import Answers
from actors.base import NodeActor, log_job_end
from actors.direct_links import DirectLinks
from actors.job_queue import JobBook
from actors.messages import (
    Abort,
    CancelJob,
    Drain,
    PingThere,
    QueryPeers,
    Reconnect,
    RunThere,
    Tick,
)
from actors.network_check import CheckNetwork, NetworkChecked
from actors.supervision import Child
from meshnet.config import DEFAULT_RELAY_QUEUE_BYTES
from meshnet.endpoints import connect_from, free_tcp_port, tcp_address
from meshnet.errors import ProtocolError, SealError
from meshnet.flow import DEFAULT_WINDOW, LinkFlow, Queued, SendQueue, frames_size
from meshnet.holepunch import (
    Abandon,
    AskRelay,
    Candidates,
    Dial,
    Expect,
    PathChange,
    PunchCoordinator,
    PunchEvent,
    PunchNotice,
    RenewPort,
    SendPunch,
    address_ip,
)
from meshnet.identity import Identity, Sealer, curve_public_z85
from meshnet.jobs.model import REFUSED_DRAINING, JobSpec, Outcome, ToPeer
from meshnet.memory_budget import MemoryBudget
from meshnet.natcheck import NatReport, stun_server
from meshnet.protocol import (
    BODY_SLACK,
    MAX_FRAMES,
    NODE_TO_NODE,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    Error,
    PeerDown,
    PeersReply,
    PeersRequest,
    Ping,
    Pong,
    Punch,
    Register,
    Registered,
    Sealed,
    Send,
    Unroutable,
    decode,
    decode_inner,
    encode,
    encode_inner,
    encode_inner_parts,
    frame_limit,
    split_bulk,
)
from meshnet.protocol.direct import Carried, decode_carried
from meshnet.rejections import RejectionLog, log_summaries
from meshnet.relay_link import LinkState, RelayLink
from meshnet.session import (
    BOX_REF_BYTES,
    Control,
    Execute,
    Notice,
    Ponged,
    SessionCore,
    Settled,
    StopRun,
    Transmit,
    box_ref,
    split_box_ref,
)
from meshnet.session.core import Event
from meshnet.session.peer import ACK_DELAY
from meshnet.socket_loop import SocketLoop, TimerHandle, recv_message, send_message
from meshnet.watched import close_watched, watch

log = structlog.get_logger("meshnet.relay_client")

RECV_BATCH = 256
#: A libzmq reconnection seen this soon after a register draws no other one.
RECENT_REGISTER = 0.5
#: libzmq's own reconnection interval, drawn per socket, and its backed-off cap (ms).
RECONNECT_IVL_MS = (100.0, 1000.0)
RECONNECT_IVL_MAX_MS = 5000
#: A network check whose actor failed is asked again after 1 s, 2 s, 4 s, ... up to this.
MAX_CHECK_RETRY = 60.0
LINK_LOST = "the node lost its connection to the relay"
DISPLACED = "another process with this node's identity took its place at the relay; this node no longer uses it"
#: The relay connection moves to a fresh local port after a failed punch at most this
#: often (a punch fails after 5 s: failures to several peers in one round share a move).
RENEW_GAP = 5.0
#: ``meshnet ping`` requests waiting at once, for all clients: more are refused.
MAX_PENDING_PINGS = 1024
#: Shorter than a client's own wait (10 s), so that the client hears why.
PEERS_QUERY_TIMEOUT = 5.0
#: The sessions' notices of relay claims they did not take at their word, with what each means.
RELAY_CLAIMS = {
    "relay_claim_ignored": "the relay bounced a box as too large that is within its own and the peer's stated limits",
    "peer_down_ignored": "the relay said a peer left that is up on a direct path",
    "peer_down_disproved": "the relay said a peer left; it answered since",
}
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


@dataclass(frozen=True)
class HandshakeFailed:
    generation: int
    auth: bool
    status: int


@dataclass(frozen=True)
class Disconnected:
    """The socket's connection to the relay broke (libzmq reconnects it by itself)."""

    generation: int


@dataclass(frozen=True)
class Reconnected:
    """libzmq re-established the socket's connection by itself (the relay came back
    before this node noticed it was gone): the relay may not know this node."""

    generation: int


class RelayClient:
    """The relay link and the sessions, on the job loop (``loop``). Made by the supervisor,
    which hands :meth:`post` to the client API; supervised by :class:`RelayClientActor`."""

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
        memory: MemoryBudget | None = None,
        local_port: int = 0,
        stun: str = "",
        direct_port: int = 0,
        direct_links: bool = True,
        network_check: Child | None = None,
        answers: Answers | None = None,
    ):
        self.identity = identity
        #: The actor that finds out this node's LAN address and NAT type (off the loop);
        #: None: direct links are off (nothing is asked).
        self.network_check = network_check
        self.peer_id = identity.peer_id
        self.sealer = sealer
        self.endpoint = endpoint
        #: relay.local_port (0: a free port for each new socket), and the port the
        #: current socket connects from (None: not a tcp:// relay).
        self.local_port_setting = local_port
        self.local_port: int | None = None
        self.relay_peer_id = relay_peer_id
        self.book = book
        self.link = RelayLink(heartbeat=heartbeat, liveness=liveness, backoff_min=backoff_min, backoff_max=backoff_max)
        #: Jobs and results held for peers until acknowledged, within max_queued_bytes;
        #: their sealed copies waiting for room on the relay link have a budget as large.
        self.sessions = SessionCore(budget=max_queued_bytes, max_payload=max_payload)
        self.max_payload = max_payload
        #: The largest deliver body this node decodes: told to the relay, which refuses
        #: larger sends to us (our socket would drop the connection past it).
        self.max_deliver_body = max_payload + BODY_SLACK
        #: Bytes in flight each way on the link (meshnet.flow), and what waits for room.
        self.flow = LinkFlow()
        self.queue = SendQueue(budget=max_queued_bytes)
        #: What the sessions hold for peers counts against the node's one memory budget.
        (memory or MemoryBudget()).add_part("sessions", lambda: self.sessions.held + self.queue.size)
        #: The largest send body the relay takes (from its ``registered``).
        self.relay_max_body: int | None = None
        self.capabilities = capabilities
        self.listen = listen
        self.context = context
        self._owns_loop = loop is None
        self.loop = loop or SocketLoop("relay-client")
        #: Where jobs' ends go, by their way back: this client answers the peers' (ToPeer).
        self.answers = answers if answers is not None else Answers(self.loop)
        self.answers.serve_peers(self._answer_peer)
        self.generation = 0
        #: Peers queries waiting for the relay's answer, by the seq they were sent with.
        self.pending_peers: dict[int, Any] = {}
        self.peers_seq = 0
        #: ``meshnet ping`` requests waiting for their peer's answer, by (peer, ping number):
        #: their reply, the path the ping went on, and the timer that gives up on them.
        self.pending_pings: dict[tuple[str, int], tuple[Any, str, TimerHandle]] = {}
        self.draining = False
        #: Set while no job sent to a peer awaits its answer (the supervisor waits on it
        #: to drain).
        self.ledger_idle = threading.Event()
        self.ledger_idle.set()
        #: Set while every message to a peer has been acknowledged (a stopping node waits
        #: on it within its grace: the answers of jobs it ran reach their submitters).
        self.delivered = threading.Event()
        self.delivered.set()
        self._ledger_check_due = False
        self.log = log.bind(peer_id=self.peer_id, relay=self.endpoint)
        #: Direct links to peers (meshnet.holepunch decides, actors.direct_links dials).
        self.punch = PunchCoordinator(self.peer_id, enabled=direct_links)
        self.direct = DirectLinks(
            identity=identity,
            loop=self.loop,
            max_message=frame_limit(self.max_deliver_body),
            on_up=self._on_direct_up,
            on_down=self._on_direct_down,
            on_message=self._on_direct_message,
        )
        #: Where the NAT is classified ("" the relay's host, port 3478; "off"), and what
        #: it came to (None: not yet, or off).
        self.stun = stun
        self.direct_port = direct_port
        self.nat: NatReport | None = None
        #: The address this node reaches the relay from (its LAN address), once known.
        self._lan_ip: str | None = None
        self._classifying = False
        #: Whether the network check (LAN address, NAT type) has run, and for which public
        #: IP (as the relay observed it): a new one means a new network, checked again.
        self._checked = False
        self._checked_at_ip = ""
        #: Network checks in a row whose actor failed, and the timer of the next try.
        self._check_failures = 0
        self._check_retry: TimerHandle | None = None
        #: Boxes sent to peers, by path.
        self.boxes_sent: Counter[str] = Counter()
        self._punch_timer: TimerHandle | None = None
        self._punch_timer_at = math.inf
        self._renewed_at = -math.inf
        self._refusal_logged = -1
        self.rejections = RejectionLog()
        #: The timer that wakes the sessions at their next deadline, and when.
        self._session_timer: TimerHandle | None = None
        self._session_timer_at = math.inf
        # loop-thread state
        self._monitor: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None
        self._handshakes = 0
        self._sock_generation = -1
        self._stopped = False
        self._last_register = -math.inf

    # -- life cycle --

    def start(self) -> None:
        if self._owns_loop:
            self.loop.start()
        self.loop.run_sync(self._start_link)

    def _start_link(self) -> None:
        self._connect()
        self._schedule_tick()

    def stop(self) -> None:
        if self.loop.running:
            self.loop.run_sync(self._shut_down)
        if self._owns_loop:
            self.loop.stop()

    def _shut_down(self) -> None:
        try:
            self._apply(self.sessions.abort_all("the node is shutting down", time.monotonic()))
            for key in list(self.pending_pings):
                self._ping_answered(key, None, "unavailable", "the node is shutting down")
        finally:
            self._io_close()
            self.direct.close_all()
            self._stopped = True
            if self._session_timer is not None:
                self._session_timer.cancel()
            if self._punch_timer is not None:
                self._punch_timer.cancel()
            if self._check_retry is not None:
                self._check_retry.cancel()

    def post(self, message: Any) -> None:
        """Hand this relay client a message (thread-safe); on its loop, handled now."""
        if self.loop.in_loop():
            self._handle(message)
        else:
            self.loop.call_soon(self._handle, message)

    def status(self) -> dict[str, Any]:
        return self.loop.run_sync(self._status, timeout=5)

    def _status(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "relay_peer_id": self.relay_peer_id,
            "state": self.link.state.value,
            "observed": self.link.observed,
            "local_port": self.local_port,
            "connects": self.link.connects,
            "forwarded_in_flight": self.sessions.in_flight,
            "forwarded": dict(self.sessions.counts),
            "held_for_peers_bytes": self.sessions.held,
            "unacknowledged_bytes": self.flow.in_flight,
            "queued_bytes": self.queue.size,
            "boxes_sent": dict(self.boxes_sent),
            "nat": self.nat.as_dict() if self.nat is not None else None,
            "direct": {peer: self.punch.describe(peer) for peer in self.punch.peers},
            "rtt_ms": _ms(self.link.rtt),
            "peers": {peer: self._peer_link(peer) for peer in self.sessions.sessions},
        }

    def _peer_link(self, peer: str) -> dict[str, Any]:
        """The path to ``peer`` now, and its last measured round trip (on that path)."""
        path = self.sessions.paths.current(peer)
        rtt = self.sessions.round_trips.get(peer, {}).get(path or "")
        return {"path": _path_name(path), "rtt_ms": _ms(rtt[0] if rtt else None)}

    # -- messages --

    def handle(self, message: Any) -> Any:
        """A message from another thread (the supervisor's): handled on the loop; a
        ``Drain`` is answered once it is (new jobs are refused from then on)."""
        if isinstance(message, Drain):
            return self.loop.run_sync(self._handle, message)
        self.post(message)

    def _handle(self, message: Any) -> Any:
        """Loop thread."""
        if self._stopped:
            if isinstance(message, RunThere):  # the node is stopping: still one answer each
                for job, _ in message.jobs:
                    self.answers.answer(job, REFUSED_DRAINING)
            elif isinstance(message, PingThere):
                message.reply(None, "unavailable", "the node is shutting down")
            elif isinstance(message, QueryPeers):
                message.reply(None, "the node is shutting down")
            return None
        now = time.monotonic()
        if isinstance(message, RunThere):
            for job, peer in message.jobs:
                if self.link.state is LinkState.DISPLACED:
                    self.answers.answer(job, Outcome.refused("no_relay", DISPLACED))
                else:
                    self._apply(self.sessions.submit(job, peer, now))
                    self._want_direct(peer, now)
        elif isinstance(message, Tick):
            self._on_tick()
        elif isinstance(message, CancelJob):
            self._apply(self.sessions.cancel(message.job_id, message.requester, now))
        elif isinstance(message, QueryPeers):
            self._query_peers(message.reply, now)
        elif isinstance(message, PingThere):
            self._ping_peer(message, now)
        elif isinstance(message, NetworkChecked):
            self._on_network_checked(message)
        elif isinstance(message, Reconnect):
            if self.link.state is not LinkState.DISPLACED:
                self._connect()
        elif isinstance(message, HandshakeFailed):
            self._on_handshake_failed(message)
        elif isinstance(message, Reconnected):
            if message.generation == self.generation:
                self._on_reconnected(now)
        elif isinstance(message, Disconnected):
            if message.generation == self.generation and self.link.registered:
                # The relay went away (it restarted, or the connection broke): nothing
                # more goes out on this path until it registers this node again, and
                # the node waits for that with a registering link's patience, not the
                # three heartbeats of silence that would make it start over meanwhile.
                self.log.info("relay_disconnected", action="waiting for libzmq to reconnect")
                self.link.connecting(now)
                self._path_down(now, LINK_LOST)
        elif isinstance(message, Drain):
            self.draining = True
        elif isinstance(message, Abort):
            self._apply(self.sessions.abort_all(message.reason, now))
        self._update_ledger_idle()
        return True

    def _update_ledger_idle(self) -> None:
        # Called per message, and done once per loop turn, after what the turn did:
        # ``holding`` looks at every session. The loop runs its calls in order, so a
        # Drain answered on the loop (run_sync) is answered after this.
        if not self._ledger_check_due:
            self._ledger_check_due = True
            self.loop.call_soon(self._mirror_ledger)

    def _mirror_ledger(self) -> None:
        # An Event's set or clear takes its lock, is_set does not.
        self._ledger_check_due = False
        _mirror(self.ledger_idle, not self.sessions.in_flight)
        _mirror(self.delivered, not self.sessions.holding)

    # -- the sessions' events --

    def _apply(self, events: list[Event]) -> None:
        """Carry out what the sessions decided; then wake them at their next deadline."""
        for event in events:
            if isinstance(event, Transmit):
                self._transmit(event)
            elif isinstance(event, Settled):
                log_job_end(self.log, event.job.id, event.job.kind, event.outcome, to=event.peer)
                self.answers.answer(event.job, event.outcome)
            elif isinstance(event, Execute):
                self._run(event.peer, event.job)
                self._want_direct(event.peer, time.monotonic())
            elif isinstance(event, Control):
                if isinstance(event.message, Punch):
                    self._punch(self.punch.on_punch(event.peer, event.message, time.monotonic()))
            elif isinstance(event, Ponged):
                self._on_pong(event)
            elif isinstance(event, StopRun):
                self.book.cancel(event.job_id, event.peer)
            elif isinstance(event, Notice):
                if event.event in RELAY_CLAIMS:
                    # What the relay said and the session did not take at its word: one
                    # line, then counts (a relay repeating it must not fill the log).
                    self._rejected("relay", event.event, RELAY_CLAIMS[event.event], **event.fields)
                    continue
                self.log.info(event.event, **event.fields)
                if event.event == "session_ended":
                    self._punch(self.punch.on_peer_gone(event.fields["peer"]))
        self._arm_session_timer()

    def _arm_session_timer(self) -> None:
        # Nothing a message or a job does makes the sessions due sooner than ACK_DELAY
        # from now (a delayed ack; re-sends, probes and deadlines are further off): with
        # the timer already that close, the scan of every session for its next deadline
        # (a cost per message that grew with what is in flight) is skipped. Under load
        # an ack is nearly always pending, so the timer is.
        if self._session_timer_at - time.monotonic() <= ACK_DELAY:
            return
        deadline = self.sessions.next_deadline()
        if deadline is None or deadline >= self._session_timer_at:
            return
        if self._session_timer is not None:
            self._session_timer.cancel()
        self._session_timer_at = deadline
        self._session_timer = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._on_session_timer)

    def _on_session_timer(self) -> None:
        self._session_timer, self._session_timer_at = None, math.inf
        if not self._stopped:
            self._apply(self.sessions.on_tick(time.monotonic()))
            self._update_ledger_idle()

    def _transmit(self, event: Transmit) -> None:
        """Send a box on its path: on a direct link in the clear (the link is CurveZMQ to
        exactly that peer), else sealed, on the relay link. A box the path cannot take
        now is dropped: the session sends it again."""
        if event.path != "relay":  # the peer's own link: direct, or over the LAN
            split = split_bulk(event.box) if self.direct.reads_parts(event.peer) else None
            if split is not None:
                sent = self.direct.send_parts(event.peer, *split)
            else:
                sent = self.direct.send(event.peer, encode_inner(event.box))
            if sent:
                self.boxes_sent[event.path] += 1
            return
        if not self.link.registered:
            return
        self.boxes_sent["relay"] += 1
        box = event.box
        sealed = self.sealer.seal_parts(event.peer, encode_inner_parts(box))
        if self.relay_max_body is not None and len(sealed) > self.relay_max_body:
            why = f"the sealed message is {len(sealed)} bytes; the relay takes at most {self.relay_max_body}"
            self.loop.call_soon(self._bounced, event.peer, box.sid, box.ctr, "too_large", why)
            return
        ref = box_ref(box)
        frames = encode(Send(to=event.peer, ref=ref, op="sealed", body=sealed))
        size = frames_size(frames)
        if not self.queue.entries and self.flow.may_send(size):
            self.flow.on_sent(size)
            self._io_send(self.generation, frames, size)
        elif self.queue.fits(size):
            self.queue.push(Queued(frames, size, ref, "sealed", event.peer))

    def _bounced(self, peer: str, sid: int, counter: int, reason: str, text: str) -> None:
        self._apply(self.sessions.on_bounce(peer, sid, counter, reason, text, time.monotonic()))
        self._update_ledger_idle()

    def _drain_queue(self) -> None:
        """Send what waits, as far as the window now allows."""
        for item in self.queue.pop_sendable(self.flow):
            self._io_send(self.generation, item.frames, item.size)

    def _run(self, sender: str, job: Any) -> None:
        """Run a peer's job here; its end goes back through the session (ToPeer)."""
        back = ToPeer(sender)
        spec = JobSpec(id=job.id, kind=job.kind, payload=job.payload, timeout=job.timeout, back=back, origin=sender)
        if self.draining:
            self._answer_peer(spec, back, REFUSED_DRAINING)
            return
        self.book.submit([spec])  # at once: a free worker starts it while the batch is read on

    def _answer_peer(self, job: JobSpec, back: ToPeer, outcome: Outcome) -> None:
        """Loop thread: job ``job``, which peer ``back.peer`` sent, ended with ``outcome``:
        answered in the peer's session (not once this client has stopped)."""
        if self._stopped:
            return
        self._apply(self.sessions.job_finished(back.peer, job.id, outcome, time.monotonic()))
        self._update_ledger_idle()

    # -- incoming --

    def _on_frames(self, frames: list[Any]) -> None:
        generation, frames = frames[0], frames[1:]
        if generation != self.generation:
            return  # from a socket replaced since
        now = time.monotonic()
        self.link.on_heard(now)
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
            self._on_deliver(message, now)
        elif isinstance(message, Pong):
            self.link.on_pong(message.seq, now)
        elif isinstance(message, Registered):
            self.link.on_registered(message.observed, message.heartbeat, now)
            # Both ends count the link's bytes from the message after this one.
            self.flow.reset(message.window or DEFAULT_WINDOW)
            self.relay_max_body = message.max_body
            self.log.info("relay_registered", observed=message.observed, local_port=self.local_port)
            self._on_observed(message.observed, now)
            self._apply(self.sessions.on_path("relay", True, now))
        elif isinstance(message, Unroutable):
            self._on_unroutable(message, now)
        elif isinstance(message, PeerDown):
            self._apply(self.sessions.on_peer_down(message.peer_id, "it left the relay", now))
        elif isinstance(message, PeersReply):
            query = self.pending_peers.pop(message.seq, None) if message.seq is not None else None
            if query is not None:
                for peer in message.peers:  # what only this node knows: its path to each
                    peer_id = peer.get("peer_id", "")
                    peer.update(self._peer_link(peer_id) if peer_id != self.peer_id else {"path": "self"})
                query[0](message.peers, "")
        elif isinstance(message, Error):
            self._on_error(message, now)

    def _count_received(self, frames: list[Any]) -> None:
        """Count a message read from the relay; acknowledge when a quarter window is in."""
        if not self.link.registered:
            return
        self._send_ack(self.flow.on_received(frames_size(frames)))

    def _send_ack(self, received: int | None) -> None:
        """Acknowledge ``received`` bytes read from the relay (None: nothing to say)."""
        if received is not None:
            self._io_send(self.generation, encode(Ack(received=received)), 0)

    def _on_unroutable(self, message: Unroutable, now: float) -> None:
        named = split_box_ref(message.ref)
        if named is None:
            self._rejected("relay", "relay_message_rejected", f"an unroutable whose ref is not {BOX_REF_BYTES} bytes")
            return
        sid, counter = named
        self._apply(self.sessions.on_bounce(message.to, sid, counter, message.reason, message.message, now))
        if message.reason == "peer_not_connected":
            for key in [key for key in self.pending_pings if key[0] == message.to]:
                self._ping_answered(key, None, "peer_not_connected", message.message)

    def _on_error(self, message: Error, now: float) -> None:
        if message.code == "not_registered":
            if self.link.on_not_registered(now):
                self.log.info("relay_forgot_us", message=message.message, action="registering again")
                self._path_down(now, "the relay did not know this node; it is registering again")
                self._register()
        elif message.code == "replaced":
            self._on_displaced(message.message, now)
        else:
            self.log.error("relay_error", code=message.code, message=message.message)

    def _on_displaced(self, why: str, now: float) -> None:
        """Another process registered at the relay with this node's identity. Registering
        again would take the place back, and have it taken again: the two would flap and
        split the jobs sent to this identity. This node stops using the relay, says why
        once, and ends the jobs it sent (their answers would reach the other process)."""
        if self.link.state is LinkState.DISPLACED:
            return
        self.log.error(
            "identity_in_use",
            reason=why,
            fix=f"run one node per identity: stop the other process with peer id {self.peer_id}, "
            "or give this one its own identity (`meshnet init`)",
        )
        self.link.on_displaced()
        self._path_down(now, DISPLACED)
        self._apply(self.sessions.abort_all(DISPLACED, now))
        self.generation += 1
        self._io_close()

    def _on_deliver(self, message: Deliver, now: float) -> None:
        sender = message.sender
        try:
            plaintext = self.sealer.open(sender, message.body)
            box = decode_inner(plaintext, NODE_TO_NODE, max_size=self.max_deliver_body)
        except (SealError, ProtocolError) as exc:
            # Altered in transit, not sealed by its claimed sender, or not a message we
            # read: dropped, never answered (an answer to garbage could loop between two
            # nodes through a tampering relay). Its sender sends it again.
            self._rejected(sender, "sealed_message_rejected", str(exc))
            return
        self._apply(self.sessions.on_box(sender, cast(Sealed, box), now))  # NODE_TO_NODE holds Sealed types only

    # -- meshnet ping --

    def _ping_peer(self, message: PingThere, now: float) -> None:
        """Measure a round trip to the peer on its current path; ask for a direct link, as
        a job would (``tailscale ping`` does the same): later pings may take it."""
        peer = message.peer
        sent = self.sessions.paths.current(peer)
        if self.link.state is LinkState.DISPLACED:
            message.reply(None, "no_relay", DISPLACED)
            return
        if sent is None:
            why = f"not connected to the relay at {self.endpoint} now, and no direct link to {peer}; try again"
            message.reply(None, "unavailable", why)
            return
        if len(self.pending_pings) >= MAX_PENDING_PINGS:
            message.reply(None, "unavailable", f"{MAX_PENDING_PINGS} pings wait for answers already; try again later")
            return
        number, events = self.sessions.ping(peer, now)
        timer = self.loop.call_later(message.timeout, self._ping_timed_out, (peer, number), message.timeout)
        self.pending_pings[peer, number] = (message.reply, sent, timer)
        self._apply(events)
        self._want_direct(peer, now)

    def _on_pong(self, event: Ponged) -> None:
        key = (event.peer, event.number)
        if key in self.pending_pings:
            address = self.punch.remote(event.peer) if event.path != "relay" else None
            answer = {"rtt": event.rtt, "path": event.path, "sent": self.pending_pings[key][1], "address": address}
            self._ping_answered(key, answer, "", "")

    def _ping_timed_out(self, key: tuple[str, int], timeout: float) -> None:
        if key in self.pending_pings:
            why = f"peer {key[0]} did not answer within {timeout:g} s"
            self._ping_answered(key, None, "timed_out", why, expired=True)

    def _ping_answered(
        self, key: tuple[str, int], answer: dict[str, Any] | None, code: str, why: str, *, expired: bool = False
    ) -> None:
        reply, _, timer = self.pending_pings.pop(key)
        if not expired:
            timer.cancel()
        reply(answer, code, why)

    def _rejected(self, source: str, event: str, error: str, **fields: Any) -> None:
        """Log a rejected message if it is the first from ``source`` lately; count it
        otherwise (summed up on the tick): a peer or relay sending garbage in a loop
        must not fill the node's log."""
        if self.rejections.on_rejected(source, error, time.monotonic()):
            self.log.warning(event, source=source, error=error, **fields)

    # -- direct links --

    def _on_observed(self, observed: str, now: float) -> None:
        """Registered, and seen by the relay at ``observed``: this node's candidates. A
        punch is offered only once the node knows its LAN address and NAT type (or knows
        it will not), which the network-check actor finds out off the loop: DNS and STUN take time."""
        enabled = self.punch.enabled
        public_ip = address_ip(observed)
        if self._checked and public_ip != self._checked_at_ip:
            # The relay sees this node from another public IP: it moved to another network
            # (or its NAT changed). Its LAN address and NAT type are found out again, and
            # nothing is offered meanwhile on what the old network said.
            self.log.info("network_changed", was=self._checked_at_ip, now=public_ip, action="checking the NAT again")
            self._checked, self.nat = False, None
        self._punch(self.punch.set_candidates(self._candidates(observed), now, final=not enabled or self._checked))
        if enabled and not self._checked and not self._classifying:
            self._checked_at_ip = public_ip
            self._ask_network_check()

    def _retry_network_check(self) -> None:
        self._check_retry = None  # fired: nothing to cancel
        self._ask_network_check()

    def _ask_network_check(self) -> None:
        """Ask the network-check actor (off the loop: DNS and STUN take time) for this
        node's LAN address and NAT type; its answer comes back as ``NetworkChecked``."""
        if self._check_retry is not None:  # asked now: a retry still pending is not needed
            self._check_retry.cancel()
            self._check_retry = None
        if self._stopped or self._classifying or self._checked:
            return
        if self.network_check is None:
            self._on_network_checked(NetworkChecked(None, None, "no network check with direct links off"))
            return
        self._classifying = True
        server = stun_server(self.stun, self.endpoint)
        self.network_check.tell(CheckNetwork(reply_to=self.post, relay_endpoint=self.endpoint, stun=server))

    def _candidates(self, observed: str) -> Candidates:
        """This node's candidates: the relay-observed address, the NAT type, and its
        listener as the internet (its public IP) and its LAN (the address it reaches the
        relay from) see it."""
        nat = self.nat.nat_type if self.nat is not None else None
        if not observed or not self.punch.enabled or self._lan_ip is None:
            return Candidates(observed, nat)
        try:
            port = self.direct.listen(self.direct_port)
        except zmq.ZMQError as exc:
            self.log.warning("direct_listener_unavailable", port=self.direct_port, error=str(exc))
            return Candidates(observed, nat)
        public_ip = address_ip(observed)
        return Candidates(observed, nat, f"{public_ip}:{port}", f"{self._lan_ip}:{port}")

    def _on_network_checked(self, checked: NetworkChecked) -> None:
        self._classifying = False
        if self._stopped:
            return
        if checked.crashed:
            # The actor failed (and was restarted): asked again, later each time.
            self._check_failures += 1
            delay = min(2.0 ** (self._check_failures - 1), MAX_CHECK_RETRY)
            self.log.warning("network_check_retry", error=checked.error, seconds=delay)
            self._check_retry = self.loop.call_later(delay, self._retry_network_check)
            return
        self._checked, self._check_failures = True, 0
        lan_ip, report = checked.lan_ip, checked.report
        self.log.info("network_checked", lan_ip=lan_ip, nat=report.nat_type if report is not None else None,
                      error=checked.error or None)  # fmt: skip
        self._lan_ip = lan_ip
        if report is not None:
            self.nat = report
            self.log.info("nat_classified", nat=report.nat_type, public_udp=report.public_address,
                          stun=report.server, seconds=report.seconds)  # fmt: skip
        now = time.monotonic()
        observed = self.link.observed if self.link.registered else ""  # none while registering again
        if observed and address_ip(observed) != self._checked_at_ip:
            self._on_observed(observed, now)  # the network changed during the check
            return
        self._punch(self.punch.set_candidates(self._candidates(observed), now, final=bool(observed)))

    def _want_direct(self, peer: str, now: float) -> None:
        """Jobs go between this node and ``peer``: a direct link is worth trying."""
        if self.link.registered and self.local_port is not None:
            # Runs for every job: most find a link up or under way, and change nothing
            # (no events, no new deadline); _punch's scan of every peer's deadline is
            # for the rest.
            events = self.punch.want(peer, now)
            if events:
                self._punch(events)

    def _punch(self, events: list[PunchEvent]) -> None:
        """Carry out what the hole-punch coordinator decided; wake it when it is due."""
        now = time.monotonic()
        for event in events:
            if isinstance(event, SendPunch):
                self._apply(self.sessions.send_control(event.peer, event.message, now))
            elif isinstance(event, Dial):
                self.direct.dial(event.peer, event.attempt, event.remote, self.local_port, event.curve_server)
            elif isinstance(event, Expect):
                self.direct.expect(event.peer, event.attempt)
            elif isinstance(event, Abandon):
                self.direct.close(event.peer, event.attempt)
            elif isinstance(event, PathChange):
                path = event.path if event.up else "relay"
                self.log.info("path_changed", peer=event.peer, path=path, reason=event.reason)
                self._apply(self.sessions.on_path(event.path, event.up, now, event.peer))
            elif isinstance(event, RenewPort):
                self._renew_port(event.reason, now)
            elif isinstance(event, AskRelay):
                self._query_peers(functools.partial(self._on_vouched, event.peer), now, event.peer)
            elif isinstance(event, PunchNotice):
                self.log.info(event.event, **event.fields)
        due = self.punch.next_deadline()
        if due is not None and due < self._punch_timer_at and not self._stopped:
            if self._punch_timer is not None:
                self._punch_timer.cancel()
            self._punch_timer_at = due
            self._punch_timer = self.loop.call_later(max(0.0, due - now), self._on_punch_timer)

    def _query_peers(self, reply: Any, now: float, peer: str | None = None) -> None:
        """Ask the relay for its peers (``peer``: that one alone); ``reply(peers, error)``
        gets its answer, or why there is none."""
        if not self.link.registered:
            # Answered from the loop's queue, never from inside what asked (a punch).
            self.loop.call_soon(reply, None, f"not connected to the relay at {self.endpoint}")
            return
        self.peers_seq += 1
        self.pending_peers[self.peers_seq] = (reply, now + PEERS_QUERY_TIMEOUT)
        self._send_control(encode(PeersRequest(seq=self.peers_seq, peer_id=peer)))

    def _on_vouched(self, peer: str, peers: list[dict[str, Any]] | None, error: str) -> None:
        """The relay's word on where it sees ``peer`` (none: it knows no address of it)."""
        observed = next((p.get("observed") for p in peers or () if p.get("peer_id") == peer), None)
        if not self._stopped:
            self._punch(self.punch.on_vouched(peer, observed if isinstance(observed, str) else None, time.monotonic()))

    def _renew_port(self, reason: str, now: float) -> None:
        """A punch from the relay connection's port failed: the connection moves to a fresh
        local port (``relay.local_port`` 0), so that the retry starts from a port with a
        fresh NAT mapping, which the relay observes on registration. The relay path is
        down meanwhile (the sessions send what was in flight again); offers wait for the
        new address. At most once per ``RENEW_GAP``: failures to several peers at once
        share one move."""
        if self.local_port_setting or not self.link.registered or now - self._renewed_at < RENEW_GAP:
            return
        self._renewed_at = now
        self.log.info("relay_port_renewed", old_port=self.local_port, why=reason)
        self._punch(self.punch.set_candidates(Candidates(nat=self.punch.mine.nat), now, final=False))
        self._path_down(now, "the relay connection moves to a fresh local port")
        self._connect()

    def _on_punch_timer(self) -> None:
        self._punch_timer, self._punch_timer_at = None, math.inf
        if not self._stopped:
            self._punch(self.punch.on_tick(time.monotonic()))

    def _on_direct_up(self, peer: str, attempt: int) -> None:
        self._punch(self.punch.on_link_up(peer, attempt, time.monotonic()))

    def _on_direct_down(self, peer: str, attempt: int, reason: str) -> None:
        self._punch(self.punch.on_link_down(peer, attempt, reason, time.monotonic()))

    def _on_direct_message(self, peer: str, item: Carried) -> None:
        try:
            box = decode_carried(item, NODE_TO_NODE, max_size=self.max_deliver_body)
        except ProtocolError as exc:
            self._rejected(peer, "direct_message_rejected", str(exc))
            return
        self._apply(self.sessions.on_box(peer, cast(Sealed, box), time.monotonic(), self.punch.link(peer)))
        self._update_ledger_idle()

    # -- link --

    def _on_tick(self) -> None:
        now = time.monotonic()
        log_summaries(self.log, "messages_rejected", self.rejections.flush(now), now)
        action = self.link.on_tick(now)
        if action == "ping":
            self._send_control(encode(Ping(seq=self.link.ping(now))))
        elif action == "lost":
            self._on_lost(now)
        for seq in [s for s, (_, deadline) in self.pending_peers.items() if deadline <= now]:
            self.pending_peers.pop(seq)[0](None, f"the relay did not answer within {PEERS_QUERY_TIMEOUT:g} s")
        if self.link.registered:
            # Whatever was read since the last ack, acknowledged on each heartbeat: on a
            # quiet link less than a quarter window would otherwise stay unacknowledged.
            self._send_ack(self.flow.ack_all())
            self._drain_queue()
        self._schedule_tick()

    def _on_reconnected(self, now: float) -> None:
        """A new connection to a relay that may not know us (it restarted) or may (the
        connection alone broke). Its silence is counted from now: a liveness expiry
        measured from before would drop this connection just as it comes back."""
        self.link.on_heard(now)
        if self.link.registered:
            # A ping asks: a relay that does not know us answers ``not_registered``, as it
            # does every message queued before it, and the first of those answers draws
            # the one register (registering here as well made two at once).
            self.log.info("relay_reconnected", action="asking whether it knows us")
            self._send_control(encode(Ping(seq=self.link.ping(now))))
        elif now - self._last_register < RECENT_REGISTER:
            # A register went out just now (the relay's not_registered, read before this
            # event, drew it): on the new connection, as that answer came on it.
            self.log.info("relay_reconnected", action="registering already")
        else:
            self.log.info("relay_reconnected", action="registering again")
            self._register()

    def _path_down(self, now: float, why: str) -> None:
        """The relay path is down until the relay registers this node again: what was in
        flight on it, or waits for room, is sent again then (by the sessions); the peers
        queries waiting for the relay's answer fail now, saying ``why``."""
        self._fail_peer_queries(why)
        self.queue.clear()
        self._apply(self.sessions.on_path("relay", False, now))

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

    def _on_lost(self, now: float) -> None:
        delay = self.link.on_lost()
        self.log.warning("relay_lost", reconnect_in_s=round(delay, 2))
        self._path_down(now, LINK_LOST)
        self.generation += 1
        self._io_close()
        self.loop.call_later(delay, self._handle, Reconnect())

    def _connect(self) -> None:
        self.generation += 1
        self.link.connecting(time.monotonic())
        self._io_open(self.generation)
        self._register()

    def _register(self) -> None:
        self._last_register = time.monotonic()
        register = Register(
            peer_id=self.peer_id, caps=self.capabilities, listen=self.listen, max_body=self.max_deliver_body
        )
        self._io_send(self.generation, encode(register), 0)  # counting starts after it

    def _schedule_tick(self) -> None:
        self.loop.call_later(min(self.link.heartbeat, 1.0), self._handle, Tick())

    def _send_control(self, frames: list[Any]) -> None:
        """A small message outside the window's gate (ping, peers): counted, never held."""
        size = frames_size(frames) if self.link.registered else 0
        self.flow.on_sent(size)
        self._io_send(self.generation, frames, size)

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
        # libzmq reconnects by itself when the relay restarts, every 100 ms by default: in
        # step with every other node of the relay, a burst its listen backlog overflows.
        # Each node waits its own random interval instead, and backs off.
        sock.setsockopt(zmq.RECONNECT_IVL, int(random.uniform(*RECONNECT_IVL_MS)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # The relay refusing our key shows only as a socket event: watch for it.
        monitor = watch(sock, HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED, "relay")
        self._handshakes = 0
        # From one local port, which libzmq's reconnects keep: the relay's `observed` is
        # then the NAT's mapping of that port, the one a punch from it will use. A new
        # socket takes a new port (the old one may linger in TIME_WAIT towards the relay).
        address = tcp_address(self.endpoint)
        self.local_port = None
        if address is not None:
            self.local_port = self.local_port_setting or free_tcp_port(ipv6=":" in address[0])
        sock.connect(connect_from(self.endpoint, self.local_port) if self.local_port else self.endpoint)
        self._sock = sock
        self._monitor = monitor
        self._sock_generation = generation
        self.loop.add_reader(sock, self._io_readable)
        self.loop.add_reader(monitor, self._io_monitor)

    def _io_close(self) -> None:
        close_watched(self.loop, self._sock, self._monitor)
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
            if event["event"] == zmq.EVENT_DISCONNECTED:
                self._handle(Disconnected(self._sock_generation))
                continue
            self._handle(
                HandshakeFailed(
                    self._sock_generation, event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH, event["value"]
                )
            )

    def _io_send(self, generation: int, frames: list[Any], counted: int) -> None:
        """Send ``frames``; ``counted`` is what they were counted for in the window, taken
        back if they cannot be sent (a sealed box is then sent again by its session)."""
        sock = self._sock
        if sock is None or generation != self._sock_generation:
            return
        try:
            send_message(sock, frames)
        except zmq.ZMQError as exc:
            self.flow.on_unsent(counted)
            self.log.warning("relay_send_failed", error=str(exc))

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


class RelayClientActor(NodeActor):
    """Supervises the node's :class:`RelayClient`: starts its link with the node and
    stops it (ending what it held) before the client API stops."""

    def __init__(self, client: RelayClient):
        super().__init__()
        self.client = client

    def on_start(self) -> None:
        self.client.start()

    def on_stop(self) -> None:
        self.client.stop()

    def handle(self, message: Any) -> Any:
        return self.client.handle(message)


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


def _path_name(path: str | None) -> str:
    """What ``meshnet peers`` calls a session's path: direct, lan, relayed, or none."""
    if path is None:
        return "none"
    return "relayed" if path == "relay" else path


def _mirror(event: threading.Event, value: bool) -> None:
    """Make ``event`` show ``value``, touching it only when it changes."""
    if value != event.is_set():
        event.set() if value else event.clear()


def node_capabilities(executors: int, kinds: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """What a node tells the relay it can do; config values win over detected ones."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {"cores": os.cpu_count() or 1, "memory_bytes": memory, "executors": executors, "kinds": kinds, **extra}
