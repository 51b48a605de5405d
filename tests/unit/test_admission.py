"""What the client API does with a submission, a ping and an answer (meshnet.admission),
without a socket: each refusal's code and text (clients and the integration tests read
them), and which rule wins when several apply."""

from __future__ import annotations

from typing import Any

import pytest

from meshnet.admission import (
    DRAINING,
    NO_RELAY,
    PING_TIMEOUT,
    PING_TIMEOUT_MAX,
    RUN_HERE,
    SEND_TO_PEER,
    Admission,
    Duplicate,
    Refusal,
    client_reply,
    ping_timeout,
)
from meshnet.jobs.model import REFUSED_DRAINING, Outcome
from meshnet.memory_budget import MemoryBudget
from meshnet.node.effects import PeersAnswered, PingAnswered
from meshnet.outbox import Outboxes
from meshnet.protocol import NODE_TO_CLIENT, Error, PeersReply, PingReply, Result, decode, encode
from tests.unit.samples import OTHER_PEER, PEER

SELF = PEER
A, B = b"client-a", b"client-b"
JOB = bytes(range(16))
BUDGET = 1000
MAX_TIMEOUT = 60.0


class Node:
    """An admission over an outbox budget of 1000 bytes and a memory budget of 1000,
    whose one part (``held``) the test sets."""

    def __init__(self) -> None:
        self.held = 0
        self.outboxes = Outboxes(budget=BUDGET)
        self.memory = MemoryBudget(BUDGET)
        self.memory.add_part("answers", lambda: self.held)
        self.admission = Admission(peer_id=SELF, max_timeout=MAX_TIMEOUT, outboxes=self.outboxes, memory=self.memory)

    def submit(
        self,
        *,
        conn: bytes = A,
        job_id: bytes = JOB,
        peer: str | None = None,
        timeout: float = 1.0,
        body: Any = b"\xf6",
        relayed: bool = True,
    ) -> Any:
        return self.admission.decide(conn, job_id, peer, timeout, body, relayed)

    def push_back(self, conn: bytes = A) -> None:
        """``conn`` leaves more than half its budget unread: its new jobs are refused."""
        assert self.outboxes.hold(conn, [b"x"], 600, now=0.0) == "pushed_back"

    def drop(self, conn: bytes = A) -> None:
        """``conn`` was dropped for not reading (nothing of it held any more)."""
        self.outboxes.cut(conn, now=0.0)


@pytest.fixture
def node() -> Node:
    return Node()


# -- each rule alone --


def test_a_job_for_this_node_runs_here_and_is_in_flight_from_then_on(node: Node) -> None:
    assert node.submit() is RUN_HERE
    assert node.admission.in_flight == {JOB}


def test_a_job_for_a_peer_goes_there_when_a_relay_and_the_memory_take_it(node: Node) -> None:
    assert node.submit(peer=OTHER_PEER) is SEND_TO_PEER
    assert node.admission.in_flight == {JOB} and node.memory.refused == 0


def test_an_id_in_flight_is_a_duplicate_error_until_its_job_ends(node: Node) -> None:
    assert node.submit() is RUN_HERE
    duplicate = node.submit(peer=OTHER_PEER)
    assert duplicate == Duplicate(
        f"job {JOB.hex()} is in flight already; its result will come; use a new id for a new job"
    )
    assert duplicate.code == "duplicate"
    assert node.admission.in_flight == {JOB}  # still the first job's
    node.admission.in_flight.discard(JOB)  # its result went out
    assert node.submit() is RUN_HERE


def test_a_draining_node_refuses_every_job_as_the_node_says_it_drains(node: Node) -> None:
    node.admission.draining = True
    assert node.submit() == DRAINING == Refusal("draining", "the node is shutting down and takes no new jobs")
    assert node.submit(peer=OTHER_PEER) == DRAINING
    assert DRAINING.outcome() == REFUSED_DRAINING


def test_a_client_pushed_back_is_refused_busy_with_what_it_has_not_read(node: Node) -> None:
    node.push_back(A)
    expected = Refusal(
        "busy", "this client has not read 600 bytes of answers (api.max_unread_bytes is 1000); read them first"
    )
    assert node.submit(conn=A) == expected
    assert node.submit(conn=A, peer=OTHER_PEER) == expected
    assert node.submit(conn=B) is RUN_HERE  # another client reads: it is not held back


