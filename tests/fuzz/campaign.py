"""The campaign: inputs for every decoder, run in worker processes under a memory limit,
with a watchdog, a rule for inputs that cost more than their size explains, and the
counts the report is made of.

Input ``i`` of decoder ``d`` is drawn from ``random.Random(f"{seed}/{d}/{i}")`` alone, so
any process regenerates it from (seed, decoder, index): the parent names the input that
killed or hung a worker without having seen it, reruns the slow ones, and
``python -m tests.fuzz --replay d:i`` reproduces any of them.
"""

from __future__ import annotations

import multiprocessing
import random
import resource
import signal
import statistics
import tempfile
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, MutableSequence
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import meshnet.identity
from tests.fuzz.checker import (
    FUZZER_ERROR,
    HANG,
    SLOW,
    WORKER_DIED,
    Failure,
    Target,
    check_input,
    error_kind,
    input_hex,
    input_size,
    raised_at,
)
from tests.fuzz.generators import Corpus
from tests.fuzz.targets import build_targets

DEFAULT_SEED = 1
DEFAULT_INPUTS = 100_000
#: RLIMIT_AS of each worker. A worker idles at about 40 MiB of address space; the
#: costliest valid input (a 1 MiB payload of a million empty maps) takes some 100 MiB
#: more. An input that needs more than this is a failure, whatever its size.
DEFAULT_MEMORY_LIMIT = 1 << 30
#: Inputs per task: small enough that the cores share the end of the run, large enough
#: that the reports sent back cost little.
CHUNK = 500
#: A worker that decodes nothing for this long is killed and its input reported as a hang.
HANG_S = 30.0
WATCH_INTERVAL_S = 0.5
#: Past this many workers lost on one decoder's inputs, a task whose worker is lost is not
#: run again (the rest of its inputs are left out): one bug, examples enough.
MAX_DEATHS_PER_TARGET = 25

# The slow-input rule. Time per byte is CPU time over max(size, SIZE_FLOOR): below some
# 64 bytes, an input's cost is the decoder's fixed cost (a call, an error raised), not
# its bytes. An input is slow when its time per byte is more than SLOW_FACTOR times the
# decoder's median AND it took more than SLOW_MIN_NS (so that a cheap input with an
# unlucky cache miss is not one), and stays so when rerun: the least of its first run
# and RERUNS reruns counts, which takes out a garbage collection or a page fault that
# fell on the input.
SIZE_FLOOR = 64
SLOW_FACTOR = 50
SLOW_MIN_NS = 5_000_000
RERUNS = 2
#: Suspects rerun per decoder at most (the costliest per byte first), and the costliest
#: inputs rerun to name the slowest per byte.
MAX_SUSPECTS = 10
SLOWEST_RERUN = 5

Factory = Callable[[int, Path], tuple[dict[str, Target], Corpus]]


@dataclass(frozen=True)
class Settings:
    seed: int = DEFAULT_SEED
    inputs: int = DEFAULT_INPUTS
    #: The decoders to run; empty: all of them.
    targets: tuple[str, ...] = ()
    workers: int = 2
    memory_limit: int = DEFAULT_MEMORY_LIMIT
    chunk: int = CHUNK
    hang_s: float = HANG_S
    #: Builds the targets; a module-level function, so that worker processes import it.
    factory: Factory = build_targets


