"""Hole-punch coordination, sans-IO: when and how two nodes try a direct TCP link.

It follows libp2p's DCUtR over the relayed session: the initiator sends ``punch
{stage: connect}`` with its candidates (the TCP address the relay observes for its relay
connection, its NAT type) and notes the time; the responder answers with its own; the
initiator, now knowing the relayed round trip, sends ``punch {stage: sync}`` and dials
RTT/2 later, while the responder dials when the sync arrives. Both dial *from* the local
port of their relay connection (the one the relay observed) *to* the other's observed
address, at about the same moment: a TCP simultaneous open, which the NATs on both sides
let through because each saw its own side's SYN go out first (NAT-LAB.md: 50 of 50
between port-restricted NATs, and with one side seconds late).

Rules both sides compute alike, so no message decides them:

- The initiator is the side that wanted the link; if both did at once, the smaller peer id.
- The CurveZMQ server of the link is the side with the smaller peer id (exactly one
  side must be: both or neither delivered nothing, NAT-LAB).
- Pairs that cannot work are not tried: symmetric with symmetric or port-restricted
  (a symmetric NAT maps the punch to a port nobody predicted).
- Behind one NAT (the same public IP) the punch cannot work (no hairpinning): those
  pairs stay relayed, logged, until the LAN path exists.

What a peer tells is its own word, and the relay's is the only other: a node dials only
what the relay vouches for. It asks the relay where it sees the peer when it offers or
answers an offer (``AskRelay``; the relay's ``peers`` answer, one entry), and at the
moment to dial it checks the plan's address against that: a punch goes only to the
address the relay observes for the peer, a listener only on the peer's public IP as the
relay sees it, a LAN address only when both share one public address; loopback and
link-local addresses only when both nodes are on one host. Dials, all peers together, take tokens from one
bucket (``DIAL_RATE`` a second after a burst of ``DIAL_BURST``), and a target address
whose dial failed waits longer each time before the next (``TARGET_BACKOFF_MAX``): a
mesh of peers, or a relay, cannot make a node a port scanner.

Failure has no signal (a dropped SYN is silence), so an attempt that is not up within
``PUNCH_TIMEOUT`` of its dial is abandoned (and ``RenewPort`` asks for a fresh local port
for the next: a failed dial can spoil its ports' NAT mappings), and the next waits
``RETRY_BACKOFF``; after ``MAX_ATTEMPTS`` the peer stays relayed for ``RETRY_LATER``
before it is tried again. A direct link that dies is reported down by the I/O layer,
and an upgrade is tried again after ``REUPGRADE_AFTER``.

It takes ``now`` and returns events; :class:`actors.direct_links.DirectLinks` carries out
``Dial``/``Abandon``, and the session carries ``SendPunch`` as a sealed message.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from meshnet.endpoints import host_port
from meshnet.protocol.messages import Punch
from meshnet.ratelimit import TokenBucket

#: From dialling to a link that answered: a few round trips and a SYN retransmit on a
#: real network (a lab link answers in 2-4 ms).
PUNCH_TIMEOUT = 5.0
#: The wait after each failed attempt, before the next; after MAX_ATTEMPTS failed in a
#: row, RETRY_LATER.
RETRY_BACKOFF = (1.0, 4.0)
MAX_ATTEMPTS = 3
#: After MAX_ATTEMPTS failures, the peer stays relayed this long before another try.
RETRY_LATER = 300.0
#: After a direct link died, the peer is tried again this much later.
REUPGRADE_AFTER = 10.0
#: The initiator's dial waits half the relayed round trip, at most this (a slow relay
#: should not hold the punch back for long; the NATs tolerate seconds of skew).
MAX_SYNC_WAIT = 1.0
#: Offers from one peer closer together than this are ignored: a peer offers again only
#: after an attempt failed (RETRY_BACKOFF, at least 1 s) or its link died, so one that
#: offers faster is broken or hostile, and each offer would make this node dial.
MIN_OFFER_GAP = 0.5
#: Peers whose last offer time is kept (for MIN_OFFER_GAP), most recent first.
MAX_OFFER_TIMES = 4096
#: The answer to a connect, or the sync, that does not come within this is given up
#: (the relay lost it, or the peer is gone): a failed attempt.
ANSWER_TIMEOUT = 10.0
#: Dials of all attempts together: a bucket of DIAL_BURST tokens, refilled at DIAL_RATE a
#: second. A node's own attempts need one dial each (a peer's are paced by MIN_OFFER_GAP and
#: RETRY_BACKOFF); a dial that would wait for a token past PUNCH_TIMEOUT is not made, and
#: its attempt fails (retried with backoff).
DIAL_RATE = 2.0
DIAL_BURST = 8
#: After a dial to an address fails, the next to it waits 1 s, then 2, 4, ... up to this.
TARGET_BACKOFF_MAX = 300.0
#: Target addresses whose failures are remembered; past it the oldest are forgotten.
MAX_TARGETS = 4096
#: After this node's relay address changed, attempts under way start again this much later
#: (a relay that makes a node register again and again draws no burst of new attempts).
RESTART_DELAY = RETRY_BACKOFF[0]

#: NAT types whose hosts a peer can simply dial, at their listener's public address.
REACHABLE = {"open", "full_cone"}
#: NAT types (meshnet.natcheck) a direct TCP punch between them cannot get through.
HOPELESS = {
    frozenset({"symmetric"}),
    frozenset({"symmetric", "port_restricted"}),
}


def is_ip_port(text: str) -> bool:
    """``text`` is IP:PORT (an IPv6 address in brackets): what a peer may make us dial."""
    parsed = host_port(text)
    if parsed is None:
        return False
    try:
        ipaddress.ip_address(parsed[0])
    except ValueError:
        return False
    return True


def address_ip(address: str) -> str:
    """The IP of an ``IP:PORT`` address as the relay writes it (an IPv6 one stays in its
    brackets): a node's public IP, from the address the relay observed."""
    return address.rsplit(":", 1)[0]


