"""``MeshExecutor``: a :class:`concurrent.futures.Executor` over a :class:`MeshClient`.

Why it exists: a node admits at most ``jobs.queue_size`` waiting jobs beyond the ones it
runs and refuses the rest ``busy`` at once (it never drops a job). A program that hands
a node more work than that with :meth:`MeshClient.submit` must catch ``busy`` and try
again itself. The executor does that for it, the way TCP does for a sender: it keeps at
most a window of jobs at the node, holds the rest in a bounded queue of its own, sends
a job the node refused ``busy`` (which therefore never ran) again after a short back-off,
and halves its window when the node pushes back, growing it again by one job per
window's worth of answers (AIMD). So a caller never sees ``busy`` while the executor is
open; every other outcome reaches the caller's future as it came.

Its futures are plain :class:`concurrent.futures.Future` objects, so ``as_completed``
and ``wait`` work on them, and they keep the standard library's meaning: a future not
sent yet can be cancelled (``cancel()`` is True and the job never reaches the node), one
sent already is running (``cancel()`` is False; :meth:`MeshExecutor.cancel` asks the node).

Threads: any number of threads may submit. One thread of the executor's own sends the
jobs and keeps the back-off timers (a condition variable waited on until the next retry
is due: nothing polls); the client's loop thread delivers the answers. The window's
arithmetic is :class:`BusyWindow` and the back-off :func:`busy_backoff`, both without
threads or sockets, so that they can be tested alone.
"""

from __future__ import annotations

import concurrent.futures
import enum
import heapq
import inspect
import itertools
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import structlog

from meshnet.client import DEFAULT_TIMEOUT, MeshClient
from meshnet.config import DEFAULT_API_ENDPOINT
from meshnet.errors import JobCancelled, JobRefused, MeshError
from meshnet.logs import debug_enabled

log = structlog.get_logger("meshnet.executor")

#: Jobs at the node at once, by default: half the node's default queue (as
#: ``MeshClient.map``'s window), which leaves room for other clients.
DEFAULT_MAX_IN_FLIGHT = 32
#: Jobs the executor holds before ``submit`` blocks: enough to keep any sensible window
#: fed, few enough that a producer faster than the node is slowed down rather than
#: growing this process without bound.
DEFAULT_MAX_QUEUED = 1024
#: Busy refusals a job absorbs before its ``JobRefused`` reaches its caller. With the
#: back-off below that is well over a minute of a node that admits nothing; a job also
#: stops being retried once its timeout has passed since it was submitted.
DEFAULT_MAX_BUSY_RETRIES = 100
#: The first retry waits 5-10 ms (a node's queue frees a slot as soon as a job ends, so
#: a longer first wait only loses throughput), doubling per retry of the same job up to
#: 0.5-1 s, so that a node that stays full is asked about once a second per job.
BACKOFF_BASE = 0.01
BACKOFF_CAP = 1.0
#: Refusals that mean "not now": the job never ran, so sending it again is safe.
#: ``relay_busy`` would qualify too, but a peer's relay link filling up is better
#: surfaced to the caller than hidden behind retries for now.
RETRIED_REASONS = frozenset({"busy"})


def busy_backoff(retry: int, rng: random.Random) -> float:
    """Seconds to wait before sending again a job refused ``busy`` ``retry`` times before.

    Exponential, capped, with "equal jitter" (half fixed, half random): the jobs of one
    burst, refused together, come back spread out instead of as the same burst."""
    ceiling = min(BACKOFF_CAP, BACKOFF_BASE * (1 << min(retry, 32)))
    return ceiling / 2 + rng.uniform(0.0, ceiling / 2)


class BusyWindow:
    """How many jobs may be at the node at once: additive increase, multiplicative
    decrease on ``busy``. Not thread-safe: its owner holds a lock.

    A burst of jobs sent into a full queue comes back as a burst of refusals; halving
    the window for each would collapse it to 1 for what is one signal. So, like TCP's
    once per round trip, only a refusal of a job sent since the last cut cuts again:
    each job carries the ``epoch`` (the number of cuts so far) it was sent in."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.limit = limit
        self.size = float(limit)
        #: Cuts so far: the epoch of jobs sent now.
        self.cuts = 0

    def admits(self, in_flight: int) -> bool:
        """Whether one more job may go, with ``in_flight`` at the node."""
        return in_flight < int(self.size)

    def on_busy(self, epoch: int, in_flight: int) -> bool:
        """A job sent in ``epoch`` was refused ``busy`` while ``in_flight`` jobs (it
        included) were at the node. True when this cut the window."""
        if epoch != self.cuts:
            return False  # sent before the last cut, which already answered this burst
        # Half of what was really at the node, not of the window: a window larger than
        # what the caller ever filled says nothing about the node's room.
        self.size = max(1.0, min(self.size, float(in_flight)) / 2)
        self.cuts += 1
        return True

    def on_taken(self) -> None:
        """The node took a job and answered it (any end but ``busy``): one more job per
        window's worth of answers, as TCP grows by one segment per round trip."""
        self.size = min(float(self.limit), self.size + 1.0 / self.size)


