"""Which connections a listener closes so that strangers cannot use up its descriptors,
sans-IO.

libzmq accepts every TCP connection a listening socket is offered, and each holds a file
descriptor until its handshake completes or ``ZMQ_HANDSHAKE_IVL`` passes: 1,088 idle
connections to a node's direct listener once took every descriptor of a node with the
usual soft limit of 1,024, and the node aborted at its next relay reconnect (libzmq
asserts when it cannot open one). So a listener's accepted connections are *pending*
until a first message shows they speak for someone (the owner calls
:meth:`ConnectionGuard.on_identified`), and this decides which pending ones to close,
oldest first:

- more than ``max_pending`` pending at once;
- more than ``max_per_source`` pending from one source IP (only silent ones: below), and
  more than four times that, whether they talk or not;
- an accepted descriptor at or above ``limit - reserve``: the kernel hands out the lowest
  free descriptor, so a number that high means fewer than ``reserve`` are left for the
  process's own work (worker processes, the relay link, clients that identified
  themselves). Then the oldest pending quarter of the reserve goes at once.

Of the pending connections, those that have sent nothing at all go first: a peer's
ZeroMQ speaks first (its greeting), an idle stranger never does, and a connection whose
first message is still on its way must not be closed for the strangers that came after
it (``talking``: the shell asks the kernel how many bytes came on a connection).

Sans-IO: the shell (meshnet.listener_guard) reads the listener's monitor events, feeds
them here, and closes what this returns.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: Pending connections a listener keeps at most; past it the oldest are closed. A
#: legitimate peer identifies itself within a round trip or two of connecting.
MAX_PENDING = 256
#: ... and at most this many from one source IP (a NAT hides a few honest hosts).
MAX_PENDING_PER_SOURCE = 32
#: libzmq closes a connection that has not finished its handshake within this (ms): its
#: default is 30 s, which lets a slow flood hold descriptors for long.
HANDSHAKE_IVL_MS = 10_000

Address = tuple[str, int]


def reserve_for(limit: int) -> int:
    """Descriptors kept for a process's own work when its limit is ``limit``."""
    return max(64, limit // 8)


@dataclass(frozen=True)
class PendingConnection:
    fd: int
    #: Both ends, as getsockname / getpeername gave them when it was accepted: a
    #: descriptor number is reused, these tell whether it is still this connection.
    local: Address
    remote: Address
    since: float
    #: Why it is to be closed (set on the copy returned by the guard).
    reason: str = ""


class ConnectionGuard:
    def __init__(
        self,
        *,
        limit: int,
        reserve: int | None = None,
        max_pending: int = MAX_PENDING,
        max_per_source: int = MAX_PENDING_PER_SOURCE,
    ):
        self.limit = limit
        self.reserve = reserve_for(limit) if reserve is None else reserve
        self.max_pending = max_pending
        self.max_per_source = max_per_source
        #: Pending connections by descriptor, oldest first.
        self.pending: OrderedDict[int, PendingConnection] = OrderedDict()
        self.per_source: Counter[str] = Counter()
        #: Connections closed, by why.
        self.closed: Counter[str] = Counter()

    def on_accepted(
        self, fd: int, local: Address, remote: Address, now: float, talking: Callable[[int], bool] = lambda fd: False
    ) -> list[PendingConnection]:
        """The listener accepted connection ``fd`` from ``remote``: what to close now
        (``talking(fd)``: whether anything came on a pending connection yet)."""
        self._forget(fd)  # a number reused after a close we have not heard of yet
        self.pending[fd] = PendingConnection(fd, local, remote, now)
        self.per_source[remote[0]] += 1
        close: list[PendingConnection] = []
        if fd >= self.limit - self.reserve:
            for _ in range(max(1, self.reserve // 4)):
                close += self._close_first(lambda c: True, talking, "descriptors")
        while len(self.pending) > self.max_pending:
            close += self._close_first(lambda c: True, talking, "pending")
        ip = remote[0]
        if self.per_source[ip] > self.max_per_source:
            # Only the silent ones of a source: many honest clients behind one address
            # connect at once and greet at once; an idle stranger never does ...
            close += self._close_first(lambda c: c.remote[0] == ip, talking, "per_source", silent_only=True)
        while self.per_source[ip] > 4 * self.max_per_source:
            # ... but one that greets and goes no further is held to a share all the same.
            close += self._close_first(lambda c: c.remote[0] == ip, talking, "per_source")
        return close

    def on_identified(self, fd: int) -> None:
        """A message came on connection ``fd``: it speaks for someone, and stays."""
        self._forget(fd)

    def on_gone(self, fd: int) -> None:
        """Connection ``fd`` is closed (by its peer, by libzmq's handshake timeout, or
        because this guard said so)."""
        self._forget(fd)

    def _close_first(
        self,
        which: Callable[[PendingConnection], bool],
        talking: Callable[[int], bool],
        reason: str,
        *,
        silent_only: bool = False,
    ) -> list[PendingConnection]:
        """Close the oldest pending connection ``which`` takes that has sent nothing, or,
        if all of those have (and ``silent_only`` is not set), the oldest of them."""
        chosen = None
        for conn in self.pending.values():
            if which(conn):
                if not talking(conn.fd):
                    chosen = conn
                    break
                if not silent_only:
                    chosen = chosen or conn
        return [self._close(chosen, reason)] if chosen is not None else []

    def _close(self, conn: PendingConnection, reason: str) -> PendingConnection:
        self._forget(conn.fd)
        self.closed[reason] += 1
        return PendingConnection(conn.fd, conn.local, conn.remote, conn.since, reason)

    def _forget(self, fd: int) -> None:
        conn = self.pending.pop(fd, None)
        if conn is not None:
            self.per_source[conn.remote[0]] -= 1
            if self.per_source[conn.remote[0]] <= 0:
                del self.per_source[conn.remote[0]]
