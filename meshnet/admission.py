"""What a node's client API decides about what its clients ask, without a socket.

The API (actors/client_api.py) is a shell on the node's job loop: it reads a message,
asks :class:`Admission` what to do with it, and does it. A submission runs here, goes to
a peer, or is refused, and each refusal has a code and a text that clients and tests
read, so the rules live here, where they can be tested one by one and in their order
(tests/unit/test_admission.py) without a ROUTER, a loop or a relay.

The order is the contract:

1. an id in flight already is a ``duplicate`` *error*, never a result: a result under
   that id would be taken for the end of the job in flight;
2. a draining node refuses every job (``draining``);
3. a client pushed back or dropped for leaving its answers unread is refused ``busy``
   until it reads;
4. a timeout over ``jobs.max_timeout`` is ``invalid``;
5. a job for this node runs here (the job book checks its own limits);
6. a job for a peer needs a relay (``no_relay``) and room in the node's memory budget
   (``busy``; asking may make the budget cut the slowest readers first).

Performance: :meth:`Admission.decide` is on the path of every job (some 10k a second).
Admitted jobs get an enum member back, allocated once; only refusals allocate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from meshnet.jobs.model import REFUSED_DRAINING, Outcome
from meshnet.memory_budget import MemoryBudget
from meshnet.node.effects import PeersAnswered, PingAnswered
from meshnet.outbox import Outboxes
from meshnet.protocol import Error, PeersReply, PingReply, Result

#: A ``ping_peer`` without a timeout waits this long for its peer; none waits longer
#: than the max (each holds a timer and an entry on the node until it ends).
PING_TIMEOUT = 5.0
PING_TIMEOUT_MAX = 60.0


class Route(enum.Enum):
    """An admitted job: run it on this node, or send it to the peer it names."""

    HERE = "here"
    PEER = "peer"


# Module constants, compared with ``is``: reading a member off its class (``Route.HERE``)
# is several times slower than reading a global (80 ns against 12 on Python 3.11), once
# per job.
RUN_HERE: Final = Route.HERE
SEND_TO_PEER: Final = Route.PEER


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refuse the job: its one result is ``refused``, with ``code`` as the error's reason
    and ``text`` as its message."""

    code: str
    text: str

    def outcome(self) -> Outcome:
        return Outcome.refused(self.code, self.text)


@dataclass(frozen=True, slots=True)
class Duplicate:
    """The job's id names a job in flight: answer an ``error`` naming that id, never a
    ``result`` (the job in flight keeps its id and its one result)."""

    text: str
    code: ClassVar[str] = "duplicate"


Decision = Route | Refusal | Duplicate

DRAINING = Refusal(REFUSED_DRAINING.reason, REFUSED_DRAINING.message)
NO_RELAY = Refusal("no_relay", "this node has no relay configured, so it cannot reach other peers")


class Admission:
    """The client API's admission rules and the state they read. Loop thread only.

    ``outboxes`` (the answers clients have not read) and ``memory`` (the node's budget)
    belong to the API's answer delivery; this reads them and changes neither, but for
    what :meth:`MemoryBudget.admits` does itself (count a refusal, ask its relievers)."""

    def __init__(self, *, peer_id: str, max_timeout: float, outboxes: Outboxes, memory: MemoryBudget):
        self.peer_id = peer_id
        self.max_timeout = max_timeout
        self.outboxes = outboxes
        self.memory = memory
        #: Ids of the jobs admitted here that have no result yet: a submission reusing
        #: one is a :class:`Duplicate`. The API forgets each when its result goes out.
        self.in_flight: set[bytes] = set()
        #: The node is shutting down: every new job is refused.
        self.draining = False

    def decide(
        self, conn: bytes, job_id: bytes, peer: str | None, timeout: float, body: Any, relayed: bool
    ) -> Decision:
        """What to do with job ``job_id`` submitted on client connection ``conn``, for
        ``peer`` (None: this node) with ``timeout`` (the default applied), payload
        ``body``; ``relayed``: the node has a relay. An admitted job's id is in flight
        from now on, before the shell hands it on (it may end at once)."""
        in_flight = self.in_flight
        if job_id in in_flight:
            return Duplicate(
                f"job {job_id.hex()} is in flight already; its result will come; use a new id for a new job"
            )
        if self.draining:
            return DRAINING
        outboxes = self.outboxes
        if (outboxes.backlogs or outboxes.dropped) and outboxes.refuses(conn):
            return self._unread(conn)
        if timeout > self.max_timeout:
            return Refusal("invalid", f"timeout {timeout:g} s exceeds this node's jobs.max_timeout")
        if peer is None:
            in_flight.add(job_id)
            return RUN_HERE
        if not relayed:
            return NO_RELAY
        memory = self.memory
        if not memory.admits(size := len(memoryview(body))):
            return Refusal("busy", memory.why(size))
        in_flight.add(job_id)
        return SEND_TO_PEER

    def _unread(self, conn: bytes) -> Refusal:
        outboxes = self.outboxes
        unread = (
            f"this client has not read {outboxes.unread(conn)} bytes of answers"
            if outboxes.holds(conn)
            else "this client stopped reading its answers and they were discarded"
        )
        return Refusal("busy", f"{unread} (api.max_unread_bytes is {outboxes.budget}); read them first")

    def undecodable(self, code: str, text: str, ref: bytes | None) -> Error | Result:
        """The answer to a client's message that did not decode, with error ``code`` and
        ``text``; ``ref``: the job id a ``submit`` named, when it could be read."""
        if ref is not None and ref in self.in_flight:
            # Its id is a job in flight: that job keeps its id and its one result.
            return Error(code=code, message=text, id=ref)
        if ref is not None:  # a submit whose job we can name: it gets its terminal status
            return Result(id=ref, status="refused", error=Outcome.refused(code, text).error)
        return Error(code=code, message=text)

    def ping_refusal(self, peer: str, relayed: bool) -> Refusal | None:
        """Why a client's ping of ``peer`` cannot go (None: it can)."""
        if peer == self.peer_id:
            return Refusal("invalid", f"{peer} is this node's own peer id; name another node's")
        if not relayed:
            return Refusal("no_relay", "this node has no relay configured, so it reaches no other peers")
        return None


def ping_timeout(asked: float | None) -> float:
    """How long a ping waits for its peer, given the timeout its client asked (or not)."""
    return min(asked or PING_TIMEOUT, PING_TIMEOUT_MAX)


def client_reply(
    reply: PingAnswered | PeersAnswered, seq: int | None, peer: str = ""
) -> Error | PeersReply | PingReply:
    """The message that answers a client's ping of ``peer`` or peers query (``seq``: its
    request's) with ``reply``, the relay client's answer."""
    if isinstance(reply, PeersAnswered):
        if reply.peers is None:
            return Error(code="no_relay", message=reply.error, seq=seq)
        return PeersReply(peers=reply.peers, seq=seq, more=reply.more, next=reply.next, unmet=reply.unmet)
    if reply.answer is None:
        return Error(code=reply.code, message=reply.why, seq=seq)
    # The wire's rtt is seconds greater than 0: one the clock measured as 0 goes as the least.
    answer = {**reply.answer, "rtt": max(reply.answer["rtt"], 1e-9)}
    return PingReply(peer=peer, seq=seq, **answer)