class _Where(enum.Enum):
    QUEUED = "queued"  # in the executor's queue: new, or a retry whose back-off is over
    DELAYED = "delayed"  # refused busy; waiting out its back-off
    SENDING = "sending"  # taken by the sender thread; MeshClient.submit not returned yet
    SENT = "sent"  # at the node (or on its way): its answer will come
    ENDED = "ended"  # its future has its outcome, or is about to get it


@dataclass(eq=False)
class _Job:
    kind: str
    payload: Any
    options: dict[str, Any]
    future: concurrent.futures.Future[Any]
    #: Its timeout at the node; busy refusals are retried for as long after it was
    #: first sent (its wait in the executor's queue is the executor's doing, not the node's).
    timeout: float
    #: After this (``time.monotonic``), a busy refusal is no longer retried.
    deadline: float = 0.0
    where: _Where = _Where.QUEUED
    #: Sent at least once: its future is RUNNING and can no longer be cancelled.
    started: bool = False
    #: Its cancelled future's waiters were notified (exactly once: a second
    #: ``set_running_or_notify_cancel`` raises).
    notified: bool = False
    busy_retries: int = 0
    epoch: int = 0
    inner: concurrent.futures.Future[Any] | None = field(default=None, repr=False)
    #: Someone asked for it to be cancelled after it was sent: a busy refusal then ends
    #: it ``JobCancelled`` instead of sending it again.
    cancel_requested: bool = False


