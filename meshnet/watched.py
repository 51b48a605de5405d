"""Sockets watched through a libzmq monitor, opened and closed one way everywhere.

Whether a connection is up, and whether CurveZMQ refused a key, shows only as socket
events; MeshNet reads them on a monitor socket. Two rules that each cost a hang when
forgotten, kept here once for the client, the node's relay link and its direct links:

- **An address of its own.** pyzmq's default monitor address names the socket's file
  descriptor, which a socket opened after this one closes can take again while the old
  monitor's address is still bound: the new monitor then fails, or reads the old one's.
- **Detached before closing.** libzmq's I/O thread sends monitor events with a blocking
  send: one sent after the monitor's reading end is closed blocks that thread for good,
  and with it every socket of its context (seen under a relay restart; closing the
  watched socket first does not help, the monitor stays attached until it is torn
  down). ``disable_monitor`` first, and no event can be sent.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

_numbers = itertools.count(1)


def watch(sock: zmq.Socket[Any], events: int, name: str) -> zmq.Socket[Any]:
    """A monitor of ``events`` on ``sock``, at an inproc address no other monitor of
    this process has had (``name`` says whose, for a reader of libzmq's errors)."""
    return sock.get_monitor_socket(events, addr=f"inproc://{name}-monitor-{os.getpid()}-{next(_numbers)}")


def close_watched(loop: Any, sock: zmq.Socket[Any] | None, monitor: zmq.Socket[Any] | None) -> None:
    """Close ``sock`` and its ``monitor`` (either may be None) on ``loop``
    (:class:`meshnet.socket_loop.SocketLoop`, whose thread this runs on): detached
    first, then neither watched nor open."""
    if sock is not None and monitor is not None:
        sock.disable_monitor()
    loop.close_socket(monitor)
    loop.close_socket(sock)
