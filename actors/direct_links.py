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

Some peers are dialled rather than punched (meshnet.holepunch decides which): a node
whose NAT forwards any port (or that has none) and two nodes behind one NAT. For them
each node binds one listener (actors/direct_listener.py). Dialled links are pinged every
second and answer ``[b"pong"]``; a link of either kind silent for
``HEARTBEAT_TIMEOUT_MS`` is down (one ROUTER serves every accepted link, so libzmq's
per-connection events cannot say which peer went).

What a link carries (hi, box, boxes, parts, ping, pong, bye) is
:mod:`meshnet.protocol.direct`'s: every frame read here goes through its ``decode_link``.
To a peer whose hi said ``boxes``, the small messages of one loop turn go out as one
``[b"boxes", ...]`` (at most MAX_BATCH, each under BULK_BYTES): under load a turn has
many, and one link message for them costs one send, one receive and one wake-up of each
side's I/O thread instead of N. The batch waits for nothing: it goes when the turn that
made it ends. To a peer whose hi said ``parts``, a job or result whose payload is
BULK_BYTES or more goes as ``[b"parts", field, message, bulk]``, copied neither by the
sender nor by the receiver.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.direct_auth import HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS, DirectAuth
from actors.direct_listener import DirectListener, Link
from meshnet.errors import RemoteProtocolError
from meshnet.identity import Identity
from meshnet.protocol import encode_inner, split_bulk
from meshnet.protocol.codec import BULK_BYTES
from meshnet.protocol.direct import (
    MAX_BATCH,
    MAX_FRAMES,
    OUR_HI,
    PING,
    PONG,
    Boxes,
    Bye,
    Carried,
    Hi,
    LinkMessage,
    Ping,
    box_frames,
    carried,
    decode_link,
    parts_frames,
)
from meshnet.socket_loop import SocketLoop, TimerHandle, recv_message, send_message
from meshnet.watched import close_watched, watch

log = structlog.get_logger("meshnet.direct")


