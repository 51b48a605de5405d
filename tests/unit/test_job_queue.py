"""Admission, slots and one terminal status per job (meshnet.jobs.queue.JobQueue)."""

from __future__ import annotations

import pytest

from meshnet.jobs.model import JobSpec
from meshnet.jobs.queue import RECENT_IDS, JobQueue


def job(n: int) -> JobSpec:
    return JobSpec(id=n.to_bytes(16, "big"), kind="echo", payload=b"\xf6", timeout=10.0)


def submit(queue: JobQueue, spec: JobSpec) -> tuple[str | None, list[JobSpec]]:
    """What the queue actor does: ask, admit if allowed, start what fits."""
    reason = queue.admission(spec)
    if reason is not None:
        queue.record_refusal()
        return reason, []
    queue.admit(spec)
    return None, queue.startable()


@pytest.fixture
def full_queue():
    """slots=2, capacity=3, with jobs 1..5 admitted: 1 and 2 running, 3..5 waiting."""
    queue = JobQueue(slots=2, capacity=3)
    for n in range(1, 6):
        assert submit(queue, job(n))[0] is None
    return queue


def test_first_jobs_start_up_to_the_slot_count():
    queue = JobQueue(slots=2, capacity=3)
    assert submit(queue, job(1)) == (None, [job(1)])
    assert submit(queue, job(2)) == (None, [job(2)])
    assert submit(queue, job(3)) == (None, [])


def test_slots_plus_capacity_jobs_are_admitted_and_the_next_is_busy(full_queue):
    assert list(full_queue.running) == [job(1).id, job(2).id]
    assert [j.id for j in full_queue.waiting] == [job(3).id, job(4).id, job(5).id]
    assert submit(full_queue, job(6)) == ("busy", [])
    assert job(6).id not in full_queue
    assert full_queue.counts["refused"] == 1


def test_finishing_a_running_job_starts_the_oldest_waiting_one(full_queue):
    assert full_queue.finish(job(2).id, "succeeded") == job(2)
    assert full_queue.startable() == [job(3)]
    assert set(full_queue.running) == {job(1).id, job(3).id}
    assert submit(full_queue, job(6)) == (None, [])
    assert [j.id for j in full_queue.waiting] == [job(4).id, job(5).id, job(6).id]


def test_waiting_jobs_start_in_admission_order(full_queue):
    started = []
    for n in (1, 2):
        full_queue.finish(job(n).id, "succeeded")
    started += full_queue.startable()
    full_queue.finish(job(3).id, "succeeded")
    started += full_queue.startable()
    assert started == [job(3), job(4), job(5)]
    assert full_queue.startable() == []


def test_finish_returns_the_job_once_then_none(full_queue):
    assert full_queue.finish(job(1).id, "succeeded") == job(1)
    assert full_queue.finish(job(1).id, "timed_out") is None
    assert full_queue.counts["succeeded"] == 1
    assert full_queue.counts["timed_out"] == 0


def test_finish_of_an_unknown_job_returns_none_and_counts_nothing():
    queue = JobQueue(slots=1, capacity=1)
    assert queue.finish(job(9).id, "failed") is None
    assert sum(queue.counts.values()) == 0


def test_counts_per_status(full_queue):
    full_queue.finish(job(1).id, "succeeded")
    full_queue.finish(job(2).id, "failed")
    full_queue.finish(job(3).id, "succeeded")
    full_queue.finish(job(4).id, "cancelled")
    submit(full_queue, job(1))  # duplicate
    assert full_queue.counts == {"succeeded": 2, "failed": 1, "cancelled": 1, "refused": 1}


def test_duplicate_of_a_running_or_waiting_job_is_refused(full_queue):
    assert submit(full_queue, job(1))[0] == "duplicate"
    assert submit(full_queue, job(5))[0] == "duplicate"
    assert full_queue.waiting_count == 3


def test_duplicate_right_after_finishing_is_refused():
    queue = JobQueue(slots=1, capacity=1)
    submit(queue, job(1))
    queue.finish(job(1).id, "succeeded")
    assert queue.idle
    assert submit(queue, job(1)) == ("duplicate", [])


def test_finished_ids_are_forgotten_after_recent_ids_more_finish():
    queue = JobQueue(slots=1, capacity=1)
    for n in range(RECENT_IDS + 1):
        submit(queue, job(n))
        queue.finish(job(n).id, "succeeded")
    assert submit(queue, job(0))[0] is None
    assert submit(queue, job(RECENT_IDS))[0] == "duplicate"


def test_start_drain_returns_the_waiting_jobs_and_refuses_later_ones(full_queue):
    assert full_queue.start_drain() == [job(3), job(4), job(5)]
    assert full_queue.draining
    assert submit(full_queue, job(6)) == ("draining", [])


def test_draining_takes_precedence_over_busy_and_duplicate(full_queue):
    full_queue.start_drain()
    assert full_queue.admission(job(1)) == "draining"
    assert full_queue.admission(job(99)) == "draining"