def input_rng(seed: int, target: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{target}/{index}")


# -- what workers are asked and what they answer --


@dataclass(frozen=True)
class RunChunk:
    """Run inputs ``start`` to ``stop`` of ``target``, except those in ``skip`` (inputs
    that killed a worker already)."""

    target: str
    start: int
    stop: int
    skip: frozenset[int] = frozenset()

    def indices(self) -> Iterator[int]:
        return (i for i in range(self.start, self.stop) if i not in self.skip)


@dataclass(frozen=True)
class Rerun:
    """Time these inputs of ``target`` again, RERUNS times each."""

    target: str
    indices: tuple[int, ...]


@dataclass
class Tally:
    """What inputs of one decoder came to: counts, failures, and each input's index,
    size and CPU time. A chunk's tally is added to its decoder's."""

    ran: int = 0
    accepted: int = 0
    refusals: Counter = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    indices: array = field(default_factory=lambda: array("q"))
    sizes: array = field(default_factory=lambda: array("q"))
    cpu_ns: array = field(default_factory=lambda: array("q"))

    def absorb(self, other: Tally) -> None:
        self.ran += other.ran
        self.accepted += other.accepted
        self.refusals.update(other.refusals)
        self.failures.extend(other.failures)
        self.indices.extend(other.indices)
        self.sizes.extend(other.sizes)
        self.cpu_ns.extend(other.cpu_ns)


@dataclass(kw_only=True)
class ChunkReport(Tally):
    target: str


@dataclass(frozen=True)
class Timed:
    """An input rerun: its least CPU time over the reruns, and its first bytes."""

    index: int
    size: int
    cpu_ns: int
    head_hex: str

    @property
    def ns_per_byte(self) -> float:
        return self.cpu_ns / max(self.size, SIZE_FLOOR)


@dataclass
class RerunReport:
    target: str
    timed: list[Timed] = field(default_factory=list)


@dataclass(frozen=True)
class Death:
    """A worker killed (or found dead) while it ran input ``index`` of ``target``."""

    target: str
    index: int
    category: str
    detail: str


Task = RunChunk | Rerun
Event = ChunkReport | RerunReport | Death

#: Caches the decoders keep (is_peer_id's), emptied before each rerun: a rerun must cost
#: what the first run did.
CACHES_TO_CLEAR = (meshnet.identity._valid_peer_id.cache_clear,)


class Session:
    """The targets and corpus for one seed, in one process: it generates inputs by index
    and runs tasks. ``progress`` (shared with the parent when in a worker) holds the
    index of the input being run and a count of runs, for the watchdog."""

    def __init__(self, seed: int, factory: Factory, workdir: Path):
        self.seed = seed
        self.targets, self.corpus = factory(seed, workdir)

    def make_input(self, target: str, index: int) -> Any:
        return self.targets[target].generate(input_rng(self.seed, target, index), self.corpus)

    def run(self, task: Task, progress: MutableSequence[int]) -> ChunkReport | RerunReport:
        if isinstance(task, RunChunk):
            return self.run_chunk(task, progress)
        return self.rerun(task, progress)

    def run_chunk(self, task: RunChunk, progress: MutableSequence[int]) -> ChunkReport:
        target = self.targets[task.target]
        report = ChunkReport(target=task.target)
        for index in task.indices():
            progress[0], progress[1] = index, progress[1] + 1
            report.ran += 1
            try:
                data = self.make_input(task.target, index)
            except Exception as exc:
                failure = Failure(
                    task.target, index, FUZZER_ERROR, error_kind(exc), 0, "(not generated)", raised_at(exc)
                )
                report.failures.append(failure)
                continue
            outcome = check_input(target, data)
            size = input_size(data)
            report.indices.append(index)
            report.sizes.append(size)
            report.cpu_ns.append(outcome.cpu_ns)
            if outcome.verdict == "accepted":
                report.accepted += 1
            elif outcome.verdict == "refused":
                report.refusals[outcome.kind] += 1
            else:
                failure = Failure(
                    task.target, index, outcome.category, outcome.kind, size, input_hex(data), outcome.where
                )
                report.failures.append(failure)
        return report

    def rerun(self, task: Rerun, progress: MutableSequence[int]) -> RerunReport:
        target = self.targets[task.target]
        report = RerunReport(task.target)
        for index in task.indices:
            data = self.make_input(task.target, index)
            times = []
            for _ in range(RERUNS):
                progress[0], progress[1] = index, progress[1] + 1
                for clear in CACHES_TO_CLEAR:
                    clear()
                times.append(check_input(target, data).cpu_ns)
            report.timed.append(Timed(index, input_size(data), min(times), input_hex(data, 32, tail=False)))
        return report


def worker_main(
    conn: Connection, progress: MutableSequence[int], seed: int, factory: Factory, workdir: Path, memory_limit: int
) -> None:
    """A worker process: a Session under an address-space limit, running the tasks it
    receives until it receives None."""
    resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    session = Session(seed, factory, workdir)
    while (task := conn.recv()) is not None:
        conn.send(session.run(task, progress))


# -- the pool --


@dataclass
class _Worker:
    process: Any
    conn: Connection
    #: [index of the input being run, runs so far], written by the worker.
    progress: Any
    task: Task | None = None
    runs_seen: int = 0
    since: float = 0.0


def exit_description(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class WorkerPool:
    """Worker processes (spawned: nothing of the parent's state or threads comes along),
    each running one task at a time. A worker that dies or stops making progress is
    replaced; the input it was on is reported, and the rest of its task run again
    without that input."""

    def __init__(self, settings: Settings, workdir: Path):
        self._settings = settings
        self._workdir = workdir
        self._context = multiprocessing.get_context("spawn")
        self._workers = [self._start() for _ in range(settings.workers)]
        self._deaths: Counter = Counter()

    def _start(self) -> _Worker:
        ours, theirs = self._context.Pipe()
        progress = self._context.RawArray("q", [-1, 0])
        s = self._settings
        process = self._context.Process(
            target=worker_main,
            args=(theirs, progress, s.seed, s.factory, self._workdir, s.memory_limit),
            daemon=True,
        )
        process.start()
        theirs.close()
        return _Worker(process, ours, progress)

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        for worker in self._workers:
            worker.process.join(timeout=5)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
            worker.conn.close()

    def run(self, tasks: Iterable[Task]) -> Iterator[Event]:
        """Run ``tasks``; yields each report as it comes, and a Death for every worker lost."""
        pending = deque(tasks)
        while pending or any(w.task for w in self._workers):
            for worker in self._workers:
                if worker.task is None and pending:
                    self._assign(worker, pending.popleft())
            busy = [w for w in self._workers if w.task]
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy], WATCH_INTERVAL_S))
            for worker in busy:
                if worker.conn in ready or worker.process.sentinel in ready:
                    yield from self._collect(worker, pending)
                elif self._stalled(worker):
                    yield from self._bury(worker, pending, HANG, f"no input finished in {self._settings.hang_s:.0f} s")

    def _assign(self, worker: _Worker, task: Task) -> None:
        if not worker.process.is_alive():
            self._replace(worker)
        worker.progress[0] = -1
        worker.task, worker.runs_seen, worker.since = task, worker.progress[1], time.monotonic()
        worker.conn.send(task)

    def _collect(self, worker: _Worker, pending: deque) -> Iterator[Event]:
        try:
            report = worker.conn.recv()
        except (EOFError, OSError):
            worker.process.join(timeout=5)
            yield from self._bury(worker, pending, WORKER_DIED, exit_description(worker.process.exitcode))
            return
        worker.task = None
        yield report

    def _stalled(self, worker: _Worker) -> bool:
        runs = worker.progress[1]
        if runs != worker.runs_seen:
            worker.runs_seen, worker.since = runs, time.monotonic()
            return False
        return time.monotonic() - worker.since > self._settings.hang_s

    def _bury(self, worker: _Worker, pending: deque, category: str, detail: str) -> Iterator[Event]:
        task, index = worker.task, worker.progress[0]
        assert task is not None
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        self._replace(worker)
        if index < 0:
            raise RuntimeError(f"a fuzz worker died before running any input ({detail}); see its output above")
        self._deaths[task.target] += 1
        if self._deaths[task.target] <= MAX_DEATHS_PER_TARGET:
            pending.appendleft(_without(task, index))
        yield Death(task.target, index, category, detail)

    def _replace(self, worker: _Worker) -> None:
        worker.conn.close()
        fresh = self._start()
        worker.process, worker.conn, worker.progress, worker.task = fresh.process, fresh.conn, fresh.progress, None