class MeshExecutor(concurrent.futures.Executor):
    """Jobs on a MeshNet node as a :class:`concurrent.futures.Executor`, with
    back-pressure instead of ``busy`` refusals.

    ``client``: a :class:`MeshClient` to send through; the executor does not close it.
    Without one, the executor opens its own to ``endpoint`` (``client_options`` are
    :class:`MeshClient`'s other arguments) and closes it once shut down and idle.

    ``max_in_flight``: the most jobs at the node at once (the window starts there, is
    halved when the node refuses ``busy`` and grows back by one job per window's worth
    of answers). ``max_queued``: the most jobs the executor holds besides those
    (waiting to be sent, or refused ``busy`` and waiting to be sent again);
    :meth:`submit` blocks while it holds that many, except on the executor's own
    threads and in callbacks of its futures, which must never wait on themselves.
    ``max_busy_retries``: busy refusals a job absorbs before its future gets the
    ``JobRefused``; it stops sooner once its timeout has passed since it was first sent.
    """

    def __init__(
        self,
        client: MeshClient | None = None,
        *,
        endpoint: str | None = None,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_queued: int = DEFAULT_MAX_QUEUED,
        max_busy_retries: int = DEFAULT_MAX_BUSY_RETRIES,
        **client_options: Any,
    ):
        if max_queued < 1:
            raise ValueError("max_queued must be at least 1")
        if max_busy_retries < 0:
            raise ValueError("max_busy_retries must be 0 or more")
        window = BusyWindow(max_in_flight)
        if client is not None and (endpoint is not None or client_options):
            raise TypeError("pass a client, or the endpoint and options to open one, not both")
        self._owns_client = client is None
        self.client = client if client is not None else MeshClient(endpoint or DEFAULT_API_ENDPOINT, **client_options)
        # Options are checked against MeshClient.submit's signature when submitted, so
        # that a typo raises in the caller, not later in the sender thread.
        self._submit_signature = inspect.signature(self.client.submit)
        self.max_in_flight = max_in_flight
        self.max_queued = max_queued
        self.max_busy_retries = max_busy_retries
        self._window = window
        self._rng = random.Random()
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the sender waits on it
        self._room = threading.Condition(self._lock)  # submitters of a full queue wait on it
        #: New jobs and retries due, oldest first; ended ones stay in it until reached
        #: (cancelling one is O(1)) and are skipped.
        self._queue: deque[_Job] = deque()
        #: Retries waiting out their back-off: (due, tie-breaker, job).
        self._delayed: list[tuple[float, int, _Job]] = []
        self._tiebreak = itertools.count()
        #: Every job whose future has not ended, by its future.
        self._jobs: dict[concurrent.futures.Future[Any], _Job] = {}
        self._held = 0  # jobs QUEUED or DELAYED: what max_queued bounds
        self._in_flight = 0  # jobs SENDING or SENT: what the window bounds
        self._shutdown = False
        self._cancelling = False  # shutdown(cancel_futures=True): nothing more is sent
        self._sent = 0
        self._busy_refusals = 0
        #: Threads that must never block in submit: they are the ones that would free
        #: the room (the sender; the thread that delivers answers, where the futures'
        #: callbacks run).
        self._local = threading.local()
        self._sender = threading.Thread(target=self._run, name="mesh-executor", daemon=True)
        self._sender.start()

    # -- the Executor API --

    def submit(self, kind: str, payload: Any = None, /, **options: Any) -> concurrent.futures.Future[Any]:  # type: ignore[override]
        """Run one job of ``kind`` on ``payload``; its future ends with the result or
        the job's :class:`~meshnet.errors.JobError` (never ``busy``, see the class).

        Unlike :meth:`concurrent.futures.Executor.submit`, which takes a callable and
        its arguments, this takes a job kind and its payload: no code travels to a node.
        ``options`` are :meth:`MeshClient.submit`'s (``to``, ``timeout``, ...).
        ``future.job_id`` is the id of the job's latest submission to the node (None
        until it is sent; a busy retry is a new submission, with a new id). Blocks while
        the executor holds ``max_queued`` jobs; raises ``RuntimeError`` once shut down.
        """
        self._submit_signature.bind(kind, payload, **options)  # TypeError for a bad option
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number of seconds, not {timeout!r}")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.job_id = None  # type: ignore[attr-defined]
        job = _Job(kind, payload, options, future, timeout)
        # Registered before anyone else can see the future: every end comes through it.
        future.add_done_callback(partial(self._future_ended, job))
        with self._lock:
            if not getattr(self._local, "never_block", False):
                while self._held >= self.max_queued and not self._shutdown:
                    self._room.wait()
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._held += 1
            self._jobs[future] = job
            self._queue.append(job)
            self._work.notify()
        return future

    def map(  # type: ignore[override]
        self,
        kind: str,
        payloads: Iterable[Any],
        *,
        timeout: float | None = None,
        chunksize: int = 1,
        **options: Any,
    ) -> Iterator[Any]:
        """Run a job of ``kind`` per payload; yield the results in payload order.

        As :meth:`concurrent.futures.Executor.map`: ``timeout`` (seconds from this call)
        bounds the wait for each next result (``TimeoutError``), a job that did not
        succeed raises its ``JobError`` when its result is reached, and leaving the
        iterator early cancels the jobs not sent yet. Unlike it, ``payloads`` is read
        lazily: at most ``max_in_flight`` jobs ahead of the results taken, so an endless
        generator works. ``chunksize`` is accepted and ignored (each payload is a job).
        """
        del chunksize  # one payload, one job: batching is the client's (``batch``) concern
        end = None if timeout is None else time.monotonic() + timeout
        source = iter(payloads)
        # The first window goes now, as the standard map submits at the call: jobs start
        # before the first result is asked for, and a shut-down executor raises here.
        ahead = deque(self.submit(kind, payload, **options) for payload in itertools.islice(source, self.max_in_flight))
        return self._results(kind, source, ahead, end, options)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Take no more jobs (``submit`` raises ``RuntimeError``).

        ``cancel_futures``: cancel the jobs not sent yet (their futures end cancelled,
        as the standard library's), end those waiting to be sent again ``JobCancelled``,
        and ask the node to cancel the ones it has (they end ``JobCancelled`` unless they
        finished first). Otherwise every job still runs, ``busy`` retries included.
        ``wait``: return once every job's future has ended (and the executor's own
        client is closed)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                self._cancelling = True  # from now the sender sends nothing
            pending = list(self._jobs) if cancel_futures else []
            self._work.notify_all()
            self._room.notify_all()
        for future in pending:
            self.cancel(future)
        if wait and threading.current_thread() is not self._sender:
            self._sender.join()

    def cancel(self, future: concurrent.futures.Future[Any]) -> bool:
        """Cancel the job behind ``future``, wherever it is: not sent yet, it is never
        sent (its future ends cancelled, as ``future.cancel()`` does); at the node, the
        node is asked to cancel it and it ends ``JobCancelled`` unless it finished first;
        waiting to be sent again after a ``busy`` refusal, it ends ``JobCancelled`` here.
        False when the future had ended already (or is not this executor's)."""
        while True:
            inner: concurrent.futures.Future[Any] | None = None
            never_sent = ended_here = False
            with self._lock:
                job = self._jobs.get(future)
                if job is None or job.where is _Where.ENDED:
                    return False
                if job.where is _Where.QUEUED and not job.started:
                    never_sent = True  # its future is cancelled below, outside the lock (callbacks)
                elif job.where in (_Where.QUEUED, _Where.DELAYED):  # a busy retry, not at the node
                    self._held -= 1
                    job.where = _Where.ENDED
                    ended_here = True
                else:  # SENDING or SENT: the sender cancels a SENDING one once it is sent
                    job.cancel_requested = True
                    inner = job.inner
            if never_sent:
                if future.cancel():
                    return True
                continue  # the sender took it meanwhile: it is being sent now
            if ended_here:
                self._settle(job, exception=JobCancelled("cancelled while waiting to be sent again after busy"))
            elif inner is not None:
                self.client.cancel(inner)
            return True

    def stats(self) -> dict[str, Any]:
        """What the executor holds and has done: its current ``window``, jobs
        ``in_flight`` (at the node), ``queued`` (waiting to be sent) and ``delayed``
        (refused busy, backing off), and counts of jobs ``sent`` (retries included),
        ``busy_refusals`` absorbed and window ``cuts``."""
        with self._lock:
            delayed = sum(1 for _, _, job in self._delayed if job.where is _Where.DELAYED)
            return {
                "window": int(self._window.size),
                "in_flight": self._in_flight,
                "queued": self._held - delayed,
                "delayed": delayed,
                "sent": self._sent,
                "busy_refusals": self._busy_refusals,
                "cuts": self._window.cuts,
            }

    # -- internals: the caller's side --

    def _results(
        self,
        kind: str,
        source: Iterator[Any],
        ahead: deque[concurrent.futures.Future[Any]],
        end: float | None,
        options: dict[str, Any],
    ) -> Iterator[Any]:
        try:
            while ahead:
                head = ahead[0]
                value = head.result() if end is None else head.result(end - time.monotonic())
                ahead.popleft()
                # One result taken, one payload read: the input is never read further
                # ahead than the window, whatever its length.
                for payload in itertools.islice(source, 1):
                    ahead.append(self.submit(kind, payload, **options))
                yield value
        finally:
            # As the standard map: what was not sent is cancelled; what runs, runs.
            for future in ahead:
                future.cancel()

    def _future_ended(self, job: _Job, future: concurrent.futures.Future[Any]) -> None:
        """Every future's one end, whoever ended it (any thread)."""
        with self._lock:
            if future.cancelled() and not job.notified:
                # Cancelled by its caller while queued, before the sender reached it: the
                # sender skips it, and its waiters (``wait``, ``as_completed``) learn it
                # here, as an executor's worker would tell them.
                job.notified = True
                if job.where is _Where.QUEUED:
                    self._held -= 1
                job.where = _Where.ENDED
                future.set_running_or_notify_cancel()
            self._jobs.pop(future, None)
            self._room.notify()
            if self._shutdown and not self._jobs:
                self._work.notify()  # the sender's last wait: nothing is left

    def _settle(self, job: _Job, *, result: Any = None, exception: BaseException | None = None) -> None:
        """Give ``job``'s future its outcome (its ``where`` is ENDED already)."""
        future = job.future
        try:
            if exception is not None:
                future.set_exception(exception)
            else:
                future.set_result(result)
        except concurrent.futures.InvalidStateError:
            pass  # someone else ended it (a caller may call set_result on any future)

    # -- internals: the sender thread --

    def _run(self) -> None:
        self._local.never_block = True
        try:
            while (job := self._next()) is not None:
                self._send(job)
        except BaseException as exc:
            # A bug here would leave every future waiting forever: end them, and refuse more.
            log.exception("executor_failed")
            self._fail_all(MeshError(f"the executor failed: {exc!r}"))
            raise
        finally:
            if self._owns_client:
                self.client.close()
            if debug_enabled():
                log.debug("executor_closed", **self.stats())

    def _fail_all(self, error: MeshError) -> None:
        with self._lock:
            self._shutdown = self._cancelling = True
            jobs = list(self._jobs.values())
            for job in jobs:
                job.where = _Where.ENDED
            self._room.notify_all()
        for job in jobs:
            self._settle(job, exception=error)

    def _next(self) -> _Job | None:
        """The next job to send, once the window admits it; None once shut down with
        every future ended. Waits on the condition, until the next retry is due at most."""
        with self._lock:
            while True:
                now = time.monotonic()
                self._release_due(now)
                while self._queue and not self._cancelling and self._window.admits(self._in_flight):
                    job = self._queue.popleft()
                    if job.where is not _Where.QUEUED:
                        continue  # cancelled while it waited
                    if not job.started:
                        if job.future.done() and not job.future.cancelled():
                            job.where = _Where.ENDED  # its caller ended it (set_result): nothing to run
                            self._held -= 1
                            continue
                        if not job.future.set_running_or_notify_cancel():
                            job.notified = True  # cancelled: never sent, waiters told
                            job.where = _Where.ENDED
                            self._held -= 1
                            continue
                        job.started = True
                        job.deadline = now + job.timeout
                    job.where = _Where.SENDING
                    job.epoch = self._window.cuts
                    self._held -= 1
                    self._in_flight += 1
                    self._room.notify()
                    return job
                if self._shutdown and not self._jobs:
                    return None
                self._work.wait(self._delayed[0][0] - now if self._delayed else None)

    def _release_due(self, now: float) -> None:
        """Retries whose back-off is over go to the front of the queue: they are older
        than anything submitted since, and ``map`` waits on the oldest."""
        due: list[_Job] = []
        while self._delayed and self._delayed[0][0] <= now:
            job = heapq.heappop(self._delayed)[2]
            if job.where is _Where.DELAYED:
                job.where = _Where.QUEUED
                due.append(job)
        self._queue.extendleft(reversed(due))

    def _send(self, job: _Job) -> None:
        try:
            inner = self.client.submit(job.kind, job.payload, **job.options)
        except Exception as exc:  # the job's error, not the executor's: to its future, as a pool does
            with self._lock:
                self._in_flight -= 1
                job.where = _Where.ENDED
                self._work.notify()
            self._settle(job, exception=exc)
            return
        with self._lock:
            self._sent += 1
            job.inner = inner
            job.where = _Where.SENT
            job.future.job_id = inner.job_id  # type: ignore[attr-defined]
            cancel = job.cancel_requested
        if cancel:  # cancel() came while it was being sent
            self.client.cancel(inner)
        inner.add_done_callback(partial(self._answered, job))

    # -- internals: answers (the client's loop thread) --

    def _answered(self, job: _Job, inner: concurrent.futures.Future[Any]) -> None:
        self._local.never_block = True  # callbacks of our futures run on this thread
        error = inner.exception()
        retry_in: float | None = None
        cut = False
        with self._lock:
            at_node = self._in_flight
            self._in_flight -= 1
            self._work.notify()
            if isinstance(error, JobRefused) and error.reason in RETRIED_REASONS:
                self._busy_refusals += 1
                cut = self._window.on_busy(job.epoch, at_node)
                if job.cancel_requested or self._cancelling:
                    error = JobCancelled(f"cancelled: the node had refused it busy ({error})", job_id=error.job_id)
                else:
                    now = time.monotonic()
                    if job.busy_retries < self.max_busy_retries and now < job.deadline:
                        # The last retry goes at the deadline rather than not at all.
                        delay = min(busy_backoff(job.busy_retries, self._rng), job.deadline - now)
                        job.busy_retries += 1
                        job.where = _Where.DELAYED
                        self._held += 1
                        heapq.heappush(self._delayed, (now + delay, next(self._tiebreak), job))
                        retry_in = delay
            else:
                self._window.on_taken()
            if retry_in is None:
                job.where = _Where.ENDED
            window = int(self._window.size)
        job_id = getattr(inner, "job_id", "")
        if cut and debug_enabled():
            log.debug("executor_window_cut", window=window, at_node=at_node)
        if retry_in is not None:
            if debug_enabled():
                log.debug("executor_busy_retry", job_id=job_id, retry=job.busy_retries, delay=round(retry_in, 4))
            return
        if isinstance(error, JobRefused) and error.reason in RETRIED_REASONS:
            log.warning("executor_busy_gave_up", job_id=job_id, kind=job.kind, retries=job.busy_retries)
        if error is not None:
            self._settle(job, exception=error)
        else:
            self._settle(job, result=inner.result())
