"""The worker pool on its own, with real worker processes: every job handed to it is
reported exactly once, large payloads cross intact, and a worker that dies, times out
or is cancelled is replaced without disturbing the others."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import cbor2
import psutil
import pytest

from actors.executor import WorkerPool
from meshnet.jobs.framing import frame_buffers, unsent
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.socket_loop import SocketLoop
from tests.harness import REPO

KINDS = ["echo", "sha256", "sleep", "fail", "crash"]


class Reports:
    def __init__(self) -> None:
        self.outcomes: dict[bytes, list[Outcome]] = {}
        self._cond = threading.Condition()

    def __call__(self, outcomes: list[tuple[bytes, Outcome]]) -> None:
        with self._cond:
            for job_id, outcome in outcomes:
                self.outcomes.setdefault(job_id, []).append(outcome)
            self._cond.notify_all()

    def wait(self, *job_ids: bytes, timeout: float = 20.0) -> list[Outcome]:
        with self._cond:
            assert self._cond.wait_for(lambda: all(i in self.outcomes for i in job_ids), timeout), job_ids
            return [self.outcomes[i][0] for i in job_ids]


@pytest.fixture
def pool() -> Iterator[tuple[WorkerPool, Reports]]:
    loop = SocketLoop("test-jobs").start()
    pool = WorkerPool(loop, workers=2, enabled=KINDS, max_payload=16 * 1024 * 1024)
    reports = Reports()
    pool.report_to(reports)
    pool.open()
    try:
        yield pool, reports
    finally:
        workers = [psutil.Process(pid) for pid in worker_pids(pool)]
        if not pool.dispatch.closing:  # a test may have closed it
            pool.close()
            assert len(workers) == 2
        loop.stop()
        assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def job(job_id: bytes, kind: str, value: object, timeout: float = 20.0) -> JobSpec:
    return JobSpec(id=job_id, kind=kind, payload=cbor2.dumps(value), timeout=timeout)


def worker_pids(pool: WorkerPool) -> set[int]:
    return {w.process.pid for w in list(pool._workers)}


def test_large_payloads_cross_intact_both_ways(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    payloads = {bytes([i]): os.urandom(8 * 1024 * 1024) for i in range(4)}
    for job_id, data in payloads.items():
        runner.run(job(job_id, "echo", data))
    for job_id, data in payloads.items():
        (outcome,) = reports.wait(job_id)
        assert outcome.status == "succeeded"
        assert cbor2.loads(outcome.result) == data


def test_each_job_is_reported_once_through_crashes_timeouts_and_cancels(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    runner.run(job(b"crash", "crash", None))
    runner.run(job(b"slow", "sleep", 30, timeout=0.5))
    crashed, timed_out = reports.wait(b"crash", b"slow")
    assert (crashed.status, crashed.error_type) == ("failed", "WorkerCrashed")
    assert (timed_out.status, timed_out.error_type) == ("timed_out", "TimedOut")

    runner.run(job(b"stuck", "sleep", 30))
    runner.run(job(b"fine", "echo", "still here"))
    assert cbor2.loads(reports.wait(b"fine")[0].result) == "still here"
    runner.cancel({b"stuck"}, "cancelled by its submitter")
    (cancelled,) = reports.wait(b"stuck")
    assert (cancelled.status, cancelled.message) == ("cancelled", "cancelled by its submitter")

    ids = [f"n{i}".encode() for i in range(20)]
    for job_id in ids:
        runner.run(job(job_id, "echo", job_id.decode()))
    assert [cbor2.loads(o.result) for o in reports.wait(*ids)] == [i.decode() for i in ids]
    assert all(len(outcomes) == 1 for outcomes in reports.outcomes.values())
    assert len(reports.outcomes) == 24


def test_a_worker_killed_from_outside_is_replaced(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    runner.run(job(b"warm", "echo", 1))
    reports.wait(b"warm")
    runner.run(job(b"victim", "sleep", 30))
    runner.run(job(b"probe", "echo", 2))
    reports.wait(b"probe")
    busy = next(w for w, running in list(runner.dispatch.running.items()) if running.id == b"victim")
    killed = busy.process.pid
    os.kill(killed, signal.SIGKILL)
    (outcome,) = reports.wait(b"victim")
    assert outcome.error_type == "WorkerCrashed" and "exit code -9" in outcome.message
    ids = [f"after{i}".encode() for i in range(6)]
    for job_id in ids:
        runner.run(job(job_id, "sha256", b"x"))
    assert all(o.status == "succeeded" for o in reports.wait(*ids))
    assert len(worker_pids(runner)) == 2 and killed not in worker_pids(runner)


def test_a_result_over_the_limit_fails_in_the_worker(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    runner.run(job(b"big", "echo", b"x" * (16 * 1024 * 1024)))  # the result's CBOR header pushes it over
    (outcome,) = reports.wait(b"big")
    assert (outcome.status, outcome.error_type) == ("failed", "ResultTooLarge")
    runner.run(job(b"next", "echo", "ok"))
    assert reports.wait(b"next")[0].status == "succeeded"


def test_workers_that_die_at_start_are_replaced_with_growing_delays() -> None:
    """A worker that cannot start (here: a kind the worker cannot load, as a plugin
    failing to import would) dies at once; the pool must not fork replacements in a
    tight loop, and a job handed to it still ends, once."""
    loop = SocketLoop("test-jobs").start()
    pool = WorkerPool(loop, workers=1, enabled=["no-such-kind"], max_payload=1024)
    reports = Reports()
    pool.report_to(reports)
    spawned: list[float] = []
    five = threading.Event()
    spawn = pool._spawn

    def counted_spawn():  # type: ignore[no-untyped-def]
        spawned.append(time.monotonic())
        if len(spawned) == 5:
            five.set()
        return spawn()

    pool._spawn = counted_spawn  # type: ignore[method-assign]
    try:
        pool.open()
        assert five.wait(30)
        # Replacements waited 0.1, 0.2, 0.4, then 0.8 s (a lower bound: starts take time too).
        assert spawned[4] - spawned[3] >= 0.8, spawned
        pool.run(job(b"doomed", "echo", 1, timeout=5))
        (outcome,) = reports.wait(b"doomed")
        assert outcome.status in ("failed", "timed_out")
        assert len(reports.outcomes[b"doomed"]) == 1
    finally:
        pool.close()
        loop.stop()


def test_a_worker_outlives_a_node_slow_to_read_its_large_result(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    data = os.urandom(4 * 1024 * 1024)
    runner.run(job(b"first", "echo", data))
    assert reports.wait(b"first")[0].status == "succeeded"
    runner.run(job(b"second", "echo", data))
    runner.loop.call_soon(time.sleep, 1.5)  # the loop stalls while the worker sends 4 MiB
    (outcome,) = reports.wait(b"second")
    assert outcome.status == "succeeded", outcome
    assert cbor2.loads(outcome.result) == data


def test_a_chain_of_jobs_already_out_of_time_ends_each_once(pool: tuple[WorkerPool, Reports]) -> None:
    """Each report of a job that ran out of time before it started hands the pool the
    next one (as the job book does): 500 in a row must not recurse."""
    runner, reports = pool
    ids = [f"late{i}".encode() for i in range(500)]
    late = [
        JobSpec(id=i, kind="echo", payload=cbor2.dumps(1), timeout=1.0, received_at=time.monotonic() - 5) for i in ids
    ]

    def report_and_feed(outcomes: list[tuple[bytes, Outcome]]) -> None:
        reports(outcomes)
        index = ids.index(outcomes[0][0])
        if index + 1 < len(late):
            runner.run(late[index + 1])

    runner.report = report_and_feed
    runner.run(late[0])
    assert all(o.status == "timed_out" for o in reports.wait(*ids))
    assert all(len(reports.outcomes[i]) == 1 for i in ids)
    runner.report = reports
    runner.run(job(b"after", "echo", 1))
    assert reports.wait(b"after")[0].status == "succeeded"


def test_a_cancel_that_overtakes_its_job_and_jobs_after_close_still_end(pool: tuple[WorkerPool, Reports]) -> None:
    runner, reports = pool
    runner.cancel({b"overtaken"}, "cancelled by its submitter")
    runner.run(job(b"overtaken", "sleep", 30))
    (outcome,) = reports.wait(b"overtaken")
    assert (outcome.status, outcome.message) == ("cancelled", "cancelled by its submitter")
    runner.close()
    runner.run(job(b"too late", "echo", 1))
    assert reports.wait(b"too late")[0].status == "cancelled"


def test_a_worker_whose_node_end_closes_while_it_sends_exits_quietly() -> None:
    """The node closes a worker's socket when it stops, or gives up on a job: a worker in
    the middle of sending a large result must end without a traceback (its stderr is
    the node's log)."""
    node_end, worker_end = socket.socketpair()
    serve = (
        "import socket, sys; from meshnet.jobs.worker import serve; "
        "serve(socket.socket(fileno=int(sys.argv[1])), ['echo'], 64 << 20)"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", serve, str(worker_end.fileno())],
        pass_fds=[worker_end.fileno()],
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    worker_end.close()
    try:
        buffers = frame_buffers([b"echo", cbor2.dumps(b"x" * (16 * 1024 * 1024))])
        while buffers:
            buffers = unsent(buffers, node_end.sendmsg(buffers))
        # The first byte of the answer: the worker is sending 16 MiB, far more than the
        # socket pair buffers, so it is still sending when the node's end closes.
        assert node_end.recv(1)
        node_end.close()
        _, stderr = worker.communicate(timeout=30)
    finally:
        node_end.close()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert "Traceback" not in stderr, stderr
    assert worker.returncode == 0
