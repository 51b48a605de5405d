"""The relay's routing table and protocol logic, without sockets.

The daemon hands it each received message with the connection it came on and the
CurveZMQ key that authenticated that connection; it returns what to send where. A
registration is bound to the key that authenticated it: a node can only register as
the peer id its own key derives, and every later message on that connection is
attributed to that peer id, whatever the message claims.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import structlog

from meshnet.errors import ProtocolError, RemoteProtocolError
from meshnet.flow import DEFAULT_WINDOW, LinkFlow, frames_size
from meshnet.holepunch import address_ip
from meshnet.identity import curve_public_z85
from meshnet.protocol import (
    MAX_LIST,
    NODE_TO_RELAY,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    Error,
    Message,
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
    encode,
)
from meshnet.protocol.strict_cbor import count_items
from meshnet.rejections import RejectionLog, log_summaries
from relay_server.registry import Registry

log = structlog.get_logger("meshnet.relay")

#: Room for the peer list in a peers reply, under the header limits of its link: bytes,
#: and data items (which a node counts before it decodes anything).
PEERS_REPLY_BUDGET = RELAY_TO_NODE.header_bytes - 4096
PEERS_REPLY_ITEMS = RELAY_TO_NODE.max_items - 64
#: Peers remembered per destination as having sent to it, to tell them when it leaves.
MAX_CORRESPONDENTS = 1024


@dataclass
class Outgoing:
    """Frames to send to connection ``conn``. If it cannot be delivered, ``bounce`` is
    the ``Unroutable`` to return to connection ``bounce_to`` instead. ``counted`` is
    what the frames were counted for in the receiving node's window (0: not counted)."""

    conn: bytes
    frames: list[Any]
    bounce_to: bytes | None = None
    bounce: Unroutable | None = None
    counted: int = 0


@dataclass
class NodeEntry:
    peer_id: str
    conn: bytes
    key: bytes
    caps: dict[str, Any]
    listen: list[str]
    observed: str
    since: float
    last_seen: float
    correspondents: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: The largest ``deliver`` body the node takes (its ``register.max_body``).
    max_body: int = 0
    #: Bytes each way on its connection (meshnet.flow): what the relay sent it and it
    #: has not read is at most the window.
    flow: LinkFlow = field(default_factory=LinkFlow)
    #: Deliveries for it that did not fit the window, sent as it acknowledges what it
    #: read: at most a window's worth more (past it, senders are told ``relay_busy``).
    held: deque[Outgoing] = field(default_factory=deque)
    held_bytes: int = 0
    #: Encoded size and data items of ``describe()``, so that a peers reply can be kept
    #: within a header.
    described_size: int = 0
    described_items: int = 0

    def __post_init__(self) -> None:
        described = cbor2.dumps(self.describe())
        # Room for what changes after registration: connected_for, load and rtt.
        self.described_size = len(described) + DESCRIBED_SLACK_BYTES
        self.described_items = count_items(described, PEERS_REPLY_ITEMS, RELAY_TO_NODE.depth) + DESCRIBED_SLACK_ITEMS

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "caps": self.caps,
            "listen": self.listen,
            "observed": self.observed,
            "connected_for": 0.0,
        }


#: A peers reply's room per entry for what is added after registration (connected_for,
#: load, rtt): in bytes of CBOR, and in data items.
DESCRIBED_SLACK_BYTES = 96
DESCRIBED_SLACK_ITEMS = 10

#: The sources under which the relay counts what it refused from strangers.
UNREGISTERED = "unregistered connections"
REFUSED_KEYS = "handshakes with keys not allowed"


