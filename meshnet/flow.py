"""Flow control on a node's link to its relay: bytes in flight are bounded each way.

ZeroMQ bounds its queues in messages (the high-water mark), and a message may be 64 MiB:
a relay forwarding 2 MiB messages to a node that never read them grew to 1.5 GB. So
each end of the link counts bytes, as TCP and HTTP/2 do with their windows:

* Every message after registration counts, by the sum of its frames' lengths, except
  ``ack`` itself. The relay counts from the ``registered`` it sends (exclusive), the
  node from the ``registered`` it receives (exclusive): the link is ordered, so both
  count the same messages.
* A receiver acknowledges what it has read with ``ack`` (``received``: bytes since
  registration) each time a quarter of the window has come in since its last ``ack``.
* Each heartbeat also acknowledges whatever was read since the last ``ack`` (on a
  quiet link, less than a quarter window would otherwise stay unacknowledged).
* A sender keeps at most ``window`` bytes sent and not acknowledged. A message that
  does not fit may still go when no more than a quarter window is in flight (else a
  message near the window's size might never go): in flight is then at most a quarter
  window and that one message.

Sans-IO: :class:`LinkFlow` is one end's account of both directions; :class:`SendQueue`
holds, within a byte budget, what a node may not send yet.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: Bytes in flight each way on a relay link, by default (``relay.max_unread_bytes`` in a
#: relay's config): room for a burst of eight 8 MiB jobs; a node that stops reading
#: costs its relay this much and one message more.
DEFAULT_WINDOW = 64 * 1024 * 1024


def frames_size(frames: Iterable[Any]) -> int:
    """What a message counts for: the sum of its frames' lengths."""
    return sum(map(len, frames))


class LinkFlow:
    """One end's account of a link: what it sent and the other end acknowledged, and
    what it received and acknowledged."""

    def __init__(self, window: int = DEFAULT_WINDOW):
        self.window = window
        self.sent = 0
        self.peer_received = 0
        self.received = 0
        self.acked = 0

    def reset(self, window: int) -> None:
        """A new registration: counting starts again, with ``window``."""
        self.window = window
        self.sent = self.peer_received = self.received = self.acked = 0

    @property
    def in_flight(self) -> int:
        """Bytes sent that the other end has not acknowledged."""
        return self.sent - self.peer_received

    def may_send(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may go now: it fits the window, or it is
        larger than the window allows and what is in flight is no more than a receiver
        may leave unacknowledged (a quarter window): then it goes alone, else it never
        could. In flight: at most a window, or a quarter window and one message."""
        in_flight = self.in_flight
        return in_flight + size <= self.window or in_flight <= self.window // 4

    def on_sent(self, size: int) -> None:
        self.sent += size

    def on_unsent(self, size: int) -> None:
        """A message counted as sent could not be sent after all."""
        self.sent -= size

    def on_ack(self, received: int) -> None:
        """The other end has read ``received`` bytes (a value past what was sent, from a
        confused or hostile peer, is taken as everything)."""
        self.peer_received = max(self.peer_received, min(received, self.sent))

    def on_received(self, size: int) -> int | None:
        """``size`` bytes were read; the ``received`` total to acknowledge now, if due."""
        self.received += size
        if self.received - self.acked >= max(1, self.window // 4):
            self.acked = self.received
            return self.received
        return None

    def ack_all(self) -> int | None:
        """The ``received`` total to acknowledge on a heartbeat, if anything was read
        since the last ``ack``: on a quiet link what is left below a quarter window is
        acknowledged too (and an ``ack`` that could not be sent is made good)."""
        if self.received > self.acked:
            self.acked = self.received
            return self.received
        return None


@dataclass
class Queued:
    """A message waiting for room in the window: its frames and size, and what it is
    (``ref``, ``op``: a sealed box's name and kind, ``peer``: its destination)."""

    frames: list[Any]
    size: int
    ref: bytes
    op: str
    peer: str = ""


@dataclass
class SendQueue:
    """Messages a node may not send yet, first in first out, at most ``budget`` bytes."""

    budget: int
    entries: deque[Queued] = field(default_factory=deque)
    size: int = 0

    def fits(self, size: int) -> bool:
        return self.size + size <= self.budget

    def push(self, entry: Queued) -> None:
        self.entries.append(entry)
        self.size += entry.size

    def pop_sendable(self, flow: LinkFlow) -> list[Queued]:
        """The messages at the head that the window has room for now, in order."""
        out = []
        while self.entries and flow.may_send(self.entries[0].size):
            entry = self.entries.popleft()
            self.size -= entry.size
            flow.on_sent(entry.size)
            out.append(entry)
        return out

    def clear(self) -> list[Queued]:
        out = list(self.entries)
        self.entries.clear()
        self.size = 0
        return out