def test_a_dropped_client_is_refused_busy_until_it_reads_again(node: Node) -> None:
    node.drop(A)
    assert node.submit(conn=A) == Refusal(
        "busy",
        "this client stopped reading its answers and they were discarded (api.max_unread_bytes is 1000); "
        "read them first",
    )
    assert node.outboxes.reading_again(A)
    assert node.submit(conn=A) is RUN_HERE


def test_held_answers_below_half_the_budget_do_not_refuse_the_client(node: Node) -> None:
    assert node.outboxes.hold(A, [b"x"], 400, now=0.0) == "held"
    assert node.submit(conn=A) is RUN_HERE


def test_a_timeout_over_the_max_is_invalid_and_the_max_itself_is_not(node: Node) -> None:
    assert node.submit(timeout=90.5) == Refusal("invalid", "timeout 90.5 s exceeds this node's jobs.max_timeout")
    assert node.submit(timeout=61.0, peer=OTHER_PEER) == Refusal(
        "invalid", "timeout 61 s exceeds this node's jobs.max_timeout"
    )
    assert node.submit(timeout=MAX_TIMEOUT) is RUN_HERE


def test_a_job_for_a_peer_without_a_relay_is_refused_no_relay(node: Node) -> None:
    node.held = 5000  # full, but not asked: it would count a refusal, or cut readers
    expected = Refusal("no_relay", "this node has no relay configured, so it cannot reach other peers")
    assert node.submit(peer=OTHER_PEER, relayed=False) == expected == NO_RELAY
    assert not node.admission.in_flight and node.memory.refused == 0


def test_a_job_for_a_peer_that_the_memory_budget_does_not_take_is_refused_busy(node: Node) -> None:
    node.held = 900
    assert node.submit(peer=OTHER_PEER, body=bytes(200)) == Refusal(
        "busy",
        "the node holds 900 bytes (answers 900) and this job brings 200 more "
        "(node.memory_budget_bytes is 1000); try again when its answers are read",
    )
    assert node.memory.refused == 1
    assert node.submit(peer=OTHER_PEER, body=memoryview(bytes(100))) is SEND_TO_PEER  # what fits goes


def test_the_memory_budget_is_asked_to_make_room_before_a_peer_job_is_refused(node: Node) -> None:
    node.held = 900
    asked: list[int] = []

    def relieve(size: int) -> None:  # the answer delivery cuts its slowest readers
        asked.append(size)
        node.held = 0

    node.memory.add_reliever(relieve)
    assert node.submit(peer=OTHER_PEER, body=bytearray(200)) is SEND_TO_PEER
    assert asked == [200] and node.memory.refused == 0


def test_a_job_for_this_node_needs_neither_a_relay_nor_room_in_the_memory_budget(node: Node) -> None:
    node.held = 5000  # the job book checks its own payload budget
    assert node.submit(peer=None, relayed=False, body=bytes(500)) is RUN_HERE
    assert node.memory.refused == 0


def test_a_refused_job_is_not_in_flight_so_its_id_may_come_again(node: Node) -> None:
    assert node.submit(timeout=61.0) == Refusal("invalid", "timeout 61 s exceeds this node's jobs.max_timeout")
    assert not node.admission.in_flight
    assert node.submit() is RUN_HERE


def test_a_refusal_ends_its_job_refused_with_its_code_as_the_reason() -> None:
    outcome = Refusal("busy", "read them first").outcome()
    assert outcome == Outcome.refused("busy", "read them first")
    assert outcome.error == {"type": "Refused", "message": "read them first", "reason": "busy"}


# -- which rule wins --

RULES = ["duplicate", "draining", "unread", "timeout", "no_relay"]


def _all_but(node: Node, lifted: int, *, relayed_rule: str) -> dict[str, Any]:
    """Make every rule from index ``lifted`` on apply; the submission to judge."""
    applies = RULES[lifted:] if relayed_rule == "no_relay" else [*RULES[lifted:-1], "memory"]
    if "duplicate" in applies:
        node.admission.in_flight.add(JOB)
    if "draining" in applies:
        node.admission.draining = True
    if "unread" in applies:
        node.push_back(A)
    if "memory" in applies:
        node.held = 2000
    return {
        "conn": A,
        "peer": OTHER_PEER,
        "timeout": 61.0 if "timeout" in applies else 1.0,
        "relayed": "no_relay" not in applies,
        "body": bytes(10),
    }