def test_finish_on_a_waiting_job_removes_it(full_queue):
    assert full_queue.is_waiting(job(4).id)
    assert full_queue.finish(job(4).id, "cancelled") == job(4)
    assert not full_queue.is_waiting(job(4).id)
    assert job(4).id not in full_queue
    assert [j.id for j in full_queue.waiting] == [job(3).id, job(5).id]
    full_queue.finish(job(1).id, "succeeded")
    full_queue.finish(job(2).id, "succeeded")
    assert full_queue.startable() == [job(3), job(5)]


def test_drained_waiting_jobs_finish_once_and_leave_the_queue_idle(full_queue):
    for waiting in full_queue.start_drain():
        assert full_queue.finish(waiting.id, "cancelled") is waiting
    full_queue.finish(job(1).id, "succeeded")
    full_queue.finish(job(2).id, "succeeded")
    assert full_queue.idle
    assert full_queue.counts == {"cancelled": 3, "succeeded": 2}


def test_contains_running_and_waiting_but_not_finished(full_queue):
    assert job(1).id in full_queue and job(5).id in full_queue
    full_queue.finish(job(1).id, "succeeded")
    assert job(1).id not in full_queue


def test_waiting_jobs_run_out_of_time_from_their_arrival():
    queue = JobQueue(slots=1, capacity=3)
    running = JobSpec(id=b"r" * 16, kind="echo", payload=b"", timeout=100.0, received_at=0.0)
    short = JobSpec(id=b"s" * 16, kind="echo", payload=b"", timeout=2.0, received_at=1.0)
    long = JobSpec(id=b"l" * 16, kind="echo", payload=b"", timeout=50.0, received_at=1.0)
    for spec in (running, short, long):
        submit(queue, spec)
    assert queue.next_waiting_deadline() == 3.0  # the running job's deadline is the pool's business
    assert queue.overdue_waiting(2.9) == []
    assert queue.overdue_waiting(3.0) == [short]
    assert queue.finish(short.id, "timed_out") is short
    assert queue.next_waiting_deadline() == 51.0
    queue.finish(long.id, "timed_out")
    assert queue.next_waiting_deadline() is None


def sized(n: int, size: int) -> JobSpec:
    spec = job(n)
    spec.payload_bytes = size
    return spec


def test_payload_bytes_waiting_and_running_are_bounded():
    queue = JobQueue(slots=2, capacity=10, max_bytes=1000)
    assert submit(queue, sized(1, 600))[0] is None
    assert submit(queue, sized(2, 400))[0] is None
    assert submit(queue, sized(3, 1))[0] == "busy"
    assert queue.bytes == 1000
    queue.finish(job(1).id, "succeeded")
    assert queue.bytes == 400
    assert submit(queue, sized(3, 600))[0] is None


def test_a_job_larger_than_the_byte_budget_runs_when_nothing_else_is_held():
    queue = JobQueue(slots=1, capacity=10, max_bytes=1000)
    assert submit(queue, sized(1, 5000))[0] is None
    assert submit(queue, sized(2, 1))[0] == "busy"
    queue.finish(job(1).id, "succeeded")
    assert queue.bytes == 0


# -- fair share --


def from_(origin: str, n: int) -> JobSpec:
    return JobSpec(id=n.to_bytes(16, "big"), kind="sleep", payload=b"\xf6", timeout=10.0, origin=origin)


def test_free_executors_go_to_the_submitters_in_turn() -> None:
    """A fills the queue first; B's jobs still start as soon as executors free up, one
    for B, one for A, in turn, not after all of A's."""
    queue = JobQueue(slots=1, capacity=10)
    for n in range(1, 6):
        submit(queue, from_("A", n))
    for n in range(11, 13):
        submit(queue, from_("B", n))
    order = []
    for _ in range(6):
        [running] = queue.running.values()
        queue.finish(running.id, "succeeded")
        order += [(j.origin, int.from_bytes(j.id, "big")) for j in queue.startable()]
    assert order == [("A", 2), ("B", 11), ("A", 3), ("B", 12), ("A", 4), ("A", 5)]


def test_a_submitter_at_its_cap_waits_while_another_runs() -> None:
    """Two executors, one per submitter: A's two long jobs take one; B's job gets the other."""
    queue = JobQueue(slots=2, capacity=10, max_per_origin=1)
    assert submit(queue, from_("A", 1))[1] == [from_("A", 1)]
    assert submit(queue, from_("A", 2))[1] == [], "A is at its cap: its second job waits"
    assert submit(queue, from_("B", 3))[1] == [from_("B", 3)]
    queue.finish(from_("B", 3).id, "succeeded")
    assert queue.startable() == [], "the free executor is not A's while A runs one"
    queue.finish(from_("A", 1).id, "succeeded")
    assert queue.startable() == [from_("A", 2)]
    assert queue.running_by == {"A": 1}


def test_a_waiting_job_ends_once_and_its_submitter_leaves_the_turn() -> None:
    queue = JobQueue(slots=1, capacity=10)
    submit(queue, from_("A", 1))
    submit(queue, from_("B", 2))
    assert queue.finish(from_("B", 2).id, "cancelled") == from_("B", 2)
    assert queue.finish(from_("B", 2).id, "cancelled") is None
    assert list(queue.queues) == [] and queue.waiting_count == 0
    assert queue.find(from_("A", 1).id) == from_("A", 1)
