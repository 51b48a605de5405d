"""ExecutorActor and its WorkerPool: the worker processes that run jobs.

Each worker is a process of its own with a Unix socket pair to the node, driven from
one :class:`SocketLoop` (the node's job loop, which the client API shares): a job is
written to an idle worker's socket, its result is read when the socket is readable,
and a timer per running job kills the worker at the job's timeout. A worker that dies
(killed for a timeout or a cancel, or crashed by its job) is seen through its process
sentinel and replaced.

Why not pebble or ``concurrent.futures``: both hand every job through two threads of
their own (a scheduler and a result handler), each a GIL hand-off and a wake-up. On the
no-op path that was most of a node's CPU per job; here a job submitted on the client
API reaches a worker and its result goes back without leaving the loop's thread.

Workers are started by a ``forkserver``: forking the node itself, which runs threads
holding locks (pykka, ZeroMQ), could deadlock a child.
"""

from __future__ import annotations

import functools
import multiprocessing
import time
from collections import deque
from collections.abc import Callable

import structlog

from actors.base import NodeActor
from actors.worker_process import Worker, outcome_of, spawn_worker, stop_helper_processes
from meshnet.errors import ProtocolError
from meshnet.jobs.framing import frame_buffers, unsent
from meshnet.jobs.model import JobSpec, Outcome, job_id_text
from meshnet.logs import debug_enabled
from meshnet.socket_loop import SocketLoop

log = structlog.get_logger("meshnet.executor")

Report = Callable[[list[tuple[bytes, Outcome]]], None]
#: Longest wait before replacing a worker after workers kept failing to start.
MAX_REPLACE_DELAY = 10.0
SHUTTING_DOWN = "the node is shutting down"
#: Ids of jobs cancelled before the call that starts them reached the loop, kept at most.
MAX_EARLY_CANCELS = 4096


def _timed_out_text(job: JobSpec, *, started: bool) -> str:
    if started:
        return f"job ran past its timeout of {job.timeout:g} s (counted from its arrival) and was killed"
    return f"job reached an executor after its timeout of {job.timeout:g} s and never started"


