"""The listener of direct links: the ROUTER that peers this node expects dial.

Part of :class:`actors.direct_links.DirectLinks` (on the node's job loop; it shares the
links' table, their ZeroMQ context and its ZAP thread). It binds on ``relay.direct_port``
of every address, CurveZMQ server; ZAP admits a key only while an attempt with its peer
expects it, from an immutable snapshot the loop replaces whenever that changes (the ZAP
thread reads no state the loop changes under it). A dialler says ``[b"hi"]`` first: that
ties the connection's routing id to the key that said it, and every later frame on it
must come with that key. A link it accepted and then drops is told ``[b"bye"]``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zmq

from actors.direct_auth import LINK_HWM
from meshnet.errors import RemoteProtocolError
from meshnet.identity import curve_public_z85
from meshnet.listener_guard import ListenerGuard, guard_listener
from meshnet.protocol.direct import BYE, HI, MAX_FRAMES, OUR_HI, PONG, Boxes, Hi, Parts, Ping, decode_link
from meshnet.socket_loop import recv_message, send_message

if TYPE_CHECKING:
    from actors.direct_links import DirectLinks

LISTEN_DOMAIN = "direct-listen"


@dataclass
class Link:
    peer: str
    attempt: int
    sock: zmq.Socket
    #: None for a link accepted by the listener (its connection is one of the ROUTER's).
    monitor: zmq.Socket | None
    remote: str
    up: bool = False
    #: The dialler's routing id on the listener (accepted links only).
    routing_id: bytes = b""
    last_heard: float = 0.0
    #: The Z85 key that said hi on an accepted link (every later frame must carry it).
    key: bytes = b""
    #: The peer reads ``[boxes, ...]`` (its hi said so).
    batches: bool = False
    #: The peer reads ``[parts, field, message, bulk]`` (its hi said so).
    parts: bool = False
    #: Small messages of this loop turn, sent when it ends (see _flush).
    outbox: list[Any] = field(default_factory=list)


class _ExpectedKeys:
    """ZAP credentials for the listener: the keys of peers an attempt expects now, as an
    immutable snapshot the loop replaces whenever they change (the ZAP thread reads no
    state the loop changes under it)."""

    def __init__(self) -> None:
        self.keys: frozenset[bytes] = frozenset()

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class DirectListener:
    """Loop thread only."""

    def __init__(self, links: DirectLinks):
        self.links = links
        self.router: zmq.Socket | None = None
        self.guard: ListenerGuard | None = None
        self.port: int | None = None
        #: The routing id of each accepted link -> its peer.
        self.accepted: dict[bytes, str] = {}
        #: Z85 key -> (peer, attempt) of the peers admitted now.
        self.expected: dict[bytes, tuple[str, int]] = {}
        #: What the ZAP handler admits: a snapshot of ``expected``'s keys.
        self._admitted = _ExpectedKeys()

    def listen(self, port: int) -> int:
        """Bind the listener on ``port`` of every address (0: a free one); its port."""
        if self.router is not None:
            assert self.port is not None
            return self.port
        links = self.links
        links.auth.serve_domain(LISTEN_DOMAIN, self._admitted)
        router = links.auth.context().socket(zmq.ROUTER)
        public, secret = links.identity.zmq_curve_keys()
        router.curve_server = True
        router.curve_publickey, router.curve_secretkey = public, secret
        router.zap_domain = LISTEN_DOMAIN.encode()
        router.setsockopt(zmq.LINGER, 0)
        # Routing ids are the ROUTER's own (random): a dialler's is tied to its key by its
        # first word, and every frame after is checked against that key.
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.setsockopt(zmq.MAXMSGSIZE, links.max_message)
        router.setsockopt(zmq.SNDHWM, LINK_HWM)
        router.setsockopt(zmq.RCVHWM, LINK_HWM)
        guard_listener(router)
        router.bind(f"tcp://0.0.0.0:{port or '*'}")
        self.port = int(router.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
        self.router = router
        # It listens on every address: connections that sent nothing yet (a stranger's
        # idle ones) are closed past a cap, and cannot hold the node's descriptors.
        self.guard = ListenerGuard(links.loop, router, name="direct", logger=links.log)
        links.log.info("direct_listening", port=self.port)
        links.loop.add_reader(router, self._readable)
        return self.port

    def expect(self, peer: str, attempt: int) -> None:
        self.expected[curve_public_z85(peer)] = (peer, attempt)
        self._admit()

    def forget(self, peer: str, attempt: int | None) -> None:
        """``peer``'s dial is no longer expected (by attempt ``attempt`` alone, when given)."""
        key = curve_public_z85(peer)
        expected = self.expected.get(key)
        if expected is not None and (attempt is None or expected[1] == attempt):
            del self.expected[key]
            self._admit()

    def closed(self, link: Link) -> None:
        """An accepted link is closed here: the listener stays. The dialler is told, and
        takes its link down (its frames here are ignored from now on)."""
        self.accepted.pop(link.routing_id, None)
        try:
            send_message(link.sock, [link.routing_id, BYE])
        except zmq.ZMQError:
            pass

    def close(self) -> None:
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        self.links.loop.close_socket(self.router)
        self.router = None

    def _admit(self) -> None:
        """Hand the ZAP thread the keys admitted now (a new snapshot)."""
        self._admitted.keys = frozenset(self.expected)

    def _readable(self) -> None:
        router, links = self.router, self.links
        if router is None:
            return
        now = time.monotonic()
        for _ in range(256):
            try:
                frames = recv_message(router, MAX_FRAMES + 1)
            except zmq.Again:
                return
            if frames is None or len(frames) < 2:
                continue
            routing_id = frames[0].bytes
            if self.guard is not None:
                self.guard.seen(routing_id, frames[-1])
            key = (frames[-1].get("User-Id") or "").encode()
            peer = self.accepted.get(routing_id)
            link = links.links.get(peer) if peer is not None else None
            if link is not None and link.routing_id == routing_id:
                if key != link.key:
                    continue  # not the key that said hi on this connection
                link.last_heard = now
                message = links.decode(link, frames[1:])
                if isinstance(message, Ping):
                    links.send_quietly(link, [PONG])
                elif isinstance(message, (Boxes, Parts)) and links.deliver(link, message):
                    return
                continue
            expected = self.expected.get(key)
            if expected is None or len(frames[1]) != len(HI) or bytes(frames[1]) != HI:
                continue  # not a dialler this node expects, or not its first word
            try:
                hi = decode_link(frames[1:])
            except RemoteProtocolError:
                continue
            assert isinstance(hi, Hi)
            peer, attempt = expected
            links.close(peer)  # an earlier connection of the same peer's, if any
            self.expected[key] = expected  # (close forgot it)
            self._admit()
            self.accepted[routing_id] = peer
            link = Link(peer, attempt, router, None, "(accepted)", True, routing_id, now, key)
            link.batches, link.parts = hi.batches, hi.parts
            links.links[peer] = link
            links.send_quietly(link, OUR_HI.frames())  # what this side reads, in turn
            links.on_up(peer, attempt)
