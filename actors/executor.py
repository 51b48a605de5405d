"""ExecutorActor and its WorkerPool: the worker processes that run jobs.

Each worker is a process of its own with a Unix socket pair to the node, driven from
one :class:`SocketLoop` (the node's job loop, which the client API shares): a job is
written to an idle worker's socket, its result is read when the socket is readable,
and a timer per running job kills the worker at the job's timeout. A worker that dies
(killed for a timeout or a cancel, or crashed by its job) is seen through its process
sentinel and replaced. The pool is a shell: which worker runs which job, and how each
job ends, is decided by its ``JobDispatch`` (meshnet/jobs/dispatch.py, sans-IO).

Why not pebble or ``concurrent.futures``: both hand every job through two threads of
their own (a scheduler and a result handler), each a GIL hand-off and a wake-up. On the
no-op path that was most of a node's CPU per job; here a job submitted on the client
API reaches a worker and its result goes back without leaving the loop's thread.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import structlog

from actors.base import NodeActor
from actors.worker_process import (
    Worker,
    discard,
    end_workers,
    outcome_of,
    spawn_worker,
    spawn_workers,
    stop_helper_processes,
    worker_context,
)
from meshnet.errors import ProtocolError
from meshnet.jobs.dispatch import Ended, JobDispatch
from meshnet.jobs.framing import frame_buffers, unsent
from meshnet.jobs.model import JobSpec, Outcome, job_id_text
from meshnet.logs import debug_enabled
from meshnet.socket_loop import SocketLoop

log = structlog.get_logger("meshnet.executor")

Report = Callable[[list[tuple[bytes, Outcome]]], None]


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
        self._context = worker_context()
        #: The live worker processes, whose descriptors the loop watches.
        self._workers: list[Worker] = []
        self.dispatch: JobDispatch[Worker] = JobDispatch()
        self._starting = False

    def report_to(self, take: Report) -> None:
        """Every job's outcome goes to ``take`` (the job book's ``finish``; set once, by
        the book, before the first job runs)."""
        self.report = take

    # -- any thread --

    def open(self) -> None:
        """Start the workers (blocks until they are forked); they take jobs once the
        loop has adopted them."""
        self.loop.call_soon(self._io_adopt, spawn_workers(self._spawn, self.size))

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
            if not self.dispatch.worker_ready(worker):  # the pool is closing
                discard(self.loop, worker)
                continue
            self._workers.append(worker)
            self.loop.add_reader(worker.sock, functools.partial(self._io_readable, worker))
            self.loop.add_reader(worker.sentinel, functools.partial(self._io_exited, worker))
        self._io_start_pending()

    def _io_run(self, job: JobSpec) -> None:
        ended = self.dispatch.submit(job)
        if ended is not None:
            self._report(job, ended)
        else:
            self._io_start_pending()

    def _io_start_pending(self) -> None:
        # Reporting a job that timed out before it started can hand this pool the next
        # job (the book starts it) and so call this again: the outer call's loop takes
        # it, rather than recursing once per job.
        if self._starting:
            return
        self._starting = True
        try:
            dispatch = self.dispatch
            while dispatch.pending and dispatch.idle:
                now = time.monotonic()
                starts, expired = dispatch.assign(now)
                for worker, job in starts:
                    worker.timer = self.loop.call_later(job.remaining(now), self._io_expire, worker, job)
                    if debug_enabled():
                        log.debug("job_started", job_id=job_id_text(job.id), kind=job.kind)
                    worker.outbox = frame_buffers([job.kind.encode(), job.payload])
                    self._io_flush(worker)
                for job, outcome in expired:
                    self._report(job, outcome)
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
            if self.dispatch.undelivered(worker) is not None:
                worker.disarm()
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
                n = worker.receive()
            except ProtocolError as exc:
                log.error("worker_stream_corrupt", error=str(exc), pid=worker.process.pid)
                worker.dead = True
                self.loop.remove_reader(worker.sock)
                garbage = Outcome("failed", error_type="WorkerCrashed", message=f"worker sent garbage: {exc}")
                if self.dispatch.kill(worker, garbage):
                    worker.process.kill()
                return
            if n < 0:
                break
            if n == 0:  # the worker exited; its sentinel says how
                worker.dead = True
                self.loop.remove_reader(worker.sock)
                break
            self._io_report_results(worker)
        self._io_report_results(worker)

    def _io_report_results(self, worker: Worker) -> None:
        while len(worker.frames) >= 2:
            status_line, result = worker.frames[0], worker.frames[1]
            del worker.frames[:2]
            self._io_finished(worker, outcome_of(status_line, result))

    def _io_finished(self, worker: Worker, outcome: Outcome) -> None:
        job = self.dispatch.finished(worker, not worker.dead)
        if job is None:
            return
        worker.disarm()
        self._report(job, outcome)
        self._io_start_pending()

    def _io_expire(self, worker: Worker, job: JobSpec) -> None:
        if self.dispatch.expire(worker, job):
            worker.process.kill()

    def _io_cancel(self, job_ids: set[bytes] | None, reason: str) -> None:
        self._io_end(*self.dispatch.cancel(job_ids, reason))

    def _io_end(self, kill: list[Worker], ended: list[Ended]) -> None:
        """Kill these workers (their jobs end when they exit) and report these jobs."""
        for worker in kill:
            worker.process.kill()
        for job, outcome in ended:
            self._report(job, outcome)

    def _io_exited(self, worker: Worker) -> None:
        self._io_readable(worker)  # a result it sent before it died still counts
        pid, exit_code = worker.process.pid, worker.process.exitcode
        discard(self.loop, worker)
        self._workers.remove(worker)
        worker.disarm()
        try:
            ended, died_idle = self.dispatch.worker_exited(worker, exit_code)
            if ended is not None:
                self._report(*ended)
            elif died_idle:
                log.error("worker_died", pid=pid, exit_code=exit_code, replaced_in_s=self.dispatch.replace_delay())
        finally:
            if not self.dispatch.closing:
                self._io_replace(self.dispatch.replace_delay())

    def _io_replace(self, delay: float) -> None:
        """Start a worker in place of one that is gone, after ``delay`` (after failed starts)."""
        if delay:
            self.loop.call_later(delay, self._io_replace, 0.0)
            return
        if self.dispatch.closing:
            return
        try:
            worker = self._spawn()
        except Exception as exc:  # forkserver gone, out of processes or descriptors
            delay = self.dispatch.start_failed()
            log.error("worker_start_failed", error=str(exc), retry_in_s=delay)
            self.loop.call_later(delay, self._io_replace, 0.0)
            return
        self._io_adopt([worker])

    def _io_close(self) -> None:
        # Jobs handed over from now on end cancelled at once (see JobDispatch.submit).
        self._io_end(*self.dispatch.close())
        end_workers(self.loop, self._workers, 5.0)
        for worker in self._workers:
            # Killed for the close above, or idle and gone: its sentinel will not be read now.
            worker.disarm()
            ended, _ = self.dispatch.worker_exited(worker, worker.process.exitcode)
            if ended is not None:
                self._report(*ended)
            discard(self.loop, worker)
        self._workers.clear()

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
