"""The job life-cycle on the node that runs jobs, without threads or processes.

``waiting`` holds at most ``capacity`` jobs; ``running`` at most ``slots``; together
their payloads hold at most ``max_bytes`` (a job alone may be larger: else it could
never run). A job that fits nowhere is refused ``busy``, never dropped. ``finish`` returns the job only the
first time it is called for it, so a job can end in exactly one terminal status however
its ending is reported (result, timeout, cancel, drain).
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque

from meshnet.jobs.model import JobSpec

#: Ids remembered after a job ends, to refuse a replayed or duplicated submission.
RECENT_IDS = 4096


class JobQueue:
    def __init__(self, slots: int, capacity: int, max_bytes: int | None = None):
        self.slots = slots
        self.capacity = capacity
        self.max_bytes = max_bytes
        #: Payload bytes of the jobs waiting and running.
        self.bytes = 0
        self.waiting: deque[JobSpec] = deque()
        self.running: dict[bytes, JobSpec] = {}
        self._waiting_ids: set[bytes] = set()
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.draining = False

    def __contains__(self, job_id: bytes) -> bool:
        return job_id in self.running or job_id in self._waiting_ids

    def admission(self, job: JobSpec) -> str | None:
        """None if ``job`` may be admitted, else the refusal reason."""
        if self.draining:
            return "draining"
        if job.id in self or job.id in self._recent:
            return "duplicate"
        if len(self.running) >= self.slots and len(self.waiting) >= self.capacity:
            return "busy"
        if self.max_bytes is not None and self.bytes and self.bytes + job.payload_bytes > self.max_bytes:
            return "busy"
        return None

    def admit(self, job: JobSpec) -> None:
        self.waiting.append(job)
        self._waiting_ids.add(job.id)
        self.bytes += job.payload_bytes

    def record_refusal(self) -> None:
        self.counts["refused"] += 1

    def startable(self) -> list[JobSpec]:
        """Move as many waiting jobs as there are free slots to running, and return them."""
        started = []
        while self.waiting and len(self.running) < self.slots:
            job = self.waiting.popleft()
            self._waiting_ids.discard(job.id)
            self.running[job.id] = job
            started.append(job)
        return started

    def finish(self, job_id: bytes, status: str) -> JobSpec | None:
        """End a job with ``status``; None when it already ended (or never existed)."""
        job = self.running.pop(job_id, None)
        if job is None and job_id in self._waiting_ids:
            job = next(j for j in self.waiting if j.id == job_id)
            self.waiting.remove(job)
            self._waiting_ids.discard(job_id)
        if job is None:
            return None
        self.bytes -= job.payload_bytes
        self.counts[status] += 1
        self._recent[job_id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return job

    def next_waiting_deadline(self) -> float | None:
        """When the first waiting job runs out of time (``time.monotonic``), if any does."""
        return min((job.received_at + job.timeout for job in self.waiting), default=None)

    def overdue_waiting(self, now: float) -> list[JobSpec]:
        """Waiting jobs whose whole timeout has passed: they must end without starting."""
        return [job for job in self.waiting if job.remaining(now) <= 0]

    def is_waiting(self, job_id: bytes) -> bool:
        return job_id in self._waiting_ids

    def start_drain(self) -> list[JobSpec]:
        """Refuse new jobs from now on; return the waiting ones, which will never start."""
        self.draining = True
        return list(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting
