"""A node's link to its relay as a state machine: register, heartbeat, detect loss, back off.

Sans-IO: the relay client actor calls it on connect, on every message heard from the
relay and on each heartbeat tick, and carries out what it answers.
"""

from __future__ import annotations

import random
from enum import Enum

#: How many liveness windows a node waits for ``registered`` before it starts over.
REGISTERING_PATIENCE = 3


class LinkState(Enum):
    DISCONNECTED = "disconnected"
    REGISTERING = "registering"
    REGISTERED = "registered"
    #: Another process registered with this node's identity: the relay is not used.
    DISPLACED = "displaced"


class RelayLink:
    def __init__(
        self,
        *,
        heartbeat: float,
        liveness: int,
        backoff_min: float,
        backoff_max: float,
        rng: random.Random | None = None,
    ):
        self.heartbeat = heartbeat
        self.liveness = liveness
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.state = LinkState.DISCONNECTED
        self.failures = 0
        self.last_heard = 0.0
        self.observed = ""
        self.connects = 0
        #: The last heartbeat's round trip (seconds; None before one is answered), and
        #: the heartbeat on its way: (its seq, when it was sent).
        self.rtt: float | None = None
        self._ping: tuple[int, float] | None = None
        self._ping_seq = 0
        self._rng = rng or random.Random()

    @property
    def registered(self) -> bool:
        return self.state is LinkState.REGISTERED

    def connecting(self, now: float) -> None:
        self.state = LinkState.REGISTERING
        self.rtt, self._ping = None, None  # a new connection's round trip is measured anew
        self.last_heard = now
        self.connects += 1

    def on_registered(self, observed: str, heartbeat: float, now: float) -> None:
        """The relay accepted us; follow its heartbeat interval from now on."""
        self.state = LinkState.REGISTERED
        self.failures = 0
        self.observed = observed
        self.heartbeat = heartbeat
        self.last_heard = now

    def on_heard(self, now: float) -> None:
        self.last_heard = now

    def ping(self, now: float) -> int:
        """A heartbeat goes out now: the seq it carries."""
        self._ping_seq += 1
        self._ping = (self._ping_seq, now)
        return self._ping_seq

    def on_pong(self, seq: int, now: float) -> None:
        """The relay answered heartbeat ``seq``: its round trip, if it is the last one sent."""
        if self._ping is not None and self._ping[0] == seq:
            self.rtt, self._ping = now - self._ping[1], None

    def on_not_registered(self, now: float) -> bool:
        """The relay answered that it does not know this node (it restarted, or expired
        us): True when a ``register`` should go out now. Every message the node had
        queued draws the same answer; one ``register`` answers them all (a node once
        sent 36 in 7 ms), so none is sent while one is on its way."""
        if self.state is not LinkState.REGISTERED:
            return False
        self.state = LinkState.REGISTERING
        self.last_heard = now
        return True

    def on_tick(self, now: float) -> str | None:
        """``"lost"`` when the relay has been silent for ``liveness`` beats, ``"ping"``
        when registered and a heartbeat is due, else None."""
        if self.state in (LinkState.DISCONNECTED, LinkState.DISPLACED):
            return None
        patience = self.heartbeat * self.liveness
        if self.state is LinkState.REGISTERING:
            # Connecting or registering: a relay just restarted is busy with every node's
            # handshake at once; giving up and starting over only adds to its work (seen
            # under 2,000 nodes). libzmq keeps reconnecting the socket meanwhile.
            patience *= REGISTERING_PATIENCE
        if now - self.last_heard > patience:
            return "lost"
        return "ping" if self.state is LinkState.REGISTERED else None

    def on_displaced(self) -> None:
        """Another process took this identity's place at the relay: going back would only
        take it again, and be taken from again (the two would flap), so this link stays
        down."""
        self.state = LinkState.DISPLACED

    def on_lost(self) -> float:
        """Mark the link down; return how long to wait before reconnecting: exponential
        in the consecutive failures, capped, with jitter so that nodes that lost the
        same relay do not come back in lockstep."""
        self.state = LinkState.DISCONNECTED
        self.rtt, self._ping = None, None
        delay = min(self.backoff_max, self.backoff_min * 2.0 ** min(self.failures, 32))
        self.failures += 1
        return delay * self._rng.uniform(0.5, 1.0)
