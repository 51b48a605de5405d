"""The shell of :class:`meshnet.conn_guard.ConnectionGuard` for one listening ZeroMQ
socket, on the loop thread that owns it.

It watches the socket's monitor for accepted and closed connections, and its owner tells
it of each connection's first message (:meth:`ListenerGuard.seen`, with one of the
message's frames: libzmq's ``SRCFD`` names the connection's descriptor). A connection
the core says to close is shut down by its descriptor (``shutdown``: libzmq reads
end-of-file and closes it as if the peer had), but only if both its addresses are still
those it was accepted with: a descriptor number that was closed and reused meanwhile is
someone else's. The descriptor is borrowed, never duplicated: a process out of
descriptors (a burst of connections can outrun the guard) must still be able to close
some. What was closed is logged once per reason, then counted.
"""

from __future__ import annotations

import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from meshnet.conn_guard import HANDSHAKE_IVL_MS, Address, ConnectionGuard, PendingConnection, reserve_for
from meshnet.log_budget import LogBudget
from meshnet.socket_loop import SocketLoop
from meshnet.watched import watch

log = structlog.get_logger("meshnet.listener")

MONITORED = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED
#: struct tcp_info (linux/tcp.h): its size as asked for, and where ``tcpi_bytes_received``
#: (u64, since Linux 4.1) lies in it.
TCP_INFO_BYTES = 256
TCP_INFO_BYTES_RECEIVED = 128
#: Routing ids remembered as having sent a message (their later messages cost a lookup,
#: not a descriptor query); past it the oldest are forgotten.
MAX_SEEN = 65_536
WHY = {
    "pending": "too many connections had not sent a first message",
    "per_source": "too many connections from one address had not sent a first message",
    "descriptors": "the process is near its limit of open files; connections that sent nothing go first",
}


def open_files_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit(logger: Any = log) -> tuple[int, int]:
    """Raise this process's soft limit of open files to its hard limit, if lower (a
    listener holds a descriptor per connection, and the soft limit is often 1024).
    Returns the soft limit before and after (a process says what it got when it has
    started: :func:`open_files_report`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            with open("/proc/sys/fs/nr_open") as fh:
                target = int(fh.read())
        except (OSError, ValueError):
            target = 1 << 20
    after = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            after = target
        except (OSError, ValueError) as exc:
            logger.warning("open_files_limit_kept", soft=soft, hard=hard, error=str(exc))
    return soft, after


def open_files_report() -> dict[str, int]:
    """The limit of open files now and the reserve kept of it, for a started line."""
    soft = open_files_limit()
    return {"open_files": soft, "open_files_reserve": reserve_for(soft)}


def guard_listener(sock: zmq.Socket[Any]) -> None:
    """Options for a socket that will be guarded (before it binds): libzmq closes a
    connection whose handshake has not completed within HANDSHAKE_IVL_MS."""
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


class ListenerGuard:
    """Loop thread only."""

    def __init__(self, loop: SocketLoop, sock: zmq.Socket[Any], *, name: str, logger: Any = log):
        self.loop = loop
        self.name = name
        self.core = ConnectionGuard(limit=open_files_limit())
        self.log = logger
        self.budget = LogBudget(loop, logger, "connections_closed", "reason")
        #: Routing id -> the descriptor and addresses of its connection, as its first
        #: message showed them (to close it when it must go: :meth:`disconnect`), and the
        #: other way round, so that a connection's end forgets it (a client that comes
        #: back under the same routing id is looked up again).
        self._seen: OrderedDict[bytes, tuple[int, tuple[Address, Address] | None]] = OrderedDict()
        self._conn_of: dict[int, bytes] = {}
        self._sock = sock
        self.monitor: zmq.Socket[Any] | None = watch(sock, MONITORED, f"guard-{name}")
        loop.add_reader(self.monitor, self._on_events)

    def seen(self, conn: bytes, frame: zmq.Frame) -> None:
        """A message came from routing id ``conn`` (``frame``: one of its frames)."""
        if conn in self._seen:
            return
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            fd = -1  # not a TCP connection (ipc, inproc): nothing to guard, nor to look up again
        self._seen[conn] = (fd, _addresses(fd) if fd >= 0 else None)
        if len(self._seen) > MAX_SEEN:
            old, (old_fd, _) = self._seen.popitem(last=False)
            if self._conn_of.get(old_fd) == old:
                del self._conn_of[old_fd]
        if fd >= 0:
            self._conn_of[fd] = conn
            self.core.on_identified(fd)

    def disconnect(self, conn: bytes) -> bool:
        """Close routing id ``conn``'s connection (a ROUTER cannot close one of its own):
        ZeroMQ then drops what it queued for it. False if it is not known, or gone."""
        fd, addresses = self._seen.get(conn, (-1, None))
        return addresses is not None and _shutdown(fd, addresses)

    def close(self) -> None:
        """Before the socket closes: detach and close the monitor (libzmq must not block
        on an event nobody reads)."""
        self.budget.close()
        if self.monitor is not None:
            self._sock.disable_monitor()
            self.loop.close_socket(self.monitor)
            self.monitor = None

    def _on_events(self) -> None:
        monitor = self.monitor
        while monitor is not None:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                addresses = _addresses(fd)
                if addresses is not None:
                    for conn in self.core.on_accepted(fd, *addresses, time.monotonic(), _talking):
                        self._shut(conn)
            else:
                self.core.on_gone(fd)
                routing_id = self._conn_of.pop(fd, None)
                if routing_id is not None and self._seen.get(routing_id, (-1,))[0] == fd:
                    del self._seen[routing_id]

    def _shut(self, conn: PendingConnection) -> None:
        if not _shutdown(conn.fd, (conn.local, conn.remote)):
            return  # gone already, its number someone else's now
        if self.budget.allow(conn.reason, WHY[conn.reason]):
            self.log.warning(
                "connection_closed",
                listener=self.name,
                reason=WHY[conn.reason],
                source=conn.remote[0],
                pending=len(self.core.pending),
                closed=dict(self.core.closed),
            )


@contextmanager
def _borrowed(fd: int) -> Iterator[socket.socket]:
    """ZeroMQ's descriptor ``fd`` as a Python socket, given back (not closed) after."""
    sock = socket.socket(fileno=fd)
    try:
        yield sock
    finally:
        sock.detach()


def _shutdown(fd: int, addresses: tuple[Address, Address]) -> bool:
    """Shut connection ``fd`` down if it still joins ``addresses``; whether it did."""
    try:
        with _borrowed(fd) as sock:
            if _ends(sock) != addresses:
                return False
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return False
    return True


def _talking(fd: int) -> bool:
    """Whether any byte came on TCP connection ``fd`` (Linux's ``tcp_info``: a peer's
    ZeroMQ sends its greeting at once, an idle stranger nothing)."""
    try:
        with _borrowed(fd) as sock:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_BYTES)
    except OSError:
        return False
    if len(info) < TCP_INFO_BYTES_RECEIVED + 8:
        return False  # a kernel before 4.1 says nothing: all pending look alike
    received: int = struct.unpack_from("=Q", info, TCP_INFO_BYTES_RECEIVED)[0]
    return received > 0


def _addresses(fd: int) -> tuple[Address, Address] | None:
    """Both ends of TCP connection ``fd`` (None: not one, or gone)."""
    try:
        with _borrowed(fd) as sock:
            return _ends(sock)
    except OSError:
        return None


def _ends(sock: socket.socket) -> tuple[Address, Address] | None:
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    local, remote = sock.getsockname(), sock.getpeername()
    return (local[0], local[1]), (remote[0], remote[1])
