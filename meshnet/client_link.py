"""What a :class:`~meshnet.client.MeshClient` knows of its connection to its node (sans-IO).

Whether the node is there at all, and with CurveZMQ whether it admits the client's key,
shows only as socket events. :class:`NodeLinkWatch` takes those events and says what
they mean: linked, lost, refused; and, when no connection comes up in time, the cause
and what to check, for the ``NodeUnreachable`` every pending job then ends with.
"""

from __future__ import annotations

from enum import Enum

import zmq

#: Socket events that tell whether the client is connected to its node. Success is the
#: ZeroMQ handshake (libzmq reports it for plain TCP as for CurveZMQ), not the TCP
#: connection: a port held by another program accepts TCP and never completes one.
LINK_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_DISCONNECTED
)
#: What the client saw of its node when it gives up on it: the cause, and what to check.
NOTHING_THERE = ("no connection", "is `meshnet node` running there?")
CONNECTION_LOST = ("the connection was lost and not re-established", "is `meshnet node` running there?")
NOT_ZEROMQ = ("a TCP connection opened but no ZeroMQ handshake completed", "is it `meshnet node` that listens there?")
HANDSHAKE_FAILED = ("the ZeroMQ handshake failed", "is it `meshnet node` that listens there?")
CURVE_FAILED = ("the CurveZMQ handshake failed", "is `meshnet node` running there, and is node_peer_id its peer id?")


class LinkChange(Enum):
    """What an event changed: nothing the client acts on, a connection up, the one
    there was lost (the connect timer starts again), or the client's key refused."""

    NONE = 0
    LINKED = 1
    LOST = 2
    REFUSED = 3


class NodeLinkWatch:
    """The state of one client's connection to ``endpoint`` (its I/O thread only)."""

    def __init__(self, endpoint: str, connect_timeout: float, *, curve: bool):
        self.endpoint = endpoint
        self.connect_timeout = connect_timeout
        self.curve = curve
        self.linked = False
        #: What the last connection attempt came to, for the error if none comes up.
        self.trouble = NOTHING_THERE

    def on_event(self, event: int) -> LinkChange:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.linked, self.trouble = True, NOTHING_THERE
            return LinkChange.LINKED
        if event == zmq.EVENT_DISCONNECTED:
            if not self.linked:
                return LinkChange.NONE
            self.linked, self.trouble = False, CONNECTION_LOST
            return LinkChange.LOST
        if event == zmq.EVENT_CONNECTED:
            if not self.linked:
                self.trouble = NOT_ZEROMQ
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return LinkChange.REFUSED
        else:  # a handshake failed otherwise: a wrong server key, or not ZeroMQ at all
            self.trouble = CURVE_FAILED if self.curve else HANDSHAKE_FAILED
        return LinkChange.NONE

    def unreachable(self) -> str:
        """Why the node cannot be reached, once ``connect_timeout`` passed unlinked."""
        cause, hint = self.trouble
        return f"cannot reach the node at {self.endpoint}: {cause} within {self.connect_timeout:g} s; {hint}"
