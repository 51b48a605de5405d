"""Direct links to peers: the sockets of hole punches, on the node's job loop.

A thin shell over :class:`meshnet.holepunch.PunchCoordinator`'s decisions: a ``Dial``
opens a DEALER that connects *from* the local port of the node's relay connection *to*
the peer's observed address (libzmq's ``tcp://0.0.0.0:P;IP:PORT``: a second socket on
the same local port, towards another destination, NAT-LAB.md), and both peers do the
same at about the same moment. CurveZMQ on the link: the side the coordinator names is
the server, and admits exactly the expected peer's key through ZAP (a domain per peer,
in a context of the direct links' own, apart from the client API's allow-list); the
other side names the peer's key as the server key. So a link that completes its
handshake is that peer's, and what it carries needs no seal of its own.

No ``connect_timeout`` (libzmq closing a half-open punch lets the peer's SYN land in the
gap and be reset, NAT-LAB): the coordinator's timer gives an attempt up, and this closes
its socket. libzmq's heartbeats (``HEARTBEAT_IVL``/``TIMEOUT``) watch a link that is up:
one that stops answering is disconnected, and reported down at once.

Frames on a link: ``[b"box", message]``, a node-to-node message in the clear (the link is
encrypted and authenticated end to end), decoded like an opened sealed box.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from meshnet.identity import Identity, curve_public_z85
from meshnet.socket_loop import SocketLoop, recv_message, send_message

log = structlog.get_logger("meshnet.direct")

BOX = b"box"
#: libzmq heartbeats on a direct link: a ping this often, and a link silent this long is
#: disconnected (reported down; the session moves the peer back to the relay at once).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
#: Messages queued per link before a send is dropped (the session sends it again).
LINK_HWM = 10_000
MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
MONITORED |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class _ExactKey:
    """ZAP credentials for one direct link: exactly the expected peer's key."""

    def __init__(self, key: bytes):
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


@dataclass
class Link:
    peer: str
    attempt: int
    sock: zmq.Socket
    monitor: zmq.Socket
    remote: str
    up: bool = False


class DirectLinks:
    """Loop thread only. ``on_up(peer, attempt)``, ``on_down(peer, attempt, reason)`` and
    ``on_message(peer, data)`` are called on the loop."""

    def __init__(
        self,
        *,
        identity: Identity,
        loop: SocketLoop,
        max_message: int,
        on_up: Callable[[str, int], None],
        on_down: Callable[[str, int, str], None],
        on_message: Callable[[str, Any], None],
    ):
        self.identity = identity
        self.loop = loop
        self.max_message = max_message
        self.on_up, self.on_down, self.on_message = on_up, on_down, on_message
        self.links: dict[str, Link] = {}
        self._context: zmq.Context | None = None
        self._auth: ThreadAuthenticator | None = None
        self._monitors = 0
        self.log = log.bind(peer_id=identity.peer_id)

    def _ctx(self) -> zmq.Context:
        if self._context is None:
            self._context = zmq.Context()
            self._auth = ThreadAuthenticator(self._context)
            self._auth.start()
        return self._context

    def dial(self, peer: str, attempt: int, remote: str, local_port: int | None, curve_server: bool) -> None:
        """Open attempt ``attempt`` to ``peer`` (replacing any link to it)."""
        self.close(peer)
        context = self._ctx()
        sock = context.socket(zmq.DEALER)
        public, secret = self.identity.zmq_curve_keys()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        peer_key = curve_public_z85(peer)
        if curve_server:
            domain = f"direct:{peer}"
            assert self._auth is not None
            self._auth.configure_curve_callback(domain=domain, credentials_provider=_ExactKey(peer_key))
            sock.curve_server = True
            sock.zap_domain = domain.encode()
        else:
            sock.curve_serverkey = peer_key
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        sock.setsockopt(zmq.SNDHWM, LINK_HWM)
        sock.setsockopt(zmq.RCVHWM, LINK_HWM)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        self._monitors += 1
        monitor = sock.get_monitor_socket(MONITORED, addr=f"inproc://direct-{id(self):x}-{self._monitors}")
        source = f"0.0.0.0:{local_port}" if local_port else "0.0.0.0:0"
        sock.connect(f"tcp://{source};{remote}")
        link = Link(peer, attempt, sock, monitor, remote)
        self.links[peer] = link
        self.loop.add_reader(sock, functools.partial(self._readable, link))
        self.loop.add_reader(monitor, functools.partial(self._monitor, link))
        self.log.info("direct_dialling", to=peer, attempt=attempt, remote=remote, local_port=local_port,
                      curve_server=curve_server)  # fmt: skip

    def send(self, peer: str, data: Any) -> bool:
        """Send a message on ``peer``'s link, if it is up; False if it could not go (the
        session sends it again)."""
        link = self.links.get(peer)
        if link is None or not link.up:
            return False
        try:
            send_message(link.sock, [BOX, data])
        except zmq.Again:
            return False
        return True

    def is_up(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.up

    def close(self, peer: str, attempt: int | None = None) -> None:
        """Close ``peer``'s link (only if it is attempt ``attempt``, when given)."""
        link = self.links.get(peer)
        if link is None or (attempt is not None and link.attempt != attempt):
            return
        del self.links[peer]
        self._close_link(link)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            self._close_link(link)
        self.links.clear()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None

    def _close_link(self, link: Link) -> None:
        # Detached from its monitor first: libzmq's I/O thread must not block on a
        # monitor event nobody reads (see the relay client's _io_close).
        link.sock.disable_monitor()
        self.loop.close_socket(link.monitor)
        self.loop.close_socket(link.sock)
        if self._auth is not None:
            self._auth.credentials_providers.pop(f"direct:{link.peer}", None)

    def _readable(self, link: Link) -> None:
        if self.links.get(link.peer) is not link:
            return
        for _ in range(256):
            try:
                frames = recv_message(link.sock, 2, copied=1)
            except zmq.Again:
                return
            if frames is None or len(frames) != 2 or frames[0] != BOX:
                self.log.warning("direct_message_rejected", peer=link.peer, error="not [box, message]")
                continue
            data = frames[1]
            self.on_message(link.peer, data.buffer if isinstance(data, zmq.Frame) else data)
            if self.links.get(link.peer) is not link:
                return  # the message closed the link

    def _monitor(self, link: Link) -> None:
        while self.links.get(link.peer) is link:
            try:
                event = recv_monitor_message(link.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and not link.up:
                link.up = True
                self.on_up(link.peer, link.attempt)
            elif kind == zmq.EVENT_DISCONNECTED:
                reason = "the direct link disconnected (heartbeats unanswered, or the peer closed it)"
                self._down(link, reason)
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                self._down(link, "the direct link's CurveZMQ handshake failed (not the expected peer)")
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self._down(link, "the direct link's handshake failed")

    def _down(self, link: Link, reason: str) -> None:
        self.close(link.peer, link.attempt)
        self.on_down(link.peer, link.attempt, reason)
