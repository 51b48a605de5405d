"""ExecutorActor: owns the process pool that runs jobs.

pebble's ``ProcessPool`` kills a job past its timeout and replaces its worker, and
replaces a worker that a job crashed; measured here it also ran no-op tasks faster than
``concurrent.futures.ProcessPoolExecutor``. Workers are started by a ``forkserver``:
forking the node itself, which runs threads holding locks (pykka, ZeroMQ), could
deadlock a child.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import threading
import time
from collections.abc import Callable

import pebble
import structlog

from actors.base import NodeActor
from meshnet.jobs.model import JobSpec, Outcome, job_id_text
from meshnet.jobs.worker import init_worker, run_job

log = structlog.get_logger("meshnet.executor")


def _timed_out_text(job: JobSpec, *, started: bool) -> str:
    if started:
        return f"job ran past its timeout of {job.timeout:g} s (counted from its arrival) and was killed"
    return f"job reached an executor after its timeout of {job.timeout:g} s and never started"


def outcome_of(future: concurrent.futures.Future, job: JobSpec, cancel_reason: str) -> Outcome:
    """The terminal outcome a finished pool future stands for."""
    if future.cancelled():
        return Outcome("cancelled", error_type="Cancelled", message=cancel_reason)
    exc = future.exception()
    if exc is None:
        status, result, error_type, message = future.result()
        return Outcome(status, result=result, error_type=error_type, message=message)
    if isinstance(exc, concurrent.futures.TimeoutError):
        return Outcome("timed_out", error_type="TimedOut", message=_timed_out_text(job, started=True))
    if isinstance(exc, pebble.ProcessExpired):
        return Outcome(
            "failed", error_type="WorkerCrashed", message=f"the worker running the job died (exit code {exc.exitcode})"
        )
    return Outcome("failed", error_type=type(exc).__name__, message=str(exc))


class PoolRunner:
    """Hands jobs to the process pool and reports each one's outcome.

    Thread-safe: the job book calls :meth:`run` and :meth:`cancel` from whichever thread
    admitted or ended a job, so that a job reaches the pool without an actor hop; pebble's
    callback thread calls ``report`` (the job book's ``finish``) as jobs end. The maps
    shared between them are guarded by one lock.
    """

    def __init__(self, pool: pebble.ProcessPool):
        self.pool = pool
        self.report: Callable[[list[tuple[bytes, Outcome]]], None] | None = None
        self.futures: dict[bytes, concurrent.futures.Future] = {}
        self.cancel_reasons: dict[bytes, str] = {}
        self._lock = threading.Lock()

    def run(self, job: JobSpec) -> None:
        report = self.report
        assert report is not None
        remaining = job.remaining(time.monotonic())
        if remaining <= 0:
            report([(job.id, Outcome("timed_out", error_type="TimedOut", message=_timed_out_text(job, started=False)))])
            return
        future = self.pool.schedule(run_job, args=(job.kind, bytes(job.payload)), timeout=remaining)
        with self._lock:
            self.futures[job.id] = future

        def done(f: concurrent.futures.Future) -> None:
            with self._lock:
                reason = self.cancel_reasons.pop(job.id, "cancelled")
                self.futures.pop(job.id, None)
            report([(job.id, outcome_of(f, job, reason))])

        future.add_done_callback(done)
        log.debug("job_started", job_id=job_id_text(job.id), kind=job.kind)

    def cancel(self, job_ids: set[bytes] | None, reason: str) -> None:
        """Kill running jobs (all when ``job_ids`` is None); their outcome is ``cancelled``."""
        with self._lock:
            chosen = [(i, f) for i, f in self.futures.items() if job_ids is None or i in job_ids]
            for job_id, _ in chosen:
                self.cancel_reasons[job_id] = reason
        for _, future in chosen:
            future.cancel()  # pebble kills the worker running it


class ExecutorActor(NodeActor):
    """Owns the pool's life: starts it with the node, stops it (and its helper
    processes) with the node. Running jobs goes through its :class:`PoolRunner`."""

    def __init__(self, *, workers: int, enabled: list[str]):
        super().__init__()
        self.workers = workers
        self.enabled = list(enabled)
        self.pool: pebble.ProcessPool | None = None
        self._runner: PoolRunner | None = None

    def on_start(self) -> None:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["meshnet.jobs.worker"])
        self.pool = pebble.ProcessPool(
            max_workers=self.workers, initializer=init_worker, initargs=(self.enabled,), context=context
        )
        self._runner = PoolRunner(self.pool)
        log.info("executors_started", workers=self.workers, kinds=self.enabled)

    def runner(self) -> PoolRunner:
        assert self._runner is not None
        return self._runner

    def on_stop(self) -> None:
        if self.pool is not None:
            self.pool.stop()
            self.pool.join(timeout=10)
            _stop_helper_processes()
            log.info("executors_stopped")


def _stop_helper_processes() -> None:
    """Stop multiprocessing's forkserver and resource tracker now, and wait for them.

    Both would exit on their own once this process is gone, but a moment later: a
    supervisor that checks, right after the node exits, that nothing it started is
    left would find them. These ``_stop`` methods are private but have been stable
    since Python 3.8 (the standard library's own tests use them); a new pool restarts
    both on demand."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except (OSError, ChildProcessError) as exc:
                log.warning("helper_stop_failed", helper=type(helper).__name__, error=str(exc))
