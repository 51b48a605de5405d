"""Answers held for clients that do not read them (meshnet.outbox)."""

from __future__ import annotations

from meshnet.outbox import (
    FIRST_RETRY_S,
    HARD_LIMIT,
    LONGEST_RETRY_S,
    STALL_OVER_BUDGET_S,
    STALL_S,
    Outboxes,
)

A, B = b"client-a", b"client-b"


def test_held_answers_are_sent_in_order():
    boxes = Outboxes(budget=1000)
    assert not boxes.holds(A)
    for i in range(3):
        assert boxes.hold(A, [bytes([i])], 100, now=0.0) == "held"
    assert boxes.holds(A) and boxes.unread(A) == 300 and not boxes.holds(B)
    sent = []
    while (frames := boxes.head(A)) is not None:
        sent.append(frames)
        boxes.sent_head(A, now=0.1)
    assert sent == [[b"\x00"], [b"\x01"], [b"\x02"]]
    assert not boxes.holds(A) and boxes.backlogs == {}


def test_past_half_the_budget_the_client_is_pushed_back_once():
    boxes = Outboxes(budget=1000)
    states = [boxes.hold(A, [b"x"], 200, now=0.0) for _ in range(4)]
    assert states == ["held", "held", "pushed_back", "held"]
    assert boxes.refuses(A) and not boxes.refuses(B)


def test_what_zeromq_holds_for_the_client_counts_toward_its_push_back():
    """Answers already in ZeroMQ's queue for the client are unread too: with 400 bytes
    there, the first 200 held here cross half of a 1000-byte budget."""
    boxes = Outboxes(budget=1000)
    assert boxes.hold(A, [b"x"], 200, now=0.0, queued=400) == "pushed_back"
    assert boxes.hold(B, [b"x"], 200, now=0.0, queued=0) == "held"


def test_a_client_that_reads_slowly_is_kept_past_its_budget():
    """A burst of results to a client that reads, if slower than they come: pushed back
    (no new jobs), not dropped, while answers keep going out to it."""
    boxes = Outboxes(budget=1000)
    now = 0.0
    for _ in range(30):  # 3 budgets of answers, one going out every second
        assert boxes.hold(A, [b"x"], 100, now) in ("held", "pushed_back")
        assert boxes.hold(A, [b"x"], 100, now) in ("held", "pushed_back")
        boxes.sent_head(A, now)
        now += 1.0
        assert boxes.drop_stalled(now) == []
    assert boxes.unread(A) == 3000 and boxes.refuses(A)


def test_a_client_over_its_budget_that_stops_reading_is_dropped():
    boxes = Outboxes(budget=1000)
    for _ in range(6):
        boxes.hold(A, [b"x"], 200, now=0.0)
    assert boxes.drop_stalled(STALL_OVER_BUDGET_S - 0.1) == []
    assert boxes.drop_stalled(STALL_OVER_BUDGET_S) == [(A, 1200)]
    assert not boxes.holds(A) and boxes.refuses(A)
    assert boxes.discarded == 6
    assert boxes.hold(A, [b"x"], 10, now=6.0) == "discarded"
    assert boxes.discarded == 7
    assert boxes.reading_again(A) and not boxes.refuses(A)
    assert not boxes.reading_again(A)


def test_past_the_hard_limit_a_client_is_dropped_at_once():
    boxes = Outboxes(budget=1000)
    states = [boxes.hold(A, [b"x"], 500, now=0.0) for _ in range(2 * HARD_LIMIT + 1)]
    assert states[-1] == "dropped" and "dropped" not in states[:-1]


def test_anything_waiting_with_nothing_going_out_for_long_is_dropped():
    """So that the retry timer of a client that never reads again stops in the end."""
    boxes = Outboxes(budget=1000)
    boxes.hold(A, [b"x"], 10, now=0.0)
    assert boxes.drop_stalled(STALL_S - 1) == []
    assert boxes.drop_stalled(STALL_S) == [(A, 10)]
    assert boxes.next_retry() is None


def test_other_clients_are_not_affected():
    boxes = Outboxes(budget=1000)
    for _ in range(6):
        boxes.hold(A, [b"x"], 200, now=0.0)
    boxes.drop_stalled(STALL_OVER_BUDGET_S)
    assert boxes.refuses(A)
    assert boxes.hold(B, [b"y"], 100, now=10.0) == "held" and not boxes.refuses(B)


def test_a_client_that_went_away_takes_its_answers_with_it():
    boxes = Outboxes(budget=1000)
    boxes.hold(A, [b"x"], 100, now=0.0)
    boxes.hold(A, [b"x"], 100, now=0.0)
    assert boxes.gone(A) == 2 and not boxes.holds(A) and boxes.discarded == 2


def test_retries_back_off_while_nothing_moves_and_restart_after_progress():
    boxes = Outboxes(budget=1000)
    assert boxes.next_retry() is None
    boxes.hold(A, [b"x"], 100, now=0.0)
    boxes.hold(A, [b"x"], 100, now=0.0)
    delays = [boxes.next_retry() for _ in range(15)]
    assert delays[0] == FIRST_RETRY_S and delays == sorted(delays) and delays[-1] == LONGEST_RETRY_S
    boxes.sent_head(A, now=1.0)
    assert boxes.next_retry() == FIRST_RETRY_S