def behind_one_nat(mine: Candidates, theirs: Candidates) -> bool:
    """Both nodes reach the relay from one public IP: behind one NAT, or one host."""
    return bool(mine.observed) and address_ip(mine.observed) == address_ip(theirs.observed)


class Stage(Enum):
    IDLE = "idle"
    #: We sent connect, and wait for the answer.
    OFFERED = "offered"
    #: We answered a connect, and wait for the sync.
    ANSWERED = "answered"
    #: Our dial is scheduled (the initiator waits RTT/2).
    SYNCING = "syncing"
    DIALING = "dialing"
    DIRECT = "direct"
    #: Waiting for ``next_at`` before another attempt.
    BACKOFF = "backoff"
    #: Not tried: the NAT types say it cannot work, or both sit behind one NAT.
    RELAYED = "relayed"


#: Stages of an attempt whose messages told the peer this node's candidates.
UNDER_WAY = (Stage.OFFERED, Stage.ANSWERED, Stage.SYNCING, Stage.DIALING)


@dataclass(frozen=True)
class Candidates:
    """What a node tells a peer about how to reach it directly."""

    #: The TCP address the relay observes for this node's relay connection ("" unknown).
    observed: str = ""
    #: Its NAT type as meshnet.natcheck tells it (None: not known yet).
    nat: str | None = None
    #: Its direct listener: as the internet reaches it (public IP, the listener's port),
    #: and on its own network ("" none).
    listen: str = ""
    lan: str = ""
    #: A dial to a listener failed between this pair (a NAT that STUN calls full cone,
    #: but that forwards no port its host never sent from): plan a simultaneous open.
    listeners_failed: bool = False


@dataclass(frozen=True)
class SendPunch:
    peer: str
    message: Punch


@dataclass(frozen=True)
class Dial:
    """Open attempt ``attempt`` to ``peer``: connect from the relay connection's local port
    to ``remote``; be the link's CurveZMQ server if ``curve_server`` (a simultaneous open;
    a dial to a listener is always its client)."""

    peer: str
    attempt: int
    remote: str
    curve_server: bool


@dataclass(frozen=True)
class Expect:
    """Attempt ``attempt``: ``peer`` dials this node's listener; admit its key there."""

    peer: str
    attempt: int


@dataclass(frozen=True)
class Abandon:
    """Close attempt ``attempt`` to ``peer`` (it failed, or was superseded)."""

    peer: str
    attempt: int
    reason: str