@pytest.mark.parametrize("relayed_rule", ["no_relay", "memory"])
@pytest.mark.parametrize(
    ("lifted", "wins"),
    [(0, "duplicate"), (1, "draining"), (2, "busy"), (3, "invalid"), (4, "last")],
)
def test_the_first_rule_in_order_decides(lifted: int, wins: str, relayed_rule: str) -> None:
    node = Node()
    decision = node.submit(**_all_but(node, lifted, relayed_rule=relayed_rule))
    if wins == "duplicate":
        assert isinstance(decision, Duplicate)
    elif wins == "last":
        assert isinstance(decision, Refusal)
        assert decision.code == ("no_relay" if relayed_rule == "no_relay" else "busy")
        assert decision.text.startswith("this node has no relay" if relayed_rule == "no_relay" else "the node holds")
    else:
        assert isinstance(decision, Refusal) and decision.code == wins
        if wins == "busy":
            assert decision.text.startswith("this client has not read")
    # The memory budget is asked last, when nothing else refused: a refusal before it
    # neither counts as its nor makes it cut anyone.
    assert node.memory.refused == (1 if wins == "last" and relayed_rule == "memory" else 0)


# -- messages that did not decode --


def test_an_undecodable_message_without_a_job_id_is_an_error(node: Node) -> None:
    assert node.admission.undecodable("invalid", "bad header", None) == Error(code="invalid", message="bad header")


def test_an_undecodable_submit_ends_its_job_refused(node: Node) -> None:
    reply = node.admission.undecodable("too_large", "body too large", JOB)
    assert reply == Result(
        id=JOB,
        status="refused",
        error={"type": "Refused", "message": "body too large", "reason": "too_large"},
    )


def test_an_undecodable_submit_reusing_an_id_in_flight_is_an_error_naming_it(node: Node) -> None:
    assert node.submit() is RUN_HERE
    reply = node.admission.undecodable("invalid", "bad kind", JOB)
    assert reply == Error(code="invalid", message="bad kind", id=JOB)  # the job in flight keeps its one result


# -- pings and peer queries --


def test_a_ping_of_this_node_itself_is_invalid_even_without_a_relay(node: Node) -> None:
    expected = Refusal("invalid", f"{SELF} is this node's own peer id; name another node's")
    assert node.admission.ping_refusal(SELF, relayed=True) == expected
    assert node.admission.ping_refusal(SELF, relayed=False) == expected


def test_a_ping_of_a_peer_needs_a_relay(node: Node) -> None:
    assert node.admission.ping_refusal(OTHER_PEER, relayed=False) == Refusal(
        "no_relay", "this node has no relay configured, so it reaches no other peers"
    )
    assert node.admission.ping_refusal(OTHER_PEER, relayed=True) is None


def test_a_ping_waits_the_default_or_what_its_client_asked_up_to_the_max() -> None:
    assert ping_timeout(None) == PING_TIMEOUT == 5.0
    assert ping_timeout(2.5) == 2.5
    assert ping_timeout(600.0) == PING_TIMEOUT_MAX == 60.0


def _round_trip(message: Any) -> Any:
    """What the client reads of ``message`` (the reply must be valid on the wire)."""
    return decode(encode(message), NODE_TO_CLIENT, max_body=1024)


def test_a_peers_answer_becomes_a_peers_reply_or_a_no_relay_error() -> None:
    peers = [{"peer": OTHER_PEER, "path": "relay"}]
    assert client_reply(PeersAnswered(None, peers), 7) == PeersReply(peers=peers, seq=7)
    reply = client_reply(PeersAnswered(None, None, "the relay is not connected"), 8)
    assert reply == Error(code="no_relay", message="the relay is not connected", seq=8)
    assert _round_trip(reply) == reply


def test_a_ping_answer_becomes_a_ping_reply_or_an_error() -> None:
    answer = {"rtt": 0.002, "path": "direct", "sent": "relay", "address": "1.2.3.4:5"}
    reply = client_reply(PingAnswered(None, answer), 3, OTHER_PEER)
    assert reply == PingReply(peer=OTHER_PEER, seq=3, **answer)
    failed = client_reply(PingAnswered(None, None, "timed_out", "no pong within 5 s"), 4, OTHER_PEER)
    assert failed == Error(code="timed_out", message="no pong within 5 s", seq=4)


def test_a_round_trip_measured_as_zero_is_still_a_valid_ping_reply() -> None:
    reply = client_reply(PingAnswered(None, {"rtt": 0.0, "path": "lan", "sent": "relay"}), None, OTHER_PEER)
    assert isinstance(reply, PingReply) and reply.rtt == 1e-9
    assert _round_trip(reply) == reply