def _without(task: Task, index: int) -> Task:
    if isinstance(task, RunChunk):
        return replace(task, skip=task.skip | {index})
    return replace(task, indices=tuple(i for i in task.indices if i != index))


# -- results --


@dataclass(frozen=True)
class Slowest:
    """The input costliest per byte of a decoder (its least time over the reruns)."""

    index: int
    size: int
    cpu_ns: int
    ns_per_byte: float
    head_hex: str


@dataclass(kw_only=True)
class TargetResult(Tally):
    """Everything one decoder did in the campaign."""

    name: str
    call: str
    median_ns_per_byte: float = 0.0
    slowest: Slowest | None = None
    #: The inputs to rerun: index -> CPU time of the first run; and those the rule flagged.
    first_runs: dict[int, int] = field(default_factory=dict)
    flagged: set[int] = field(default_factory=set)

    def ns_per_byte(self) -> list[float]:
        return [cpu / max(size, SIZE_FLOOR) for size, cpu in zip(self.sizes, self.cpu_ns, strict=True)]

    def choose_reruns(self) -> tuple[int, ...]:
        """The inputs to rerun: those the slow rule flags on their first run (the costliest
        per byte first, MAX_SUSPECTS at most) and the SLOWEST_RERUN costliest per byte."""
        per_byte = self.ns_per_byte()
        if not per_byte:
            return ()
        self.median_ns_per_byte = statistics.median(per_byte)
        order = sorted(range(len(per_byte)), key=per_byte.__getitem__, reverse=True)
        flagged = [i for i in order if self._is_slow(self.cpu_ns[i], per_byte[i])][:MAX_SUSPECTS]
        self.flagged = {self.indices[i] for i in flagged}
        self.first_runs = {self.indices[i]: self.cpu_ns[i] for i in [*flagged, *order[:SLOWEST_RERUN]]}
        return tuple(self.first_runs)

    def _is_slow(self, cpu_ns: int, ns_per_byte: float) -> bool:
        return cpu_ns > SLOW_MIN_NS and ns_per_byte > SLOW_FACTOR * self.median_ns_per_byte

    def judge_reruns(self, report: RerunReport, session: Session) -> None:
        """Slow failures from the reruns of flagged inputs, and the slowest per byte."""
        for rerun in report.timed:
            timed = replace(rerun, cpu_ns=min(rerun.cpu_ns, self.first_runs.get(rerun.index, rerun.cpu_ns)))
            if timed.index in self.flagged and self._is_slow(timed.cpu_ns, timed.ns_per_byte):
                data = session.make_input(self.name, timed.index)
                detail = (
                    f"{timed.cpu_ns / 1e6:.1f} ms CPU for {timed.size} bytes: {timed.ns_per_byte:,.0f} ns/byte, "
                    f"{timed.ns_per_byte / self.median_ns_per_byte:,.0f}x the median"
                )
                self.failures.append(Failure(self.name, timed.index, SLOW, detail, timed.size, input_hex(data)))
            if self.slowest is None or timed.ns_per_byte > self.slowest.ns_per_byte:
                self.slowest = Slowest(timed.index, timed.size, timed.cpu_ns, timed.ns_per_byte, timed.head_hex)


