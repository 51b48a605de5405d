"""Which worker runs which job, for the node's worker pool, without processes, sockets or
timers (sans-IO).

The pool (``WorkerPool``, actors/executor.py) is the shell: it writes jobs to the
workers' sockets and reads their results, arms a timer per running job, and kills and
starts processes. Every decision about jobs and workers is made here instead, from the
events the shell passes in (a job handed over, a worker ready, finished, unreachable or
exited, a job's timer, a cancel, the close) with the clock; what comes back is plain
data for the shell to carry out. Kept apart so that the rules can be checked without
processes, over any order of events (tests/unit/test_job_dispatch.py):

- Every job handed over ends in exactly one outcome, returned once: at once (it was
  cancelled before it arrived, or the pool is closing), when its time runs out before a
  worker is free (``timed_out``, never started), when it is cancelled while it waits, or
  when its worker sends its result or exits (killed by the pool: for the reason it was
  killed; else ``WorkerCrashed``).
- A worker runs one job at a time; one the pool is killing, or whose socket is gone,
  gets no more.
- Workers that die before they finish any job (a broken start: a plugin failing to
  import, say) would die again at once: their replacements wait, longer each time, until
  a worker finishes a job.

Workers are opaque handles here (any hashable object: the shell's ``Worker``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

from meshnet.jobs.model import JobSpec, Outcome

#: Longest wait before replacing a worker after workers kept failing to start.
MAX_REPLACE_DELAY = 10.0
#: The wait before replacing a worker after one failed start; it doubles with each.
FIRST_REPLACE_DELAY = 0.1
#: Why the jobs still there when the pool closes end cancelled.
SHUTTING_DOWN = "the node is shutting down"
#: Ids of jobs cancelled before the call that starts them reached the pool, kept at most.
MAX_EARLY_CANCELS = 4096

W = TypeVar("W", bound=Hashable)
#: A job and the outcome it ends with.
Ended = tuple[JobSpec, Outcome]


def timed_out(job: JobSpec, *, started: bool) -> Outcome:
    """The outcome of a job that ran out of time: killed while it ran, or before it started."""
    if started:
        text = f"job ran past its timeout of {job.timeout:g} s (counted from its arrival) and was killed"
    else:
        text = f"job reached an executor after its timeout of {job.timeout:g} s and never started"
    return Outcome("timed_out", error_type="TimedOut", message=text)


def crashed(exit_code: int | None) -> Outcome:
    """The outcome of a job whose worker died without being killed by the pool."""
    return Outcome(
        "failed", error_type="WorkerCrashed", message=f"the worker running the job died (exit code {exit_code})"
    )


class JobDispatch(Generic[W]):
    """The pool's jobs and workers: the jobs that wait (``pending``, oldest first), the
    free workers (``idle``), the job each busy one runs (``running``), the workers being
    killed and why, and when to replace a worker that is gone."""

    def __init__(self) -> None:
        #: Jobs handed over while no worker was idle (one being replaced), oldest first.
        self.pending: deque[JobSpec] = deque()
        #: Workers free for a job; the last one freed is given the next job.
        self.idle: list[W] = []
        #: The job each busy worker was given (until its result, or its exit).
        self.running: dict[W, JobSpec] = {}
        #: Workers the pool is killing: the outcome their job (if any) ends with.
        self._endings: dict[W, Outcome] = {}
        #: Workers that have finished a job: they started fine.
        self._ran: set[W] = set()
        #: Job ids cancelled before the call that starts them reached the pool, and why.
        self._cancelled_early: dict[bytes, str] = {}
        #: Workers that failed to start (died before finishing any job, not killed by the
        #: pool) since one last finished a job.
        self._failed_starts = 0
        self.closing = False

    def submit(self, job: JobSpec) -> Outcome | None:
        """``job`` is handed over: the outcome it ends with at once, or None (it waits
        for :meth:`assign`)."""
        reason = self._cancelled_early.pop(job.id, None)
        if reason is not None:
            return Outcome.cancelled(reason)
        if self.closing:
            return Outcome.cancelled(SHUTTING_DOWN)
        self.pending.append(job)
        return None

    def worker_ready(self, worker: W) -> bool:
        """A new worker started: it takes jobs (False: the pool is closing, stop it)."""
        if self.closing:
            return False
        self.idle.append(worker)
        return True

    def assign(self, now: float) -> tuple[list[tuple[W, JobSpec]], list[Ended]]:
        """Give waiting jobs to idle workers, oldest job first: the ``(worker, job)``
        pairs to start, and the jobs whose time ran out before a worker was free (they
        end ``timed_out`` without starting)."""
        starts: list[tuple[W, JobSpec]] = []
        expired: list[Ended] = []
        pending, idle, running = self.pending, self.idle, self.running
        while pending and idle:
            job = pending.popleft()
            if job.remaining(now) <= 0:
                expired.append((job, timed_out(job, started=False)))
                continue
            worker = idle.pop()
            running[worker] = job
            starts.append((worker, job))
        return starts, expired

    def finished(self, worker: W, reusable: bool) -> JobSpec | None:
        """``worker`` sent its job's result: the job that ends with it (None: it ran none).
        ``reusable`` is false when its socket is gone: it will exit, and gets no job."""
        job = self.running.pop(worker, None)
        if job is None:
            return None
        self._ran.add(worker)
        self._failed_starts = 0  # workers run jobs: their start is not broken
        if reusable and worker not in self._endings:
            self.idle.append(worker)
        return job

    def undelivered(self, worker: W) -> JobSpec | None:
        """``worker``'s socket refused its job, so the worker never got it: the job,
        which goes back to the front of the queue for another worker (None: it had no
        job, or is being killed, and its job ends with that)."""
        if worker in self._endings:
            return None
        job = self.running.pop(worker, None)
        if job is not None:
            self.pending.appendleft(job)
        return job

    def expire(self, worker: W, job: JobSpec) -> bool:
        """``job``'s timer fired: True if ``worker`` still runs it and is to be killed."""
        return self.running.get(worker) is job and self.kill(worker, timed_out(job, started=True))

    def kill(self, worker: W, ending: Outcome) -> bool:
        """``worker`` is to be killed, its job (if any) to end with ``ending``: True the
        first time (kill its process), False when it is being killed already."""
        if worker in self._endings:
            return False
        self._endings[worker] = ending
        if worker in self.idle:
            self.idle.remove(worker)
        return True

    def cancel(self, job_ids: set[bytes] | None, reason: str) -> tuple[list[W], list[Ended]]:
        """Cancel these jobs (all when ``job_ids`` is None): the workers to kill (their
        jobs end ``cancelled`` when they exit), and the waiting jobs that end now."""
        cancelled = Outcome.cancelled(reason)
        kill: list[W] = []
        found: set[bytes] = set()
        for worker, job in self.running.items():
            if job_ids is None or job.id in job_ids:
                found.add(job.id)
                if self.kill(worker, cancelled):
                    kill.append(worker)
        ended = [(job, cancelled) for job in self.pending if job_ids is None or job.id in job_ids]
        if job_ids is None:
            self.pending.clear()
            return kill, ended
        for job, _ in ended:
            found.add(job.id)
            self.pending.remove(job)
        # The book cancels only jobs it has started; one not here yet is on its way
        # (started from another thread): it ends cancelled when it arrives.
        early = self._cancelled_early
        for job_id in job_ids - found:
            early[job_id] = reason
            while len(early) > MAX_EARLY_CANCELS:
                del early[next(iter(early))]
        return kill, ended

    def close(self) -> tuple[list[W], list[Ended]]:
        """The pool closes: no worker gets a job from now on, every job ends cancelled
        (one handed over later, at once); returns what :meth:`cancel` does."""
        self.closing = True
        self.idle.clear()
        return self.cancel(None, SHUTTING_DOWN)

    def worker_exited(self, worker: W, exit_code: int | None) -> tuple[Ended | None, bool]:
        """``worker``'s process has ended, and it is forgotten here: the job it was
        running and the outcome that job ends with (None: it ran none); and whether it
        died on its own while idle (if it never finished a job, a failed start)."""
        if worker in self.idle:
            self.idle.remove(worker)
        ending = self._endings.pop(worker, None)
        ran = worker in self._ran
        self._ran.discard(worker)
        job = self.running.pop(worker, None)
        if job is not None:
            return (job, ending or crashed(exit_code)), False
        if ending is not None or self.closing:
            return None, False
        if not ran:
            self._failed_starts += 1
        return None, True

    def start_failed(self) -> float:
        """No worker process could be started: the wait before the next try."""
        self._failed_starts += 1
        return self.replace_delay()

    def replace_delay(self) -> float:
        """The wait before starting a worker in place of one that is gone: none, or
        after failed starts FIRST_REPLACE_DELAY doubling with each, up to MAX_REPLACE_DELAY."""
        if not self._failed_starts:
            return 0.0
        # The exponent is capped: a float cannot hold 2 ** 1024 (after about three
        # hours of failed starts, 10 s apart).
        return min(MAX_REPLACE_DELAY, FIRST_REPLACE_DELAY * 2.0 ** min(self._failed_starts - 1, 64))
