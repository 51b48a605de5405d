"""The relay's routing table and protocol logic, without sockets.

The daemon hands it each received message with the connection it came on and the
CurveZMQ key that authenticated that connection; it returns what to send where. A
registration is bound to the key that authenticated it: a node can only register as
the peer id its own key derives, and every later message on that connection is
attributed to that peer id, whatever the message claims.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import cbor2
import structlog

from meshnet.errors import ProtocolError
from meshnet.identity import curve_public_z85
from meshnet.protocol import (
    MAX_LIST,
    NODE_TO_RELAY,
    RELAY_TO_NODE,
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
from meshnet.rejections import RejectionLog

log = structlog.get_logger("meshnet.relay")

#: Room for the peer list in a peers reply, under the header limits of its link: bytes,
#: and data items (which a node counts before it decodes anything).
PEERS_REPLY_BUDGET = RELAY_TO_NODE.header_bytes - 4096
PEERS_REPLY_ITEMS = RELAY_TO_NODE.items - 64
#: Peers remembered per destination as having sent to it, to tell them when it leaves.
MAX_CORRESPONDENTS = 1024


@dataclass
class Outgoing:
    """Frames to send to connection ``conn``. If it cannot be delivered, ``bounce`` is
    the ``Unroutable`` to return to connection ``bounce_to`` instead."""

    conn: bytes
    frames: list[Any]
    bounce_to: bytes | None = None
    bounce: Unroutable | None = None


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
    #: Encoded size and data items of ``describe()``, so that a peers reply can be kept
    #: within a header.
    described_size: int = 0
    described_items: int = 0

    def __post_init__(self) -> None:
        described = cbor2.dumps(self.describe())
        self.described_size = len(described) + 16
        self.described_items = count_items(described, PEERS_REPLY_ITEMS, RELAY_TO_NODE.depth)

    def describe(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "caps": self.caps,
            "listen": self.listen,
            "observed": self.observed,
            "connected_for": 0.0,
        }


class RelayCore:
    def __init__(self, *, heartbeat: float, liveness: int, max_body: int, allowed_peers: frozenset[str] | None = None):
        #: None in ``open`` mode. ZAP admits keys, but two peer ids (differing in the
        #: sign of their Ed25519 key) share each CurveZMQ key, so registration checks
        #: the peer id itself too.
        self.allowed_peers = allowed_peers
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.max_body = max_body
        self.nodes: dict[str, NodeEntry] = {}
        self.by_conn: dict[bytes, str] = {}
        self.forwarded = 0
        self.rejected = 0
        self.rejections = RejectionLog()

    # -- input --

    def on_message(
        self, conn: bytes, key: bytes, frames: list[Any], now: float, observe: Callable[[], str] = str
    ) -> list[Outgoing]:
        """Handle one message from connection ``conn`` authenticated by Z85 key ``key``.

        ``observe()`` returns the address the relay sees for the connection; it costs
        system calls, so it is called only when a node registers."""
        try:
            message = decode(frames, NODE_TO_RELAY, max_body=self.max_body)
        except ProtocolError as exc:
            self.on_rejected(conn, str(exc), now)
            return [self._reply(conn, Error(code=exc.code, message=str(exc)))]
        if isinstance(message, Register):
            return self._register(conn, key, message, observe(), now)
        peer_id = self.by_conn.get(conn)
        entry = self.nodes.get(peer_id) if peer_id else None
        if entry is None or entry.key != key:
            out = [self._reply(conn, Error(code="not_registered", message="register before sending anything else"))]
            if isinstance(message, Send):  # the job it carries is answered, not lost
                bounce = Unroutable(
                    to=message.to,
                    ref=message.ref,
                    op=message.op,
                    reason="no_relay",
                    message="the relay did not know this node yet (it reconnected, or the relay restarted); resubmit",
                )
                out.insert(0, self._reply(conn, bounce))
            return out
        entry.last_seen = now
        if isinstance(message, Ping):
            return [self._reply(conn, Pong(seq=message.seq))]
        if isinstance(message, Send):
            return self._forward(entry, message, now)
        assert isinstance(message, PeersRequest)
        peers, more = self.describe_peers(now)
        return [self._reply(conn, PeersReply(peers=peers, seq=message.seq, more=more or None))]

    def on_undeliverable(self, out: Outgoing, *, queue_full: bool) -> list[Outgoing]:
        """The daemon could not send ``out``: its peer is gone, or its queue is full."""
        if out.bounce is None or out.bounce_to is None:
            return []
        bounce = out.bounce
        if queue_full:
            bounce = replace(bounce, reason="relay_busy", message=f"peer {bounce.to}'s queue at the relay is full")
        return [self._reply(out.bounce_to, bounce)]

    def on_rejected(self, conn: bytes, error: str, now: float) -> None:
        """Count a message from ``conn`` that was refused; log it if it is the first
        from there lately (the rest are summed up on the tick)."""
        self.rejected += 1
        source = self.by_conn.get(conn) or f"connection {conn.hex()}"
        if self.rejections.on_rejected(source, error, now):
            log.warning("message_rejected", source=source, error=error)

    def on_tick(self, now: float) -> list[Outgoing]:
        """Expire nodes silent for ``liveness`` heartbeats; tell their correspondents.
        Log the rejections counted since the last summary."""
        for summary in self.rejections.flush(now):
            log.warning(
                "messages_rejected",
                source=summary.source,
                count=summary.count,
                over_s=round(now - summary.since, 1),
                last_error=summary.last_error,
            )
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

    def describe_peers(self, now: float) -> tuple[list[dict[str, Any]], int]:
        """The registered peers that fit in one reply, and how many were left out."""
        peers: list[dict[str, Any]] = []
        size = items = 0
        for entry in self.nodes.values():
            if (
                len(peers) >= MAX_LIST
                or size + entry.described_size > PEERS_REPLY_BUDGET
                or items + entry.described_items > PEERS_REPLY_ITEMS
            ):
                break
            info = entry.describe()
            info["connected_for"] = round(now - entry.since, 3)
            peers.append(info)
            size += entry.described_size
            items += entry.described_items
        return peers, len(self.nodes) - len(peers)

    def _reply(self, conn: bytes, message: Message) -> Outgoing:
        return Outgoing(conn, encode(message))

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
            # The same key on a new connection: the node reconnected; the old link is dead.
            self.by_conn.pop(old.conn, None)
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
        )
        self.nodes[message.peer_id] = entry
        self.by_conn[conn] = message.peer_id
        log.info("peer_registered", peer_id=message.peer_id, observed=observed, reconnected=old is not None)
        out.append(self._reply(conn, Registered(peer_id=message.peer_id, observed=observed, heartbeat=self.heartbeat)))
        return out

    def _forward(self, sender: NodeEntry, message: Send, now: float) -> list[Outgoing]:
        bounce = Unroutable(
            to=message.to,
            ref=message.ref,
            op=message.op,
            reason="peer_not_connected",
            message=f"peer {message.to} is not connected to the relay",
        )
        target = self.nodes.get(message.to)
        if target is None:
            return [self._reply(sender.conn, bounce)]
        target.correspondents[sender.peer_id] = None
        target.correspondents.move_to_end(sender.peer_id)
        if len(target.correspondents) > MAX_CORRESPONDENTS:
            target.correspondents.popitem(last=False)
        self.forwarded += 1
        deliver = Deliver(sender=sender.peer_id, ref=message.ref, op=message.op, body=message.body)
        return [Outgoing(target.conn, encode(deliver), bounce_to=sender.conn, bounce=bounce)]

    def _remove(self, entry: NodeEntry) -> list[Outgoing]:
        self.nodes.pop(entry.peer_id, None)
        if self.by_conn.get(entry.conn) == entry.peer_id:
            del self.by_conn[entry.conn]
        notice = encode(PeerDown(peer_id=entry.peer_id))
        return [Outgoing(self.nodes[peer].conn, list(notice)) for peer in entry.correspondents if peer in self.nodes]