MONITORED = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
MONITORED |= zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class DirectLinks:
    """Loop thread only. ``on_up(peer, attempt)``, ``on_down(peer, attempt, reason)`` and
    ``on_messages(peer, carried)`` are called on the loop (``carried``: the node-to-node
    messages one link message brought, each for
    :func:`meshnet.protocol.direct.decode_carried`)."""

    def __init__(
        self,
        *,
        identity: Identity,
        loop: SocketLoop,
        max_message: int,
        on_up: Callable[[str, int], None],
        on_down: Callable[[str, int, str], None],
        on_messages: Callable[[str, tuple[Carried, ...]], None],
    ):
        self.identity = identity
        self.loop = loop
        self.max_message = max_message
        self.on_up, self.on_down, self.on_messages = on_up, on_down, on_messages
        self.links: dict[str, Link] = {}
        #: The listener peers dial (meshnet.holepunch decides who listens).
        self.listener = DirectListener(self)
        self._pinger: TimerHandle | None = None
        #: The links' context and ZAP thread (made on first use), apart from the API's.
        self.auth = DirectAuth(identity, max_message)
        self.log = log.bind(peer_id=identity.peer_id)

    def listen(self, port: int) -> int:
        """Bind the listener on ``port`` of every address (0: a free one); its port."""
        return self.listener.listen(port)

    def expect(self, peer: str, attempt: int) -> None:
        """Attempt ``attempt``: admit ``peer``'s key on the listener, for it to dial."""
        self.close(peer)
        self.listener.expect(peer, attempt)
        self._arm_pinger()

    def dial(self, peer: str, attempt: int, remote: str, local_port: int | None, curve_server: bool) -> None:
        """Open attempt ``attempt`` to ``peer`` (replacing any link to it)."""
        self.close(peer)
        sock = self.auth.dialled_socket(peer, curve_server)
        monitor = watch(sock, MONITORED, "direct")
        source = f"0.0.0.0:{local_port}" if local_port else "0.0.0.0:0"
        try:
            sock.connect(f"tcp://{source};{remote}")
        except zmq.ZMQError as exc:
            close_watched(self.loop, sock, monitor)
            self.loop.call_soon(self.on_down, peer, attempt, f"cannot connect to {remote}: {exc}")
            return
        link = Link(peer, attempt, sock, monitor, remote, last_heard=time.monotonic())
        self.links[peer] = link
        self.loop.add_reader(sock, functools.partial(self._readable, link))
        self.loop.add_reader(monitor, functools.partial(self._monitor, link))
        self.log.info("direct_dialling", to=peer, attempt=attempt, remote=remote, local_port=local_port,
                      curve_server=curve_server)  # fmt: skip

    def send(self, peer: str, data: Any) -> bool:
        """Send a message on ``peer``'s link, if it is up; False if it cannot. A small
        message to a peer that reads batches goes when this loop turn ends, with the
        others of the turn. One that is not delivered (the link's queue full, or it went
        down) is lost here: the session sends it again."""
        link = self.links.get(peer)
        if link is None or not link.up:
            return False
        if not link.batches or len(data) >= BULK_BYTES:
            self._flush(link)  # what was queued goes first
            return self._send_frames(link, box_frames([data]))
        link.outbox.append(data)
        if len(link.outbox) == 1:
            self.loop.at_turn_end(functools.partial(self._flush, link))
        elif len(link.outbox) >= MAX_BATCH:
            self._flush(link)
        return True

    def send_box(self, peer: str, box: Any) -> bool:
        """Send node-to-node message ``box`` (a dict) on ``peer``'s link, if it is up:
        to a peer that reads parts, a large payload goes as a frame of its own."""
        split = split_bulk(box) if self.reads_parts(peer) else None
        if split is not None:
            return self.send_parts(peer, *split)
        return self.send(peer, encode_inner(box))

    def reads_parts(self, peer: str) -> bool:
        """Whether ``peer``'s link is up and takes a message's bulk field as a frame."""
        link = self.links.get(peer)
        return link is not None and link.up and link.parts

    def send_parts(self, peer: str, message: bytes, field: str, bulk: Any) -> bool:
        """Send a message whose bulk field ``field`` goes as a frame of its own (``bulk``,
        not copied), to a peer that reads parts; False if it cannot go."""
        link = self.links.get(peer)
        if link is None or not link.up or not link.parts:
            return False
        self._flush(link)  # what was queued goes first
        return self._send_frames(link, parts_frames(message, field, bulk))

    def _flush(self, link: Link) -> None:
        """Send the messages queued on ``link``: one as a box, more as a batch."""
        queued, link.outbox = link.outbox, []
        if not queued or self.links.get(link.peer) is not link:
            return
        self._send_frames(link, box_frames(queued))

    def _send_frames(self, link: Link, frames: list[Any]) -> bool:
        try:
            send_message(link.sock, [link.routing_id, *frames] if link.monitor is None else frames)
        except zmq.ZMQError:  # full (Again), or an accepted link whose connection is gone
            return False
        return True

    def is_up(self, peer: str) -> bool:
        link = self.links.get(peer)
        return link is not None and link.up

    def close(self, peer: str, attempt: int | None = None) -> None:
        """Close ``peer``'s link (only if it is attempt ``attempt``, when given)."""
        self.listener.forget(peer, attempt)  # an attempt that expected the peer's dial, and ended
        link = self.links.get(peer)
        if link is None or (attempt is not None and link.attempt != attempt):
            return
        del self.links[peer]
        self._close_link(link)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            self._close_link(link)
        self.links.clear()
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        self.listener.close()
        self.auth.close()

    def _close_link(self, link: Link) -> None:
        self.listener.forget(link.peer, None)
        link.outbox.clear()
        if link.monitor is None:
            self.listener.closed(link)
            return
        close_watched(self.loop, link.sock, link.monitor)
        self.auth.forget(link.peer)

    def _readable(self, link: Link) -> None:
        if self.links.get(link.peer) is not link:
            return
        for _ in range(256):
            try:
                frames = recv_message(link.sock, MAX_FRAMES, copied=1)
            except zmq.Again:
                return
            link.last_heard = time.monotonic()
            message = self.decode(link, frames)
            if message is None:
                continue
            if isinstance(message, Hi):
                link.batches, link.parts = message.batches, message.parts
            elif isinstance(message, Ping):
                self.send_quietly(link, [PONG])
            elif isinstance(message, Bye):
                self._down(link, "the peer closed the direct link")
                return
            elif self.deliver(link, message):
                return

    def decode(self, link: Link, frames: list[Any] | None) -> LinkMessage | None:
        """The link message ``frames`` make, or None (logged) for what is none."""
        try:
            if frames is None:
                raise RemoteProtocolError(f"a link message has at most {MAX_FRAMES} frames")
            return decode_link(frames)
        except RemoteProtocolError as exc:
            self.log.warning("direct_message_rejected", peer=link.peer, error=str(exc))
            return None

    def deliver(self, link: Link, message: LinkMessage) -> bool:
        """Hand the node-to-node messages ``message`` carries to ``on_messages``, all at
        once. True when the reader is to stop for this turn: a batch is a turn's worth
        (the loop serves its other sockets, the workers whose jobs it just queued, before
        it reads another), and the messages may have closed the link."""
        items = carried(message)
        if items:
            self.on_messages(link.peer, items)
            if self.links.get(link.peer) is not link:
                return True  # the messages closed the link
        return isinstance(message, Boxes) and len(message.messages) > 1

    def _monitor(self, link: Link) -> None:
        monitor = link.monitor
        while monitor is not None and self.links.get(link.peer) is link:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED and not link.up:
                link.up, link.last_heard = True, time.monotonic()
                self.send_quietly(link, OUR_HI.frames())  # a listener learns who we are from it
                self._arm_pinger()
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

    def send_quietly(self, link: Link, frames: list[bytes]) -> None:
        """A control word on ``link``; one that cannot go now is not needed later."""
        try:
            send_message(link.sock, [link.routing_id, *frames] if link.monitor is None else frames)
        except zmq.ZMQError:
            pass

    def _arm_pinger(self) -> None:
        if self._pinger is None:
            self._pinger = self.loop.call_later(HEARTBEAT_IVL_MS / 1000, self._ping)

    def _ping(self) -> None:
        """Every second while links are up or expected: a ping on each link this node
        dialled, answered with a pong (any frame counts); a link of either kind silent
        for HEARTBEAT_TIMEOUT_MS is down. (libzmq's heartbeats also drop a dead dialled
        connection; these also catch a listener that forgot the link.)"""
        self._pinger = None
        now = time.monotonic()
        for link in list(self.links.values()):
            if not link.up:
                continue
            if now - link.last_heard > HEARTBEAT_TIMEOUT_MS / 1000:
                self._down(link, "the direct link went silent (pings unanswered)")
            elif link.monitor is not None:
                self.send_quietly(link, [PING])
        if self.links or self.listener.expected:
            self._arm_pinger()
