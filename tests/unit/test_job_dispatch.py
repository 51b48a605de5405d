"""The worker pool's decisions without processes (meshnet.jobs.dispatch.JobDispatch):
which worker gets which job, jobs out of time before they start, cancels (also those
that overtake their job), the close, and the backoff of worker replacements; and, over
random sequences of events, one outcome for every job handed over."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.jobs.dispatch import MAX_EARLY_CANCELS, MAX_REPLACE_DELAY, SHUTTING_DOWN, JobDispatch
from meshnet.jobs.model import JobSpec, Outcome

NOW = 1000.0


def job(n: int, *, timeout: float = 10.0, received_at: float = NOW) -> JobSpec:
    return JobSpec(id=b"job%d" % n, kind="echo", payload=b"\xf6", timeout=timeout, received_at=received_at)


def pool(*workers: str) -> JobDispatch[str]:
    dispatch: JobDispatch[str] = JobDispatch()
    for worker in workers:
        assert dispatch.worker_ready(worker)
    return dispatch


def test_oldest_job_goes_first_to_the_worker_freed_last() -> None:
    dispatch = pool("w1", "w2")
    for n in (1, 2, 3):
        assert dispatch.submit(job(n)) is None
    assert dispatch.assign(NOW) == ([("w2", job(1)), ("w1", job(2))], [])
    assert list(dispatch.pending) == [job(3)] and dispatch.idle == []
    assert dispatch.assign(NOW) == ([], [])  # no worker free: job 3 waits

    assert dispatch.finished("w1", True) == job(2)
    assert dispatch.assign(NOW) == ([("w1", job(3))], [])
    assert dispatch.running == {"w2": job(1), "w1": job(3)}


def test_a_job_out_of_time_before_a_worker_is_free_ends_without_starting() -> None:
    dispatch = pool()
    late = job(1, timeout=1.0, received_at=NOW - 5)
    dispatch.submit(late)
    dispatch.submit(job(2))
    assert dispatch.assign(NOW) == ([], [])  # it ends when a worker would have taken it

    dispatch.worker_ready("w1")
    starts, expired = dispatch.assign(NOW)
    assert starts == [("w1", job(2))]
    ((ended, outcome),) = expired
    assert ended is late
    assert (outcome.status, outcome.error_type) == ("timed_out", "TimedOut")
    assert "never started" in outcome.message and "1 s" in outcome.message


def test_a_running_job_past_its_timeout_kills_its_worker_once() -> None:
    dispatch = pool("w1")
    running = job(1)
    dispatch.submit(running)
    dispatch.assign(NOW)
    assert dispatch.expire("w1", running)
    assert not dispatch.expire("w1", running)  # already being killed
    assert dispatch.finished("w1", True) is running  # a result sent before it died counts
    assert dispatch.idle == []  # but a worker being killed gets no more jobs
    dispatch.submit(job(2))
    assert dispatch.assign(NOW) == ([], [])
    assert dispatch.worker_exited("w1", -9) == (None, False)


def test_a_job_whose_worker_is_killed_for_its_timeout_ends_timed_out() -> None:
    dispatch = pool("w1")
    running = job(1)
    dispatch.submit(running)
    dispatch.assign(NOW)
    assert dispatch.expire("w1", running)
    (ended, outcome), died_idle = dispatch.worker_exited("w1", -9)
    assert ended is running and not died_idle
    assert (outcome.status, outcome.error_type) == ("timed_out", "TimedOut")
    assert "was killed" in outcome.message


def test_a_timer_of_a_job_that_ended_kills_nothing() -> None:
    dispatch = pool("w1")
    first, second = job(1), job(2)
    dispatch.submit(first)
    dispatch.assign(NOW)
    dispatch.finished("w1", True)
    dispatch.submit(second)
    dispatch.assign(NOW)
    assert not dispatch.expire("w1", first)  # the worker runs another job now
    assert dispatch.expire("w1", second)


def test_a_worker_that_dies_mid_job_ends_it_worker_crashed() -> None:
    dispatch = pool("w1")
    dispatch.submit(job(1))
    dispatch.assign(NOW)
    (ended, outcome), died_idle = dispatch.worker_exited("w1", -11)
    assert ended == job(1) and not died_idle
    assert (outcome.status, outcome.error_type) == ("failed", "WorkerCrashed")
    assert "exit code -11" in outcome.message
    assert dispatch.running == {} and dispatch.idle == []


def test_a_worker_whose_socket_is_gone_is_not_given_another_job() -> None:
    dispatch = pool("w1")
    dispatch.submit(job(1))
    dispatch.assign(NOW)
    assert dispatch.finished("w1", False) == job(1)
    assert dispatch.idle == []
    assert dispatch.finished("w1", True) is None  # no job: nothing ends twice


def test_a_job_its_worker_never_got_goes_first_to_another() -> None:
    dispatch = pool("w1", "w2")
    dispatch.submit(job(1))
    dispatch.submit(job(2))
    dispatch.submit(job(3))
    dispatch.assign(NOW)  # w2 runs job 1, w1 job 2
    assert dispatch.undelivered("w2") == job(1)
    assert list(dispatch.pending) == [job(1), job(3)]
    dispatch.finished("w1", True)
    assert dispatch.assign(NOW) == ([("w1", job(1))], [])


def test_cancel_kills_running_jobs_and_ends_waiting_ones() -> None:
    dispatch = pool("w1", "w2")
    for n in (1, 2, 3, 4):
        dispatch.submit(job(n))
    dispatch.assign(NOW)  # w2 runs 1, w1 runs 2; 3 and 4 wait
    kill, ended = dispatch.cancel({job(1).id, job(3).id}, "by its submitter")
    assert kill == ["w2"]
    assert ended == [(job(3), Outcome.cancelled("by its submitter"))]
    assert list(dispatch.pending) == [job(4)]
    assert dispatch.cancel({job(1).id}, "again") == ([], [])  # killed once
    assert not dispatch.kill("w2", Outcome.cancelled("third"))

    assert dispatch.finished("w1", True) == job(2)
    assert dispatch.assign(NOW) == ([("w1", job(4))], [])  # the killed w2 gets nothing
    (ended_job, outcome), _ = dispatch.worker_exited("w2", -9)
    assert ended_job == job(1) and outcome == Outcome.cancelled("by its submitter")


def test_a_cancel_that_overtakes_its_job_ends_it_when_it_arrives() -> None:
    dispatch = pool("w1")
    dispatch.cancel({job(1).id}, "by its submitter")
    assert dispatch.submit(job(1)) == Outcome.cancelled("by its submitter")
    assert dispatch.submit(job(1)) is None  # remembered for one arrival only
    assert list(dispatch.pending) == [job(1)]


def test_early_cancels_are_remembered_up_to_their_bound_oldest_forgotten_first() -> None:
    dispatch = pool()
    extra = 10
    for n in range(MAX_EARLY_CANCELS + extra):
        dispatch.cancel({job(n).id}, "early")
    for n in range(extra):
        assert dispatch.submit(job(n)) is None, n  # forgotten: it runs
    for n in range(extra, MAX_EARLY_CANCELS + extra):
        assert dispatch.submit(job(n)) == Outcome.cancelled("early"), n
    assert len(dispatch.pending) == extra


def test_close_cancels_everything_and_what_comes_after() -> None:
    dispatch = pool("w1", "w2")
    late = job(1)
    for spec in (late, job(2), job(3)):
        dispatch.submit(spec)
    dispatch.assign(NOW)  # w2 runs 1, w1 runs 2; 3 waits
    assert dispatch.expire("w2", late)  # killed for its timeout before the close
    assert dispatch.worker_ready("w3")  # adopted, not yet given job 3
    kill, ended = dispatch.close()
    assert kill == ["w1"]
    assert ended == [(job(3), Outcome.cancelled(SHUTTING_DOWN))]
    assert dispatch.closing and dispatch.idle == [] and not dispatch.pending
    assert dispatch.close() == ([], [])  # nothing is cancelled twice

    assert dispatch.submit(job(4)) == Outcome.cancelled(SHUTTING_DOWN)
    assert not dispatch.worker_ready("w4")
    assert dispatch.assign(NOW) == ([], [])
    outcomes = {}
    for worker in ("w1", "w2", "w3"):
        ended_here, died_idle = dispatch.worker_exited(worker, 0)
        assert not died_idle  # a worker that exits at the close did not fail
        if ended_here is not None:
            outcomes[worker] = (ended_here[0], ended_here[1].status)
    assert outcomes == {"w1": (job(2), "cancelled"), "w2": (late, "timed_out")}
    assert dispatch.replace_delay() == 0.0
    assert not dispatch.running


def test_replacements_back_off_while_workers_fail_to_start_and_not_after_one_ran_a_job() -> None:
    dispatch = pool()
    delays = []
    for n in range(10):
        dispatch.worker_ready(f"w{n}")
        ended, died_idle = dispatch.worker_exited(f"w{n}", 1)
        assert ended is None and died_idle
        delays.append(dispatch.replace_delay())
    assert delays == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, MAX_REPLACE_DELAY, MAX_REPLACE_DELAY, MAX_REPLACE_DELAY]
    assert dispatch.start_failed() == MAX_REPLACE_DELAY  # no process at all counts too

    dispatch.worker_ready("good")
    dispatch.submit(job(1))
    dispatch.assign(NOW)
    dispatch.finished("good", True)
    assert dispatch.replace_delay() == 0.0  # workers start fine again

    _, died_idle = dispatch.worker_exited("good", 1)
    assert died_idle and dispatch.replace_delay() == 0.0  # it ran a job: not a failed start
    dispatch.worker_ready("killed")
    dispatch.kill("killed", Outcome.cancelled())
    assert dispatch.worker_exited("killed", -9) == (None, False)
    assert dispatch.replace_delay() == 0.0  # killed by the pool: not a failed start


def test_the_backoff_stays_at_its_cap_after_thousands_of_failed_starts() -> None:
    dispatch = pool()
    for _ in range(3000):  # past 1024, 2 ** n no longer fits a float
        dispatch.start_failed()
    assert dispatch.replace_delay() == MAX_REPLACE_DELAY


# -- every job ends once, over random sequences of events --

submits = st.tuples(st.just("submit"), st.sampled_from([0.5, 3.0, 30.0]))
finishes = st.tuples(st.just("finish"), st.integers(0, 7))
ticks = st.tuples(st.just("tick"), st.sampled_from([0.3, 1.0, 5.0]))
events = st.lists(
    st.one_of(
        # Jobs arriving and finishing are the most common events, as in a pool.
        submits,
        submits,
        finishes,
        finishes,
        ticks,
        st.tuples(st.just("socket_end"), st.integers(0, 7)),
        st.tuples(st.just("undelivered"), st.integers(0, 7)),
        st.tuples(st.just("died"), st.integers(0, 7)),
        st.tuples(st.just("garbage"), st.integers(0, 7)),
        st.tuples(st.just("cancel"), st.sets(st.integers(0, 24), max_size=3)),
        st.tuples(st.just("cancel_all"), st.just(0)),
    ),
    # Long enough for a job to go through being started, killed, finished and replaced.
    min_size=10,
    max_size=80,
)


class Shell:
    """What the pool does with the core's decisions, with workers as numbers, killed
    processes that exit when the sequence says (or at the end), and its own record of
    which worker was told to run which job."""

    def __init__(self, workers: int) -> None:
        self.dispatch: JobDispatch[int] = JobDispatch()
        self.now = NOW
        self.next_worker = 0
        self.live: list[int] = []
        self.dead: set[int] = set()
        #: Workers the core said to kill, or whose socket refused a job or ended (as the
        #: core learnt): none of them may get a job.
        self.unusable: set[int] = set()
        self.told: dict[int, JobSpec] = {}
        self.jobs: dict[bytes, JobSpec] = {}
        self.outcomes: dict[bytes, str] = {}
        for _ in range(workers):
            self.spawn()

    def spawn(self) -> None:
        worker, self.next_worker = self.next_worker, self.next_worker + 1
        if self.dispatch.worker_ready(worker):
            self.live.append(worker)
        self.start_pending()

    def report(self, ended: JobSpec, outcome: Outcome) -> None:
        assert ended.id in self.jobs, "an outcome for a job never handed over"
        assert ended.id not in self.outcomes, f"{ended.id!r} ended twice: {self.outcomes[ended.id]}, {outcome}"
        self.outcomes[ended.id] = outcome.status

    def start_pending(self) -> None:
        while self.dispatch.pending and self.dispatch.idle:
            starts, expired = self.dispatch.assign(self.now)
            for worker, started in starts:
                assert worker in self.live and worker not in self.told, "a busy or gone worker got a job"
                assert worker not in self.unusable, "a worker being killed or unreachable got a job"
                assert started.remaining(self.now) > 0
                self.told[worker] = started
            for ended, outcome in expired:
                assert ended.remaining(self.now) <= 0
                self.report(ended, outcome)
        assert len(set(self.dispatch.idle)) == len(self.dispatch.idle)
        assert not set(self.dispatch.idle) & set(self.dispatch.running)

    def end(self, kill: list[int], ended: list[tuple[JobSpec, Outcome]]) -> None:
        assert all(worker in self.live for worker in kill)
        self.unusable.update(kill)
        for pair in ended:
            self.report(*pair)

    def exited(self, worker: int) -> None:
        self.live.remove(worker)
        self.dead.discard(worker)
        told = self.told.pop(worker, None)
        ended, _ = self.dispatch.worker_exited(worker, -9)
        assert (ended[0] if ended else None) is told
        if ended is not None:
            self.report(*ended)
        if not self.dispatch.closing:
            self.spawn()

    def step(self, event: str, arg: object) -> None:
        # A result or a refused send comes from a worker told to run a job; the rest
        # happens to any worker.
        among = sorted(self.told) if event in ("finish", "undelivered") else self.live
        pick = among[arg % len(among)] if isinstance(arg, int) and among else None
        if event == "submit":
            assert isinstance(arg, float)
            spec = job(len(self.jobs), timeout=arg, received_at=self.now)
            self.jobs[spec.id] = spec
            outcome = self.dispatch.submit(spec)
            if outcome is not None:
                self.report(spec, outcome)
            self.start_pending()
        elif event == "finish" and pick is not None:
            finished = self.dispatch.finished(pick, pick not in self.dead)
            if pick in self.dead:
                self.unusable.add(pick)
            assert finished is self.told.pop(pick)
            self.report(finished, Outcome("succeeded"))
            self.start_pending()
        elif event == "socket_end" and pick is not None:
            self.dead.add(pick)
        elif event == "undelivered" and pick is not None:
            self.dead.add(pick)
            self.unusable.add(pick)
            requeued = self.dispatch.undelivered(pick)
            if requeued is not None:
                assert requeued is self.told.pop(pick)
                self.start_pending()
        elif event == "died" and pick is not None:
            self.exited(pick)
        elif event == "garbage" and pick is not None:
            self.dead.add(pick)
            if self.dispatch.kill(pick, Outcome("failed", error_type="WorkerCrashed")):
                self.unusable.add(pick)
        elif event == "cancel":
            assert isinstance(arg, set)
            self.end(*self.dispatch.cancel({job(n).id for n in arg}, "cancelled"))
        elif event == "cancel_all":
            self.end(*self.dispatch.cancel(None, "aborted"))
        elif event == "tick":
            assert isinstance(arg, float)
            self.now += arg
            for worker, running in list(self.told.items()):
                if running.remaining(self.now) <= 0 and self.dispatch.expire(worker, running):
                    self.unusable.add(worker)
            self.start_pending()

    def exit_all(self) -> None:
        """As the pool's close ends: every worker exits."""
        for worker in list(self.live):
            self.exited(worker)


@settings(max_examples=400, deadline=None)
@given(workers=st.integers(1, 3), sequence=events, close_at=st.integers(0, 100))
def test_every_job_handed_over_ends_exactly_once(
    workers: int, sequence: list[tuple[str, object]], close_at: int
) -> None:
    """The pool closes at ``close_at`` (past the end: after it); events go on after it,
    as jobs, results and exits still reach a closing pool."""
    shell = Shell(workers)
    for index, (event, arg) in enumerate(sequence):
        if index == close_at:
            shell.end(*shell.dispatch.close())
        shell.step(event, arg)
    if not shell.dispatch.closing:
        shell.end(*shell.dispatch.close())
    shell.exit_all()
    assert shell.outcomes.keys() == shell.jobs.keys()  # and none twice (Shell.report)
    dispatch = shell.dispatch
    assert not dispatch.pending and not dispatch.running and not dispatch.idle
