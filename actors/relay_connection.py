"""The node's connection to its relay: one CurveZMQ DEALER and its monitor, on the job loop.

It opens, reads, sends and closes; what it reads and what its monitor sees go to the
node core (through :class:`actors.relay_client.RelayClient`), tagged with the
generation the core gave the connection, so that anything from a connection replaced
since is told apart.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshnet.endpoints import connect_from
from meshnet.identity import Identity, curve_public_z85
from meshnet.node.effects import Disconnected, HandshakeFailed, Reconnected, RelayEvent
from meshnet.protocol import MAX_FRAMES
from meshnet.socket_loop import SocketLoop, recv_message, send_message
from meshnet.watched import close_watched, watch

RECV_BATCH = 256
#: libzmq's own reconnection interval, drawn per socket, and its backed-off cap (ms).
RECONNECT_IVL_MS = (100.0, 1000.0)
RECONNECT_IVL_MAX_MS = 5000
HANDSHAKE_FAILURES = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class RelayConnection:
    """Loop thread only. ``on_frames(generation, frames)`` gets each message read (None:
    one of more than MAX_FRAMES frames), ``on_event(event)`` what the monitor saw,
    ``on_unsent(counted)`` what a send that failed was counted for; ``after_read()``
    runs once per batch read."""

    def __init__(
        self,
        *,
        identity: Identity,
        endpoint: str,
        relay_peer_id: str,
        max_message: int,
        context: zmq.Context,
        loop: SocketLoop,
        on_frames: Callable[[int, list[Any] | None], None],
        on_event: Callable[[RelayEvent], None],
        on_unsent: Callable[[int], None],
        after_read: Callable[[], None],
        logger: Any,
    ):
        self.identity = identity
        self.endpoint = endpoint
        self.relay_peer_id = relay_peer_id
        self.max_message = max_message
        self.context = context
        self.loop = loop
        self.on_frames, self.on_event, self.on_unsent, self.after_read = on_frames, on_event, on_unsent, after_read
        self.log = logger
        self._monitor: zmq.Socket | None = None
        self._sock: zmq.Socket | None = None
        self._handshakes = 0
        self._generation = -1

    def open(self, generation: int, local_port: int | None) -> None:
        self.close()
        sock = self.context.socket(zmq.DEALER)
        public, secret = self.identity.zmq_curve_keys()
        sock.curve_publickey = public
        sock.curve_secretkey = secret
        sock.curve_serverkey = curve_public_z85(self.relay_peer_id)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
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
        # From the core's local port, which libzmq's reconnects keep (NodeCore._connect).
        sock.connect(connect_from(self.endpoint, local_port) if local_port else self.endpoint)
        self._sock = sock
        self._monitor = monitor
        self._generation = generation
        self.loop.add_reader(sock, self._readable)
        self.loop.add_reader(monitor, self._monitor_readable)

    def close(self) -> None:
        close_watched(self.loop, self._sock, self._monitor)
        self._monitor = self._sock = None

    def send(self, generation: int, frames: list[Any], counted: int) -> None:
        """Send ``frames``; ``counted`` is what they were counted for in the window, given
        back if they cannot be sent (a sealed box is then sent again by its session)."""
        sock = self._sock
        if sock is None or generation != self._generation:
            return
        try:
            send_message(sock, frames)
        except zmq.ZMQError as exc:
            self.on_unsent(counted)
            self.log.warning("relay_send_failed", error=str(exc))

    def _monitor_readable(self) -> None:
        monitor = self._monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshakes += 1
                if self._handshakes > 1:
                    self.on_event(Reconnected(self._generation))
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.on_event(Disconnected(self._generation))
            else:
                auth = event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                self.on_event(HandshakeFailed(self._generation, auth, event["value"]))
            monitor = self._monitor

    def _readable(self) -> None:
        sock = self._sock
        generation = self._generation
        try:
            for _ in range(RECV_BATCH):
                if sock is None or self._sock is not sock:  # closed or replaced meanwhile
                    return
                try:
                    frames = recv_message(sock, MAX_FRAMES, copied=1)
                except zmq.Again:
                    return
                # Each message is handled as it is read: a job from a peer reaches a free
                # worker before the rest of the batch is read.
                self.on_frames(generation, frames)
        finally:
            self.after_read()