class RelayCore:
    def __init__(
        self,
        *,
        heartbeat: float,
        liveness: int,
        max_body: int,
        allowed_peers: frozenset[str] | None = None,
        window: int = DEFAULT_WINDOW,
    ):
        #: None in ``open`` mode. ZAP admits keys, but two peer ids (differing in the
        #: sign of their Ed25519 key) share each CurveZMQ key, so registration checks
        #: the peer id itself too.
        self.allowed_peers = allowed_peers
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_body = max_body
        #: Bytes the relay holds for a node that has not read them, and takes from a node
        #: before acknowledging them (meshnet.flow).
        self.window = window
        self.nodes: dict[str, NodeEntry] = {}
        #: The same nodes as devices: capabilities, load, round trip (placement's view).
        self.registry = Registry()
        self.by_conn: dict[bytes, str] = {}
        #: The IPs registered nodes connect from (each with how many), and whether that
        #: changed since the daemon last looked (its STUN responder answers them alone
        #: when they ask for a CHANGE-REQUEST).
        self.member_ips: Counter[str] = Counter()
        self.members_changed = False
        self.forwarded = 0
        self.rejected = 0
        #: Messages for nodes that were not reading (their window full): forwards bounced
        #: ``relay_busy``, replies dropped.
        self.held_back = 0
        self.rejections = RejectionLog()
        #: Nodes that stopped reading, logged like rejections: a line, then counts.
        self.stalls = RejectionLog()
        #: The ``now`` of the input being handled.
        self._now = 0.0

    # -- input --

    def on_message(
        self, conn: bytes, key: bytes, frames: list[Any], now: float, observe: Callable[[], str] = str
    ) -> list[Outgoing]:
        """Handle one message from connection ``conn`` authenticated by Z85 key ``key``.

        ``observe()`` returns the address the relay sees for the connection; it costs
        system calls, so it is called only when a node registers."""
        self._now = now
        entry = self._entry(conn)
        if entry is not None and entry.key != key:
            entry = None
        try:
            message = decode(frames, NODE_TO_RELAY, max_body=self.max_body)
        except ProtocolError as exc:
            out = self._count_received(entry, frames)  # its sender counted it as sent
            self.on_rejected(conn, str(exc), now)
            header = exc.header if isinstance(exc, RemoteProtocolError) else None
            if isinstance(header, Send):  # a job, result or cancel: named, so its sender can end it
                return out + self._reply_to(conn, self._unroutable(header, exc.code, str(exc)))
            return out + self._reply_to(conn, Error(code=exc.code, message=str(exc)))
        if isinstance(message, Register):
            return self._register(conn, key, message, observe(), now)
        if entry is None:
            out = [self._reply(conn, Error(code="not_registered", message="register before sending anything else"))]
            if isinstance(message, Send):  # its sender learns at once that it was not passed on
                bounce = self._unroutable(
                    message,
                    "no_relay",
                    "the relay did not know this node yet (it reconnected, or the relay restarted); register first",
                )
                out.insert(0, self._reply(conn, bounce))
            return out
        entry.last_seen = now
        if isinstance(message, Ack):
            entry.flow.on_ack(message.received)
            return self._release_held(entry)
        out = self._count_received(entry, frames)
        if isinstance(message, Ping):
            self.registry.heard(entry.peer_id, message.load, message.rtt)
            out += self._reply_to(entry, Pong(seq=message.seq))
            # On every heartbeat, whatever is read and not acknowledged yet: less than a
            # quarter window, which would otherwise stay unacknowledged on a quiet link.
            out += self._ack(entry, entry.flow.ack_all())
        elif isinstance(message, Send):
            out += self._forward(entry, message, now)
        else:
            assert isinstance(message, PeersRequest)
            if message.peer_id is not None:  # one peer: where the relay sees it (a punch's check)
                reply = PeersReply(peers=self.describe_peer(message.peer_id, now), seq=message.seq)
            elif message.requires is not None:
                reply = self.find_devices(message.requires, message.limit, message.seq, now)
            else:
                reply = self.describe_peers(now, message.after, message.limit, message.seq)
            out += self._reply_to(entry, reply)
        return out

    def _count_received(self, entry: NodeEntry | None, frames: list[Any]) -> list[Outgoing]:
        """Count a message read from a registered node; acknowledge when due."""
        if entry is None:
            return []
        return self._ack(entry, entry.flow.on_received(frames_size(frames)))

    @staticmethod
    def _ack(entry: NodeEntry, received: int | None) -> list[Outgoing]:
        """The ``ack`` of ``received`` bytes read from ``entry`` (none for None): never
        counted itself (meshnet.flow)."""
        return [] if received is None else [Outgoing(entry.conn, encode(Ack(received=received)))]

    def on_undeliverable(self, out: Outgoing, *, queue_full: bool) -> list[Outgoing]:
        """The daemon could not send ``out``: its peer is gone, or its queue is full."""
        if out.counted:
            entry = self._entry(out.conn)
            if entry is not None:
                entry.flow.on_unsent(out.counted)
        if out.bounce is None or out.bounce_to is None:
            return []
        bounce = out.bounce
        if queue_full:
            bounce = replace(bounce, reason="relay_busy", message=f"peer {bounce.to}'s queue at the relay is full")
        return self._reply_to(out.bounce_to, bounce)

    def on_rejected(self, conn: bytes, error: str, now: float) -> None:
        """Count a message from ``conn`` that was refused; log it if it is the first
        from there lately (the rest are summed up on the tick). Connections that have not
        registered are one source: nothing about an unauthenticated connection is logged
        per connection (each new one would otherwise get its own first line)."""
        self.rejected += 1
        source = self.by_conn.get(conn) or UNREGISTERED
        if self.rejections.on_rejected(source, error, now):
            log.warning("message_rejected", source=source, error=error)

    def on_refused_key(self, key: bytes, now: float) -> None:
        """A CurveZMQ handshake with a key not in ``allowed_peers`` was refused (by ZAP):
        the first lately is logged with its key, the rest counted (one source, however
        many keys: a stranger can make up a key per handshake)."""
        self.rejected += 1
        error = "key not in allowed_peers"
        if self.rejections.on_rejected(REFUSED_KEYS, error, now):
            log.warning("connection_refused", reason=error, curve_key=key.decode("ascii", "replace"))

    def on_tick(self, now: float) -> list[Outgoing]:
        """Expire nodes silent for ``liveness`` heartbeats; tell their correspondents.
        Log the rejections and stalls counted since the last summary."""
        self._now = now
        log_summaries(log, "messages_rejected", self.rejections.flush(now), now)
        for summary in self.stalls.flush(now):
            log.warning("peer_not_reading", peer_id=summary.source, held_back=summary.count, last=summary.last_error)
        limit = self.heartbeat * self.liveness
        out: list[Outgoing] = []
        for entry in [e for e in self.nodes.values() if now - e.last_seen > limit]:
            log.info("peer_expired", peer_id=entry.peer_id, silent_s=round(now - entry.last_seen, 2))
            out.extend(self._remove(entry))
        return out

    def next_deadline(self) -> float | None:
        if not self.nodes:
            return None
        return min(e.last_seen for e in self.nodes.values()) + self.heartbeat * self.liveness

    # -- helpers --

    def describe_peers(
        self, now: float, after: str | None = None, limit: int | None = None, seq: int | None = None
    ) -> PeersReply:
        """A page of the registered peers in peer-id order, from the first after
        ``after``: as many as fit one reply (at most ``limit``); ``more`` counts those
        left, ``next`` is where the next page starts."""
        listed = self._fitting(now, (self.nodes[peer] for peer in self.registry.page(after)), limit)
        left = self.registry.count_after(listed[-1]["peer_id"] if listed else after)
        return PeersReply(
            peers=listed, seq=seq, more=left or None, next=listed[-1]["peer_id"] if listed and left else None
        )

    def find_devices(self, requires: dict[str, Any], limit: int | None, seq: int | None, now: float) -> PeersReply:
        """The devices that meet ``requires``, best first (relay_server.registry), as many
        as fit one reply (at most ``limit``); ``unmet`` says why none does."""
        fit = self.registry.candidates(requires)
        listed = self._fitting(now, (self.nodes[device.peer_id] for device in fit), limit)
        unmet = self.registry.unmet_by_all(requires) if not fit else None
        return PeersReply(peers=listed, seq=seq, more=(len(fit) - len(listed)) or None, unmet=unmet)

    def _fitting(self, now: float, entries: Iterable[NodeEntry], limit: int | None) -> list[dict[str, Any]]:
        """``entries`` described, as many as fit one peers reply (and ``limit``)."""
        peers: list[dict[str, Any]] = []
        size = items = 0
        most = min(limit or MAX_LIST, MAX_LIST)
        for entry in entries:
            if (
                len(peers) >= most
                or size + entry.described_size > PEERS_REPLY_BUDGET
                or items + entry.described_items > PEERS_REPLY_ITEMS
            ):
                break
            peers.append(self._described(entry, now))
            size += entry.described_size
            items += entry.described_items
        return peers

    def describe_peer(self, peer_id: str, now: float) -> list[dict[str, Any]]:
        """``peer_id``'s entry of a peers reply, alone (none if it is not registered)."""
        entry = self.nodes.get(peer_id)
        return [self._described(entry, now)] if entry is not None else []

    def _described(self, entry: NodeEntry, now: float) -> dict[str, Any]:
        """``entry`` as a peers reply lists it: as registered, with its time connected as
        of ``now``, and its last heartbeat's load and round trip."""
        info = entry.describe()
        info["connected_for"] = round(now - entry.since, 3)
        device = self.registry.devices.get(entry.peer_id)
        if device is not None and device.load is not None:
            info["load"] = device.load
        if device is not None and device.rtt is not None:
            info["rtt"] = round(device.rtt, 6)
        return info

    def _reply(self, conn: bytes, message: Message) -> Outgoing:
        """``message`` for a connection that is not registered (nothing is counted)."""
        return Outgoing(conn, encode(message))

    def _reply_to(self, to: NodeEntry | bytes, message: Message) -> list[Outgoing]:
        """``message`` for a node, counted in its window; dropped (and counted) when the
        node is not reading what it was sent. A connection that is not registered gets it
        uncounted."""
        entry = self._entry(to) if isinstance(to, bytes) else to
        if entry is None:
            assert isinstance(to, bytes)
            return [self._reply(to, message)]
        frames = encode(message)
        size = frames_size(frames)
        if not entry.flow.may_send(size):
            self._stalled(entry, f"a {message.TYPE} was dropped")
            return []
        entry.flow.on_sent(size)
        return [Outgoing(entry.conn, frames, counted=size)]

    def _entry(self, conn: bytes) -> NodeEntry | None:
        peer_id = self.by_conn.get(conn)
        return self.nodes.get(peer_id) if peer_id else None

    def _stalled(self, entry: NodeEntry, what: str) -> None:
        self.held_back += 1
        if self.stalls.on_rejected(entry.peer_id, what, self._now):
            log.warning(
                "peer_not_reading",
                peer_id=entry.peer_id,
                unread_bytes=entry.flow.in_flight,
                window=entry.flow.window,
                action=what,
            )

    @staticmethod
    def _unroutable(send: Send, reason: str, message: str) -> Unroutable:
        return Unroutable(to=send.to, ref=send.ref, op=send.op, reason=reason, message=message)

    def _register(self, conn: bytes, key: bytes, message: Register, observed: str, now: float) -> list[Outgoing]:
        if curve_public_z85(message.peer_id) != key:
            self.on_rejected(conn, f"register as {message.peer_id} refused: key does not match peer id", now)
            return [
                self._reply(
                    conn,
                    Error(
                        code="identity_mismatch",
                        message=f"peer id {message.peer_id} does not belong to the key this connection authenticated",
                    ),
                )
            ]
        if self.allowed_peers is not None and message.peer_id not in self.allowed_peers:
            self.on_rejected(conn, f"register as {message.peer_id} refused: peer id not in allowed_peers", now)
            error = Error(code="identity_mismatch", message=f"peer id {message.peer_id} is not in allowed_peers")
            return [self._reply(conn, error)]
        out: list[Outgoing] = []
        old = self.nodes.get(message.peer_id)
        if old is not None and old.conn != conn:
            # The same key on a new connection: the node reconnected (its old link is
            # dead, and this goes nowhere), or a second process runs with its identity.
            # The old connection is told so, once, and is served no more.
            self.by_conn.pop(old.conn, None)
            replaced = (
                f"peer id {message.peer_id} registered again on another connection (from {observed}); "
                "this connection is served no more"
            )
            out.append(self._reply(old.conn, Error(code="replaced", message=replaced)))
        previous_peer = self.by_conn.get(conn)
        if previous_peer and previous_peer != message.peer_id:
            out.extend(self._remove(self.nodes[previous_peer]))
        entry = NodeEntry(
            peer_id=message.peer_id,
            conn=conn,
            key=key,
            caps=message.caps,
            listen=message.listen,
            observed=observed,
            since=old.since if old is not None else now,
            last_seen=now,
            correspondents=old.correspondents if old is not None else OrderedDict(),
            max_body=min(self.max_body, message.max_body if message.max_body is not None else self.max_body),
            flow=LinkFlow(self.window),
        )
        if old is not None and old.held:
            # Deliveries held for the node go to it on its new connection (or its new
            # registration), as its new window allows.
            entry.held = deque(replace(delivery, conn=conn) for delivery in old.held)
            entry.held_bytes = old.held_bytes
            old.held.clear()
        if old is not None:
            self._count_member(old.observed, -1)
        self._count_member(observed, +1)
        self.nodes[message.peer_id] = entry
        self.registry.join(message.peer_id, message.caps)
        self.by_conn[conn] = message.peer_id
        log.info("peer_registered", peer_id=message.peer_id, observed=observed, reconnected=old is not None)
        # Not counted: both ends count from the message after this one (meshnet.flow).
        registered = Registered(
            peer_id=message.peer_id,
            observed=observed,
            heartbeat=self.heartbeat,
            max_body=self.max_body,
            window=self.window,
        )
        out.append(self._reply(conn, registered))
        return out + self._release_held(entry)

    def _forward(self, sender: NodeEntry, message: Send, now: float) -> list[Outgoing]:
        target = self.nodes.get(message.to)
        if target is None:
            bounce = self._unroutable(message, "peer_not_connected", f"peer {message.to} is not connected to the relay")
            return self._reply_to(sender, bounce)
        size = len(message.body)
        if size > target.max_body:
            # Past it the node's socket would drop its connection to the relay, and
            # every job in flight on it: refused here, to the sender, naming the limit.
            too_large = f"the sealed message is {size} bytes; peer {message.to} takes at most {target.max_body}"
            return self._reply_to(sender, self._unroutable(message, "too_large", too_large))
        deliver = encode(Deliver(sender=sender.peer_id, ref=message.ref, op=message.op, body=message.body))
        counted = frames_size(deliver)
        sendable = not target.held and target.flow.may_send(counted)
        if not sendable and target.held_bytes + counted > self.window:
            self._stalled(target, f"a {message.op} from {sender.peer_id} was refused relay_busy")
            busy = (
                f"peer {message.to} has not read the {target.flow.in_flight} bytes the relay sent it, and "
                f"{target.held_bytes} more wait for it (the relay holds at most {target.flow.window} of each)"
            )
            return self._reply_to(sender, self._unroutable(message, "relay_busy", busy))
        target.correspondents[sender.peer_id] = None
        target.correspondents.move_to_end(sender.peer_id)
        if len(target.correspondents) > MAX_CORRESPONDENTS:
            target.correspondents.popitem(last=False)
        self.forwarded += 1
        bounce = self._unroutable(message, "peer_not_connected", f"peer {message.to} is not connected to the relay")
        out = Outgoing(target.conn, deliver, bounce_to=sender.conn, bounce=bounce, counted=counted)
        if not sendable:  # a burst past its window: sent as it reads (held, counted in bytes)
            target.held.append(out)
            target.held_bytes += counted
            return []
        target.flow.on_sent(counted)
        return [out]

    def _release_held(self, entry: NodeEntry) -> list[Outgoing]:
        """The deliveries held for ``entry`` that its window has room for now."""
        out: list[Outgoing] = []
        held = entry.held
        while held and entry.flow.may_send(held[0].counted):
            delivery = held.popleft()
            entry.held_bytes -= delivery.counted
            entry.flow.on_sent(delivery.counted)
            out.append(delivery)
        return out

    def _count_member(self, observed: str, change: int) -> None:
        ip = address_ip(observed).strip("[]") if observed else ""
        if not ip:
            return
        self.member_ips[ip] += change
        if self.member_ips[ip] <= 0:
            del self.member_ips[ip]
        self.members_changed = True

    def _remove(self, entry: NodeEntry) -> list[Outgoing]:
        if self.nodes.get(entry.peer_id) is entry:
            self._count_member(entry.observed, -1)
        if self.nodes.pop(entry.peer_id, None) is not None:
            self.registry.leave(entry.peer_id)
        if self.by_conn.get(entry.conn) == entry.peer_id:
            del self.by_conn[entry.conn]
        out: list[Outgoing] = []
        for delivery in entry.held:  # never sent: each goes back to its sender
            if delivery.bounce is not None and delivery.bounce_to is not None:
                out += self._reply_to(delivery.bounce_to, delivery.bounce)
        entry.held.clear()
        entry.held_bytes = 0
        notice = PeerDown(peer_id=entry.peer_id)
        for peer in entry.correspondents:
            if peer in self.nodes:
                out += self._reply_to(self.nodes[peer], notice)
        return out
