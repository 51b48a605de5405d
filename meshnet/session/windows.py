"""The counting parts of a peer session: which boxes and messages were seen, and the
round-trip estimate that times re-sends. Plain objects, no clock of their own."""

from __future__ import annotations

from meshnet.protocol.messages import MAX_SACK

#: Box counters remembered below the highest seen. WireGuard keeps 2,048 (RFC 6479's
#: bitmap); a re-sent message gets a new counter, so this only has to outlast the
#: re-ordering of boxes in flight, which on a relay path is none and on a direct path
#: a window's worth.
REPLAY_WINDOW = 4096
#: Messages of one stream that may be unacknowledged at once (the sender holds them, the
#: receiver remembers which of them it has). A relay path holds 64 MiB unread per node; at
#: 1,024 messages a window of small jobs fills a round trip many times over.
STREAM_WINDOW = 1024


class ReplayWindow:
    """Box counters seen from one peer session: the highest, and a bitmap of the
    ``REPLAY_WINDOW`` below it (as WireGuard and DTLS do). A counter seen before, or too
    far below the highest to tell, is a replay."""

    __slots__ = ("top", "bits")

    def __init__(self) -> None:
        self.top = -1
        self.bits = 0

    def is_new(self, counter: int) -> bool:
        """Whether :meth:`accept` would take ``counter`` (nothing is remembered)."""
        back = self.top - counter
        return back < 0 or (back < REPLAY_WINDOW and not self.bits >> back & 1)

    def accept(self, counter: int) -> bool:
        """True, and remembered, when ``counter`` was not seen before."""
        if counter > self.top:
            shift = counter - self.top
            self.bits = ((self.bits << shift) | 1) & ((1 << REPLAY_WINDOW) - 1) if shift < REPLAY_WINDOW else 1
            self.top = counter
            return True
        back = self.top - counter
        if back >= REPLAY_WINDOW or self.bits >> back & 1:
            return False
        self.bits |= 1 << back
        return True


class ReceiveWindow:
    """The sequence numbers received on one stream: all up to ``cumulative``, and those
    in ``above`` (at most ``STREAM_WINDOW`` past it). Sequence numbers start at 1."""

    __slots__ = ("cumulative", "above")

    def __init__(self) -> None:
        self.cumulative = 0
        self.above: set[int] = set()

    def receive(self, seq: int) -> bool:
        """True when ``seq`` is new and within the window: its message is to be handled
        (once). False for a duplicate, or one past the window (the sender broke the rule
        it was told; it will send it again once the window has moved)."""
        if seq <= self.cumulative or seq > self.cumulative + STREAM_WINDOW or seq in self.above:
            return False
        if seq == self.cumulative + 1:
            self.cumulative = seq
            while self.cumulative + 1 in self.above:
                self.cumulative += 1
                self.above.remove(self.cumulative)
        else:
            self.above.add(seq)
        return True

    def has(self, seq: int) -> bool:
        """Whether ``seq`` was received (or is too far below the window to tell, which
        only an old message is)."""
        return seq <= self.cumulative or seq in self.above

    def sack(self) -> list[int] | None:
        """The sequence numbers received above ``cumulative``, the lowest first (None: none)."""
        if not self.above:
            return None
        return sorted(self.above)[:MAX_SACK]


class RoundTrip:
    """Smoothed round-trip time and the re-send timeout from it (RFC 6298), with Karn's
    rule left to the caller: only messages sent once give samples."""

    __slots__ = ("srtt", "rttvar", "rto")

    #: Before any sample. On a relay path a sealed job is acknowledged after the delayed
    #: ack at most (``ACK_DELAY``) plus two relay hops, well under this.
    INITIAL = 1.0
    #: Re-sending sooner buys nothing on a path that delivers in order (a relay's TCP):
    #: a message there is lost only with its connection, which the path's own events say.
    MIN = 0.3
    #: Backed off no further than this: when a peer comes back, it hears again in seconds.
    MAX = 4.0

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = self.INITIAL

    def sample(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(self.MAX, max(self.MIN, self.srtt + 4 * self.rttvar))

    def backed_off(self, attempts: int) -> float:
        """The timeout after ``attempts`` sends of the same message."""
        return min(self.MAX, self.rto * 2.0 ** min(attempts - 1, 8))
