"""One peer's session: a reliable stream each way over whatever path is current.

Sans-IO. The session numbers the messages it sends (``seq``), keeps each until the peer
acknowledges it, and sends it again on its timer or at once when the path changes. It
stamps every box with the session header (``meshnet.protocol.messages.SESSION_RULES``),
drops boxes replayed (their counter seen) or from another session, and hands on each
message it receives exactly once. Acknowledgements are cumulative with a selective
part, and ride on whatever goes the other way; alone (``peer_ack``) only after
``ACK_DELAY`` or ``ACK_EVERY`` messages, as TCP's delayed acks do.

What the messages mean (jobs, results, cancels) is :mod:`meshnet.session.core`'s.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from meshnet.protocol.messages import Hello, PeerAck, Sealed
from meshnet.session.state import Move, State, next_state
from meshnet.session.windows import STREAM_WINDOW, ReceiveWindow, ReplayWindow, RoundTrip

#: Any node-to-node message type: what is stamped comes back as the same type.
_Box = TypeVar("_Box", bound=Sealed)

#: A message received is acknowledged within this (unless something else goes back
#: first, carrying the ack): short against a round trip, long enough to gather a burst.
ACK_DELAY = 0.02
#: ... or at once when this many are unacknowledged.
ACK_EVERY = 32
#: A peer's hello is answered at most this often (a burst of its boxes for our old session
#: id asks the same question many times).
ANSWER_GAP = 0.2
#: While a job sent to the peer is unanswered, a probe goes out after this long without
#: a word from it (an unacknowledged message is sent again on its own timer instead).
KEEPALIVE = 2.0
#: Pings kept per session, waiting to go or for their answer; older ones are forgotten
#: (a ping is a measurement, not a message: lost, it is not sent again).
MAX_PINGS = 64


@dataclass(eq=False)
class Pending:
    """A message of ours, kept until acknowledged."""

    seq: int
    message: Sealed
    #: Bytes it holds (its payload or result), counted against the node's budget.
    size: int
    #: When it was last sent (None: not yet); how often; when to send it again.
    sent_at: float | None = None
    sends: int = 0
    due: float = 0.0
    counters: list[int] = field(default_factory=list)


@dataclass
class Received:
    """What one box from the peer came to."""

    #: The message to act on (a job, a result, a cancel): new, handed on once. None when
    #: the box carried nothing new (an ack, a hello, a duplicate, a stale or replayed box).
    message: Sealed | None = None
    #: Boxes to send back now (an answer to a hello, an ack).
    replies: list[Sealed] = field(default_factory=list)
    #: The peer started a new session: what ours held is handed back (see
    #: :meth:`PeerSession.start_over`) and must be settled before ``message`` is handled.
    restarted: tuple[list[Pending], list[Pending]] | None = None
    #: Our messages the box acknowledged.
    acked: list[Pending] = field(default_factory=list)
    #: Why the box was dropped, for the log (None: it was not).
    dropped: str | None = None
    #: The box answered our ping: (its number, seconds since it was sent).
    pong: tuple[int, float] | None = None


class PeerSession:
    def __init__(self, peer: str, new_sid: Callable[[], int], max_payload: int | None = None, batch: int | None = None):
        self.peer = peer
        self._new_sid = new_sid
        #: The largest payload or result this side takes, told in its hellos; and the
        #: peer's, from its hellos (None: it has not said).
        self.max_payload = max_payload
        self.peer_max_payload: int | None = None
        #: The most messages this side reads in one sealed batch, told in its hellos; and
        #: the peer's, from its last hello (None: it reads none: one message per box).
        self.batch = batch
        self.peer_batch: int | None = None
        self.state = State.NEW
        self.local_sid = new_sid()
        self.remote_sid: int | None = None
        self.replay = ReplayWindow()
        self.counter = 0
        self.next_seq = 1
        #: Sent and not yet acknowledged, by seq (in the order sent first).
        self.unacked: dict[int, Pending] = {}
        #: Not sent yet: the session is not open, no path is up, or the window is full.
        self.waiting: deque[Pending] = deque()
        self.waiting_by_seq: dict[int, Pending] = {}
        self.inbound = ReceiveWindow()
        self.unacked_in = 0
        self.ack_due: float | None = None
        self.rtt = RoundTrip()
        #: Box counter -> the seq it carried, for boxes the path bounced.
        self.counters: dict[int, int] = {}
        self.path_up = False
        self.last_heard: float | None = None
        #: Boxes taken from the peer (new ones: not replayed, not of an old session).
        self.heard = 0
        #: When an ack last acknowledged one of our messages.
        self.progress_at: float | None = None
        self.hello_due: float | None = None
        self.hellos = 0
        self.answered_at = -1e9
        self.probe_at = -1e9
        #: Set by the core while it waits on the peer (jobs it has not answered).
        self.awaiting = False
        #: The message :meth:`send` queued last.
        self.last_sent: Pending | None = None
        #: Pings to send once the session is open and a path is up, and those sent and
        #: not answered: number -> when it was sent.
        self.pings_waiting: list[int] = []
        self.pings_sent: dict[int, float] = {}

    # -- sending --

    def send(self, message: Sealed, size: int, now: float) -> list[Sealed]:
        """Queue ``message`` (without its header) for the peer; the boxes to send now."""
        pending = Pending(self.next_seq, with_fields(message, {"seq": self.next_seq}), size)
        self.next_seq += 1
        self.waiting.append(pending)
        self.waiting_by_seq[pending.seq] = pending
        self.last_sent = pending
        self.state = next_state(self.state, Move.SEND)
        return self._flush(now)

    def ping(self, number: int, now: float) -> list[Sealed]:
        """Ask the peer to answer ``number`` at once: now if the session is open and a
        path is up, else (a hello first) when it is."""
        self.pings_waiting = [*self.pings_waiting[-(MAX_PINGS - 1) :], number]
        if self.state is State.NEW:
            self.state = next_state(self.state, Move.SEND)
        return self._flush(now)

    def replace(self, seq: int, message: Sealed) -> Pending | None:
        """Send ``message`` in place of our message ``seq`` (not yet acknowledged) from now
        on: a job the submitter has ended goes as a small cancel, a result too large for
        the path as a failure. It keeps the seq: the peer's stream has no hole."""
        pending = self.find(seq)
        if pending is not None:
            pending.message = with_fields(message, {"seq": seq})
        return pending

    def find(self, seq: int) -> Pending | None:
        """Our message ``seq``, sent or waiting (None: acknowledged, or of another stream)."""
        return self.unacked.get(seq) or self.waiting_by_seq.get(seq)

    def seq_of(self, counter: int) -> int | None:
        """The seq that the box with ``counter`` carried (None: an ack, a hello, or acked)."""
        return self.counters.get(counter)

    def _flush(self, now: float) -> list[Sealed]:
        """Boxes for what may go now."""
        if not self.path_up:
            return []
        boxes: list[Sealed] = []
        if self.state is State.HELLO_SENT:
            if self.hello_due is None or self.hello_due <= now:
                boxes.append(self._hello(now))
            return boxes
        if self.state is not State.OPEN:
            return boxes
        if self.pings_waiting:
            for number in self.pings_waiting:
                self.pings_sent[number] = now
                boxes.append(self._stamp(PeerAck(ping=number)))
            self.pings_waiting = []
            while len(self.pings_sent) > MAX_PINGS:
                del self.pings_sent[next(iter(self.pings_sent))]
        while self.waiting and len(self.unacked) < STREAM_WINDOW:
            pending = self.waiting.popleft()
            del self.waiting_by_seq[pending.seq]
            self.unacked[pending.seq] = pending
            boxes.append(self._box_for(pending, now))
        return boxes

    def _hello(self, now: float) -> Hello:
        self.hellos += 1
        self.hello_due = now + self.rtt.backed_off(self.hellos)
        return self._stamp(Hello(max_payload=self.max_payload, batch=self.batch))

    def _box_for(self, pending: Pending, now: float) -> Sealed:
        pending.sends += 1
        pending.sent_at = now
        pending.due = now + self.rtt.backed_off(pending.sends)
        box = self._stamp(pending.message)
        pending.counters.append(box.ctr)
        self.counters[box.ctr] = pending.seq
        return box

    def _stamp(self, message: _Box) -> _Box:
        """``message`` with this session's header and the current acknowledgement."""
        self.counter += 1
        self.unacked_in = 0
        self.ack_due = None
        return with_fields(
            message,
            {
                "sid": self.local_sid,
                "rsid": self.remote_sid,
                "ctr": self.counter,
                "ack": self.inbound.cumulative if self.remote_sid is not None else None,
                "sack": self.inbound.sack(),
            },
        )

    # -- receiving --

    def takes(self, box: Sealed) -> bool:
        """Whether :meth:`on_box` would take ``box`` as new (not of an older session of
        the peer's, not replayed), without taking it."""
        if self.remote_sid is None or box.sid > self.remote_sid:
            return isinstance(box, Hello)
        return box.sid == self.remote_sid and self.replay.is_new(box.ctr)

    def on_box(self, box: Sealed, now: float) -> Received:
        """Take a box the peer sealed (opened and decoded)."""
        if self.remote_sid is not None and box.sid < self.remote_sid:
            return Received(dropped="from an earlier session of the peer")
        restarted = None
        if self.remote_sid is None or box.sid > self.remote_sid:
            if not isinstance(box, Hello):
                # A session we have not heard open: the peer takes us for someone we are
                # not (we restarted, or started over); our hello tells it who we are now.
                return Received(replies=self._answer(now), dropped="for a session not opened with us")
            if self.remote_sid is not None:
                restarted = self.start_over(now, renew=False)
            else:
                self.state = next_state(self.state, Move.HELLO)
            self.remote_sid = box.sid
            self.replay = ReplayWindow()
        if not self.replay.accept(box.ctr):
            return Received(dropped="replayed (its counter was seen)", restarted=restarted)
        self.last_heard = now
        self.heard += 1
        if isinstance(box, Hello):
            if box.max_payload is not None:
                self.peer_max_payload = box.max_payload
            self.peer_batch = box.batch
            self.state = next_state(self.state, Move.HELLO)
            self.hello_due = None
            # Answered when the peer does not know our current id, and whenever its hello
            # started a new session where we had one: a peer that started over (keeping
            # our id) waits for this answer before it sends anything.
            renewed = restarted is not None
            replies = self._answer(now, force=renewed) if box.rsid != self.local_sid or renewed else []
            replies += self._flush(now)
            return Received(replies=replies, restarted=restarted)
        if box.rsid != self.local_sid:
            # Sent to an earlier session of ours, before the peer heard our new id.
            return Received(replies=self._answer(now), dropped="for an earlier session of ours")
        received = Received(acked=self._on_ack(box.ack, box.sack, now))
        if isinstance(box, PeerAck):
            if box.ping is not None:
                received.replies.append(self._stamp(PeerAck(pong=box.ping)))
            elif box.probe:
                received.replies.append(self._stamp(PeerAck()))
            sent_at = self.pings_sent.pop(box.pong, None) if box.pong is not None else None
            if box.pong is not None and sent_at is not None:
                received.pong = (box.pong, now - sent_at)
        elif box.seq is not None:
            if self.inbound.receive(box.seq):
                received.message = box
                self.unacked_in += 1
                if self.ack_due is None:
                    self.ack_due = now + ACK_DELAY
            else:
                self.ack_due = now  # a copy we had: our ack was lost, or is late
        if self.unacked_in >= ACK_EVERY:
            received.replies.append(self._stamp(PeerAck()))
        received.replies += self._flush(now)
        return received

    def _answer(self, now: float, *, force: bool = False) -> list[Sealed]:
        if not self.path_up or (now - self.answered_at < ANSWER_GAP and not force):
            return []
        self.answered_at = now
        return [self._stamp(Hello(max_payload=self.max_payload, batch=self.batch))]

    def _on_ack(self, cumulative: int | None, sack: list[int] | None, now: float) -> list[Pending]:
        acked: list[Pending] = []
        if cumulative is None or not self.unacked:
            return acked
        # ``unacked`` is in seq order (sent first, first in): the acknowledged ones lead.
        for seq in list(itertools.takewhile(lambda s: s <= cumulative, self.unacked)):
            acked.append(self.unacked.pop(seq))
        for seq in sack or ():
            pending = self.unacked.pop(seq, None)
            if pending is not None:
                acked.append(pending)
        if acked:
            self.progress_at = now
        for pending in acked:
            for counter in pending.counters:
                self.counters.pop(counter, None)
        once = [p.sent_at for p in acked if p.sends == 1 and p.sent_at is not None]
        if once:
            self.rtt.sample(now - max(once))  # Karn: a re-sent message's ack is ambiguous
        return acked

    # -- time and paths --

    def on_tick(self, now: float) -> list[Sealed]:
        """Send again what is due; a delayed ack; a probe when the peer is silent."""
        if not self.path_up:
            return []
        boxes = self._flush(now)
        if self.state is not State.OPEN:
            return boxes
        for pending in self.unacked.values():
            if pending.due <= now:
                boxes.append(self._box_for(pending, now))
        if self.ack_due is not None and self.ack_due <= now and not boxes:
            boxes.append(self._stamp(PeerAck()))
        probe_due = self._probe_due()
        if probe_due is not None and probe_due <= now:
            # Whatever goes now asks for an answer too (a message is acknowledged
            # within ACK_DELAY): a probe of its own only when nothing else goes.
            self.probe_at = now
            if not boxes:
                boxes.append(self._stamp(PeerAck(probe=True)))
        return boxes

    def probe(self, now: float) -> list[Sealed]:
        """A probe to send now (none before the session is open)."""
        if self.state is not State.OPEN or not self.path_up:
            return []
        self.probe_at = now
        return [self._stamp(PeerAck(probe=True))]

    def _probe_due(self) -> float | None:
        """When to probe a peer silent while we wait on it (None: we do not)."""
        if not self.awaiting or self.state is not State.OPEN:
            return None
        return max(-1e9 if self.last_heard is None else self.last_heard, self.probe_at) + KEEPALIVE

    def next_deadline(self) -> float | None:
        if not self.path_up:
            return None
        times = [p.due for p in self.unacked.values()]
        if self.ack_due is not None:
            times.append(self.ack_due)
        if self.state is State.HELLO_SENT and self.hello_due is not None:
            times.append(self.hello_due)
        probe_due = self._probe_due()
        if probe_due is not None:
            times.append(probe_due)
        return min(times) if times else None

    def set_path(self, up: bool, now: float) -> list[Sealed]:
        """The peer's current path came up (or changed) or went down. On a new path,
        everything unacknowledged goes again now: what was in flight on the old one may
        be lost with it."""
        self.path_up = up
        if not up:
            return []
        if self.state is State.HELLO_SENT:
            self.hello_due = None
        for pending in self.unacked.values():
            pending.due = now
        return self.on_tick(now)

    @property
    def outstanding(self) -> bool:
        return bool(self.unacked or self.waiting or self.awaiting or self.state is State.HELLO_SENT)

    def start_over(self, now: float, *, renew: bool = True) -> tuple[list[Pending], list[Pending]]:
        """End both streams; return what was sent (the peer may have it) and what never
        was. ``renew``: this side gives the peer up and takes a new session id (the
        peer's is kept as a floor); else the peer started a new session, and the new pair
        of ids already tells the new streams from the old."""
        sent, unsent = list(self.unacked.values()), list(self.waiting)
        self.state = next_state(self.state, Move.STARTED_OVER if renew else Move.PEER_RESTARTED)
        if renew:
            # Counters are per session id: the peer keeps a replay window for each.
            self.local_sid = max(self._new_sid(), self.local_sid + 1)
            self.counter = 0
        self.next_seq = 1
        self.unacked = {}
        self.waiting = deque()
        self.waiting_by_seq = {}
        self.counters = {}
        self.inbound = ReceiveWindow()
        self.unacked_in = 0
        self.ack_due = None
        self.hello_due = None
        self.hellos = 0
        self.answered_at = -1e9
        self.awaiting = False
        return sent, unsent


def with_fields(message: _Box, fields: dict[str, Any]) -> _Box:
    """A copy of ``message`` with ``fields`` changed. ``dataclasses.replace`` builds the
    copy through ``__init__`` with every field: two of those per box were a third of the
    session's own time per job (measured). The messages are frozen dataclasses with no
    ``__post_init__``, and the fields set here are header fields, so copying the
    instance's dict makes the same object in a fraction of the time."""
    copy = object.__new__(type(message))
    copy.__dict__.update(message.__dict__)
    copy.__dict__.update(fields)
    return copy
