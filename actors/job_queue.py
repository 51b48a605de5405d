"""JobQueueActor and its JobBook: the bounded queue in front of the executors.

The book drives :class:`meshnet.jobs.queue.JobQueue`, which decides admission and
guarantees one terminal status per job; every job's terminal status is logged here,
once. The book lives on the node's job loop, like everything on the job path: the
client API and the relay client submit to it and cancel through it as they read, the
worker pool reports to it as jobs end, all on that loop's thread, so a job crosses no
thread and the book takes no lock. Its one timer (the first waiting job's timeout) is
a loop timer. Other threads (the supervisor draining the node, a status request) go
through the loop: :meth:`JobBook.on_loop`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from actors.answers import Answers
from actors.base import NodeActor, log_job_end
from actors.executor import WorkerPool
from meshnet.jobs.model import CANCELLED_BY_SUBMITTER, REFUSED_DRAINING, JobSpec, Outcome, job_id_text
from meshnet.jobs.queue import JobQueue
from meshnet.log_budget import LogBudget
from meshnet.memory_budget import MemoryBudget
from meshnet.socket_loop import TimerHandle

log = structlog.get_logger("meshnet.jobs")

SHUTTING_DOWN = "the node is shutting down"


def waited_too_long(job: JobSpec) -> str:
    return f"job waited in the queue past its timeout of {job.timeout:g} s and never started"


class JobBook:
    def __init__(
        self,
        *,
        runner: WorkerPool,
        slots: int,
        capacity: int,
        enabled: list[str],
        max_payload: int,
        max_timeout: float,
        max_bytes: int | None = None,
        max_per_origin: int | None = None,
        memory: MemoryBudget | None = None,
        answers: Answers | None = None,
    ):
        self.runner = runner
        #: Where each job's terminal status goes, by its way back (None: nowhere).
        self.answers = answers
        runner.report_to(self.finish)
        self.loop = runner.loop
        self.queue = JobQueue(slots=slots, capacity=capacity, max_bytes=max_bytes, max_per_origin=max_per_origin)
        self.enabled = frozenset(enabled)
        self.max_payload = max_payload
        self.max_timeout = max_timeout
        #: Set while no job waits or runs (the supervisor waits on it to drain).
        self.idle = threading.Event()
        self.idle.set()
        # One timer at a time, armed for the first waiting job to run out of time, so
        # that a job stuck behind long ones ends when its timeout does, not when an
        # executor frees up.
        self._expiry: TimerHandle | None = None
        self._expiry_at = math.inf
        self._closed = False
        #: Refusals are logged once per submitter lately, then counted: a peer streaming
        #: jobs of a kind this node does not run must not write a line per job.
        self.refusals = LogBudget(self.loop, log, "jobs_refused", "submitter")
        self.memory = memory or MemoryBudget()
        self.memory.add_part("jobs", lambda: self.queue.bytes)

    def on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the job loop and return its result (from another thread)."""
        if self.loop.in_loop():
            return fn(*args)
        return self.loop.run_sync(fn, *args)

    # -- the job loop --

    def submit(self, jobs: Iterable[JobSpec]) -> None:
        """Admit each job, or answer it with its refusal; start what fits."""
        answers: list[tuple[JobSpec, Outcome]] = []
        started: list[JobSpec] = []
        for job in jobs:
            refusal = self._refusal(job)
            if refusal is not None:
                self.queue.record_refusal()
                answers.append((job, refusal))
                continue
            self.queue.admit(job)
            started += self._start()  # before the next admission looks at what runs
            if self.queue.is_waiting(job.id):
                self._arm_expiry(job.received_at + job.timeout)
        self._carry_out(started, answers)

    def finish(self, outcomes: Iterable[tuple[bytes, Outcome]]) -> None:
        """Jobs ended with these outcomes (a job that already ended is ignored)."""
        answers: list[tuple[JobSpec, Outcome]] = []
        for job_id, outcome in outcomes:
            job = self.queue.finish(job_id, outcome.status)
            if job is not None:
                answers.append((job, outcome))
        self._carry_out(self._start(), answers)

    def cancel(self, job_id: bytes, requester: str) -> None:
        """Cancel a job if ``requester`` submitted it: a waiting one ends now, a running
        one when the pool has killed its worker."""
        job = self.queue.find(job_id)
        if job is None or job.origin != requester:
            return
        if self.queue.is_waiting(job_id):
            self.finish([(job_id, Outcome.cancelled(CANCELLED_BY_SUBMITTER))])
        else:
            self.runner.cancel({job_id}, CANCELLED_BY_SUBMITTER)

    def drain(self) -> None:
        """Refuse new jobs from now on; end the waiting ones as cancelled."""
        waiting = self.queue.start_drain()
        self.finish([(job.id, Outcome.cancelled(SHUTTING_DOWN)) for job in waiting])

    def abort(self, reason: str) -> None:
        """Kill every running job; each ends as cancelled with ``reason``."""
        self.runner.cancel(None, reason)

    def has_free_executor(self) -> bool:
        """Whether a job handed over now starts at once (the loop thread)."""
        queue = self.queue
        return len(queue.running) < queue.slots and not queue.waiting_count

    def load(self) -> dict[str, int]:
        """Executors busy and free, and jobs waiting, now (the loop thread): what the
        node's heartbeat tells its relay for placement."""
        queue, counts = self.queue, self.queue.counts
        busy = len(queue.running)
        ran = counts["succeeded"] + counts["failed"] + counts["timed_out"]
        return {"busy": busy, "free": max(0, queue.slots - busy), "queued": queue.waiting_count, "ran": ran}

    def status(self) -> dict[str, Any]:
        return {
            "queued": self.queue.waiting_count,
            "max_running_per_submitter": self.queue.max_per_origin,
            "running": len(self.queue.running),
            "queue_size": self.queue.capacity,
            "queued_bytes": self.queue.bytes,
            "executors": self.queue.slots,
            "draining": self.queue.draining,
            "jobs": dict(self.queue.counts),
        }

    def close(self) -> None:
        self._closed = True
        self.refusals.close()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    # -- internals --

    def _refusal(self, job: JobSpec) -> Outcome | None:
        if job.kind not in self.enabled:
            return Outcome.refused(
                "unknown_kind",
                f"job kind {job.kind!r} is not enabled on this node; enabled: {', '.join(sorted(self.enabled))}",
            )
        if job.timeout > self.max_timeout:
            return Outcome.refused(
                "invalid", f"timeout {job.timeout:g} s exceeds this node's jobs.max_timeout ({self.max_timeout:g} s)"
            )
        size = job.payload_bytes = len(memoryview(job.payload))
        if size > self.max_payload:
            return Outcome.refused("too_large", f"payload is {size} bytes; this node takes at most {self.max_payload}")
        reason = self.queue.admission(job)
        if reason is None and not self.memory.admits(size):
            return Outcome.refused("busy", self.memory.why(size))
        if reason == "busy":
            if self.queue.waiting_count < self.queue.capacity:
                return Outcome.refused(
                    "busy",
                    f"jobs with {self.queue.bytes} bytes of payloads already wait or run here "
                    f"(jobs.max_queued_bytes is {self.queue.max_bytes})",
                )
            return Outcome.refused(
                "busy", f"all {self.queue.slots} executors are busy and the queue of {self.queue.capacity} is full"
            )
        if reason == "duplicate":
            return Outcome.refused("duplicate", f"a job with id {job_id_text(job.id)} was already submitted")
        if reason == "draining":
            return REFUSED_DRAINING
        return None

    def _start(self) -> list[JobSpec]:
        started = self.queue.startable()
        idle = self.queue.idle
        if idle != self.idle.is_set():
            self.idle.set() if idle else self.idle.clear()
        return started

    def _carry_out(self, started: list[JobSpec], answers: list[tuple[JobSpec, Outcome]]) -> None:
        """Start jobs, then log and send answers."""
        for job in started:
            self.runner.run(job)
        for job, outcome in answers:
            # Never the client connection's routing id: it is what a client would need
            # to take another's results over.
            submitter = "client" if job.origin.startswith("client") else job.origin
            refused = outcome.status == "refused"
            if not refused or self.refusals.allow(submitter, f"{outcome.reason}: {outcome.message}"):
                log_job_end(log, job.id, job.kind, outcome, submitter=submitter)
            if self.answers is not None:
                self.answers.answer(job, outcome)

    def _arm_expiry(self, deadline: float | None) -> None:
        """Have the timer fire by ``deadline`` (it may fire for a job that has started
        since; it then arms itself for the next waiting job)."""
        if deadline is None or deadline >= self._expiry_at or self._closed:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self.loop.call_later(max(0.0, deadline - time.monotonic()), self._expire_waiting)
        self._expiry_at = deadline

    def _expire_waiting(self) -> None:
        self._expiry, self._expiry_at = None, math.inf
        overdue = self.queue.overdue_waiting(time.monotonic())
        self.finish(
            [(job.id, Outcome("timed_out", error_type="TimedOut", message=waited_too_long(job))) for job in overdue]
        )
        self._arm_expiry(self.queue.next_waiting_deadline())


class JobQueueActor(NodeActor):
    """Supervises the node's :class:`JobBook` (made by the supervisor and handed to the
    parts on the job loop, which call it directly there): closes it at stop."""

    def __init__(self, book: JobBook):
        super().__init__()
        self._book = book

    def on_stop(self) -> None:
        if self._book.loop.running:
            self._book.on_loop(self._book.close)
        else:
            self._book.close()
