"""The node's protocol with its relay and its peers, as one object without sockets.

:class:`NodeCore` composes the cores that each know one part: :class:`RelayLink`
(register, heartbeat, reconnect), :class:`SessionCore` (jobs to and from peers, each to
one true end), :class:`PunchCoordinator` (direct links), and the relay link's flow
control and send queue. Around them it decides what none of them knows alone: which
path a box takes and how it is sealed, what a register after a reconnect or a twin
identity's displacement means, when the node's network changed, when the relay port
moves, and the bookkeeping of pings and peer queries.

It takes relay frames, monitor events, direct-link frames, link up / down, requests,
job ends, network-check results, timers and ``now``; it returns effects
(:mod:`meshnet.node.effects`) for a shell to carry out. Sealing (a pure function of the
keys) and picking a free local port are handed in. The cores' events go through one
work queue, drained at the end of each input: nothing re-enters what is running. Like
libp2p's swarm: the core never dials; it asks for a dial and learns the outcome as an
event.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from meshnet.capabilities import read_capabilities
from meshnet.config import DEFAULT_RELAY_QUEUE_BYTES
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
from meshnet.jobs.model import CANCELLED_BY_SUBMITTER, REFUSED_DRAINING, JobSpec, Outcome, ToClient, ToPeer
from meshnet.natcheck import NatReport
from meshnet.node.effects import (
    AnswerJob,
    AskNetworkCheck,
    CancelTimer,
    CloseRelay,
    Effect,
    FlushSoon,
    HandshakeFailed,
    Listen,
    Log,
    OpenRelay,
    PeersAnswered,
    PingAnswered,
    Reconnected,
    RelayEvent,
    RunJob,
    SendDirect,
    SendRelay,
    SetTimer,
    StopJob,
)
from meshnet.placement import CANDIDATES_ASKED, Decision, Here, Local, Placement, Refuse, There
from meshnet.protocol import (
    BODY_SLACK,
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
    encode_inner_parts,
)
from meshnet.protocol.batch import (
    BATCH_BULK_BYTES,
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    encode_batch_parts,
    is_batch,
    split_batch,
)
from meshnet.protocol.codec import BULK_FIELDS
from meshnet.protocol.direct import Carried, decode_carried
from meshnet.rejections import RejectionLog, summary_fields
from meshnet.relay_link import LinkState, RelayLink
from meshnet.requirements import unmet
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

#: A libzmq reconnection seen this soon after a register draws no other one.
RECENT_REGISTER = 0.5
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
#: Batches sent whose bounce is still possible, remembered by (peer, ref): what each held.
MAX_BATCHES_KEPT = 4096
#: The core's timers (besides one per ping: ``("ping", peer, number)``).
TICK, SESSIONS, PUNCH, RECONNECT, CHECK_RETRY = "tick", "sessions", "punch", "reconnect", "check_retry"


class Sealing(Protocol):
    """Seals and opens node-to-node boxes (:class:`meshnet.identity.Sealer`)."""

    def seal_parts(self, peer_id: str, parts: list[Any]) -> bytearray: ...

    def open(self, peer_id: str, sealed: Any) -> bytes | bytearray: ...


@dataclass(frozen=True)
class NetworkChecked:
    """What the network check found: the LAN address toward the relay and the NAT
    report (None where unknown, ``error`` says why); ``crashed``: the check failed."""

    lan_ip: str | None
    report: NatReport | None
    error: str = ""
    crashed: bool = False


@dataclass(frozen=True)
class _Bounced:
    """A box that could not go on the relay: handed to its session after what runs now."""

    peer: str
    sid: int
    counter: int
    reason: str
    text: str


@dataclass(frozen=True)
class _Vouch:
    """A peers query the punch coordinator made: where the relay sees ``peer``."""

    peer: str


@dataclass(frozen=True)
class _Candidates:
    """A peers query placement made: the devices that meet ``requires``, best first."""

    requires: dict[str, Any]


_Work = Event | PunchEvent | _Bounced


class NodeCore:
    def __init__(
        self,
        *,
        peer_id: str,
        relay_peer_id: str,
        endpoint: str,
        sealer: Sealing,
        heartbeat: float,
        liveness: int,
        backoff_min: float,
        backoff_max: float,
        max_payload: int,
        capabilities: dict[str, Any],
        listen: list[str],
        free_port: Callable[[], int] | None,
        max_queued_bytes: int = DEFAULT_RELAY_QUEUE_BYTES,
        local_port: int = 0,
        direct_port: int = 0,
        direct_links: bool = True,
        network_check: bool = True,
        sessions: SessionCore | None = None,
        link: RelayLink | None = None,
        load: Callable[[], dict[str, int]] | None = None,
        placement: Placement | None = None,
    ):
        self.peer_id = peer_id
        self.relay_peer_id = relay_peer_id
        self.endpoint = endpoint
        self.sealer = sealer
        #: Picks a free local port for a new relay connection (None: the relay is not on
        #: tcp://, and the connection has no port of its own to punch from).
        self.free_port = free_port
        #: relay.local_port (0: a fresh port for each new connection), and the port the
        #: current connection is made from.
        self.local_port_setting = local_port
        self.local_port: int | None = None
        self.link = link or RelayLink(
            heartbeat=heartbeat, liveness=liveness, backoff_min=backoff_min, backoff_max=backoff_max
        )
        #: Jobs and results held for peers until acknowledged, within max_queued_bytes;
        #: their sealed copies waiting for room on the relay link have a budget as large.
        self.sessions = sessions or SessionCore(
            budget=max_queued_bytes, max_payload=max_payload, batch=MAX_BATCH_MESSAGES
        )
        #: The largest deliver body this node decodes: told to the relay, which refuses
        #: larger sends to us (our socket would drop the connection past it).
        self.max_deliver_body = max_payload + BODY_SLACK
        #: Bytes in flight each way on the link (meshnet.flow), and what waits for room.
        self.flow = LinkFlow()
        self.queue = SendQueue(budget=max_queued_bytes)
        #: The largest send body the relay takes (from its ``registered``).
        self.relay_max_body: int | None = None
        self.capabilities = capabilities
        #: This node's capabilities as placement reads them (meshnet.capabilities).
        self.own_caps = read_capabilities(capabilities)
        #: Where jobs submitted without a target run (meshnet.placement), and the jobs
        #: that wait for the relay's list of candidates.
        self.placement = placement or Placement()
        self.placing: dict[bytes, JobSpec] = {}
        #: This node's load now (executors busy and free, jobs queued), told to the relay
        #: on each heartbeat for placement; handed in (the job book knows it). None: not told.
        self.load = load
        self.listen = listen
        self.generation = 0
        self.punch = PunchCoordinator(peer_id, enabled=direct_links)
        #: Whether a network-check actor exists (False: none is asked, as with direct links off).
        self.network_check = network_check
        self.direct_port = direct_port
        #: The direct listener's port once it listens (None: not yet, or it could not).
        self.listen_port: int | None = None
        self._listen_asked = False
        self.nat: NatReport | None = None
        #: The address this node reaches the relay from (its LAN address), once known.
        self.lan_ip: str | None = None
        self._classifying = False
        #: Whether the network check (LAN address, NAT type) has run, and for which public
        #: IP (as the relay observed it): a new one means a new network, checked again.
        self._checked = False
        self._checked_at_ip = ""
        #: Network checks in a row that failed.
        self._check_failures = 0
        #: Peers queries waiting for the relay's answer, by the seq they were sent with:
        #: who asked (a requester's reply_to, or the punch's _Vouch) and the deadline.
        self.pending_peers: dict[int, tuple[Any, float]] = {}
        self.peers_seq = 0
        #: ``meshnet ping`` requests waiting for their peer's answer, by (peer, ping
        #: number): who asked, the path the ping went on, and how long it waits.
        self.pending_pings: dict[tuple[str, int], tuple[Any, str, float]] = {}
        self.draining = False
        self.stopped = False
        #: Boxes sent to peers, by path.
        self.boxes_sent: Counter[str] = Counter()
        self.rejections = RejectionLog()
        self._renewed_at = -math.inf
        self._refusal_logged = -1
        self._last_register = -math.inf
        #: When the sessions' and the punch's timers are set for (inf: not set).
        self._sessions_at = math.inf
        self._punch_at = math.inf
        self._punch_asked = False
        #: Boxes for each peer gathered in this loop turn, and their bytes (sealed as one
        #: batch when the turn ends), and whether the shell was asked to end it.
        self._batching: dict[str, list[Sealed]] = {}
        self._batching_bytes: dict[str, int] = {}
        self._flush_asked = False
        #: The boxes of the batches sent lately, by (peer, ref): a bounce names the first.
        self._batches: OrderedDict[tuple[str, bytes], list[tuple[int, int]]] = OrderedDict()
        self._work: deque[_Work] = deque()
        self._effects: list[Effect] = []
        self._now = 0.0

    # -- what the shell asks --

    @property
    def in_flight(self) -> int:
        """Jobs this node sent to peers that await their answer."""
        return self.sessions.in_flight

    @property
    def holding(self) -> bool:
        """Whether a message to a peer awaits its acknowledgement."""
        return self.sessions.holding

    @property
    def held_bytes(self) -> int:
        """What the sessions hold for peers (counted in the node's memory budget)."""
        return self.sessions.held + self.queue.size

    def status(self) -> dict[str, Any]:
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
            "peers": {peer: self.peer_link(peer) for peer in self.sessions.sessions},
        }

    def peer_link(self, peer: str) -> dict[str, Any]:
        """The path to ``peer`` now, and its last measured round trip (on that path)."""
        path = self.sessions.paths.current(peer)
        rtt = self.sessions.round_trips.get(peer, {}).get(path or "")
        return {"path": _path_name(path), "rtt_ms": _ms(rtt[0] if rtt else None)}

    # -- inputs: life cycle --

    def start(self, now: float) -> list[Effect]:
        self._now = now
        self._connect()
        self._effects.append(SetTimer(TICK, now + min(self.link.heartbeat, 1.0)))
        return self._settle()

    def stop(self, now: float) -> list[Effect]:
        """The node stops: every job sent to a peer ends, every ping is answered."""
        self._now = now
        if self.stopped:
            return []
        self._apply(self.sessions.abort_all("the node is shutting down", now))
        for key in list(self.pending_pings):
            self._ping_answered(key, None, "unavailable", "the node is shutting down")
        self._fail_peer_queries("the node is shutting down")
        for job in self.placing.values():
            self._effects.append(AnswerJob(job, REFUSED_DRAINING))
        self.placing.clear()
        effects = self._settle()
        self._send_gathered()  # what this turn gathered goes before the link closes
        self.stopped = True
        return [*effects, *self._take(), CloseRelay()]

    def drain(self) -> list[Effect]:
        """Refuse peers' new jobs from now on."""
        self.draining = True
        return []

    def abort(self, reason: str, now: float) -> list[Effect]:
        self._now = now
        self._apply(self.sessions.abort_all(reason, now))
        return self._settle()

    # -- inputs: requests --

    def submit(self, jobs: list[tuple[JobSpec, str]], now: float) -> list[Effect]:
        """Send each job to its peer: ``(job, peer)`` pairs."""
        self._now = now
        for job, peer in jobs:
            if self.stopped:
                self._effects.append(AnswerJob(job, REFUSED_DRAINING))
            elif self.link.state is LinkState.DISPLACED:
                self._effects.append(AnswerJob(job, Outcome.refused("no_relay", DISPLACED)))
            else:
                self._apply(self.sessions.submit(job, peer, now))
                self._want_direct(peer)
        return self._settle()

    def place(self, jobs: list[tuple[JobSpec, dict[str, Any]]], now: float) -> list[Effect]:
        """Run each job where placement says (meshnet.placement): here, on a peer, or
        nowhere (``no_device``). ``(job, requires)`` pairs; the job's kind is required too."""
        self._now = now
        for job, requires in jobs:
            if self.stopped:
                self._effects.append(AnswerJob(job, REFUSED_DRAINING))
                continue
            wants = _with_kind(requires, job.kind)
            self._carry_placement(job, self.placement.place(job.id, wants, self._local(wants), now))
        return self._settle()

    def cancel(self, job_id: bytes, requester: str, now: float) -> list[Effect]:
        self._now = now
        waiting = self.placing.get(job_id)
        if waiting is not None and waiting.origin == requester:  # not placed yet: it ends here
            del self.placing[job_id]
            self.placement.forget(job_id)
            self._effects.append(AnswerJob(waiting, Outcome.cancelled(CANCELLED_BY_SUBMITTER)))
        elif not self.stopped:
            self._apply(self.sessions.cancel(job_id, requester, now))
        return self._settle()

    def ping(self, peer: str, timeout: float, request: Any, now: float) -> list[Effect]:
        """Measure a round trip to ``peer`` on its current path; ask for a direct link, as
        a job would (``tailscale ping`` does the same): later pings may take it. The
        answer is a ``PingAnswered`` naming ``request`` (opaque here: who asked)."""
        self._now = now
        sent = self.sessions.paths.current(peer)
        if self.stopped:
            return [PingAnswered(request, None, "unavailable", "the node is shutting down")]
        if self.link.state is LinkState.DISPLACED:
            return [PingAnswered(request, None, "no_relay", DISPLACED)]
        if sent is None:
            why = f"not connected to the relay at {self.endpoint} now, and no direct link to {peer}; try again"
            return [PingAnswered(request, None, "unavailable", why)]
        if len(self.pending_pings) >= MAX_PENDING_PINGS:
            why = f"{MAX_PENDING_PINGS} pings wait for answers already; try again later"
            return [PingAnswered(request, None, "unavailable", why)]
        number, events = self.sessions.ping(peer, now)
        self.pending_pings[peer, number] = (request, sent, timeout)
        self._effects.append(SetTimer(("ping", peer, number), now + timeout))
        self._apply(events)
        self._want_direct(peer)
        return self._settle()

    def query_peers(
        self,
        request: Any,
        now: float,
        *,
        requires: dict[str, Any] | None = None,
        after: str | None = None,
        limit: int | None = None,
    ) -> list[Effect]:
        """Ask the relay for its peers (those that meet ``requires``, best first; or the
        page of its listing after ``after``); the answer is a ``PeersAnswered`` naming
        ``request``."""
        self._now = now
        if self.stopped:
            return [PeersAnswered(request, None, "the node is shutting down")]
        self._query_peers(request, requires=requires, after=after, limit=limit)
        return self._settle()

    # -- inputs: jobs run here --

    def job_finished(self, peer: str, job_id: bytes, outcome: Outcome, now: float) -> list[Effect]:
        """Job ``job_id``, which ``peer`` sent, ended with ``outcome``: answered in the
        peer's session (not once the node has stopped)."""
        if self.stopped:
            return []
        self._now = now
        self._apply(self.sessions.job_finished(peer, job_id, outcome, now))
        return self._settle()

    # -- inputs: the relay connection --

    def on_relay_frames(self, generation: int, frames: list[Any], now: float) -> list[Effect]:
        """One message read from the relay connection of ``generation``."""
        if generation != self.generation or self.stopped:
            return []  # from a connection replaced since
        self._now = now
        self.link.on_heard(now)
        try:
            message = decode(frames, RELAY_TO_NODE, max_body=self.max_deliver_body)
        except ProtocolError as exc:
            self._count_received(frames)
            self._rejected("relay", "relay_message_rejected", str(exc))
            return self._settle()
        if isinstance(message, Ack):
            self.flow.on_ack(message.received)
            self._drain_queue()
            return self._settle()
        self._count_received(frames)
        if isinstance(message, Deliver):
            self._on_deliver(message)
        elif isinstance(message, Pong):
            self.link.on_pong(message.seq, now)
        elif isinstance(message, Registered):
            self.link.on_registered(message.observed, message.heartbeat, now)
            # Both ends count the link's bytes from the message after this one.
            self.flow.reset(message.window or DEFAULT_WINDOW)
            self.relay_max_body = message.max_body
            self._log("info", "relay_registered", observed=message.observed, local_port=self.local_port)
            self._on_observed(message.observed)
            self._apply(self.sessions.on_path("relay", True, now))
        elif isinstance(message, Unroutable):
            self._on_unroutable(message)
        elif isinstance(message, PeerDown):
            self._apply(self.sessions.on_peer_down(message.peer_id, "it left the relay", now))
        elif isinstance(message, PeersReply):
            self._on_peers_reply(message)
        elif isinstance(message, Error):
            self._on_error(message)
        return self._settle()

    def rejected_from_relay(self, error: str, now: float) -> list[Effect]:
        """The shell could not read a message from the relay (too many frames)."""
        self._now = now
        self._rejected("relay", "relay_message_rejected", error)
        return self._settle()

    def on_relay_event(self, event: RelayEvent, now: float) -> list[Effect]:
        """What the relay connection's monitor saw."""
        if self.stopped:
            return []
        self._now = now
        if isinstance(event, HandshakeFailed):
            self._on_handshake_failed(event)
        elif event.generation != self.generation:
            pass
        elif isinstance(event, Reconnected):
            self._on_reconnected()
        elif self.link.registered:  # Disconnected
            # The relay went away (it restarted, or the connection broke): nothing more
            # goes out on this path until it registers this node again, and the node
            # waits for that with a registering link's patience, not the three
            # heartbeats of silence that would make it start over meanwhile.
            self._log("info", "relay_disconnected", action="waiting for libzmq to reconnect")
            self.link.connecting(now)
            self._path_down(LINK_LOST)
        return self._settle()

    def on_relay_unsent(self, counted: int) -> list[Effect]:
        """Frames counted for ``counted`` in the window could not be sent (a sealed box
        is then sent again by its session)."""
        self.flow.on_unsent(counted)
        return []

    def flush(self, now: float) -> list[Effect]:
        """The loop turn has read what it had: what was gathered for each peer leaves, one
        sealed batch per peer."""
        self._now = now
        self._flush_asked = False
        self._send_gathered()
        return self._settle()

    def _send_gathered(self) -> None:
        """Seal and send what was gathered for each peer, one batch per peer."""
        for peer in list(self._batching):
            self._seal_and_send(peer, self._take_batch(peer))

    # -- inputs: direct links --

    def on_listening(self, port: int | None, error: str, now: float) -> list[Effect]:
        """The direct listener listens on ``port`` (None: it could not, ``error`` says why)."""
        self._now = now
        if port is None:
            self._listen_asked = False  # asked again at the next network check
            self._log("warning", "direct_listener_unavailable", port=self.direct_port, error=error)
        self.listen_port = port
        return []

    def on_link_up(self, peer: str, attempt: int, now: float) -> list[Effect]:
        self._now = now
        if not self.stopped:
            self._punch(self.punch.on_link_up(peer, attempt, now))
        return self._settle()

    def on_link_down(self, peer: str, attempt: int, reason: str, now: float) -> list[Effect]:
        self._now = now
        if not self.stopped:
            self._punch(self.punch.on_link_down(peer, attempt, reason, now))
        return self._settle()

    def on_link_messages(self, peer: str, items: Sequence[Carried], now: float) -> list[Effect]:
        """The node-to-node messages one message of ``peer``'s direct link carried (a
        ``boxes`` carries a turn's worth): one input, so one settling for them all. One
        that does not decode is dropped alone (logged); its sender sends it again."""
        if self.stopped:
            return []
        self._now = now
        path = self.punch.link(peer)
        for item in items:
            try:
                box = decode_carried(item, NODE_TO_NODE, max_size=self.max_deliver_body)
            except ProtocolError as exc:
                self._rejected(peer, "direct_message_rejected", str(exc))
                continue
            self._apply(self.sessions.on_box(peer, cast(Sealed, box), now, path))
        return self._settle()

    def on_direct_sent(self, path: str) -> None:
        """A box went out on a direct link (counted in ``boxes_sent``)."""
        self.boxes_sent[path] += 1

    # -- inputs: the network check and timers --

    def on_network_checked(self, checked: NetworkChecked, now: float) -> list[Effect]:
        self._now = now
        self._network_checked(checked)
        return self._settle()

    def _network_checked(self, checked: NetworkChecked) -> None:
        now = self._now
        self._classifying = False
        if self.stopped:
            return
        if checked.crashed:
            # The check failed (its actor was restarted): asked again, later each time.
            self._check_failures += 1
            delay = min(2.0 ** (self._check_failures - 1), MAX_CHECK_RETRY)
            self._log("warning", "network_check_retry", error=checked.error, seconds=delay)
            self._effects.append(SetTimer(CHECK_RETRY, now + delay))
            return
        self._checked, self._check_failures = True, 0
        lan_ip, report = checked.lan_ip, checked.report
        self._log("info", "network_checked", lan_ip=lan_ip, nat=report.nat_type if report is not None else None,
                  error=checked.error or None)  # fmt: skip
        self.lan_ip = lan_ip
        if report is not None:
            self.nat = report
            self._log("info", "nat_classified", nat=report.nat_type, public_udp=report.public_address,
                      stun=report.server, seconds=report.seconds)  # fmt: skip
        observed = self.link.observed if self.link.registered else ""  # none while registering again
        if observed and address_ip(observed) != self._checked_at_ip:
            self._on_observed(observed)  # the network changed during the check
        else:
            self._punch(self.punch.set_candidates(self._candidates(observed), now, final=bool(observed)))

    def on_timer(self, key: Any, now: float) -> list[Effect]:
        """The timer set under ``key`` is due."""
        self._now = now
        if self.stopped:
            return []
        if key == TICK:
            self._on_tick()
        elif key == SESSIONS:
            self._sessions_at = math.inf
            self._apply(self.sessions.on_tick(now))
        elif key == PUNCH:
            self._punch_at = math.inf
            self._punch(self.punch.on_tick(now))
        elif key == RECONNECT:
            if self.link.state is not LinkState.DISPLACED:
                self._connect()
        elif key == CHECK_RETRY:
            self._ask_network_check()
        elif isinstance(key, tuple) and key[0] == "ping":
            _, peer, number = key
            if (peer, number) in self.pending_pings:
                timeout = self.pending_pings[peer, number][2]
                why = f"peer {peer} did not answer within {timeout:g} s"
                self._ping_answered((peer, number), None, "timed_out", why, expired=True)
        return self._settle()

    # -- the work queue --

    def _apply(self, work: list[Any]) -> None:
        self._work.extend(work)

    def _punch(self, events: list[PunchEvent]) -> None:
        """What the punch coordinator decided (it was asked something: its next deadline
        is looked at again when this input settles)."""
        self._punch_asked = True
        self._work.extend(events)

    def _settle(self) -> list[Effect]:
        """Carry out the queued work (what it adds joins the queue), then set the timers
        for the sessions' and the punch's next deadlines; the effects so far."""
        work = self._work
        while work:
            item = work.popleft()
            if isinstance(item, (Transmit, Settled, Execute, Control, Ponged, StopRun, Notice)):
                self._on_session_event(item)
            elif isinstance(item, _Bounced):
                self._apply(
                    self.sessions.on_bounce(item.peer, item.sid, item.counter, item.reason, item.text, self._now)
                )
            else:
                self._on_punch_event(item)
        if not self.stopped:
            self._arm_timers()
        return self._take()

    def _take(self) -> list[Effect]:
        effects, self._effects = self._effects, []
        return effects

    def _arm_timers(self) -> None:
        now = self._now
        # Nothing a message or a job does makes the sessions due sooner than ACK_DELAY
        # from now (a delayed ack; re-sends, probes and deadlines are further off): with
        # the timer already that close, the scan of every session for its next deadline
        # (a cost per message that grew with what is in flight) is skipped. Under load
        # an ack is nearly always pending, so the timer is.
        if self._sessions_at - now > ACK_DELAY:
            deadline = self.sessions.next_deadline()
            if deadline is not None and deadline < self._sessions_at:
                self._sessions_at = deadline
                self._effects.append(SetTimer(SESSIONS, deadline))
        if self._punch_asked:  # its deadline scans every peer: not for an input it never saw
            self._punch_asked = False
            due = self.punch.next_deadline()
            if due is not None and due < self._punch_at:
                self._punch_at = due
                self._effects.append(SetTimer(PUNCH, due))

    def _on_session_event(self, event: Event) -> None:
        if isinstance(event, Transmit):
            self._transmit(event)
        elif isinstance(event, Settled):
            job = event.job
            placed = self.placement.placed.get(job.id)
            if placed is not None:
                here = self._local(placed.requires)
                again = self.placement.ended(job.id, event.peer, event.outcome, here, self._now)
                if again is not None:
                    reason = event.outcome.reason
                    self._log("info", "job_placed_again", job_id=job.id.hex(), refused_by=event.peer, reason=reason)
                    self._carry_placement(job, again)
                    return
            self._effects.append(AnswerJob(job, event.outcome, event.peer))
        elif isinstance(event, Execute):
            self._run(event.peer, event.job)
            self._want_direct(event.peer)
        elif isinstance(event, Control):
            if isinstance(event.message, Punch):
                self._punch(self.punch.on_punch(event.peer, event.message, self._now))
        elif isinstance(event, Ponged):
            self._on_pong(event)
        elif isinstance(event, StopRun):
            self._effects.append(StopJob(event.job_id, event.peer))
        elif event.event in RELAY_CLAIMS:
            # What the relay said and the session did not take at its word: one line,
            # then counts (a relay repeating it must not fill the log).
            self._rejected("relay", event.event, RELAY_CLAIMS[event.event], **event.fields)
        else:
            self._log("info", event.event, **event.fields)
            if event.event == "session_ended":
                self._punch(self.punch.on_peer_gone(event.fields["peer"]))

    def _on_punch_event(self, event: PunchEvent) -> None:
        if isinstance(event, SendPunch):
            self._apply(self.sessions.send_control(event.peer, event.message, self._now))
        elif isinstance(event, (Dial, Expect, Abandon)):
            self._effects.append(event)
        elif isinstance(event, PathChange):
            path = event.path if event.up else "relay"
            self._log("info", "path_changed", peer=event.peer, path=path, reason=event.reason)
            self._apply(self.sessions.on_path(event.path, event.up, self._now, event.peer))
        elif isinstance(event, RenewPort):
            self._renew_port(event.reason)
        elif isinstance(event, AskRelay):
            self._query_peers(_Vouch(event.peer), event.peer)
        elif isinstance(event, PunchNotice):
            self._log("info", event.event, **event.fields)

    # -- jobs and boxes --

    def _transmit(self, event: Transmit) -> None:
        """Send a box on its path: on a direct link in the clear, else sealed, on the
        relay link. A box the path cannot take now is dropped: the session sends it
        again."""
        if event.path != "relay":  # the peer's own link: direct, or over the LAN
            self._effects.append(SendDirect(event.peer, event.path, event.box))
            return
        if not self.link.registered:
            return
        peer, box = event.peer, event.box
        self.boxes_sent["relay"] += 1
        count, room = self.sessions.batch_room(peer)
        size = _bulk_size(box)
        waiting = self._batching.get(peer)
        if count > 1 and size < BATCH_BULK_BYTES:
            if waiting is not None and self._batching_bytes[peer] + size > min(room, MAX_BATCH_BYTES):
                self._seal_and_send(peer, self._take_batch(peer))  # full: it goes, a new one starts
                waiting = None
            if waiting is None:
                waiting = self._batching[peer] = []
                self._batching_bytes[peer] = 0
            waiting.append(box)
            self._batching_bytes[peer] += size
            if len(waiting) >= min(count, MAX_BATCH_MESSAGES):
                self._seal_and_send(peer, self._take_batch(peer))
            elif not self._flush_asked:
                self._flush_asked = True
                self._effects.append(FlushSoon())
            return
        if waiting is not None:  # what was gathered goes first
            self._seal_and_send(peer, self._take_batch(peer))
        self._seal_and_send(peer, [box])

    def _take_batch(self, peer: str) -> list[Sealed]:
        del self._batching_bytes[peer]
        return self._batching.pop(peer)

    def _seal_and_send(self, peer: str, boxes: list[Sealed]) -> None:
        """Seal ``boxes`` for ``peer`` as one (a batch if more than one) and send it on the
        relay link, within its window (else queued, or dropped past the queue's budget:
        the session sends again)."""
        if not self.link.registered:
            return
        first = boxes[0]
        parts = encode_inner_parts(first) if len(boxes) == 1 else encode_batch_parts(boxes)
        sealed = self.sealer.seal_parts(peer, parts)
        if self.relay_max_body is not None and len(sealed) > self.relay_max_body:
            why = f"the sealed message is {len(sealed)} bytes; the relay takes at most {self.relay_max_body}"
            self._work.extend(_Bounced(peer, box.sid, box.ctr, "too_large", why) for box in boxes)
            return
        ref = box_ref(first)
        if len(boxes) > 1:
            self._batches[peer, ref] = [(box.sid, box.ctr) for box in boxes]
            if len(self._batches) > MAX_BATCHES_KEPT:
                self._batches.popitem(last=False)
        frames = encode(Send(to=peer, ref=ref, op="sealed", body=sealed))
        size = frames_size(frames)
        if not self.queue.entries and self.flow.may_send(size):
            self.flow.on_sent(size)
            self._effects.append(SendRelay(self.generation, frames, size))
        elif self.queue.fits(size):
            self.queue.push(Queued(frames, size, ref, "sealed", peer))

    def _drain_queue(self) -> None:
        """Send what waits, as far as the window now allows."""
        for item in self.queue.pop_sendable(self.flow):
            self._effects.append(SendRelay(self.generation, item.frames, item.size))

    def _run(self, sender: str, job: Any) -> None:
        """Run a peer's job here; its end comes back through the session (ToPeer)."""
        back = ToPeer(sender)
        spec = JobSpec(id=job.id, kind=job.kind, payload=job.payload, timeout=job.timeout, back=back, origin=sender)
        if self.draining:
            self._apply(self.sessions.job_finished(sender, job.id, REFUSED_DRAINING, self._now))
            return
        self._effects.append(RunJob(spec))

    def _on_deliver(self, message: Deliver) -> None:
        sender = message.sender
        limit = self.max_deliver_body
        try:
            plaintext = self.sealer.open(sender, message.body)
            if is_batch(plaintext):
                boxes = [decode_inner(item, NODE_TO_NODE, max_size=limit) for item in split_batch(plaintext)]
            else:
                boxes = [decode_inner(plaintext, NODE_TO_NODE, max_size=limit)]
        except (SealError, ProtocolError) as exc:
            # Altered in transit, not sealed by its claimed sender, or not a message we
            # read: dropped (a batch whole), never answered (an answer to garbage could
            # loop between two nodes through a tampering relay). Its sender sends again.
            self._rejected(sender, "sealed_message_rejected", str(exc))
            return
        for box in boxes:  # NODE_TO_NODE holds Sealed types only
            self._apply(self.sessions.on_box(sender, cast(Sealed, box), self._now))

    def _on_unroutable(self, message: Unroutable) -> None:
        named = split_box_ref(message.ref)
        if named is None:
            self._rejected("relay", "relay_message_rejected", f"an unroutable whose ref is not {BOX_REF_BYTES} bytes")
            return
        for sid, counter in self._batches.pop((message.to, message.ref), None) or [named]:
            self._apply(self.sessions.on_bounce(message.to, sid, counter, message.reason, message.message, self._now))
        if message.reason == "peer_not_connected":
            for key in [key for key in self.pending_pings if key[0] == message.to]:
                self._ping_answered(key, None, "peer_not_connected", message.message)

    def _count_received(self, frames: list[Any]) -> None:
        """Count a message read from the relay; acknowledge when a quarter window is in."""
        if self.link.registered:
            self._send_ack(self.flow.on_received(frames_size(frames)))

    def _send_ack(self, received: int | None) -> None:
        """Acknowledge ``received`` bytes read from the relay (None: nothing to say)."""
        if received is not None:
            self._effects.append(SendRelay(self.generation, encode(Ack(received=received)), 0))

    def _send_control(self, frames: list[Any]) -> None:
        """A small message outside the window's gate (ping, peers): counted, never held."""
        size = frames_size(frames) if self.link.registered else 0
        self.flow.on_sent(size)
        self._effects.append(SendRelay(self.generation, frames, size))

    # -- pings and peer queries --

    def _on_pong(self, event: Ponged) -> None:
        key = (event.peer, event.number)
        if key in self.pending_pings:
            address = self.punch.remote(event.peer) if event.path != "relay" else None
            answer = {"rtt": event.rtt, "path": event.path, "sent": self.pending_pings[key][1], "address": address}
            self._ping_answered(key, answer, "", "")

    def _ping_answered(
        self, key: tuple[str, int], answer: dict[str, Any] | None, code: str, why: str, *, expired: bool = False
    ) -> None:
        request, _, _ = self.pending_pings.pop(key)
        if not expired:
            self._effects.append(CancelTimer(("ping", *key)))
        self._effects.append(PingAnswered(request, answer, code, why))

    def _query_peers(self, asker: Any, peer: str | None = None, **query: Any) -> None:
        """Ask the relay for its peers (``peer``: that one alone; ``query``: the
        ``requires``, ``after`` and ``limit`` of a peers request)."""
        if not self.link.registered:
            self._answer_peers(asker, None, f"not connected to the relay at {self.endpoint}")
            return
        self.peers_seq += 1
        self.pending_peers[self.peers_seq] = (asker, self._now + PEERS_QUERY_TIMEOUT)
        self._send_control(encode(PeersRequest(seq=self.peers_seq, peer_id=peer, **query)))

    def _on_peers_reply(self, message: PeersReply) -> None:
        query = self.pending_peers.pop(message.seq, None) if message.seq is not None else None
        if query is None:
            return
        for peer in message.peers:  # what only this node knows: its path to each
            peer_id = peer.get("peer_id", "")
            peer.update(self.peer_link(peer_id) if peer_id != self.peer_id else {"path": "self"})
        self._answer_peers(query[0], message.peers, "", message)

    def _answer_peers(
        self, asker: Any, peers: list[dict[str, Any]] | None, error: str, reply: PeersReply | None = None
    ) -> None:
        if isinstance(asker, _Vouch):
            # The relay's word on where it sees the peer (none: it knows no address of it).
            observed = next((p.get("observed") for p in peers or () if p.get("peer_id") == asker.peer), None)
            vouched = observed if isinstance(observed, str) else None
            self._punch(self.punch.on_vouched(asker.peer, vouched, self._now))
        elif isinstance(asker, _Candidates):
            here = self._local(asker.requires)
            why = (reply.unmet if reply is not None else None) or error or None
            decided = self.placement.on_candidates(asker.requires, peers, why, here, self._now, self_id=self.peer_id)
            for job_id, decision in decided:
                job = self.placing.pop(job_id, None)
                if job is not None:
                    self._carry_placement(job, decision)
        elif reply is not None:
            self._effects.append(PeersAnswered(asker, peers, error, reply.more, reply.next, reply.unmet))
        else:
            self._effects.append(PeersAnswered(asker, peers, error))

    def _fail_peer_queries(self, why: str) -> None:
        pending, self.pending_peers = self.pending_peers, {}
        for asker, _ in pending.values():
            self._answer_peers(asker, None, why)

    # -- placement --

    def _local(self, requires: dict[str, Any]) -> Local:
        """This node as placement weighs it for ``requires``."""
        executors = self.own_caps.get("executors", 1)
        load = self.load() if self.load is not None else None
        work = load["busy"] + load["queued"] if load is not None else 0
        return Local(unmet(self.own_caps, requires), executors if isinstance(executors, int) else 1, work)

    def _carry_placement(self, job: JobSpec, decision: Decision) -> None:
        """Carry out where placement put ``job``: its result names the device it ran on."""
        if isinstance(decision, Here):
            _name_device(job, self.peer_id)
            self._effects.append(RunJob(job))
        elif isinstance(decision, There):
            _name_device(job, decision.peer)
            self._apply(self.sessions.submit(job, decision.peer, self._now))
            self._want_direct(decision.peer)
        elif isinstance(decision, Refuse):
            self._effects.append(AnswerJob(job, decision.outcome()))
        else:
            self.placing[job.id] = job
            if decision.ask is not None:
                self._query_peers(_Candidates(decision.ask), requires=decision.ask, limit=CANDIDATES_ASKED)

    # -- the relay link --

    def _heartbeat(self, now: float) -> Ping:
        """A heartbeat, with this node's load and the last one's round trip."""
        rtt = self.link.rtt
        # The wire's seconds are above 0; a loopback round trip may read as 0.0.
        rtt = None if rtt is None else max(rtt, 1e-6)
        return Ping(seq=self.link.ping(now), load=self.load() if self.load else None, rtt=rtt)

    def _on_tick(self) -> None:
        now = self._now
        for summary in self.rejections.flush(now):
            self._log("warning", "messages_rejected", **summary_fields(summary, now))
        action = self.link.on_tick(now)
        if action == "ping":
            self._send_control(encode(self._heartbeat(now)))
        elif action == "lost":
            self._on_lost()
        for seq in [s for s, (_, deadline) in self.pending_peers.items() if deadline <= now]:
            asker = self.pending_peers.pop(seq)[0]
            self._answer_peers(asker, None, f"the relay did not answer within {PEERS_QUERY_TIMEOUT:g} s")
        if self.link.registered:
            # Whatever was read since the last ack, acknowledged on each heartbeat: on a
            # quiet link less than a quarter window would otherwise stay unacknowledged.
            self._send_ack(self.flow.ack_all())
            self._drain_queue()
        self._effects.append(SetTimer(TICK, now + min(self.link.heartbeat, 1.0)))

    def _on_error(self, message: Error) -> None:
        if message.code == "not_registered":
            if self.link.on_not_registered(self._now):
                self._log("info", "relay_forgot_us", message=message.message, action="registering again")
                self._path_down("the relay did not know this node; it is registering again")
                self._register()
        elif message.code == "replaced":
            self._on_displaced(message.message)
        else:
            self._log("error", "relay_error", code=message.code, message=message.message)

    def _on_displaced(self, why: str) -> None:
        """Another process registered at the relay with this node's identity. Registering
        again would take the place back, and have it taken again: the two would flap and
        split the jobs sent to this identity. This node stops using the relay, says why
        once, and ends the jobs it sent (their answers would reach the other process)."""
        if self.link.state is LinkState.DISPLACED:
            return
        self._log(
            "error",
            "identity_in_use",
            reason=why,
            fix=f"run one node per identity: stop the other process with peer id {self.peer_id}, "
            "or give this one its own identity (`meshnet init`)",
        )
        self.link.on_displaced()
        self._path_down(DISPLACED)
        self._apply(self.sessions.abort_all(DISPLACED, self._now))
        self.generation += 1
        self._effects.append(CloseRelay())

    def _on_reconnected(self) -> None:
        """A new connection to a relay that may not know us (it restarted) or may (the
        connection alone broke). Its silence is counted from now: a liveness expiry
        measured from before would drop this connection just as it comes back."""
        now = self._now
        self.link.on_heard(now)
        if self.link.registered:
            # A ping asks: a relay that does not know us answers ``not_registered``, as it
            # does every message queued before it, and the first of those answers draws
            # the one register (registering here as well made two at once).
            self._log("info", "relay_reconnected", action="asking whether it knows us")
            self._send_control(encode(self._heartbeat(now)))
        elif now - self._last_register < RECENT_REGISTER:
            # A register went out just now (the relay's not_registered, read before this
            # event, drew it): on the new connection, as that answer came on it.
            self._log("info", "relay_reconnected", action="registering already")
        else:
            self._log("info", "relay_reconnected", action="registering again")
            self._register()

    def _on_handshake_failed(self, event: HandshakeFailed) -> None:
        if event.generation != self.generation or self._refusal_logged == self.generation:
            return
        self._refusal_logged = self.generation
        if event.auth:
            self._log(
                "error",
                "relay_refused_us",
                reason=f"the relay did not admit this node's key (ZAP status {event.status})",
                fix=f"add {self.peer_id} to allowed_peers in the relay's config",
            )
        else:
            self._log(
                "error",
                "relay_handshake_failed",
                reason="CurveZMQ handshake failed",
                fix=f"check that relay.peer_id ({self.relay_peer_id}) is the relay's peer id (`meshnet id --relay`)",
            )

    def _path_down(self, why: str) -> None:
        """The relay path is down until the relay registers this node again: what was in
        flight on it, or waits for room, is sent again then (by the sessions); the peers
        queries waiting for the relay's answer fail now, saying ``why``."""
        self._fail_peer_queries(why)
        self.queue.clear()
        self._batching.clear()
        self._batching_bytes.clear()
        self._apply(self.sessions.on_path("relay", False, self._now))

    def _on_lost(self) -> None:
        delay = self.link.on_lost()
        self._log("warning", "relay_lost", reconnect_in_s=round(delay, 2))
        self._path_down(LINK_LOST)
        self.generation += 1
        self._effects.append(CloseRelay())
        self._effects.append(SetTimer(RECONNECT, self._now + delay))

    def _connect(self) -> None:
        self.generation += 1
        self.link.connecting(self._now)
        # From one local port, which libzmq's reconnects keep: the relay's `observed` is
        # then the NAT's mapping of that port, the one a punch from it will use. A new
        # connection takes a new port (the old one may linger in TIME_WAIT to the relay).
        self.local_port = None
        if self.free_port is not None:
            self.local_port = self.local_port_setting or self.free_port()
        self._effects.append(OpenRelay(self.generation, self.local_port))
        self._register()

    def _register(self) -> None:
        self._last_register = self._now
        register = Register(
            peer_id=self.peer_id, caps=self.capabilities, listen=self.listen, max_body=self.max_deliver_body
        )
        self._effects.append(SendRelay(self.generation, encode(register), 0))  # counting starts after it

    def _renew_port(self, reason: str) -> None:
        """A punch from the relay connection's port failed: the connection moves to a fresh
        local port (``relay.local_port`` 0), so that the retry starts from a port with a
        fresh NAT mapping, which the relay observes on registration. The relay path is
        down meanwhile (the sessions send what was in flight again); offers wait for the
        new address. At most once per ``RENEW_GAP``: failures to several peers at once
        share one move."""
        now = self._now
        if self.local_port_setting or not self.link.registered or now - self._renewed_at < RENEW_GAP:
            return
        self._renewed_at = now
        self._log("info", "relay_port_renewed", old_port=self.local_port, why=reason)
        self._punch(self.punch.set_candidates(Candidates(nat=self.punch.mine.nat), now, final=False))
        self._path_down("the relay connection moves to a fresh local port")
        self._connect()

    # -- direct links --

    def _want_direct(self, peer: str) -> None:
        """Jobs go between this node and ``peer``: a direct link is worth trying."""
        if self.link.registered and self.local_port is not None:
            # Runs for every job: most find a link up or under way, and change nothing
            # (no events, no new deadline): the deadline's scan is for the rest.
            events = self.punch.want(peer, self._now)
            if events:
                self._punch(events)

    def _on_observed(self, observed: str) -> None:
        """Registered, and seen by the relay at ``observed``: this node's candidates. A
        punch is offered only once the node knows its LAN address and NAT type (or knows
        it will not), which the network check finds out off the loop: DNS and STUN take
        time."""
        enabled = self.punch.enabled
        public_ip = address_ip(observed)
        if self._checked and public_ip != self._checked_at_ip:
            # The relay sees this node from another public IP: it moved to another network
            # (or its NAT changed). Its LAN address and NAT type are found out again, and
            # nothing is offered meanwhile on what the old network said.
            self._log("info", "network_changed", was=self._checked_at_ip, now=public_ip,
                      action="checking the NAT again")  # fmt: skip
            self._checked, self.nat = False, None
        final = not enabled or self._checked
        self._punch(self.punch.set_candidates(self._candidates(observed), self._now, final=final))
        if enabled and not self._checked and not self._classifying:
            self._checked_at_ip = public_ip
            self._ask_network_check()

    def _ask_network_check(self) -> None:
        """Ask for this node's LAN address and NAT type; the direct listener opens first,
        so that its port is known when the answer comes."""
        self._effects.append(CancelTimer(CHECK_RETRY))  # asked now: a retry is not needed
        if self.stopped or self._classifying or self._checked:
            return
        if not self.network_check:
            self._network_checked(NetworkChecked(None, None, "no network check with direct links off"))
            return
        if not self._listen_asked:
            self._listen_asked = True
            self._effects.append(Listen(self.direct_port))
        self._classifying = True
        self._effects.append(AskNetworkCheck())

    def _candidates(self, observed: str) -> Candidates:
        """This node's candidates: the relay-observed address, the NAT type, and its
        listener as the internet (its public IP) and its LAN (the address it reaches the
        relay from) see it."""
        nat = self.nat.nat_type if self.nat is not None else None
        if not observed or not self.punch.enabled or self.lan_ip is None or self.listen_port is None:
            return Candidates(observed, nat)
        port = self.listen_port
        return Candidates(observed, nat, f"{address_ip(observed)}:{port}", f"{self.lan_ip}:{port}")

    # -- logging --

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self._effects.append(Log(level, event, fields))

    def _rejected(self, source: str, event: str, error: str, **fields: Any) -> None:
        """Log a rejected message if it is the first from ``source`` lately; count it
        otherwise (summed up on the tick): a peer or relay sending garbage in a loop
        must not fill the node's log."""
        if self.rejections.on_rejected(source, error, self._now):
            self._log("warning", event, source=source, error=error, **fields)


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 2) if seconds is not None else None


def _path_name(path: str | None) -> str:
    """What ``meshnet peers`` calls a session's path: direct, lan, relayed, or none."""
    if path is None:
        return "none"
    return "relayed" if path == "relay" else path


def _bulk_size(box: Sealed) -> int:
    """The size of a box's payload or result (0: it has none)."""
    name = BULK_FIELDS.get(box.TYPE)
    value = getattr(box, name) if name is not None else None
    return memoryview(value).nbytes if value is not None else 0


def _with_kind(requires: dict[str, Any], kind: str) -> dict[str, Any]:
    """``requires``, with the job's own kind among the kinds required."""
    kinds = requires.get("kinds") or []
    return requires if kind in kinds else {**requires, "kinds": [*kinds, kind]}


def _name_device(job: JobSpec, device: str) -> None:
    """A client's job placed on ``device``: its result names the device."""
    back = job.back
    if isinstance(back, ToClient):
        job.back = ToClient(back.conn, device, back.batch)
