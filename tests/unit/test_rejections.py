"""The rejection log: one line for a source's first bad message, then a summary."""

from __future__ import annotations

import structlog
from structlog.testing import capture_logs

from meshnet.rejections import OTHER_SOURCES, RejectionLog, log_summaries


def test_first_rejection_of_a_source_is_logged_the_rest_counted():
    log = RejectionLog(interval=10.0)
    assert log.on_rejected("client-a", "bad", 0.0)
    assert not any(log.on_rejected("client-a", f"bad {i}", 0.1 * i) for i in range(1, 1000))
    assert log.on_rejected("client-b", "bad", 1.0)  # another source has its own first line
    assert log.next_flush() == 10.1
    assert log.flush(9.0) == []
    (summary,) = log.flush(10.2)
    assert (summary.source, summary.count, summary.last_error) == ("client-a", 999, "bad 999")
    assert log.total == 1001
    assert log.next_flush() is None


def test_a_steady_flood_gets_one_summary_per_interval():
    log = RejectionLog(interval=10.0)
    lines = summaries = 0
    now = 0.0
    while now < 100.0:
        lines += log.on_rejected("flood", "bad", now)
        summaries += len(log.flush(now))
        now += 0.01
    assert lines == 1
    assert 9 <= summaries <= 10


def test_a_source_that_stops_and_comes_back_later_is_logged_again():
    log = RejectionLog(interval=10.0)
    assert log.on_rejected("peer", "bad", 0.0)
    assert not log.on_rejected("peer", "bad", 1.0)
    assert len(log.flush(11.0)) == 1
    assert not log.on_rejected("peer", "bad", 12.0)  # within the window that the summary opened
    assert len(log.flush(22.5)) == 1
    assert log.on_rejected("peer", "bad", 40.0)  # quiet for a whole interval: a full line again


def test_sources_are_bounded_and_evicted_counts_are_kept():
    log = RejectionLog(interval=10.0, max_sources=3, max_new=1000)
    for source in ("a", "b", "c"):
        log.on_rejected(source, "bad", 0.0)
        log.on_rejected(source, "bad", 0.5)
    for i in range(100):
        log.on_rejected(f"new-{i}", "bad", 1.0)
    assert len(log._windows) == 3
    counts = {entry.source: entry.count for entry in log.flush(20.0)}
    assert counts[OTHER_SOURCES] == 3
    assert sum(counts.values()) + 103 == log.total


def test_summaries_are_logged_one_line_per_source():
    log = RejectionLog(interval=10.0)
    log.on_rejected("client-a", "bad", 0.0)
    for _ in range(5):
        log.on_rejected("client-a", "worse", 1.0)
    with capture_logs() as lines:
        log_summaries(structlog.get_logger(), "client_messages_rejected", log.flush(11.5), 11.5, source="client")
    assert lines == [
        {
            "event": "client_messages_rejected",
            "client": "client-a",
            "count": 5,
            "over_s": 10.5,
            "last_error": "worse",
            "log_level": "warning",
        }
    ]


def test_new_sources_past_the_budget_are_counted_together_not_logged_each():
    """A stranger is a new source at will (a connection, a key): past MAX_NEW_SOURCES in
    an interval, new sources are counted under one, and the log gets a summary line."""
    log = RejectionLog(interval=10.0, max_new=20)
    logged = sum(log.on_rejected(f"conn-{i}", "bad first frame", 1.0) for i in range(10_000))
    assert logged == 20
    summaries = {entry.source: entry.count for entry in log.flush(11.0)}
    assert summaries == {OTHER_SOURCES: 10_000 - 20}
    assert log.on_rejected("conn-late", "bad first frame", 12.0), "a new interval logs new sources again"