@dataclass(frozen=True)
class PathChange:
    """The direct link to ``peer`` is up (``up``) or gone: move its path. ``path`` is the
    session's name for it: ``lan`` for two nodes behind one NAT, else ``direct``."""

    peer: str
    up: bool
    reason: str
    path: str = "direct"


@dataclass(frozen=True)
class RenewPort:
    """A dial failed: the next attempt should start from a fresh local port, with the
    NAT mapping the relay observes for it. The failed attempt's mappings may be spoiled:
    a SYN the far NAT did not expect can leave an entry there that takes the tuple, so
    its SYNs from the same port go out under another port nobody predicted (NAT-LAB)."""

    reason: str


@dataclass(frozen=True)
class AskRelay:
    """Ask the relay where it sees ``peer`` (the address it observes on the peer's relay
    connection); answer with :meth:`PunchCoordinator.on_vouched`."""

    peer: str


@dataclass(frozen=True)
class PunchNotice:
    event: str
    fields: dict[str, Any]


PunchEvent = SendPunch | Dial | Expect | Abandon | PathChange | RenewPort | AskRelay | PunchNotice


@dataclass
class PeerPunch:
    stage: Stage = Stage.IDLE
    #: The attempt under way or last made (numbered by its initiator).
    attempt: int = 0
    initiator: bool = False
    #: When the connect was sent (initiator), for the round trip.
    sent_at: float = 0.0
    rtt: float | None = None
    #: When the current stage times out, or the scheduled dial / retry is due.
    due: float | None = None
    failures: int = 0
    theirs: Candidates = field(default_factory=Candidates)
    #: Our candidates as we told them for this attempt (both sides plan from what was
    #: exchanged, not from what either learned since), and the plan made from both.
    told: Candidates = field(default_factory=Candidates)
    plan: tuple[str, str] = ("no", "")
    #: What the link is (PathChange.path): "lan" when both sit behind one NAT.
    link: str = "direct"
    why: str = ""
    #: When the punch was decided (initiator: the connect; responder: the answer), for
    #: "decide to punch -> direct" figures.
    decided_at: float = 0.0
    #: How many of the peer's offers came too soon after the one before.
    offers_ignored: int = 0
    #: An attempt that dialled a listener (ours or the peer's) failed: later attempts
    #: with this peer punch instead.
    listener_failed: bool = False
    #: The address this attempt dialled ("" none yet); and, while it waits to dial (for the
    #: relay's word, a token or a target's backoff), when it gives up waiting.
    dialled: str = ""
    dial_by: float | None = None


