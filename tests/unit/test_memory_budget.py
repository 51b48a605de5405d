"""The node's one memory budget (meshnet.memory_budget), with parts the test sets."""

from __future__ import annotations

from meshnet.memory_budget import READ_GRACE, MemoryBudget, Reader, readers_to_cut


def test_new_work_fits_while_the_parts_together_stay_within_the_budget() -> None:
    held = {"jobs": 0, "answers": 0}
    budget = MemoryBudget(1000)
    for name in held:
        budget.add_part(name, lambda name=name: held[name])
    assert budget.admits(1000)
    held["jobs"] = 600
    assert budget.admits(400) and not budget.admits(401)
    held["answers"] = 500
    assert budget.over() and not budget.admits(1)
    assert budget.describe() == {"jobs": 600, "answers": 500, "total": 1100, "limit": 1000, "refused": 2, "cut": 0}
    assert "jobs 600, answers 500" in budget.why(1) and "node.memory_budget_bytes is 1000" in budget.why(1)


def test_a_job_larger_than_the_budget_fits_an_empty_node() -> None:
    budget = MemoryBudget(10)
    budget.add_part("jobs", lambda: 0)
    assert budget.admits(100)


def test_relievers_are_asked_for_room_before_new_work_is_refused() -> None:
    held = {"answers": 900}
    budget = MemoryBudget(1000)
    budget.add_part("answers", lambda: held["answers"])
    asked = []

    def relieve(size: int) -> None:
        asked.append(size)
        held["answers"] = 0

    budget.add_reliever(relieve)
    assert budget.admits(200) and asked == [200] and budget.refused == 0


def test_the_slowest_readers_are_cut_oldest_first_and_only_as_many_as_it_takes() -> None:
    readers = [Reader(b"new", 9.5, 300), Reader(b"old", 1.0, 300), Reader(b"older", 0.5, 300)]
    assert readers_to_cut(readers, used=1000, limit=1000, size=200, now=10.0) == [b"older"]
    assert readers_to_cut(readers, used=1000, limit=1000, size=500, now=10.0) == [b"older", b"old"]
    # The reader whose oldest answer is younger than the grace is never cut...
    assert readers_to_cut(readers, used=1000, limit=1000, size=800, now=10.0) == []
    assert READ_GRACE > 0


def test_no_one_is_cut_when_what_fills_the_budget_is_not_unread_answers() -> None:
    """Jobs fill the budget (a peer keeps the queue full): cutting every client that reads
    slowly would not make room, so none is cut."""
    readers = [Reader(b"slow", 0.0, 100)]
    assert readers_to_cut(readers, used=1000, limit=1000, size=200, now=10.0) == []
    assert readers_to_cut([], used=0, limit=1000, size=5000, now=10.0) == []
