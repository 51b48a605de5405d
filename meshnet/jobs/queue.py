"""The job life-cycle on the node that runs jobs, without threads or processes.

Waiting jobs are at most ``capacity``; running ones at most ``slots``; together their
payloads hold at most ``max_bytes`` (a job alone may be larger: else it could never run).
A job that fits nowhere is refused ``busy``, never dropped. ``finish`` returns the job
only the first time it is called for it, so a job can end in exactly one terminal status
however its ending is reported (result, timeout, cancel, drain).

Fair share: each submitter (a job's ``origin``: a client connection, or a peer) has a
queue of its own, and a free executor goes to the submitters in turn (round-robin), each
taking its oldest waiting job; and a submitter runs at most ``max_per_origin`` jobs at
once (None: no cap). So a client that fills the queue first, or holds executors with
long jobs, does not stop another's jobs from starting.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Iterator

from meshnet.jobs.model import JobSpec

#: Ids remembered after a job ends, to refuse a replayed or duplicated submission.
RECENT_IDS = 4096


class JobQueue:
    def __init__(self, slots: int, capacity: int, max_bytes: int | None = None, max_per_origin: int | None = None):
        self.slots = slots
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.max_per_origin = max_per_origin
        #: Payload bytes of the jobs waiting and running.
        self.bytes = 0
        #: Waiting jobs by submitter, oldest first; the submitters in the order they are
        #: served (the next free executor goes to the first that may run one).
        self.queues: OrderedDict[str, deque[JobSpec]] = OrderedDict()
        self.waiting_count = 0
        self.running: dict[bytes, JobSpec] = {}
        #: Running jobs by submitter (a plain dict: a Counter's missing key costs a call of
        #: Python code, for every job of a lone submitter).
        self.running_by: dict[str, int] = {}
        self._waiting_ids: set[bytes] = set()
        self._recent: OrderedDict[bytes, None] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.draining = False

    def __contains__(self, job_id: bytes) -> bool:
        return job_id in self.running or job_id in self._waiting_ids

    @property
    def waiting(self) -> Iterator[JobSpec]:
        """Every waiting job (by submitter, each one's oldest first)."""
        for jobs in self.queues.values():
            yield from jobs

    def admission(self, job: JobSpec) -> str | None:
        """None if ``job`` may be admitted, else the refusal reason."""
        if self.draining:
            return "draining"
        if job.id in self or job.id in self._recent:
            return "duplicate"
        if len(self.running) >= self.slots and self.waiting_count >= self.capacity:
            return "busy"
        if self.max_bytes is not None and self.bytes and self.bytes + job.payload_bytes > self.max_bytes:
            return "busy"
        return None

    def admit(self, job: JobSpec) -> None:
        jobs = self.queues.get(job.origin)
        if jobs is None:
            jobs = self.queues[job.origin] = deque()
        jobs.append(job)
        self.waiting_count += 1
        self._waiting_ids.add(job.id)
        self.bytes += job.payload_bytes

    def record_refusal(self) -> None:
        self.counts["refused"] += 1

    def startable(self) -> list[JobSpec]:
        """Move waiting jobs to running while executors are free, the submitters in turn,
        none past its cap; return them."""
        started = []
        queues, cap = self.queues, self.max_per_origin
        while queues and len(self.running) < self.slots:
            origin = next(iter(queues)) if cap is None else self._next_origin(cap)
            if origin is None:
                break  # every submitter with waiting jobs is at its cap
            jobs = queues[origin]
            job = jobs.popleft()
            if not jobs:
                del queues[origin]
            elif len(queues) > 1:
                queues.move_to_end(origin)  # to the back of the turn
            self.waiting_count -= 1
            self._waiting_ids.discard(job.id)
            self.running[job.id] = job
            self.running_by[origin] = self.running_by.get(origin, 0) + 1
            started.append(job)
        return started

    def _next_origin(self, cap: int) -> str | None:
        running = self.running_by
        return next((origin for origin in self.queues if running.get(origin, 0) < cap), None)

    def finish(self, job_id: bytes, status: str) -> JobSpec | None:
        """End a job with ``status``; None when it already ended (or never existed)."""
        job = self.running.pop(job_id, None)
        if job is not None:
            left = self.running_by[job.origin] - 1
            if left:
                self.running_by[job.origin] = left
            else:
                del self.running_by[job.origin]
        elif job_id in self._waiting_ids:
            jobs = self.queues[self._origin_of_waiting(job_id)]
            job = next(j for j in jobs if j.id == job_id)
            jobs.remove(job)
            if not jobs:
                del self.queues[job.origin]
            self.waiting_count -= 1
            self._waiting_ids.discard(job_id)
        if job is None:
            return None
        self.bytes -= job.payload_bytes
        self.counts[status] += 1
        self._recent[job_id] = None
        if len(self._recent) > RECENT_IDS:
            self._recent.popitem(last=False)
        return job

    def _origin_of_waiting(self, job_id: bytes) -> str:
        return next(origin for origin, jobs in self.queues.items() if any(j.id == job_id for j in jobs))

    def find(self, job_id: bytes) -> JobSpec | None:
        """The job with ``job_id``, waiting or running (None: neither)."""
        job = self.running.get(job_id)
        if job is None and job_id in self._waiting_ids:
            job = next(j for j in self.waiting if j.id == job_id)
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
        return not self.running and not self.queues