class PunchCoordinator:
    def __init__(self, peer_id: str, *, enabled: bool = True):
        self.peer_id = peer_id
        #: False: this node makes no direct links, and declines the peers' offers.
        self.enabled = enabled
        self.mine = Candidates()
        #: Whether ``mine`` is complete: this node offers nothing before it knows its NAT
        #: type (or knows it will not), so that a hopeless pair is never tried.
        self.final = False
        self.peers: dict[str, PeerPunch] = {}
        #: Peers jobs went to or came from: offered a punch once this node is ready.
        self.wanted: set[str] = set()
        #: Offers that came while this node had no observed address (its relay link was
        #: registering again): answered once it has one, by peer: (attempt, candidates).
        self.deferred: dict[str, tuple[int, Candidates, float]] = {}
        #: When each peer's last offer was taken (kept apart from ``peers``, which a
        #: peer's new session clears): offers closer than MIN_OFFER_GAP are ignored.
        self.offered_at: OrderedDict[str, float] = OrderedDict()
        self._attempts = 0
        #: Where the relay sees each peer, as it last said (""): it knows none), asked when
        #: an attempt starts; None while its answer is awaited.
        self.vouched: dict[str, str | None] = {}
        #: Dials of all attempts together (DIAL_RATE after DIAL_BURST).
        self.dials = TokenBucket(DIAL_RATE, DIAL_BURST)
        #: Target address -> (dials to it that failed in a row, when the next may go).
        self.targets: OrderedDict[str, tuple[int, float]] = OrderedDict()

    # -- inputs --

    def set_candidates(self, candidates: Candidates, now: float, *, final: bool = True) -> list[PunchEvent]:
        """This node's own candidates changed (registered; NAT classified). ``final``:
        nothing more is coming (the NAT type is known, or will not be): the peers wanted
        meanwhile, and those left relayed for what the old candidates said, are offered
        a punch now."""
        self.mine, self.final = candidates, final
        events: list[PunchEvent] = []
        for peer, state in self.peers.items():
            if state.stage is Stage.RELAYED:
                state.stage = Stage.IDLE
            elif state.stage in UNDER_WAY and state.told.observed != candidates.observed:
                # Told the peer an address this node no longer dials from (its relay
                # connection moved): the attempt cannot work; it starts again, uncounted,
                # a little later (a relay that makes this node register again and again
                # draws no burst of attempts).
                if state.stage is Stage.DIALING:
                    events.append(Abandon(peer, state.attempt, "this node's relay port changed"))
                    self._target_failed(state, now)
                state.stage, state.due = Stage.BACKOFF, now + RESTART_DELAY
                state.why = "this node's relay address changed"
        if candidates.observed:
            deferred, self.deferred = self.deferred, {}
            for peer, (attempt, theirs, at) in deferred.items():
                if now - at < ANSWER_TIMEOUT:  # else its initiator has given it up
                    events += self._on_offer(peer, self._state(peer), attempt, theirs, now)
        for peer in sorted(self.wanted):
            events += self.want(peer, now)
        return events

    def want(self, peer: str, now: float) -> list[PunchEvent]:
        """Jobs go between us and ``peer``: try a direct link if none is up or under way.
        Called for every job: nothing changes (no deadline either) when it returns []."""
        if not self.enabled:
            return []
        self.wanted.add(peer)
        state = self._state(peer)
        if state.stage is not Stage.IDLE or not self.mine.observed or not self.final:
            return []
        return self._offer(peer, state, now)

    def _state(self, peer: str) -> PeerPunch:
        # Not setdefault(peer, PeerPunch()): want() runs for every job, and a PeerPunch
        # made to be thrown away costs a few microseconds each time.
        state = self.peers.get(peer)
        if state is None:
            state = self.peers[peer] = PeerPunch()
        return state

    def on_punch(self, peer: str, message: Punch, now: float) -> list[PunchEvent]:
        state = self._state(peer)
        theirs = Candidates(
            message.observed or "", message.nat, message.listen or "", message.lan or "", bool(message.punch)
        )
        ours = state.initiator and state.attempt == message.attempt
        if message.stage == "connect":
            if now - self.offered_at.get(peer, float("-inf")) < MIN_OFFER_GAP:
                state.offers_ignored += 1
                if state.offers_ignored & (state.offers_ignored - 1):
                    return []  # logged at the 1st, 2nd, 4th, 8th, ... only
                why = f"offers come faster than one per {MIN_OFFER_GAP:g} s"
                return [PunchNotice("punch_offer_ignored", {"peer": peer, "why": why, "ignored": state.offers_ignored})]
            self.offered_at[peer] = now
            self.offered_at.move_to_end(peer)
            while len(self.offered_at) > MAX_OFFER_TIMES:
                self.offered_at.popitem(last=False)
            if self.enabled and not self.mine.observed:
                self.deferred[peer] = (message.attempt, theirs, now)
                return []
            return self._on_offer(peer, state, message.attempt, theirs, now)
        if message.stage == "answer":
            return self._on_answer(peer, state, theirs, now) if ours and state.stage is Stage.OFFERED else []
        if message.stage == "sync":
            if state.stage is Stage.ANSWERED and message.attempt == state.attempt and not state.initiator:
                return self._dial(peer, state, now)
            return []
        if message.stage == "refuse" and ours and state.stage is Stage.OFFERED:
            return self._give_up(peer, state, message.reason or "the peer declined")
        return []

    def on_vouched(self, peer: str, observed: str | None, now: float) -> list[PunchEvent]:
        """The relay's answer to :class:`AskRelay`: where it sees ``peer`` ("" or None: it
        knows no address of it, or did not answer). An attempt waiting for it dials now,
        or fails saying why not."""
        if peer not in self.vouched:
            return []  # not asked (the attempt ended, or its peer's session did)
        self.vouched[peer] = observed or ""
        state = self.peers.get(peer)
        if state is None or state.stage is not Stage.SYNCING or state.dial_by is None:
            return []
        return self._dial(peer, state, now)

    def on_link_up(self, peer: str, attempt: int, now: float) -> list[PunchEvent]:
        """A link of attempt ``attempt`` is up. A listening side takes it whenever the
        attempt admits the peer: a dialler may connect as soon as the sync leaves or
        reaches it, before this side's own moment (or before its sync arrives here)."""
        state = self.peers.get(peer)
        early = state is not None and state.plan[0] == "listen" and state.stage in (Stage.ANSWERED, Stage.SYNCING)
        if state is None or state.attempt != attempt or not (state.stage is Stage.DIALING or early):
            return [Abandon(peer, attempt, "superseded")]
        self.targets.pop(state.dialled, None)
        state.stage, state.due, state.failures = Stage.DIRECT, None, 0
        took_ms = round((now - state.decided_at) * 1000, 1)
        return [
            PathChange(peer, True, "hole punched" if state.plan[0] == "punch" else "dialled", state.link),
            PunchNotice("direct_link_up", {"peer": peer, "attempt": attempt, "ms_since_decided": took_ms}),
        ]

    def on_link_down(self, peer: str, attempt: int, reason: str, now: float) -> list[PunchEvent]:
        state = self.peers.get(peer)
        if state is None or state.attempt != attempt:
            return []
        if state.stage is Stage.DIRECT:
            state.stage, state.due, state.why = Stage.BACKOFF, now + REUPGRADE_AFTER, reason
            return [
                PathChange(peer, False, reason, state.link),
                PunchNotice("direct_link_down", {"peer": peer, "reason": reason}),
            ]
        if state.stage is Stage.DIALING:
            return self._fail(peer, state, reason, now)
        return []

    def on_peer_gone(self, peer: str) -> list[PunchEvent]:
        """The peer's session ended (it restarted, or is gone): forget the attempt; a
        direct link to it goes down with a reason."""
        self.wanted.discard(peer)
        self.deferred.pop(peer, None)
        self.vouched.pop(peer, None)
        state = self.peers.pop(peer, None)
        if state is None or state.stage in (Stage.IDLE, Stage.BACKOFF, Stage.RELAYED):
            return []
        events: list[PunchEvent] = [Abandon(peer, state.attempt, "the peer's session ended")]
        if state.stage is Stage.DIRECT:
            events.append(PathChange(peer, False, "the peer's session ended", state.link))
        return events

    def on_tick(self, now: float) -> list[PunchEvent]:
        events: list[PunchEvent] = []
        for peer, state in list(self.peers.items()):
            if state.due is None or state.due > now:
                continue
            if state.stage is Stage.SYNCING:
                events += self._dial(peer, state, now)
            elif state.stage is Stage.BACKOFF:
                state.stage, state.due = Stage.IDLE, None
                events += self.want(peer, now)
            elif state.stage in (Stage.OFFERED, Stage.ANSWERED):
                events += self._fail(peer, state, "no answer through the relay", now)
            elif state.stage is Stage.DIALING:
                events += self._fail(peer, state, f"not connected within {PUNCH_TIMEOUT:g} s", now)
        return events

    def next_deadline(self) -> float | None:
        dues = [s.due for s in self.peers.values() if s.due is not None]
        return min(dues) if dues else None

    def describe(self, peer: str) -> dict[str, Any]:
        """The state of the direct link to ``peer``, for ``meshnet status``."""
        state = self.peers[peer]
        return {
            "stage": state.stage.value,
            "attempt": state.attempt,
            "rtt_ms": round(state.rtt * 1000, 1) if state.rtt is not None else None,
            "why": state.why or None,
        }

    def is_direct(self, peer: str) -> bool:
        """Whether a direct link to ``peer`` is up (its name: :meth:`link`)."""
        state = self.peers.get(peer)
        return state is not None and state.stage is Stage.DIRECT

    def link(self, peer: str) -> str:
        """The session's name for a direct link to ``peer``: ``lan`` or ``direct``."""
        state = self.peers.get(peer)
        return state.link if state is not None else "direct"

    def remote(self, peer: str) -> str | None:
        """The peer's end of the direct link: the address dialled, or, for a peer that
        dialled us, the address it said it dials from (its LAN or observed one)."""
        if not self.is_direct(peer):
            return None
        state = self.peers[peer]
        how, address = state.plan
        if how != "listen":
            return address
        return (state.theirs.lan if state.link == "lan" else state.theirs.observed) or None

    # -- internals --

    def _plan(self, peer: str, mine: Candidates, theirs: Candidates) -> tuple[str, str]:
        """How this pair connects, computed alike on both sides from the candidates they
        exchanged: ("dial", address) to a listener of the peer's, ("listen", "") for the
        peer to dial ours, ("punch", address) for a simultaneous open, or ("no", why)."""
        if not theirs.observed or not mine.observed:
            return "no", "an observed address is missing"
        for address in (theirs.observed, theirs.listen, theirs.lan):
            if address and not is_ip_port(address):
                return "no", f"the peer's address {address[:64]!r} is not IP:PORT"
        first = self.peer_id < peer
        if behind_one_nat(mine, theirs):
            # Behind one NAT: no hairpinning, but the LAN reaches; the smaller id listens.
            if mine.lan and theirs.lan:
                return ("listen", "") if first else ("dial", theirs.lan)
            return "no", "both behind one NAT (no hairpinning), and no LAN listener"
        # After a listener did not answer, a simultaneous open, unless a symmetric NAT
        # rules that out (then the listener again: it may answer this time).
        punchable = "symmetric" not in (mine.nat, theirs.nat)
        dial_listeners = not (mine.listeners_failed or theirs.listeners_failed) or not punchable
        me_reachable = dial_listeners and mine.nat in REACHABLE and bool(mine.listen)
        them_reachable = dial_listeners and theirs.nat in REACHABLE and bool(theirs.listen)
        if them_reachable and (not me_reachable or not first):
            return "dial", theirs.listen
        if me_reachable:
            return "listen", ""
        if frozenset({mine.nat, theirs.nat}) in HOPELESS or "symmetric" in (mine.nat, theirs.nat):
            # A symmetric NAT maps the punch to a port nobody predicted: only a listener
            # the other side can reach helps (above).
            return "no", f"NAT types {mine.nat} and {theirs.nat} cannot be punched through"
        return "punch", theirs.observed

    def _offer(self, peer: str, state: PeerPunch, now: float) -> list[PunchEvent]:
        self._attempts += 1
        state.attempt = self._attempts
        state.initiator = True
        state.told = replace(self.mine, listeners_failed=state.listener_failed)
        state.stage, state.sent_at, state.decided_at = Stage.OFFERED, now, now
        state.due = now + ANSWER_TIMEOUT
        state.dialled, state.dial_by = "", None
        # The relay's word on the peer's address now: in well before the answer, which
        # checks it (and asks again if the peer has moved since).
        return [SendPunch(peer, self._message("connect", state)), *self._ask_relay(peer)]

    def _on_answer(self, peer: str, state: PeerPunch, theirs: Candidates, now: float) -> list[PunchEvent]:
        """The answer to our offer: sync, and dial half a round trip later. A listening
        side admits the peer at once: its dial may come before our own moment."""
        state.theirs = theirs
        state.plan = self._plan(peer, state.told, theirs)
        state.link = "lan" if behind_one_nat(state.told, theirs) else "direct"
        if state.plan[0] == "no":
            return self._give_up(peer, state, state.plan[1])
        state.rtt = now - state.sent_at
        state.stage = Stage.SYNCING
        state.due = now + min(state.rtt / 2, MAX_SYNC_WAIT)
        # A listening side admits the peer; a dialling one has the relay's word on where
        # it sees the peer (asked with the offer), or asks again if the peer's address is
        # not that (it moved meanwhile): the answer, half a relayed round trip, is in by
        # the dial, or the dial waits for it.
        events: list[PunchEvent] = []
        if state.plan[0] == "listen":
            events.append(Expect(peer, state.attempt))
        elif self.vouched.get(peer) != theirs.observed:
            events += self._ask_relay(peer)
        return events + [SendPunch(peer, self._message("sync", state))]

    def _on_offer(self, peer: str, state: PeerPunch, attempt: int, theirs: Candidates, now: float) -> list[PunchEvent]:
        """The peer offers a punch: answer it (or say why not) and wait for its sync."""
        events: list[PunchEvent] = []
        leading = state.initiator and state.stage in (Stage.OFFERED, Stage.SYNCING, Stage.DIALING)
        if leading and self.peer_id < peer:
            # Both offered at once: the smaller peer id stays the initiator (the peer
            # gives way when our offer reaches it).
            return []
        if leading and state.stage is Stage.OFFERED:
            events.append(PunchNotice("punch_crossed", {"peer": peer, "initiator": peer}))
        elif state.stage in (Stage.DIALING, Stage.SYNCING, Stage.DIRECT):
            # A new attempt from the peer replaces ours (it saw the old one fail).
            events.append(Abandon(peer, state.attempt, "the peer started a new attempt"))
            if state.stage is Stage.DIRECT:
                events.append(PathChange(peer, False, "the peer started a new attempt", state.link))
        state.attempt, state.initiator, state.theirs = attempt, False, theirs
        state.told = replace(self.mine, listeners_failed=state.listener_failed)
        state.decided_at = now
        disabled = ("no", "direct links are off on the peer")
        state.plan = self._plan(peer, state.told, theirs) if self.enabled else disabled
        state.link = "lan" if behind_one_nat(state.told, theirs) else "direct"
        if state.plan[0] == "no":
            events += self._give_up(peer, state, state.plan[1])
            return events + [SendPunch(peer, self._message("refuse", state, state.plan[1]))]
        state.stage, state.due = Stage.ANSWERED, now + ANSWER_TIMEOUT
        state.dialled, state.dial_by = "", None
        if state.plan[0] == "listen":  # admitted before our answer leaves: its dial may be quick
            events.append(Expect(peer, attempt))
        else:  # the relay's word on the peer's address, in by the time the sync is
            events += self._ask_relay(peer)
        return events + [SendPunch(peer, self._message("answer", state))]

    def _dial(self, peer: str, state: PeerPunch, now: float) -> list[PunchEvent]:
        """The moment to connect: dial (a listening side already admits the peer), if the
        relay vouches for the address, and the dial bucket and the target's backoff allow
        it; else wait for those (in SYNCING) until ``dial_by``, or fail saying why."""
        how, remote = state.plan
        if how == "listen":
            state.stage, state.due = Stage.DIALING, now + PUNCH_TIMEOUT
            return []
        if state.dial_by is None:
            state.dial_by = now + PUNCH_TIMEOUT
        vouched = self.vouched.get(peer)
        if vouched is None:
            if now >= state.dial_by:
                return self._fail(peer, state, self._dial_wait_why(peer), now)
            state.stage, state.due = Stage.SYNCING, state.dial_by  # on_vouched dials
            return [] if peer in self.vouched else self._ask_relay(peer)
        if not vouched:
            # No word (the relay did not answer, or knows the peer at no address now):
            # a failed attempt, tried again after its backoff.
            return self._fail(peer, state, "the relay knows no address of the peer now", now)
        why = self._unvouched(state, vouched)
        if why:
            return self._give_up(peer, state, why)
        wait = self._dial_wait(remote, now)
        if wait > 0:
            if now + wait > state.dial_by:
                return self._fail(peer, state, self._dial_wait_why(peer, remote), now)
            state.stage, state.due = Stage.SYNCING, now + wait
            return []
        self.dials.take(now)
        state.stage, state.due, state.dialled = Stage.DIALING, now + PUNCH_TIMEOUT, remote
        return [Dial(peer, state.attempt, remote, curve_server=how == "punch" and self.peer_id < peer)]

    def _ask_relay(self, peer: str) -> list[PunchEvent]:
        self.vouched[peer] = None
        return [AskRelay(peer)]

    def _unvouched(self, state: PeerPunch, vouched: str) -> str:
        """Why the plan's address is not one this node may dial ("" when it is): the relay
        sees the peer at ``vouched``."""
        how, remote = state.plan
        peer_ip, target_ip = address_ip(vouched), address_ip(remote)
        if how == "punch":
            vouches = remote == vouched
        elif remote == state.theirs.lan and state.link == "lan":
            vouches = peer_ip == address_ip(state.told.observed)  # both behind one public IP
        else:
            vouches = target_ip == peer_ip  # a listener on the peer's own public IP
        if not vouches:
            return f"the peer's address {remote} is not where the relay sees it ({vouched})"
        ip = ipaddress.ip_address(target_ip.strip("[]"))
        if ip.is_unspecified or ip.is_multicast or ip.is_reserved or str(ip) == "255.255.255.255":
            return f"{remote} is not an address to dial"
        if ip.is_loopback or ip.is_link_local:
            mine = state.told
            one_host = (
                peer_ip == address_ip(mine.observed)
                and bool(mine.lan)
                and address_ip(state.theirs.lan) == address_ip(mine.lan) == target_ip
            )
            if not one_host:
                return f"{remote} is a loopback or link-local address, and the peer is not on this host"
        return ""

    def _dial_wait(self, remote: str, now: float) -> float:
        """Seconds until a dial to ``remote`` may go: the bucket's next token, and the
        target's backoff after failed dials (0: now; the token is taken by the caller)."""
        wait = self.dials.wait(now)
        backoff = self.targets.get(remote)
        if backoff is not None:
            wait = max(wait, backoff[1] - now)
        return wait

    def _dial_wait_why(self, peer: str, remote: str = "") -> str:
        if self.vouched.get(peer) is None:
            return f"the relay did not say where it sees the peer within {PUNCH_TIMEOUT:g} s"
        backoff = self.targets.get(remote)
        if backoff is not None:
            return f"dials to {remote} failed {backoff[0]} times in a row; the next waits longer"
        return f"too many dials: this node dials at most {DIAL_RATE:g} a second"

    def _target_failed(self, state: PeerPunch, now: float) -> None:
        """The dial of ``state``'s attempt did not come up: its address waits longer."""
        if not state.dialled:
            return
        failures = self.targets.pop(state.dialled, (0, now))[0] + 1
        self.targets[state.dialled] = (failures, now + min(TARGET_BACKOFF_MAX, 2.0 ** (failures - 1)))
        while len(self.targets) > MAX_TARGETS:
            self.targets.popitem(last=False)
        state.dialled = ""

    def _fail(self, peer: str, state: PeerPunch, reason: str, now: float) -> list[PunchEvent]:
        state.failures += 1
        if state.failures >= MAX_ATTEMPTS:
            wait, state.failures = RETRY_LATER, 0
        else:
            wait = RETRY_BACKOFF[state.failures - 1]
        dialing = state.stage is Stage.DIALING
        timed_out = dialing and state.due is not None and now >= state.due
        if timed_out and state.plan[0] in ("dial", "listen") and state.link == "direct":
            # No answer from the listener (not a refused handshake): the next attempt
            # punches, and says so to the peer; listeners are tried again after RETRY_LATER.
            state.listener_failed = True
        if wait == RETRY_LATER:
            state.listener_failed = False
        punched = state.plan[0] == "punch"
        timed_out = timed_out and bool(state.dialled)  # only a dial made can have spoiled a port
        if dialing:
            self._target_failed(state, now)
        state.dial_by = None
        state.stage, state.due, state.why = Stage.BACKOFF, now + wait, reason
        events: list[PunchEvent] = [
            PunchNotice("punch_failed", {"peer": peer, "attempt": state.attempt, "reason": reason, "retry_in_s": wait})
        ]
        if dialing:
            events.insert(0, Abandon(peer, state.attempt, reason))
        if timed_out and punched and state.initiator:
            # Our own punch from the relay connection's port went unanswered: its NAT
            # mappings may be spoiled. Only for attempts this node started (paced by its
            # own backoff): a peer cannot make it move its relay connection at will.
            events.insert(1, RenewPort(f"attempt {state.attempt} to {peer}: {reason}"))
        return events

    def _give_up(self, peer: str, state: PeerPunch, reason: str) -> list[PunchEvent]:
        state.stage, state.due, state.why, state.dial_by = Stage.RELAYED, None, reason, None
        return [PunchNotice("punch_skipped", {"peer": peer, "reason": reason})]

    def _message(self, stage: str, state: PeerPunch, reason: str | None = None) -> Punch:
        mine = state.told
        return Punch(
            stage=stage,
            attempt=state.attempt,
            observed=mine.observed or None,
            nat=mine.nat,
            listen=mine.listen or None,
            lan=mine.lan or None,
            punch=mine.listeners_failed or None,
            reason=reason,
        )
