"""Node cores and a relay core on a simulated network, on a simulated clock.

Each node is a :class:`NodeCore` with a real identity and real sealing; the relay is a
:class:`RelayCore`. Everything between them crosses as the frames a socket would carry,
so what one side encodes the other decodes. The simulation plays the parts the shells
play: the relay connection (libzmq's DEALER: ordered, keeps what was queued while
disconnected, loses what was on the wire when the relay died), the direct links (a
simultaneous open, or a dial to a listener that expects it), the worker pool, the
network check and the timers. The relay is hostile: it may drop, duplicate and re-order
what it forwards, and it restarts. Nothing here sleeps: time is a number.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import nacl.signing

from meshnet.holepunch import Abandon, Dial, Expect
from meshnet.identity import Identity, Sealer, curve_public_z85
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.natcheck import NatReport
from meshnet.node.core import NetworkChecked, NodeCore
from meshnet.node.effects import (
    AnswerJob,
    AskNetworkCheck,
    CancelTimer,
    CloseRelay,
    Disconnected,
    FlushSoon,
    Listen,
    Log,
    OpenRelay,
    PeersAnswered,
    PingAnswered,
    Reconnected,
    RunJob,
    SendDirect,
    SendRelay,
    SetTimer,
    StopJob,
)
from meshnet.protocol import encode_inner
from relay_server.routing import Outgoing, RelayCore

HEARTBEAT = 1.0
LIVENESS = 3
MAX_BODY = 1 << 20
LISTEN_PORT = 7000


@dataclass
class Chaos:
    """What the hostile relay does to what it forwards, and the network's delays."""

    drop: float = 0.0
    duplicate: float = 0.0
    #: Extra delay (s) a forward may take beyond the link's: forwards overtake each other.
    reorder: float = 0.0
    min_delay: float = 0.002
    max_delay: float = 0.02


@dataclass
class RelayConn:
    """A node's relay connection (one per OpenRelay): libzmq's DEALER pipe."""

    generation: int
    local_port: int
    conn_id: bytes
    #: Connected to the relay now; handshakes made (a second one is a Reconnected).
    connected: bool = False
    handshakes: int = 0
    #: What was sent while not connected: sent on the next connection, in order.
    waiting: list[list[Any]] = field(default_factory=list)
    #: The relay's life the connection is with (what is in flight dies with it).
    epoch: int = 0
    #: When the last message each way arrives (each way is ordered).
    last_up: float = 0.0
    last_down: float = 0.0


@dataclass
class SimNode:
    name: str
    index: int
    identity: Identity
    core: NodeCore
    conn: RelayConn | None = None
    timers: dict[Any, int] = field(default_factory=dict)

    @property
    def public_ip(self) -> str:
        return f"203.0.113.{self.index + 1}"

    def observed(self) -> str:
        assert self.conn is not None
        return f"{self.public_ip}:{self.conn.local_port}"


@dataclass
class DirectLink:
    attempts: dict[str, int]
    generation: int
    last: dict[str, float] = field(default_factory=dict)


def _identity(rng: random.Random) -> Identity:
    return Identity(nacl.signing.SigningKey(rng.randbytes(32)))


class NodeSimulation:
    def __init__(
        self,
        rng: random.Random,
        names: tuple[str, ...] = ("A", "B", "C"),
        *,
        chaos: Chaos | None = None,
        direct_works: Callable[[str, str], bool] = lambda a, b: True,
        work_time: tuple[float, float] = (0.01, 0.2),
    ):
        self.rng = rng
        self.chaos = chaos or Chaos()
        self.direct_works = direct_works
        self.work_time = work_time
        self.now = 0.0
        self._queue: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._tokens = itertools.count(1)
        # Keys from the seed too: which side dials and which is the CurveZMQ server follow
        # from the peer ids, so a failing example replays exactly.
        self.relay_identity = _identity(rng)
        self.relay: RelayCore | None = None
        self.relay_epoch = 0
        self._ports = itertools.count(40000)
        self.nodes: dict[str, SimNode] = {}
        for index, name in enumerate(names):
            identity = _identity(rng)
            core = NodeCore(
                peer_id=identity.peer_id,
                relay_peer_id=self.relay_identity.peer_id,
                endpoint="tcp://198.51.100.1:9000",
                sealer=Sealer(identity),
                heartbeat=HEARTBEAT,
                liveness=LIVENESS,
                backoff_min=0.2,
                backoff_max=2.0,
                max_payload=MAX_BODY // 2,
                capabilities={"kinds": ["echo"]},
                listen=[],
                free_port=lambda: next(self._ports),
            )
            self.nodes[name] = SimNode(name, index, identity, core)
        self.by_peer = {node.identity.peer_id: node for node in self.nodes.values()}
        # what the tests check
        self.executed: Counter[tuple[str, bytes]] = Counter()
        self.settled: dict[bytes, list[Outcome]] = defaultdict(list)
        self.submitted: dict[bytes, tuple[str, str]] = {}
        self.replies: list[PingAnswered | PeersAnswered] = []
        self.logs: list[tuple[str, str, Log]] = []
        self.bad_dials: list[tuple[str, Dial]] = []
        self.port_renewals = 0
        self.links_up = 0
        # direct links: pending dials and expects by (from, to), and links by pair
        self._dials: dict[tuple[str, str], int] = {}
        self._expects: dict[tuple[str, str], int] = {}
        self.links: dict[frozenset[str], DirectLink] = {}
        self._link_generation = itertools.count(1)
        self._running: dict[tuple[str, str, bytes], int] = {}
        self.start_relay()
        for node in self.nodes.values():
            self._drive(node, node.core.start(self.now))

    # -- what a test does --

    def submit(self, at: str, to: str, job_id: bytes, timeout: float = 60.0) -> None:
        spec = JobSpec(id=job_id, kind="echo", payload=job_id * 4, timeout=timeout, origin="client:sim")
        self.submitted[job_id] = (at, to)
        node = self.nodes[at]
        self._drive(node, node.core.submit([(spec, self.nodes[to].identity.peer_id)], self.now))

    def at(self, when: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._queue, (when, next(self._order), action, args))

    def start_relay(self) -> None:
        self.relay_epoch += 1
        self.relay = RelayCore(heartbeat=HEARTBEAT, liveness=LIVENESS, max_body=MAX_BODY)
        epoch = self.relay_epoch
        self.at(self.now + HEARTBEAT, self._relay_tick, epoch)
        for node in self.nodes.values():
            if node.conn is not None and not node.conn.connected:
                self.at(self.now + self.rng.uniform(0.1, 1.0), self._connected, node, node.conn)

    def kill_relay(self, down_for: float) -> None:
        """The relay dies: what was in flight to or from it is lost; it comes back."""
        self.relay, self.relay_epoch = None, self.relay_epoch + 1
        for node in self.nodes.values():
            conn = node.conn
            if conn is not None and conn.connected:
                conn.connected = False
                self.at(self.now + 0.001, self._monitor, node, Disconnected(conn.generation))
        self.at(self.now + down_for, self.start_relay)

    def cut_link(self, a: str, b: str) -> None:
        """The direct link between ``a`` and ``b`` breaks: both hear it."""
        link = self.links.pop(frozenset((a, b)), None)
        if link is None:
            return
        for name, other in ((a, b), (b, a)):
            node = self.nodes[name]
            peer = self.nodes[other].identity.peer_id
            self._drive(node, node.core.on_link_down(peer, link.attempts[name], "the link broke", self.now))

    def run(self, until: float) -> None:
        while self._queue and self._queue[0][0] <= until:
            when, _, action, args = heapq.heappop(self._queue)
            self.now = max(self.now, when)
            action(*args)
        self.now = max(self.now, until)

    def unsettled(self) -> list[bytes]:
        return [job_id for job_id in self.submitted if not self.settled.get(job_id)]

    # -- the shells' part --

    def _drive(self, node: SimNode, effects: list[Any]) -> None:
        queue = list(effects)
        while queue:
            effect = queue.pop(0)
            queue.extend(self._do(node, effect))

    def _do(self, node: SimNode, effect: Any) -> list[Any]:  # noqa: C901 - one branch per effect
        core = node.core
        if isinstance(effect, SendRelay):
            self._send_up(node, effect)
        elif isinstance(effect, SendDirect):
            self._send_direct(node, effect)
        elif isinstance(effect, FlushSoon):  # the turn's end: after what is due now
            self.at(self.now, lambda: self._drive(node, node.core.flush(self.now)))
        elif isinstance(effect, SetTimer):
            token = next(self._tokens)
            node.timers[effect.key] = token
            self.at(max(effect.at, self.now), self._timer, node, effect.key, token)
        elif isinstance(effect, CancelTimer):
            node.timers.pop(effect.key, None)
        elif isinstance(effect, RunJob):
            job = effect.job
            self.executed[node.name, job.id] += 1
            run = next(self._tokens)
            self._running[node.name, job.origin, job.id] = run
            self.at(self.now + self.rng.uniform(*self.work_time), self._finish, node, job.origin, job.id, run)
        elif isinstance(effect, StopJob):
            if self._running.pop((node.name, effect.peer, effect.job_id), None) is not None:
                return core.job_finished(effect.peer, effect.job_id, Outcome.cancelled("stopped"), self.now)
        elif isinstance(effect, AnswerJob):
            self.settled[effect.job.id].append(effect.outcome)
        elif isinstance(effect, (PingAnswered, PeersAnswered)):
            self.replies.append(effect)
        elif isinstance(effect, Log):
            self.logs.append((node.name, effect.event, effect))
            if effect.event == "relay_port_renewed":
                self.port_renewals += 1
        elif isinstance(effect, OpenRelay):
            self._open(node, effect)
        elif isinstance(effect, CloseRelay):
            node.conn = None
        elif isinstance(effect, Listen):
            return core.on_listening(LISTEN_PORT, "", self.now)
        elif isinstance(effect, AskNetworkCheck):
            self.at(self.now + 0.05, self._checked, node)
        elif isinstance(effect, Dial):
            self._dial(node, effect)
        elif isinstance(effect, Expect):
            self._expects[node.name, self.by_peer[effect.peer].name] = effect.attempt
            self._match(node.name, self.by_peer[effect.peer].name)
        elif isinstance(effect, Abandon):
            self._abandon(node, effect)
        return []

    def _timer(self, node: SimNode, key: Any, token: int) -> None:
        if node.timers.get(key) == token:
            del node.timers[key]
            self._drive(node, node.core.on_timer(key, self.now))

    def _finish(self, node: SimNode, peer: str, job_id: bytes, run: int) -> None:
        if self._running.get((node.name, peer, job_id)) != run:
            return
        del self._running[node.name, peer, job_id]
        outcome = Outcome("succeeded", result=b"done:" + job_id)
        self._drive(node, node.core.job_finished(peer, job_id, outcome, self.now))

    def _checked(self, node: SimNode) -> None:
        report = NatReport("port_restricted", f"{node.public_ip}:3478", "0.0.0.0:0", "stun", True, 0.05)
        checked = NetworkChecked(f"10.0.{node.index}.2", report)
        self._drive(node, node.core.on_network_checked(checked, self.now))

    # -- the relay connection --

    def _open(self, node: SimNode, effect: OpenRelay) -> None:
        assert effect.local_port is not None
        conn_id = f"{node.name}/{effect.generation}".encode()
        node.conn = RelayConn(effect.generation, effect.local_port, conn_id)
        if self.relay is not None:
            self.at(self.now + self.rng.uniform(0.001, 0.01), self._connected, node, node.conn)

    def _connected(self, node: SimNode, conn: RelayConn) -> None:
        if node.conn is not conn or conn.connected or self.relay is None:
            return
        conn.connected, conn.epoch = True, self.relay_epoch
        conn.handshakes += 1
        waiting, conn.waiting = conn.waiting, []
        for frames in waiting:
            self._up(node, conn, frames)
        if conn.handshakes > 1:
            self._monitor(node, Reconnected(conn.generation))

    def _monitor(self, node: SimNode, event: Any) -> None:
        self._drive(node, node.core.on_relay_event(event, self.now))

    def _send_up(self, node: SimNode, effect: SendRelay) -> None:
        conn = node.conn
        if conn is None or conn.generation != effect.generation:
            return
        frames = [bytes(f) for f in effect.frames]
        if conn.connected:
            self._up(node, conn, frames)
        else:
            conn.waiting.append(frames)

    def _up(self, node: SimNode, conn: RelayConn, frames: list[Any]) -> None:
        arrive = max(self.now + self.rng.uniform(self.chaos.min_delay, self.chaos.max_delay), conn.last_up)
        conn.last_up = arrive
        self.at(arrive, self._relay_reads, node, conn, conn.epoch, frames)

    def _relay_reads(self, node: SimNode, conn: RelayConn, epoch: int, frames: list[Any]) -> None:
        if self.relay is None or epoch != self.relay_epoch:
            return  # on the wire when the relay died
        key = curve_public_z85(node.identity.peer_id)
        observed = f"{node.public_ip}:{conn.local_port}"
        self._relay_sends(self.relay.on_message(conn.conn_id, key, frames, self.now, lambda: observed))

    def _relay_tick(self, epoch: int) -> None:
        if self.relay is None or epoch != self.relay_epoch:
            return
        self._relay_sends(self.relay.on_tick(self.now))
        self.at(self.now + HEARTBEAT, self._relay_tick, epoch)

    def _relay_sends(self, outgoing: list[Outgoing]) -> None:
        assert self.relay is not None
        for out in outgoing:
            node = self._holder(out.conn)
            if node is None:  # ROUTER_MANDATORY: that connection is gone
                self._relay_sends(self.relay.on_undeliverable(out, queue_full=False))
                continue
            conn = node.conn
            assert conn is not None
            frames = [bytes(f) for f in out.frames]
            chaos = self.chaos
            copies = 1
            if out.bounce is not None:  # a forward: the hostile relay's to play with
                copies = 0 if self.rng.random() < chaos.drop else 1
                copies += self.rng.random() < chaos.duplicate
            for _ in range(copies):
                delay = self.rng.uniform(chaos.min_delay, chaos.max_delay)
                if out.bounce is not None and chaos.reorder:
                    arrive = self.now + delay + self.rng.uniform(0.0, chaos.reorder)
                else:
                    arrive = conn.last_down = max(self.now + delay, conn.last_down)
                self.at(arrive, self._node_reads, node, conn, conn.epoch, frames)

    def _holder(self, conn_id: bytes) -> SimNode | None:
        name = conn_id.split(b"/")[0].decode()
        node = self.nodes.get(name)
        if node is None or node.conn is None or node.conn.conn_id != conn_id or not node.conn.connected:
            return None
        return node

    def _node_reads(self, node: SimNode, conn: RelayConn, epoch: int, frames: list[Any]) -> None:
        if node.conn is not conn or epoch != self.relay_epoch or not conn.connected:
            return
        self._drive(node, node.core.on_relay_frames(conn.generation, frames, self.now))

    # -- direct links --

    def _dial(self, node: SimNode, dial: Dial) -> None:
        peer = self.by_peer[dial.peer]
        if peer.conn is None or dial.remote.rsplit(":", 1)[0] != peer.public_ip:
            self.bad_dials.append((node.name, dial))
        self._dials[node.name, peer.name] = dial.attempt
        self._match(node.name, peer.name)

    def _match(self, a: str, b: str) -> None:
        """A link comes up between ``a`` and ``b`` when each has a dial or an expect open
        for the other (a simultaneous open, or a dial to a listener that expects it)."""
        if frozenset((a, b)) in self.links or not self.direct_works(a, b):
            return
        if (a, b) not in self._dials and (b, a) not in self._dials:
            return
        ends = {}
        for x, y in ((a, b), (b, a)):
            attempt = self._dials.get((x, y), self._expects.get((x, y)))
            if attempt is None:
                return
            ends[x] = attempt
        self.at(self.now + self.rng.uniform(0.002, 0.02), self._link_up, a, b, ends)

    def _link_up(self, a: str, b: str, ends: dict[str, int]) -> None:
        pair = frozenset((a, b))
        if pair in self.links:
            return
        for x, y in ((a, b), (b, a)):
            if self._dials.get((x, y), self._expects.get((x, y))) != ends[x]:
                return  # abandoned meanwhile
        for x, y in ((a, b), (b, a)):
            self._dials.pop((x, y), None)
            self._expects.pop((x, y), None)
        self.links[pair] = DirectLink(ends, next(self._link_generation))
        self.links_up += 1
        for x, y in ((a, b), (b, a)):
            node = self.nodes[x]
            self._drive(node, node.core.on_link_up(self.nodes[y].identity.peer_id, ends[x], self.now))

    def _abandon(self, node: SimNode, abandon: Abandon) -> None:
        other = self.by_peer[abandon.peer].name
        for table in (self._dials, self._expects):
            if table.get((node.name, other)) == abandon.attempt:
                del table[node.name, other]
        link = self.links.get(frozenset((node.name, other)))
        if link is not None and link.attempts[node.name] == abandon.attempt:
            del self.links[frozenset((node.name, other))]
            peer = self.nodes[other]
            reason = "the peer closed the direct link"
            self.at(self.now + 0.005, self._link_down, peer, node.identity.peer_id, link.attempts[other], reason)

    def _link_down(self, node: SimNode, peer: str, attempt: int, reason: str) -> None:
        self._drive(node, node.core.on_link_down(peer, attempt, reason, self.now))

    def _send_direct(self, node: SimNode, effect: SendDirect) -> None:
        other = self.by_peer[effect.peer]
        link = self.links.get(frozenset((node.name, other.name)))
        if link is None:
            return  # dropped: the session sends it again
        node.core.on_direct_sent(effect.path)
        data = bytes(encode_inner(effect.box))
        arrive = max(self.now + self.rng.uniform(0.001, 0.005), link.last.get(node.name, 0.0))
        link.last[node.name] = arrive
        self.at(arrive, self._direct_reads, other, node, link.generation, data)

    def _direct_reads(self, node: SimNode, sender: SimNode, generation: int, data: bytes) -> None:
        link = self.links.get(frozenset((node.name, sender.name)))
        if link is None or link.generation != generation:
            return  # the link broke with it on the wire
        self._drive(node, node.core.on_link_messages(sender.identity.peer_id, [data], self.now))