class WorkerPool:
    """Runs jobs on ``workers`` worker processes, at most one job per worker.

    :meth:`run` and :meth:`cancel` are safe from any thread (the job book calls them
    from whichever thread admitted or ended a job); everything else happens on
    ``loop``. Each job's outcome goes to what :meth:`report_to` named (the job book's
    ``finish``), once, on the loop thread.
    """

    def __init__(self, loop: SocketLoop, *, workers: int, enabled: list[str], max_payload: int):
        self.loop = loop
        self.size = workers
        self.enabled = list(enabled)
        self.max_payload = max_payload
        self.report: Report | None = None
        self._context = multiprocessing.get_context("forkserver")
        # The forkserver imports these as it starts: the workers' code, and what makes it
        # (and so every worker) ignore the node's stop signals (meshnet.jobs.forkserver).
        self._context.set_forkserver_preload(["meshnet.jobs.forkserver", "meshnet.jobs.worker"])
        self._workers: list[Worker] = []
        self._idle: list[Worker] = []
        #: Jobs handed over while no worker was idle (one being replaced).
        self._pending: deque[JobSpec] = deque()
        self._closing = False
        self._starting = False
        #: Workers that failed to start (died before finishing any job, not killed by
        #: the pool) since one last finished a job.
        self._failed_starts = 0
        #: Job ids cancelled before the call that starts them reached the loop.
        self._cancelled_early: dict[bytes, str] = {}

    def report_to(self, take: Report) -> None:
        """Every job's outcome goes to ``take`` (the job book's ``finish``; set once, by
        the book, before the first job runs)."""
        self.report = take

    # -- any thread --

    def open(self) -> None:
        """Start the workers (blocks until they are forked); they take jobs once the
        loop has adopted them."""
        started: list[Worker] = []
        try:
            for _ in range(self.size):
                started.append(self._spawn())
        except BaseException:
            for worker in started:
                worker.sock.close()
                worker.process.kill()
                worker.process.join()
                worker.process.close()
            raise
        self.loop.call_soon(self._io_adopt, started)

    def run(self, job: JobSpec) -> None:
        if self.loop.in_loop():
            self._io_run(job)
        else:
            self.loop.call_soon(self._io_run, job)

    def cancel(self, job_ids: set[bytes] | None, reason: str) -> None:
        """Kill running jobs (all when ``job_ids`` is None); their outcome is ``cancelled``.
        On the loop, at once: deferred, a job that ended meanwhile would leave its id
        among the early cancels for good."""
        if self.loop.in_loop():
            self._io_cancel(job_ids, reason)
        else:
            self.loop.call_soon(self._io_cancel, job_ids, reason)

    def close(self, timeout: float = 10.0) -> None:
        """Stop every worker and wait for them; a job still running ends ``cancelled``."""
        self.loop.run_sync(self._io_close, timeout=timeout)

    # -- loop thread --

    def _spawn(self) -> Worker:
        return spawn_worker(self._context, self.enabled, self.max_payload)

    def _io_adopt(self, workers: list[Worker]) -> None:
        for worker in workers:
            if self._closing:
                self._io_discard(worker)
                continue
            self._workers.append(worker)
            self._idle.append(worker)
            self.loop.add_reader(worker.sock, functools.partial(self._io_readable, worker))
            self.loop.add_reader(worker.sentinel, functools.partial(self._io_exited, worker))
        self._io_start_pending()

    def _io_run(self, job: JobSpec) -> None:
        reason = self._cancelled_early.pop(job.id, None)
        if reason is not None or self._closing:
            self._report(job, Outcome.cancelled(reason or SHUTTING_DOWN))
            return
        self._pending.append(job)
        self._io_start_pending()

    def _io_start_pending(self) -> None:
        # Reporting a job that timed out before it started can hand this pool the next
        # job (the book starts it) and so call this again: the outer call's loop takes
        # it, rather than recursing once per job.
        if self._starting:
            return
        self._starting = True
        try:
            while self._pending and self._idle:
                job = self._pending.popleft()
                remaining = job.remaining(time.monotonic())
                if remaining <= 0:
                    timed_out = Outcome("timed_out", error_type="TimedOut", message=_timed_out_text(job, started=False))
                    self._report(job, timed_out)
                    continue
                worker = self._idle.pop()
                worker.job = job
                worker.timer = self.loop.call_later(remaining, self._io_expire, worker, job)
                if debug_enabled():
                    log.debug("job_started", job_id=job_id_text(job.id), kind=job.kind)
                worker.outbox = frame_buffers([job.kind.encode(), job.payload])
                self._io_flush(worker)
        finally:
            self._starting = False

    def _io_flush(self, worker: Worker) -> None:
        """Send what is left of the job to ``worker``; wait for room if it does not fit."""
        try:
            worker.outbox = unsent(worker.outbox, worker.sock.sendmsg(worker.outbox))
        except BlockingIOError:
            pass
        except OSError:  # the worker is gone and never got the job: another worker runs it
            worker.outbox = []
            worker.dead = True
            job = worker.job
            if job is not None and worker.ending is None:
                self._io_unassign(worker)
                self._pending.appendleft(job)
                self._io_start_pending()
        if worker.outbox:
            self.loop.add_writer(worker.sock, lambda: self._io_flush(worker))
        else:
            self.loop.remove_writer(worker.sock)

    def _io_readable(self, worker: Worker) -> None:
        # Results are reported as they are read (the next job reaches the worker before
        # the loop reads on: measured, reading to the end first cost a node a quarter
        # more CPU per no-op job). A worker found dead after reporting a result may thus
        # have been given the next job: its send fails and the job goes back to the
        # queue (see _io_flush).
        while not worker.dead:
            try:
                n = worker.sock.recv_into(worker.reader.buffer())
            except BlockingIOError:
                break
            except OSError:
                n = 0
            if n == 0:  # the worker exited; its sentinel says how
                worker.dead = True
                self.loop.remove_reader(worker.sock)
                break
            try:
                worker.frames += worker.reader.received(n)
            except ProtocolError as exc:
                log.error("worker_stream_corrupt", error=str(exc), pid=worker.process.pid)
                worker.dead = True
                self.loop.remove_reader(worker.sock)
                self._io_kill(
                    worker, Outcome("failed", error_type="WorkerCrashed", message=f"worker sent garbage: {exc}")
                )
                return
            self._io_report_results(worker)
        self._io_report_results(worker)

    def _io_report_results(self, worker: Worker) -> None:
        while len(worker.frames) >= 2:
            status_line, result = worker.frames[0], worker.frames[1]
            del worker.frames[:2]
            self._io_finished(worker, outcome_of(status_line, result))

    def _io_unassign(self, worker: Worker) -> JobSpec | None:
        job, worker.job = worker.job, None
        if worker.timer is not None:
            worker.timer.cancel()
            worker.timer = None
        return job

    def _io_finished(self, worker: Worker, outcome: Outcome) -> None:
        job = self._io_unassign(worker)
        if job is None:
            return
        worker.ran = True
        self._failed_starts = 0  # workers run jobs: their start is not broken
        if worker.ending is None and not worker.dead:  # a dying worker is replaced, not reused
            self._idle.append(worker)
        self._report(job, outcome)
        self._io_start_pending()

    def _io_expire(self, worker: Worker, job: JobSpec) -> None:
        if worker.job is job:
            self._io_kill(
                worker, Outcome("timed_out", error_type="TimedOut", message=_timed_out_text(job, started=True))
            )

    def _io_cancel(self, job_ids: set[bytes] | None, reason: str) -> None:
        cancelled = Outcome.cancelled(reason)
        found: set[bytes] = set()
        for worker in self._workers:
            if worker.job is not None and (job_ids is None or worker.job.id in job_ids):
                found.add(worker.job.id)
                self._io_kill(worker, cancelled)
        for job in [j for j in self._pending if job_ids is None or j.id in job_ids]:
            found.add(job.id)
            self._pending.remove(job)
            self._report(job, cancelled)
        # The book cancels only jobs it has started; one not here yet is on its way
        # (started from another thread): it ends cancelled when it arrives.
        for job_id in (job_ids or set()) - found:
            self._cancelled_early[job_id] = reason
            while len(self._cancelled_early) > MAX_EARLY_CANCELS:
                del self._cancelled_early[next(iter(self._cancelled_early))]

    def _io_kill(self, worker: Worker, ending: Outcome) -> None:
        if worker.ending is None:
            worker.ending = ending
            if worker in self._idle:
                self._idle.remove(worker)
            worker.process.kill()

    def _io_exited(self, worker: Worker) -> None:
        self._io_readable(worker)  # a result it sent before it died still counts
        pid, exit_code = worker.process.pid, worker.process.exitcode
        self._io_discard(worker)
        self._workers.remove(worker)
        if worker in self._idle:
            self._idle.remove(worker)
        try:
            job = self._io_unassign(worker)
            if job is not None:
                outcome = worker.ending or Outcome(
                    "failed",
                    error_type="WorkerCrashed",
                    message=f"the worker running the job died (exit code {exit_code})",
                )
                self._report(job, outcome)
            elif worker.ending is None and not self._closing:
                if not worker.ran:
                    # A broken start (a plugin failing to import in the worker, say)
                    # would die again at once: replacements back off.
                    self._failed_starts += 1
                log.error("worker_died", pid=pid, exit_code=exit_code, replaced_in_s=self._replace_delay())
        finally:
            if not self._closing:
                self._io_replace()

    def _replace_delay(self) -> float:
        if not self._failed_starts:
            return 0.0
        return min(MAX_REPLACE_DELAY, 0.1 * 2 ** (self._failed_starts - 1))

    def _io_replace(self) -> None:
        """Start a worker in place of one that is gone (later, after failed starts)."""
        delay = self._replace_delay()
        if delay:
            self.loop.call_later(delay, self._io_spawn_now)
        else:
            self._io_spawn_now()

    def _io_spawn_now(self) -> None:
        if self._closing:
            return
        try:
            worker = self._spawn()
        except Exception as exc:  # forkserver gone, out of processes or descriptors
            self._failed_starts += 1
            log.error("worker_start_failed", error=str(exc), retry_in_s=self._replace_delay())
            self.loop.call_later(self._replace_delay(), self._io_spawn_now)
            return
        self._io_adopt([worker])

    def _io_discard(self, worker: Worker) -> None:
        """Stop watching a worker's descriptors and release them (it has exited, or is
        killed here)."""
        self.loop.remove_reader(worker.sentinel)
        self.loop.close_socket(worker.sock)
        if worker.process.exitcode is None:
            worker.process.kill()
        worker.process.join()
        worker.process.close()

    def _io_close(self) -> None:
        self._closing = True
        self._idle.clear()  # jobs handed over from now on end cancelled (see _io_run)
        self._io_cancel(None, SHUTTING_DOWN)
        for worker in self._workers:
            # Closing its socket ends an idle worker's loop; a killed one is gone.
            self.loop.close_socket(worker.sock)
        deadline = time.monotonic() + 5
        for worker in self._workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            job = self._io_unassign(worker)
            if job is not None:  # killed for the cancel above; its sentinel will not be read now
                self._report(job, worker.ending or Outcome.cancelled())
            self._io_discard(worker)
        self._workers.clear()
        while self._pending:
            self._report(self._pending.popleft(), Outcome.cancelled(SHUTTING_DOWN))

    def _report(self, job: JobSpec, outcome: Outcome) -> None:
        assert self.report is not None
        self.report([(job.id, outcome)])


class ExecutorActor(NodeActor):
    """Supervises the node's job loop and worker pool (both made by the supervisor, which
    hands them to the parts that run on the loop): starts them with the node, stops them
    (and multiprocessing's helper processes) with it."""

    def __init__(self, *, loop: SocketLoop, pool: WorkerPool):
        super().__init__()
        self.loop = loop
        self._pool = pool

    def on_start(self) -> None:
        self.loop.start()
        try:
            self._pool.open()
        except BaseException:  # pykka does not call on_stop after a failed on_start
            self._pool.close()
            self.loop.stop()
            raise
        log.info("executors_started", workers=self._pool.size, kinds=self._pool.enabled)

    def on_stop(self) -> None:
        if self.loop.running:
            try:
                self._pool.close()
            finally:
                self.loop.stop()
        stop_helper_processes(log)
        log.info("executors_stopped")
