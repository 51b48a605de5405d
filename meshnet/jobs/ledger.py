"""Jobs this node forwarded to peers, until each has its one terminal status.

Sans-IO: the relay client feeds it results, refusals, peer departures, relay loss and
the clock, and answers whoever each returned job names.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

#: How long past a job's own timeout the submitting node waits for the executing
#: node's answer before it reports ``timed_out`` itself (the executing node enforces
#: the timeout and normally answers first; this covers a silent or stuck peer).
DEADLINE_GRACE = 2.0


@dataclass
class ForwardedJob:
    id: bytes
    peer: str
    deadline: float
    reply: Any = None
    kind: str = ""
    #: Who submitted it (as in ``JobSpec.origin``): only they may cancel it.
    origin: str = ""
    #: The nonce of the sealed job as sent: a refusal of an unopenable job must name it.
    nonce: bytes = b""


@dataclass
class ForwardLedger:
    jobs: dict[bytes, ForwardedJob] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    #: (deadline, sequence, job): the job itself is kept so that the entry of a settled
    #: job is never taken for a later job that reuses its id.
    _deadlines: list[tuple[float, int, ForwardedJob]] = field(default_factory=list)
    _sequence: int = 0

    def add(self, job: ForwardedJob) -> bool:
        if job.id in self.jobs:
            return False
        self.jobs[job.id] = job
        self._sequence += 1
        heapq.heappush(self._deadlines, (job.deadline, self._sequence, job))
        return True

    def settle(self, job_id: bytes, status: str, *, peer: str | None = None) -> ForwardedJob | None:
        """End a forwarded job once; a ``peer`` given must be the one it went to."""
        job = self.jobs.get(job_id)
        if job is None or (peer is not None and job.peer != peer):
            return None
        del self.jobs[job_id]
        self.counts[status] += 1
        if len(self._deadlines) > 2 * len(self.jobs) + 64:
            # Drop the entries of settled jobs, which would otherwise stay (holding their
            # reply callables) until their deadlines, up to a day away.
            self._deadlines = [entry for entry in self._deadlines if self.jobs.get(entry[2].id) is entry[2]]
            heapq.heapify(self._deadlines)
        return job

    def jobs_on(self, peer: str) -> list[ForwardedJob]:
        return [job for job in self.jobs.values() if job.peer == peer]

    def expired(self, now: float) -> list[ForwardedJob]:
        """Jobs past their deadline, removed from the ledger (their status: ``timed_out``)."""
        out = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, job = heapq.heappop(self._deadlines)
            if self.jobs.get(job.id) is job:
                self.settle(job.id, "timed_out")
                out.append(job)
        return out

    def next_deadline(self) -> float | None:
        while self._deadlines and self.jobs.get(self._deadlines[0][2].id) is not self._deadlines[0][2]:
            heapq.heappop(self._deadlines)
        return self._deadlines[0][0] if self._deadlines else None
