"""JobQueueActor: admits jobs into the bounded queue and feeds the executors.

It drives :class:`meshnet.jobs.queue.JobQueue`, which decides admission and guarantees
one terminal status per job; every job's terminal status is logged here, once.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import structlog

from actors.base import NodeActor, log_job_end
from actors.executor import PoolRunner
from actors.messages import Abort, CancelJob, Drain, Executed, RunHere, RunHereMany
from meshnet.jobs.model import JobSpec, Outcome, job_id_text
from meshnet.jobs.queue import JobQueue

log = structlog.get_logger("meshnet.jobs")


@dataclass(frozen=True)
class ExpireWaiting:
    """The first waiting job's timeout has passed."""


def waited_too_long(job: JobSpec) -> str:
    return f"job waited in the queue past its timeout of {job.timeout:g} s and never started"


class JobQueueActor(NodeActor):
    def __init__(
        self,
        *,
        runner: PoolRunner,
        slots: int,
        capacity: int,
        enabled: list[str],
        max_payload: int,
        max_timeout: float,
    ):
        super().__init__()
        self.runner = runner
        self.queue = JobQueue(slots=slots, capacity=capacity)
        self.enabled = frozenset(enabled)
        self.max_payload = max_payload
        self.max_timeout = max_timeout
        self.idle = threading.Event()
        self.idle.set()
        # One timer at a time, armed for the first waiting job to run out of time, so
        # that a job stuck behind long ones ends when its timeout does, not when an
        # executor frees up.
        self._expiry: threading.Timer | None = None
        self._expiry_at = math.inf

    def on_start(self) -> None:
        self.runner.queue = self.actor_ref

    def handle(self, message: Any) -> Any:
        if isinstance(message, RunHere):
            self._admit(message.job)
        elif isinstance(message, RunHereMany):
            for job in message.jobs:
                self._admit(job)
        elif isinstance(message, Executed):
            self._finish(message.job_id, message.outcome)
        elif isinstance(message, CancelJob):
            self._cancel(message)
        elif isinstance(message, Drain):
            for job in self.queue.start_drain():
                self._finish(job.id, Outcome("cancelled", error_type="Cancelled", message="the node is shutting down"))
        elif isinstance(message, Abort):
            self.runner.cancel(None, message.reason)
        elif isinstance(message, ExpireWaiting):
            self._expiry, self._expiry_at = None, math.inf
            for job in self.queue.overdue_waiting(time.monotonic()):
                self._finish(job.id, Outcome("timed_out", error_type="TimedOut", message=waited_too_long(job)))
            self._arm_expiry(self.queue.next_waiting_deadline())
        self._update_idle()

    def on_stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()

    def _arm_expiry(self, deadline: float | None) -> None:
        """Have the timer fire by ``deadline`` (it may fire for a job that has started
        since; the handler then just arms it for the next waiting job)."""
        if deadline is None or deadline >= self._expiry_at:
            return
        if self._expiry is not None:
            self._expiry.cancel()
        me = self.actor_ref
        self._expiry = threading.Timer(max(0.0, deadline - time.monotonic()), lambda: me.tell(ExpireWaiting()))
        self._expiry.daemon = True
        self._expiry.start()
        self._expiry_at = deadline

    def status(self) -> dict[str, Any]:
        return {
            "queued": len(self.queue.waiting),
            "running": len(self.queue.running),
            "queue_size": self.queue.capacity,
            "executors": self.queue.slots,
            "draining": self.queue.draining,
            "jobs": dict(self.queue.counts),
        }

    def _admit(self, job: JobSpec) -> None:
        refusal = self._refusal(job)
        if refusal is not None:
            self.queue.record_refusal()
            _answer(job, refusal)
            return
        self.queue.admit(job)
        for ready in self.queue.startable():
            self.runner.run(ready)
        if self.queue.is_waiting(job.id):
            self._arm_expiry(job.received_at + job.timeout)

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
        size = len(memoryview(job.payload))
        if size > self.max_payload:
            return Outcome.refused("too_large", f"payload is {size} bytes; this node takes at most {self.max_payload}")
        reason = self.queue.admission(job)
        if reason == "busy":
            return Outcome.refused(
                "busy", f"all {self.queue.slots} executors are busy and the queue of {self.queue.capacity} is full"
            )
        if reason == "duplicate":
            return Outcome.refused("duplicate", f"a job with id {job_id_text(job.id)} was already submitted")
        if reason == "draining":
            return Outcome.refused("draining", "the node is shutting down and takes no new jobs")
        return None

    def _finish(self, job_id: bytes, outcome: Outcome) -> None:
        if outcome.status == "succeeded" and len(outcome.result) > self.max_payload:
            outcome = Outcome(
                "failed",
                error_type="ResultTooLarge",
                message=f"result is {len(outcome.result)} bytes; this node sends at most {self.max_payload}",
            )
        job = self.queue.finish(job_id, outcome.status)
        if job is None:
            return
        _answer(job, outcome)
        for ready in self.queue.startable():
            self.runner.run(ready)

    def _cancel(self, message: CancelJob) -> None:
        job = next((j for j in [*self.queue.running.values(), *self.queue.waiting] if j.id == message.job_id), None)
        if job is None or job.origin != message.requester:
            return
        if self.queue.is_waiting(job.id):
            self._finish(job.id, Outcome("cancelled", error_type="Cancelled", message="cancelled by its submitter"))
        else:
            self.runner.cancel({job.id}, "cancelled by its submitter")

    def _update_idle(self) -> None:
        if self.queue.idle:
            self.idle.set()
        else:
            self.idle.clear()


def _answer(job: JobSpec, outcome: Outcome) -> None:
    # Never the client connection's routing id: it is what a client would need to take
    # another's results over.
    submitter = "client" if job.origin.startswith("client") else job.origin
    log_job_end(log, job.id, job.kind, outcome, submitter=submitter)
    job.reply(outcome)
