"""The peer-session core (meshnet.session), driven by hand: two cores whose boxes the
test carries from one to the other (encoded and decoded as a node seals them), on a clock
the test sets. Each test is one behaviour that a node's users rely on."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import NODE_TO_NODE, decode_inner, encode_inner
from meshnet.protocol.messages import MAX_SACK, Hello, Job, JobCancel, JobResult, PeerAck, Sealed
from meshnet.session import (
    DEADLINE_GRACE,
    PEER_DOWN_CHECK,
    PEER_SILENCE,
    Execute,
    Notice,
    Ponged,
    SessionCore,
    Settled,
    StopRun,
    Transmit,
)
from meshnet.session.core import Event
from meshnet.session.peer import ACK_DELAY, ACK_EVERY
from meshnet.session.windows import REPLAY_WINDOW, STREAM_WINDOW, ReceiveWindow, ReplayWindow, RoundTrip

A, B = "A", "B"
CLIENT = "client:1"
PAYLOAD = b"p" * 64


def spec(n: int, timeout: float = 30.0, payload: bytes = PAYLOAD) -> JobSpec:
    return JobSpec(id=n.to_bytes(16, "big"), kind="echo", payload=payload, timeout=timeout, origin=CLIENT)


def job_id(n: int) -> bytes:
    return n.to_bytes(16, "big")


def wire(box: Sealed) -> Sealed:
    """``box`` as the peer reads it: encoded and decoded with the node-to-node table."""
    return decode_inner(bytes(encode_inner(box)), NODE_TO_NODE, max_size=1 << 20)


def boxes(events: list[Event], kind: type[Sealed] = Sealed) -> list[Sealed]:
    return [e.box for e in events if isinstance(e, Transmit) and isinstance(e.box, kind)]


def settled(events: list[Event]) -> list[Settled]:
    return [e for e in events if isinstance(e, Settled)]


def executed(events: list[Event]) -> list[bytes]:
    return [e.job.id for e in events if isinstance(e, Execute)]


def stopped(events: list[Event]) -> list[bytes]:
    return [e.job_id for e in events if isinstance(e, StopRun)]


def statuses(events: list[Event]) -> dict[bytes, list[str]]:
    out: dict[bytes, list[str]] = {}
    for event in settled(events):
        out.setdefault(event.job.id, []).append(event.outcome.status)
    return out


def never(box: Sealed) -> bool:
    return False


def other(name: str) -> str:
    return B if name == A else A


class Duo:
    """Nodes A and B, each a :class:`SessionCore`, on a relay path that is up. Their
    session ids come from counters (A from 100, B from 200): a restarted B takes larger
    ones."""

    def __init__(self) -> None:
        self.cores = {A: self._core(100), B: self._core(200)}
        for core in self.cores.values():
            core.on_path("relay", True, 0.0)

    @staticmethod
    def _core(first_sid: int) -> SessionCore:
        sids = itertools.count(first_sid)
        return SessionCore(budget=1 << 20, new_sid=lambda: next(sids))

    @property
    def a(self) -> SessionCore:
        return self.cores[A]

    @property
    def b(self) -> SessionCore:
        return self.cores[B]

    def restart_b(self, now: float) -> None:
        self.cores[B] = self._core(1000)
        self.b.on_path("relay", True, now)

    def deliver(self, to: str, events: list[Event], now: float, drop: Callable[[Sealed], bool] = never) -> list[Event]:
        """The boxes among ``events`` (sent by the other node) handed to ``to``, except
        those ``drop`` takes; what ``to`` does."""
        out: list[Event] = []
        for event in events:
            if isinstance(event, Transmit) and event.peer == to and not drop(event.box):
                out += self.cores[to].on_box(other(to), wire(event.box), now)
        return out

    def converse(
        self, sender: str, events: list[Event], now: float, drop: Callable[[Sealed], bool] = never
    ) -> dict[str, list[Event]]:
        """``events`` of ``sender`` and all that follows at ``now``: boxes carried back
        and forth until neither side sends more. Every event of each side (``events``
        among the sender's)."""
        log: dict[str, list[Event]] = {A: [], B: []}
        log[sender] += events
        to = other(sender)
        while any(isinstance(e, Transmit) for e in events):
            events = self.deliver(to, events, now, drop)
            log[to] += events
            to = other(to)
        return log

    def open_with(self, n: int, now: float = 0.0) -> dict[str, list[Event]]:
        """A sends job ``n`` to B, which starts running it (the session opens on the way)."""
        log = self.converse(A, self.a.submit(spec(n), B, now), now)
        assert executed(log[B]) == [job_id(n)]
        return log

    def finish(
        self, n: int, now: float, outcome: Outcome | None = None, drop: Callable[[Sealed], bool] = never
    ) -> dict[str, list[Event]]:
        """B's run of job ``n`` ends (``succeeded`` unless told) and its answer goes to A."""
        outcome = outcome or Outcome("succeeded", result=b"done:%d" % n)
        return self.converse(B, self.b.job_finished(A, job_id(n), outcome, now), now, drop)

    def tick(self, name: str, now: float, drop: Callable[[Sealed], bool] = never) -> dict[str, list[Event]]:
        """``name``'s timers at ``now``, and all that follows."""
        return self.converse(name, self.cores[name].on_tick(now), now, drop)

    def run(self, until: float, drop: Callable[[Sealed], bool] = never) -> dict[str, list[Event]]:
        """Both nodes' timers, each when due, up to ``until``."""
        log: dict[str, list[Event]] = {A: [], B: []}
        for _ in range(10_000):
            dues = [(due, name) for name, core in self.cores.items() if (due := core.next_deadline()) is not None]
            if not dues or min(dues)[0] > until:
                return log
            now, name = min(dues)
            for side, events in self.tick(name, now, drop).items():
                log[side] += events
        raise AssertionError("the timers never went quiet")


# -- the windows --


def test_replay_window_refuses_a_counter_seen_before() -> None:
    window = ReplayWindow()
    assert window.accept(1)
    assert window.accept(2)
    assert not window.accept(2)
    assert not window.accept(1)


def test_replay_window_accepts_new_counters_out_of_order_once() -> None:
    window = ReplayWindow()
    assert window.accept(10)
    assert window.accept(7)
    assert window.accept(9)
    assert window.accept(1)
    assert not window.accept(7)
    assert not window.accept(9)
    assert window.accept(8)
    assert not window.accept(10)


def test_replay_window_refuses_a_counter_too_far_below_the_highest() -> None:
    window = ReplayWindow()
    assert window.accept(5)
    assert window.accept(5 + REPLAY_WINDOW)
    assert not window.accept(5)  # seen, and now too old to tell anyway
    assert not window.accept(4)  # never seen, but beyond the window: a replay for all we know
    assert window.accept(6)  # the oldest counter still inside the window


def test_receive_window_hands_each_seq_on_once() -> None:
    window = ReceiveWindow()
    assert window.receive(1)
    assert not window.receive(1)
    assert window.receive(3)
    assert not window.receive(3)
    assert window.cumulative == 1


def test_receive_window_cumulative_advances_over_a_filled_gap() -> None:
    window = ReceiveWindow()
    for seq in (1, 3, 4, 6):
        assert window.receive(seq)
    assert window.cumulative == 1
    assert window.receive(2)
    assert window.cumulative == 4
    assert window.above == {6}
    assert window.receive(5)
    assert window.cumulative == 6
    assert window.above == set()


def test_receive_window_refuses_a_seq_beyond_the_stream_window() -> None:
    window = ReceiveWindow()
    assert window.receive(1)
    assert not window.receive(1 + STREAM_WINDOW + 1)
    assert window.receive(1 + STREAM_WINDOW)
    assert window.cumulative == 1


def test_receive_window_sack_lists_those_above_cumulative_lowest_first() -> None:
    window = ReceiveWindow()
    assert window.sack() is None
    for seq in (1, 9, 4, 6):
        window.receive(seq)
    assert window.sack() == [4, 6, 9]
    for seq in range(20, 20 + MAX_SACK + 10):
        window.receive(seq)
    sack = window.sack()
    assert sack is not None and len(sack) == MAX_SACK and sack[:3] == [4, 6, 9]


# -- opening a session --


def test_first_job_to_a_peer_sends_a_hello_and_the_job_waits_for_its_answer() -> None:
    duo = Duo()
    events = duo.a.submit(spec(1), B, 0.0)
    assert [type(box) for box in boxes(events)] == [Hello]
    hello = boxes(events)[0]
    assert hello.sid == 100 and hello.rsid is None
    # Unanswered, the hello goes again on its timer; the job still waits.
    again = duo.a.on_tick(RoundTrip.INITIAL)
    assert [type(box) for box in boxes(again)] == [Hello]
    assert duo.b.sessions == {}


def test_once_the_hello_is_answered_the_job_goes_with_both_session_ids() -> None:
    duo = Duo()
    answer = duo.deliver(B, duo.a.submit(spec(1), B, 0.0), 0.0)
    assert [type(box) for box in boxes(answer)] == [Hello]
    assert boxes(answer)[0].sid == 200 and boxes(answer)[0].rsid == 100
    sent = duo.deliver(A, answer, 0.0)
    [job] = boxes(sent, Job)
    assert (job.sid, job.rsid, job.seq, job.id) == (100, 200, 1, job_id(1))
    assert executed(duo.deliver(B, sent, 0.0)) == [job_id(1)]


# -- replays, duplicates, acks --


def test_a_job_box_delivered_twice_executes_once() -> None:
    duo = Duo()
    sent = duo.deliver(A, duo.deliver(B, duo.a.submit(spec(1), B, 0.0), 0.0), 0.0)
    assert executed(duo.deliver(B, sent, 0.0)) == [job_id(1)]
    assert duo.deliver(B, sent, 0.01) == []  # dropped: its counter was seen
    # The replay changes nothing: B's ack goes when it was due, and nothing more.
    [ack] = boxes(duo.b.on_tick(ACK_DELAY), PeerAck)
    assert ack.ack == 1
    assert duo.deliver(B, sent, 5.0) == []
    assert duo.b.next_deadline() is None


def test_a_resent_copy_of_a_job_already_received_is_not_run_and_is_acked_at_once() -> None:
    duo = Duo()
    duo.open_with(1)
    # B's delayed ack is lost: A sends the job again when its timer runs out.
    assert boxes(duo.b.on_tick(ACK_DELAY), PeerAck)
    resent = duo.a.on_tick(RoundTrip.INITIAL)
    assert [box.seq for box in boxes(resent, Job)] == [1]
    now = RoundTrip.INITIAL + 0.01
    assert duo.deliver(B, resent, now) == []
    assert duo.b.next_deadline() == now
    [ack] = boxes(duo.b.on_tick(now), PeerAck)
    assert ack.ack == 1


def test_a_received_job_is_acked_alone_only_after_ack_delay() -> None:
    duo = Duo()
    log = duo.open_with(1, now=10.0)
    assert boxes(log[B], PeerAck) == []
    assert boxes(duo.b.on_tick(10.0 + ACK_DELAY / 2)) == []
    [ack] = boxes(duo.b.on_tick(10.0 + ACK_DELAY))
    assert isinstance(ack, PeerAck) and ack.ack == 1
    assert duo.a.held == len(PAYLOAD)
    duo.deliver(A, [Transmit(A, "relay", ack)], 10.05)
    assert duo.a.held == 0


def test_a_burst_of_ack_every_messages_is_acked_at_once() -> None:
    duo = Duo()
    duo.open_with(1)
    sent = [e for n in range(2, ACK_EVERY + 1) for e in duo.a.submit(spec(n), B, 0.0)]
    reply = duo.deliver(B, sent, 0.0)
    assert len(executed(reply)) == ACK_EVERY - 1
    assert [box.ack for box in boxes(reply, PeerAck)] == [ACK_EVERY]


def test_a_result_going_back_carries_the_ack() -> None:
    duo = Duo()
    duo.open_with(1, now=0.0)
    result = duo.b.job_finished(A, job_id(1), Outcome("succeeded", result=b"r"), 0.005)
    [box] = boxes(result)
    assert isinstance(box, JobResult) and box.ack == 1
    assert boxes(duo.b.on_tick(ACK_DELAY)) == []  # no separate ack is due any more
    done = duo.deliver(A, result, 0.01)
    assert [(s.job.id, s.outcome.status, s.outcome.result) for s in settled(done)] == [(job_id(1), "succeeded", b"r")]
    assert duo.a.held == 0


# -- loss and paths --


def test_a_job_whose_first_box_is_lost_is_resent_after_the_rto_and_executes_once() -> None:
    duo = Duo()
    t0 = 10.0
    log = duo.converse(A, duo.a.submit(spec(1), B, t0), t0, drop=lambda box: isinstance(box, Job))
    assert executed(log[B]) == []
    assert boxes(duo.a.on_tick(t0 + RoundTrip.INITIAL - 0.01)) == []
    log = duo.tick(A, t0 + RoundTrip.INITIAL)
    assert executed(log[B]) == [job_id(1)]
    log = duo.finish(1, t0 + 1.5)
    assert statuses(log[A]) == {job_id(1): ["succeeded"]}
    # Nothing of it is left to send, and it ran once.
    later = duo.run(t0 + 30.0)
    assert executed(later[B]) == [] and settled(later[A]) == []
    assert duo.a.held == 0 and duo.a.in_flight == 0


def test_a_peer_heard_at_time_zero_is_not_probed_before_keepalive() -> None:
    duo = Duo()
    duo.converse(A, duo.a.submit(spec(1), B, 0.0), 0.0)  # B answered the hello at 0.0
    assert boxes(duo.a.on_tick(0.5), PeerAck) == []


def test_a_path_that_goes_down_and_up_resends_everything_unacknowledged_at_once() -> None:
    duo = Duo()
    duo.open_with(1)
    duo.converse(A, duo.a.submit(spec(2), B, 0.0), 0.0, drop=lambda box: True)  # lost
    duo.a.submit(spec(3), B, 0.0)  # lost too
    assert duo.a.on_path("relay", False, 0.1) == []
    assert duo.a.on_tick(5.0) == []  # no path: nothing is sent
    back = duo.a.on_path("relay", True, 5.0)
    assert sorted(box.seq for box in boxes(back, Job)) == [1, 2, 3]
    log = duo.converse(A, back, 5.0)
    assert sorted(executed(log[B])) == [job_id(2), job_id(3)]  # job 1 was running already


# -- cancels --


def test_a_cancel_whose_first_copy_is_lost_still_stops_the_run() -> None:
    duo = Duo()
    duo.open_with(1)
    duo.tick(B, ACK_DELAY)
    log = duo.converse(A, duo.a.cancel(job_id(1), CLIENT, 0.5), 0.5, drop=lambda box: isinstance(box, JobCancel))
    assert stopped(log[B]) == []
    now = 0.5
    while not stopped(log[B]):
        next_due = duo.a.next_deadline()
        assert next_due is not None and next_due < 5.0, "the cancel was never sent again"
        now = next_due
        log = duo.tick(A, now)
    assert stopped(log[B]) == [job_id(1)]
    cancelled = Outcome.cancelled("cancelled by its submitter")
    assert statuses(duo.finish(1, now, cancelled)[A]) == {job_id(1): ["cancelled"]}


def test_a_cancel_from_someone_else_than_the_submitter_is_ignored() -> None:
    duo = Duo()
    duo.open_with(1)
    assert duo.a.cancel(job_id(1), "client:2", 0.1) == []


def test_a_cancel_that_overtakes_its_job_keeps_the_job_from_running() -> None:
    duo = Duo()
    submitted = duo.a.submit(spec(1), B, 0.0)
    submitted += duo.a.cancel(job_id(1), CLIENT, 0.0)
    sent = duo.deliver(A, duo.deliver(B, submitted, 0.0), 0.0)
    assert [type(box) for box in boxes(sent)] == [Job, JobCancel]
    overtaken = list(reversed(sent))
    log = duo.converse(A, overtaken, 0.01)
    assert executed(log[B]) == []
    assert [(s.job.id, s.outcome.status) for s in settled(log[A])] == [(job_id(1), "cancelled")]


# -- bounces --


def _bounce(duo: Duo, box: Sealed, reason: str, now: float) -> list[Event]:
    return duo.a.on_bounce(B, box.sid, box.ctr, reason, f"{reason}: from the relay", now)


def test_a_job_bounced_too_large_is_refused_at_once_and_later_jobs_still_run() -> None:
    duo = Duo()
    duo.open_with(1)
    [big] = boxes(duo.a.submit(spec(2, payload=b"B" * 5000), B, 0.1), Job)
    events = _bounce(duo, big, "too_large", 0.11)
    [end] = settled(events)
    assert (end.job.id, end.outcome.status, end.outcome.reason) == (job_id(2), "refused", "too_large")
    log = duo.converse(A, duo.a.submit(spec(3), B, 0.2), 0.2)
    assert executed(log[B]) == [job_id(3)]
    assert statuses(duo.finish(3, 0.3)[A]) == {job_id(3): ["succeeded"]}


def test_a_job_bounced_too_large_is_never_sent_again_nor_run() -> None:
    duo = Duo()
    duo.open_with(1)
    [big] = boxes(duo.a.submit(spec(2, payload=b"B" * 5000), B, 0.1), Job)
    assert settled(_bounce(duo, big, "too_large", 0.11))
    # A direct path to B comes up (one that carries large boxes): what was in flight goes again.
    log = duo.converse(A, duo.a.on_path("direct", True, 0.5, peer=B), 0.5)
    log_later = duo.tick(A, 10.0)
    assert job_id(2) not in executed(log[B] + log_later[B]), "a job its submitter was told was refused ran"
    resent = [box.id for box in boxes(log[A] + log_later[A], Job)]
    assert job_id(2) not in resent, "a job refused too_large was sent again"


def test_a_job_bounced_too_large_releases_its_bytes_and_leaves_no_hole() -> None:
    duo = Duo()
    duo.open_with(1)
    duo.finish(1, 0.05)
    assert duo.a.held == 0
    big = spec(2, payload=b"B" * 5000)
    [box] = boxes(duo.a.submit(big, B, 0.1), Job)
    assert duo.a.held == 5000

    def bounced(box: Sealed) -> bool:  # the relay bounces the big job's every copy
        return isinstance(box, Job) and box.id == big.id

    _bounce(duo, box, "too_large", 0.11)
    assert executed(duo.converse(A, duo.a.submit(spec(3), B, 0.2), 0.2, drop=bounced)[B]) == [job_id(3)]
    duo.finish(3, 0.3)
    duo.run(10.0, drop=bounced)
    assert duo.b.sessions[A].inbound.cumulative == 3, "the peer's stream has a hole where the bounced job was"
    assert duo.a.held == 0, "the bounced job's payload is still counted against the budget"


def test_a_bounce_for_a_session_that_has_ended_is_ignored() -> None:
    duo = Duo()
    [job] = boxes(duo.converse(A, duo.a.submit(spec(1), B, 0.0), 0.0)[A], Job)
    gone(duo, 1.0)
    assert _bounce(duo, job, "too_large", 1.0 + PEER_DOWN_CHECK + 0.1) == []


def limited_duo(a_max: int = 10_000, b_max: int = 1000) -> Duo:
    """A and B that tell each other their payload limits in their hellos."""
    duo = Duo()
    for name, first, limit in ((A, 100, a_max), (B, 200, b_max)):
        sids = itertools.count(first)
        duo.cores[name] = SessionCore(budget=1 << 20, new_sid=lambda sids=sids: next(sids), max_payload=limit)
        duo.cores[name].on_path("relay", True, 0.0)
    return duo


def test_hellos_carry_the_payload_limit_and_a_job_over_the_peers_is_refused_before_it_goes() -> None:
    duo = limited_duo()
    events = duo.a.submit(spec(1), B, 0.0) + duo.a.submit(spec(2, payload=b"L" * 1001), B, 0.0)
    [hello] = boxes(events, Hello)
    assert hello.max_payload == 10_000
    log = duo.converse(A, events, 0.0)
    assert executed(log[B]) == [job_id(1)], "the job over B's limit was sent"
    [refusal] = settled(log[A])
    assert (refusal.job.id, refusal.outcome.status, refusal.outcome.reason) == (job_id(2), "refused", "too_large")
    assert "at most 1000" in refusal.outcome.message
    # Once the limit is known, a large job is refused on submit, with nothing sent.
    later = duo.a.submit(spec(3, payload=b"L" * 2000), B, 0.1)
    assert statuses(later) == {job_id(3): ["refused"]} and not boxes(later, Job)
    assert executed(duo.converse(A, duo.a.submit(spec(4), B, 0.2), 0.2)[B]) == [job_id(4)]
    assert statuses(duo.finish(1, 0.3)[A]) == {job_id(1): ["succeeded"]}
    assert duo.b.sessions[A].inbound.cumulative >= 2, "the refused job left a hole in B's stream"
    duo.run(5.0)
    assert duo.a.held == 0, "the refused job's payload is still counted"


def test_a_replayed_or_stale_hello_says_nothing_of_the_peers_limit() -> None:
    """A relay replays B's hello, or one of an older session of B's, with a smaller limit:
    A takes neither, and a job within B's real limit goes and runs."""
    duo = limited_duo()
    log = duo.open_with(1)
    [b_hello] = boxes(log[B], Hello)
    stale = Hello(sid=b_hello.sid - 1, ctr=1, max_payload=10)
    assert not settled(duo.a.on_box(B, wire(stale), 0.1) + duo.a.on_box(B, wire(b_hello), 0.1))
    assert duo.a.sessions[B].peer_max_payload == 1000
    assert executed(duo.converse(A, duo.a.submit(spec(2, payload=b"x" * 500), B, 0.2), 0.2)[B]) == [job_id(2)]


def test_a_result_over_the_submitters_limit_goes_back_as_a_failure_that_says_why() -> None:
    duo = limited_duo(a_max=100)
    duo.open_with(1)
    log = duo.finish(1, 0.1, Outcome("succeeded", result=b"r" * 101))
    [end] = settled(log[A])
    assert (end.outcome.status, end.outcome.error_type) == ("failed", "ResultTooLarge")
    assert "at most 100" in end.outcome.message


def test_a_too_large_bounce_within_the_stated_limits_is_not_believed() -> None:
    """The relay forges ``unroutable too_large`` for a job both it and the peer take:
    the job is not refused; it goes again and succeeds."""
    duo = limited_duo()
    duo.open_with(1)

    def first_copy(box: Sealed) -> bool:
        return isinstance(box, Job) and box.id == job_id(2) and box.ctr == sent.ctr

    [sent] = boxes(duo.a.submit(spec(2), B, 0.1), Job)
    events = _bounce(duo, sent, "too_large", 0.11)
    assert not settled(events)
    assert any(e.event == "relay_claim_ignored" for e in events if isinstance(e, Notice))
    log = duo.run(5.0, drop=first_copy)
    assert job_id(2) in executed(log[B])
    assert statuses(duo.finish(2, 5.1)[A]) == {job_id(2): ["succeeded"]}


def test_a_job_the_relay_keeps_bouncing_times_out_naming_the_bounces() -> None:
    duo = limited_duo()
    duo.open_with(1)
    [sent] = boxes(duo.a.submit(spec(2, timeout=1.0), B, 0.1), Job)
    _bounce(duo, sent, "relay_busy", 0.11)
    [end] = settled(duo.a.on_tick(0.1 + 1.0 + DEADLINE_GRACE))
    assert end.outcome.status == "timed_out" and "the relay bounced it 1 times, last: relay_busy" in end.outcome.message


def test_a_hello_bounced_peer_not_connected_refuses_the_waiting_jobs_at_once() -> None:
    duo = Duo()
    events = duo.a.submit(spec(1), B, 0.0) + duo.a.submit(spec(2), B, 0.0)
    [hello] = boxes(events, Hello)
    ended = settled(_bounce(duo, hello, "peer_not_connected", 0.05))
    assert sorted((s.job.id, s.outcome.status, s.outcome.reason) for s in ended) == [
        (job_id(1), "refused", "peer_not_connected"),
        (job_id(2), "refused", "peer_not_connected"),
    ]
    assert duo.a.in_flight == 0 and duo.a.held == 0


# -- peers lost --


def gone(duo: Duo, now: float) -> list[Event]:
    """The relay says B left, and B (whose boxes nobody carries) says nothing for the
    check: A gives it up."""
    events = duo.a.on_peer_down(B, "it left the relay", now)
    assert not settled(events), "a job ended on the relay's word alone"
    return events + duo.a.on_tick(now + PEER_DOWN_CHECK)


def test_peer_down_ends_sent_jobs_peer_lost_and_stops_runs_for_the_peer() -> None:
    duo = Duo()
    duo.open_with(1)
    # B sends a job to A, which runs it.
    log = duo.converse(B, duo.b.submit(spec(7), A, 0.1), 0.1)
    assert executed(log[A]) == [job_id(7)]
    events = gone(duo, 0.2)
    assert statuses(events) == {job_id(1): ["peer_lost"]}
    assert stopped(events) == [job_id(7)]
    assert duo.a.in_flight == 0 and duo.a.held == 0


def test_a_false_peer_down_is_checked_and_ends_nothing_when_the_peer_answers() -> None:
    """A relay says B left while B lives: A probes it, B answers, and neither the job
    A sent nor the one B runs for A is ended or stopped."""
    duo = Duo()
    duo.open_with(1)
    log = duo.converse(B, duo.b.submit(spec(7), A, 0.1), 0.1)
    assert executed(log[A]) == [job_id(7)]
    probed = duo.converse(A, duo.a.on_peer_down(B, "it left the relay", 0.2), 0.2)
    assert boxes(probed[A], PeerAck), "B was not asked"
    assert not settled(probed[A]) and not stopped(probed[A])
    assert any(e.event == "peer_down_disproved" for e in probed[A] if isinstance(e, Notice))
    later = duo.run(0.2 + 3 * PEER_DOWN_CHECK)
    assert not settled(later[A]) and not stopped(later[A])
    assert statuses(duo.finish(1, 10.0)[A]) == {job_id(1): ["succeeded"]}


def test_peer_down_over_a_direct_path_that_is_up_changes_nothing() -> None:
    duo = Duo()
    duo.open_with(1)
    duo.converse(A, duo.a.on_path("direct", True, 0.1, peer=B), 0.1)
    events = duo.a.on_peer_down(B, "it left the relay", 0.2)
    assert events == [Notice("peer_down_ignored", {"peer": B, "relay_said": "it left the relay", "path": "direct"})]
    assert not settled(duo.a.on_tick(0.2 + 2 * PEER_DOWN_CHECK))


def test_the_check_of_a_peer_down_waits_while_no_path_is_up() -> None:
    """The relay says B left and then goes away itself: nothing can be asked, so nothing
    ends; once the path is back, B has the whole check to answer."""
    duo = Duo()
    duo.open_with(1)
    duo.a.on_peer_down(B, "it left the relay", 1.0)
    duo.a.on_path("relay", False, 1.1)
    assert not settled(duo.a.on_tick(1.0 + 5 * PEER_DOWN_CHECK))
    back = duo.a.on_path("relay", True, 20.0)
    assert not settled(back + duo.a.on_tick(20.0 + PEER_DOWN_CHECK / 2))
    assert statuses(duo.a.on_tick(20.0 + PEER_DOWN_CHECK)) == {job_id(1): ["peer_lost"]}


def test_a_peer_silent_for_peer_silence_while_its_path_is_up_loses_its_jobs() -> None:
    duo = Duo()
    duo.open_with(1)
    duo.tick(B, ACK_DELAY)  # B acks the job, then says nothing more

    def silent(box: Sealed) -> bool:
        return True

    events: list[Event] = []
    for now in (2.0, 5.0, 10.0, 15.0, PEER_SILENCE - 0.1):
        events += duo.tick(A, now, drop=silent)[A]
    assert settled(events) == []
    assert boxes(events, PeerAck), "A probes the silent peer"
    events = duo.tick(A, PEER_SILENCE + ACK_DELAY, drop=silent)[A]
    assert statuses(events) == {job_id(1): ["peer_lost"]}


def test_silence_while_the_path_is_down_is_not_counted() -> None:
    duo = Duo()
    duo.open_with(1)  # a job of 30 s
    duo.tick(B, ACK_DELAY)
    duo.a.on_path("relay", False, 0.5)
    events: list[Event] = []
    for now in (5.0, PEER_SILENCE + 1, 25.0, 30.0, 31.0):
        events += duo.a.on_tick(now)
    assert settled(events) == []
    events = duo.a.on_tick(30.0 + DEADLINE_GRACE)
    assert statuses(events) == {job_id(1): ["timed_out"]}


def test_silence_is_counted_afresh_once_the_path_is_back() -> None:
    duo = Duo()
    log = duo.converse(A, duo.a.submit(spec(1, timeout=100.0), B, 0.0), 0.0)
    assert executed(log[B]) == [job_id(1)]
    duo.a.on_path("relay", False, 0.5)
    duo.a.on_path("relay", True, 40.0)
    assert settled(duo.a.on_tick(40.0 + PEER_SILENCE - 1)) == []
    assert statuses(duo.a.on_tick(40.0 + PEER_SILENCE)) == {job_id(1): ["peer_lost"]}


# -- deadlines --


def test_a_job_past_its_deadline_times_out_once_and_its_peer_is_told_to_cancel() -> None:
    duo = Duo()
    log = duo.converse(A, duo.a.submit(spec(1, timeout=5.0), B, 0.0), 0.0)
    assert executed(log[B]) == [job_id(1)]
    duo.tick(B, ACK_DELAY)
    assert settled(duo.a.on_tick(5.0 + DEADLINE_GRACE - 0.01)) == []
    events = duo.a.on_tick(5.0 + DEADLINE_GRACE)
    assert statuses(events) == {job_id(1): ["timed_out"]}
    assert [box.id for box in boxes(events, JobCancel)] == [job_id(1)]
    log = duo.converse(A, events, 7.0)
    assert stopped(log[B]) == [job_id(1)]
    # B's answer to the cancel comes back: the job has ended, nothing more happens.
    cancelled = Outcome.cancelled("stopped")
    log = duo.finish(1, 7.1, cancelled)
    assert settled(log[A]) == []
    assert settled(duo.tick(A, 60.0)[A]) == []
    duo.tick(A, 60.0 + ACK_DELAY)
    duo.tick(B, 60.0 + ACK_DELAY)
    assert duo.a.held == 0 and duo.a.in_flight == 0 and duo.b.held == 0


def test_a_job_timed_out_before_its_peer_acknowledged_it_releases_its_bytes() -> None:
    duo = Duo()
    duo.converse(A, duo.a.submit(spec(1, timeout=1.0), B, 0.0), 0.0, drop=lambda box: isinstance(box, Job))
    assert duo.a.held == len(PAYLOAD)
    events = duo.a.on_tick(1.0 + DEADLINE_GRACE)
    assert statuses(events) == {job_id(1): ["timed_out"]}
    assert duo.a.held == 0
    # What goes in the job's place is a cancel, never the job: B never runs it.
    log = duo.converse(A, events, 3.0)
    log2 = duo.tick(A, 10.0)
    assert boxes(log[A] + log2[A], Job) == []
    assert executed(log[B] + log2[B]) == []


def test_a_job_timed_out_before_it_left_sends_no_cancel() -> None:
    duo = Duo()
    duo.a.submit(spec(1, timeout=1.0), B, 0.0)  # B never answers the hello
    events = duo.a.on_tick(1.0 + DEADLINE_GRACE)
    assert statuses(events) == {job_id(1): ["timed_out"]}
    assert boxes(events, JobCancel) == []
    assert duo.a.held == 0 and duo.a.in_flight == 0


# -- duplicates and restarts --


def test_a_duplicate_job_id_in_flight_is_refused_and_the_original_still_succeeds() -> None:
    duo = Duo()
    duo.open_with(1)
    again = duo.a.submit(spec(1), B, 0.1)
    assert boxes(again) == []
    [refusal] = settled(again)
    assert (refusal.outcome.status, refusal.outcome.reason) == ("refused", "duplicate")
    log = duo.finish(1, 0.2, Outcome("succeeded", result=b"original"))
    [done] = settled(log[A])
    assert (done.job.id, done.outcome.status, done.outcome.result) == (job_id(1), "succeeded", b"original")


def is_result(box: Sealed) -> bool:
    return isinstance(box, JobResult)


def _past_the_deadline_of_job_1(
    duo: Duo, drop: Callable[[Sealed], bool] = never, answer: Outcome | None = None
) -> tuple[float, list[Event]]:
    """Job 1 (timeout 5 s) runs on B (and ends at 1 s with ``answer``, if given); the two
    keep talking, with what ``drop`` takes held up on the way, until A gives up on the
    job at its deadline. That time, and A's events then (a cancel, not yet sent)."""
    log = duo.converse(A, duo.a.submit(spec(1, timeout=5.0), B, 0.0), 0.0)
    assert executed(log[B]) == [job_id(1)]
    if answer is not None:
        duo.finish(1, 1.0, answer, drop)
    deadline = 5.0 + DEADLINE_GRACE
    duo.run(deadline - 0.01, drop)
    events = duo.a.on_tick(deadline)
    assert statuses(events) == {job_id(1): ["timed_out"]}
    assert [box.id for box in boxes(events, JobCancel)] == [job_id(1)]
    return deadline, events


def test_a_late_answer_to_a_timed_out_job_is_not_taken_for_a_new_job_reusing_its_id() -> None:
    duo = Duo()
    late: list[Event] = []

    def hold(box: Sealed) -> bool:
        if isinstance(box, JobResult):
            late.append(Transmit(A, "relay", box))
            return True
        return False

    now, _ = _past_the_deadline_of_job_1(duo, hold, Outcome("succeeded", result=b"first"))
    log = duo.converse(A, duo.a.submit(spec(1), B, now), now)
    assert executed(log[B]) == [job_id(1)]
    assert settled(duo.deliver(A, late, now + 0.1)) == []  # the first job's answers: not the new one's
    [done] = settled(duo.finish(1, now + 0.2, Outcome("succeeded", result=b"second"))[A])
    assert (done.outcome.status, done.outcome.result) == ("succeeded", b"second")


@pytest.mark.parametrize("cancel_first", [True, False], ids=["cancel_first", "job_first"])
def test_a_late_cancel_of_a_timed_out_job_does_not_touch_a_new_job_reusing_its_id(cancel_first: bool) -> None:
    duo = Duo()
    # B's run ends, and A never hears.
    now, cancel = _past_the_deadline_of_job_1(duo, is_result, Outcome("succeeded", result=b"first"))
    again = duo.a.submit(spec(1), B, now)
    log = duo.converse(A, cancel + again if cancel_first else again + cancel, now)
    assert executed(log[B]) == [job_id(1)] and stopped(log[B]) == []
    [done] = settled(duo.finish(1, now + 0.1, Outcome("succeeded", result=b"second"))[A])
    assert (done.outcome.status, done.outcome.result) == ("succeeded", b"second")


def test_a_job_reusing_the_id_of_one_still_running_for_that_peer_is_refused_not_ignored() -> None:
    duo = Duo()
    now, cancel = _past_the_deadline_of_job_1(duo)
    log = duo.converse(A, duo.a.submit(spec(1), B, now), now)  # the new job overtakes the cancel
    assert executed(log[B]) == []
    [refusal] = settled(log[A])
    assert (refusal.outcome.status, refusal.outcome.reason) == ("refused", "duplicate")
    log = duo.converse(A, cancel, now + 0.1)
    assert stopped(log[B]) == [job_id(1)]  # the first run is still stopped by its cancel
    assert settled(duo.finish(1, now + 0.2, Outcome.cancelled("stopped"))[A]) == []


def _restart_with_a_job_waiting(duo: Duo) -> tuple[int, dict[str, list[Event]]]:
    """A's jobs fill the stream window to B (one more waits in A); B runs two of them
    and restarts; the new B sends A a job, whose hello tells A of the restart. The
    waiting job's number, and what the hello led to."""
    duo.open_with(0)
    sent = [e for n in range(1, STREAM_WINDOW + 1) for e in duo.a.submit(spec(n, payload=b"j"), B, 0.1)]
    assert len(boxes(sent, Job)) == STREAM_WINDOW - 1  # job 0 holds the window's first place
    assert executed(duo.deliver(B, sent[:2], 0.2)) == [job_id(1), job_id(2)]
    duo.restart_b(1.0)
    return STREAM_WINDOW, duo.converse(B, duo.b.submit(spec(5000), A, 1.0), 1.0)


def test_a_restarted_peer_loses_what_it_may_have_had_and_gets_what_was_never_sent() -> None:
    duo = Duo()
    waiting, log = _restart_with_a_job_waiting(duo)
    assert statuses(log[A]) == {job_id(n): ["peer_lost"] for n in range(waiting)}
    assert executed(log[A]) == [job_id(5000)]
    later = duo.run(10.0)
    assert executed(log[B] + later[B]) == [job_id(waiting)]
    assert settled(later[A]) == []
    assert statuses(duo.finish(waiting, 10.0)[A]) == {job_id(waiting): ["succeeded"]}
    # Nothing of B's earlier life goes to (or runs in) its new one.
    assert executed(duo.run(60.0)[B]) == []
    assert duo.a.held == 0 and duo.a.in_flight == 0


def test_a_job_resent_to_a_restarted_peer_reaches_it_with_the_hello_answer() -> None:
    duo = Duo()
    waiting, log = _restart_with_a_job_waiting(duo)
    assert executed(log[B]) == [job_id(waiting)]


def test_a_result_replayed_after_its_job_ended_changes_nothing() -> None:
    duo = Duo()
    duo.open_with(1)
    answer = duo.b.job_finished(A, job_id(1), Outcome("succeeded", result=b"r"), 0.1)
    assert statuses(duo.deliver(A, answer, 0.1)) == {job_id(1): ["succeeded"]}
    assert duo.deliver(A, answer, 0.2) == []
    assert duo.deliver(A, answer, 30.0) == []
    # A fresh copy (B re-sends it: A's ack was lost) is acknowledged, not settled again.
    resent = duo.b.on_tick(5.0)
    [copy] = boxes(resent, JobResult)
    assert copy.seq == boxes(answer)[0].seq
    assert settled(duo.deliver(A, resent, 5.0)) == []
    assert boxes(duo.a.on_tick(5.0), PeerAck)


def test_a_box_from_an_old_session_of_the_peer_changes_nothing() -> None:
    duo = Duo()
    duo.open_with(1)
    old_answer = duo.b.job_finished(A, job_id(1), Outcome("succeeded", result=b"old"), 0.1)
    duo.restart_b(1.0)
    log = duo.converse(B, duo.b.submit(spec(9), A, 1.0), 1.0)
    assert statuses(log[A]) == {job_id(1): ["peer_lost"]}
    assert duo.deliver(A, old_answer, 1.5) == []
    assert duo.a.counts["boxes_dropped"] >= 1


def test_after_peer_down_a_restarted_peer_gets_the_next_job_not_a_false_peer_lost() -> None:
    """B dies, the relay says so, B starts again: A's next job waits for a hello's answer
    (B's new life would drop a job of A's new session it has not heard open), then runs."""
    duo = Duo()
    duo.open_with(1)
    assert statuses(gone(duo, 1.0)) == {job_id(1): ["peer_lost"]}
    duo.restart_b(2.0)
    log = duo.converse(A, duo.a.submit(spec(2), B, 3.0), 3.0)
    assert [type(box) for box in boxes(log[A])][:1] == [Hello]
    assert executed(log[B]) == [job_id(2)]
    assert statuses(duo.finish(2, 3.1)[A]) == {job_id(2): ["succeeded"]}


def test_after_giving_a_silent_peer_up_the_next_job_reaches_it_when_it_speaks_again() -> None:
    """A gives B up (peer_down, though B lives on): A's new session opens with a hello that
    B answers although it names B's current id, and the next job runs on B."""
    duo = Duo()
    duo.open_with(1)
    gone(duo, 1.0)
    log = duo.converse(A, duo.a.submit(spec(2), B, 4.0), 4.0)
    assert job_id(2) in executed(log[B])
    assert job_id(1) in stopped(log[B])  # B's run for A's old session stops
    assert statuses(duo.finish(2, 4.1)[A]) == {job_id(2): ["succeeded"]}


def test_a_peer_that_probes_but_never_acknowledges_is_given_up_and_its_answers_freed() -> None:
    """A hostile or stuck peer: it sends a job and then only probes, acknowledging none of
    this node's answers. Its answers are not held for ever: with no acknowledgement for
    PEER_SILENCE the session ends, and what it held is released."""
    core = SessionCore(budget=1 << 30, new_sid=itertools.count(100).__next__)
    core.on_path("relay", True, 0.0)
    [answer] = boxes(core.on_box(B, wire(Hello(sid=500, ctr=1)), 0.0), Hello)
    job = Job(id=job_id(1), kind="echo", timeout=30.0, payload=b"x", sid=500, rsid=answer.sid, ctr=2, ack=0, seq=1)
    assert executed(core.on_box(B, wire(job), 0.0)) == [job_id(1)]
    core.job_finished(B, job_id(1), Outcome("succeeded", result=b"r" * 100_000), 0.1)
    assert core.held == 100_000
    for n, now in enumerate(range(5, 25, 5)):
        probe = PeerAck(sid=500, rsid=answer.sid, ctr=3 + n, ack=0, probe=True)
        assert boxes(core.on_box(B, wire(probe), float(now)), PeerAck)  # answered: it is heard
    ended = [e for e in core.on_tick(0.1 + PEER_SILENCE) if isinstance(e, Notice) and e.event == "session_ended"]
    assert ended and core.held == 0


# -- pings (meshnet ping, and each new path's round trip) --


def pongs(events: list[Event]) -> list[Ponged]:
    return [e for e in events if isinstance(e, Ponged)]


def test_a_ping_to_a_peer_never_heard_opens_the_session_and_is_answered_once_with_its_round_trip():
    duo = Duo()
    number, events = duo.a.ping(B, 1.0)
    assert [type(b) for b in boxes(events)] == [Hello], "the hello goes first; the ping waits for the session"
    hello_answer = duo.deliver(B, events, 1.0)
    sent = duo.deliver(A, hello_answer, 1.25)
    assert [b.ping for b in boxes(sent, PeerAck)] == [number]
    answer = duo.deliver(B, sent, 1.5)
    assert [b.pong for b in boxes(answer, PeerAck)] == [number]
    got = pongs(duo.deliver(A, answer, 1.75))
    assert [(p.peer, p.number, p.path) for p in got] == [(B, number, "relay")]
    assert got[0].rtt == pytest.approx(0.5)
    assert duo.a.round_trips[B]["relay"] == (pytest.approx(0.5), 1.75)
    # A replayed answer is not a second pong, and a pong nobody asked for is none.
    assert pongs(duo.deliver(A, answer, 2.0)) == []
    for pong in (number, number + 7):  # answered already / never asked: both with a fresh counter
        forged = PeerAck(sid=answer[0].box.sid, rsid=answer[0].box.rsid, ctr=900 + pong, pong=pong)
        assert pongs(duo.a.on_box(B, wire(forged), 2.0)) == []


def test_a_lost_ping_is_not_sent_again_and_holds_nothing_back():
    duo = Duo()
    duo.converse(A, duo.a.submit(spec(1), B, 0.0), 0.0)
    duo.converse(B, duo.b.on_tick(0.05), 0.05)  # B's delayed ack: A holds nothing now
    assert not duo.a.holding
    _, events = duo.a.ping(B, 1.0)
    assert [b.ping is not None for b in boxes(events, PeerAck)] == [True]
    assert not duo.a.holding, "a ping is not a message the node waits to have acknowledged"
    for now in (1.5, 3.0, 5.0, 8.0, 12.0):  # re-sends and probes happen here; PEER_SILENCE is 20 s
        later = duo.a.on_tick(now)
        assert not [b for b in boxes(later, PeerAck) if b.ping is not None], "a ping is a measurement: never re-sent"


def test_a_new_path_is_pinged_so_that_its_round_trip_is_known():
    duo = Duo()
    duo.converse(A, duo.a.submit(spec(1), B, 0.0), 0.0)
    events = duo.a.on_path("direct", True, 2.0, peer=B)
    pings = [(e.path, e.box.ping) for e in events if isinstance(e, Transmit) and getattr(e.box, "ping", None)]
    assert len(pings) == 1 and pings[0][0] == "direct"
    answer = duo.deliver(B, events, 2.0)
    got = []
    for event in answer:
        if isinstance(event, Transmit):
            got += pongs(duo.a.on_box(B, wire(event.box), 2.004, path="direct"))
    assert [(p.path, round(p.rtt, 3)) for p in got] == [("direct", 0.004)]
    assert set(duo.a.round_trips[B]) == {"direct"}


def test_a_round_trip_counts_for_a_path_only_if_the_ping_went_and_came_back_on_it():
    duo = Duo()
    duo.converse(A, duo.a.submit(spec(1), B, 0.0), 0.0)
    number, events = duo.a.ping(B, 1.0)  # on the relay
    answer = duo.deliver(B, events, 1.0)
    got = []
    for event in answer:
        if isinstance(event, Transmit):
            got += pongs(duo.a.on_box(B, wire(event.box), 1.1, path="direct"))  # back on a direct link
    assert [(p.number, p.path) for p in got] == [(number, "direct")], "the answer is reported"
    assert "direct" not in duo.a.round_trips.get(B, {}), "but a mixed round trip is no path's"