@dataclass
class CampaignResult:
    settings: Settings
    targets: dict[str, TargetResult]
    wall_s: float = 0.0

    @property
    def failures(self) -> list[Failure]:
        return [f for result in self.targets.values() for f in result.failures]


ProgressCallback = Callable[[int, int, int], None]


def run_campaign(settings: Settings, progress: ProgressCallback | None = None) -> CampaignResult:
    """Run every selected decoder on ``settings.inputs`` inputs in a pool of workers, then
    rerun the suspects of slowness. ``progress(done, total, failures)`` is called as
    reports arrive."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="meshnet-fuzz-") as workdir:
        session = Session(settings.seed, settings.factory, Path(workdir))  # describes inputs workers lost
        names = list(settings.targets or session.targets)
        result = CampaignResult(settings, {n: TargetResult(name=n, call=session.targets[n].call) for n in names})
        pool = WorkerPool(settings, Path(workdir))
        try:
            _run_inputs(pool, session, result, progress)
            _rerun_suspects(pool, session, result)
        finally:
            pool.close()
    for target in result.targets.values():
        target.failures.sort(key=lambda f: (f.index, f.category))
    result.wall_s = time.monotonic() - started
    return result


def chunks(settings: Settings, names: list[str]) -> Iterator[RunChunk]:
    """Every decoder's inputs, interleaved: all decoders advance together."""
    for start in range(0, settings.inputs, settings.chunk):
        for name in names:
            yield RunChunk(name, start, min(start + settings.chunk, settings.inputs))


def _run_inputs(pool: WorkerPool, session: Session, result: CampaignResult, progress: ProgressCallback | None) -> None:
    total = result.settings.inputs * len(result.targets)
    done = 0
    for event in pool.run(chunks(result.settings, list(result.targets))):
        target = result.targets[event.target]
        if isinstance(event, Death):
            target.failures.append(_death_failure(event, session))
            target.ran += 1
            done += 1
        elif isinstance(event, ChunkReport):
            target.absorb(event)
            done += event.ran
        if progress:
            progress(done, total, len(result.failures))


def _rerun_suspects(pool: WorkerPool, session: Session, result: CampaignResult) -> None:
    tasks = [Rerun(name, indices) for name, target in result.targets.items() if (indices := target.choose_reruns())]
    for event in pool.run(tasks):
        target = result.targets[event.target]
        if isinstance(event, Death):
            target.failures.append(_death_failure(event, session))
        elif isinstance(event, RerunReport):
            target.judge_reruns(event, session)


def _death_failure(death: Death, session: Session) -> Failure:
    data = session.make_input(death.target, death.index)
    return Failure(death.target, death.index, death.category, death.detail, input_size(data), input_hex(data))
