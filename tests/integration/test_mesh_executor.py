"""MeshExecutor against a real node: the standard library's executor semantics
(``as_completed``, ``wait``, ``cancel``, ``shutdown``, ``map``, exceptions), each beside
the same steps on a ``ThreadPoolExecutor`` running the same job functions in threads,
and back-pressure: busy refusals absorbed, never seen by the caller.

Each test runs its own node, so that its job counts (``status()["jobs"]``, every
terminal status the node gave) are exactly its own. A test that needs a job to be at
the node waits for the node's ``job_started`` line (the node logs at debug), never
sleeps.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Future,
    ThreadPoolExecutor,
    as_completed,
    wait,
)
from typing import Any

import pytest

from meshnet import JobCancelled, JobError, JobFailed, JobRefused, MeshClient, MeshError, MeshExecutor
from meshnet.config import DEFAULT_API_ENDPOINT
from meshnet.jobs import builtin
from tests.harness import REPO, Mesh, MeshProcess

#: The job kinds as plain functions, for the reference ThreadPoolExecutor.
KINDS: dict[str, Callable[[Any], Any]] = {"echo": builtin.echo, "sleep": builtin.sleep, "fail": builtin.fail}
LONG = 30.0  # a job that would outlast the test: it ends only when cancelled
STDLIB_SHUTDOWN = "cannot schedule new futures after shutdown"

# An exception in the executor's sender thread or in a callback on the client's thread
# is a bug even when the futures a test looks at came out right.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


def start_node(mesh: Mesh, log_level: str = "debug", **jobs: Any) -> tuple[MeshProcess, str]:
    path, _, endpoint = mesh.node_config(
        "exec", jobs={"enabled": ["echo", "sleep", "fail"], "executors": 2, **jobs}, log_level=log_level
    )
    return mesh.start_node("exec", path), endpoint


@pytest.fixture
def node(mesh: Mesh) -> tuple[MeshProcess, str]:
    return start_node(mesh)


@pytest.fixture
def client(node: tuple[MeshProcess, str]) -> Iterator[MeshClient]:
    with MeshClient(node[1]) as c:
        yield c


def counts(client: MeshClient) -> dict[str, int]:
    """Every terminal status the node gave, by status."""
    return dict(client.status()["jobs"])


def outcome(future: Future[Any]) -> tuple[str, Any]:
    """A future's end, the same for both executors: the value, or what raised (a
    node's JobFailed names the type that raised in the job)."""
    error = future.exception(timeout=30)
    if error is None:
        return ("ok", future.result())
    return ("raised", error.error_type if isinstance(error, JobFailed) else type(error).__name__)


def test_as_completed_yields_every_future_once_as_the_standard_library_does(client: MeshClient) -> None:
    jobs = [("echo", i) for i in range(40)] + [("fail", "disk on fire"), ("sleep", 0.2)]
    with ThreadPoolExecutor(4) as pool:
        reference = [outcome(f) for f in as_completed([pool.submit(KINDS[k], p) for k, p in jobs], timeout=30)]
    with MeshExecutor(client, max_in_flight=4) as executor:
        futures = [executor.submit(kind, payload) for kind, payload in jobs]
        completed = list(as_completed(futures, timeout=30))
    assert len(completed) == len(set(completed)) == len(futures)  # each once
    assert sorted(map(outcome, completed), key=repr) == sorted(reference, key=repr)
    assert ("raised", "RuntimeError") in reference
    assert counts(client) == {"succeeded": 41, "failed": 1}


def test_wait_first_completed_and_all_completed(client: MeshClient) -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(4) as pool:
        slow, fast = pool.submit(gate.wait), pool.submit(builtin.echo, "x")
        assert wait([slow, fast], timeout=10, return_when=FIRST_COMPLETED) == ({fast}, {slow})
        gate.set()
    with MeshExecutor(client, max_in_flight=4) as executor:
        slow, fast = executor.submit("sleep", LONG), executor.submit("echo", "x")
        assert wait([slow, fast], timeout=10, return_when=FIRST_COMPLETED) == ({fast}, {slow})
        batch = [executor.submit("echo", i) for i in range(10)]
        done, not_done = wait(batch, timeout=30, return_when=ALL_COMPLETED)
        assert done == set(batch) and not not_done
        assert [f.result() for f in batch] == list(range(10))
        assert not slow.done()
        assert executor.cancel(slow)
        with pytest.raises(JobCancelled):
            slow.result(timeout=10)
    assert counts(client) == {"succeeded": 11, "cancelled": 1}


def test_cancel_of_a_queued_future_is_true_and_it_never_runs(node: tuple[MeshProcess, str]) -> None:
    ran: list[str] = []
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        blocker = pool.submit(gate.wait)
        queued = pool.submit(ran.append, "queued")
        assert queued.cancel() is True
        gate.set()
    assert ran == [] and queued.cancelled() and blocker.result() is True

    proc, endpoint = node
    with MeshClient(endpoint) as client:
        with MeshExecutor(client, max_in_flight=1) as executor:
            blocker = executor.submit("sleep", LONG)
            proc.wait_for("job_started", kind="sleep")  # it holds the executor's one slot
            queued = executor.submit("echo", "never")
            assert not queued.running()
            assert queued.cancel() is True
            assert queued.cancelled()
            assert wait([queued], timeout=0).done == {queued}  # waiters are told at once
            assert executor.cancel(blocker) is True  # frees the slot; the cancelled job stays unsent
            with pytest.raises(JobCancelled):
                blocker.result(timeout=10)
            assert executor.submit("echo", "next").result(timeout=10) == "next"  # the slot went to it
        assert executor.stats()["sent"] == 2
        assert counts(client) == {"cancelled": 1, "succeeded": 1}  # "never" never reached the node


def test_cancel_of_a_sent_future_is_false_and_executor_cancel_ends_it(node: tuple[MeshProcess, str]) -> None:
    started, gate = threading.Event(), threading.Event()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(lambda: (started.set(), gate.wait()))
        started.wait(10)
        assert running.running() and running.cancel() is False
        gate.set()
    assert running.result() == (None, True)

    proc, endpoint = node
    with MeshClient(endpoint) as client, MeshExecutor(client) as executor:
        running = executor.submit("sleep", LONG)
        proc.wait_for("job_started", kind="sleep")
        assert running.running()
        assert running.cancel() is False  # as the standard library's: it runs
        cancelled_at = time.monotonic()
        assert executor.cancel(running) is True
        with pytest.raises(JobCancelled):
            running.result(timeout=10)
        assert time.monotonic() - cancelled_at < 5  # ended by the cancel, not its 30 s
        assert running.job_id == proc.find("job_started", kind="sleep")[0]["job_id"]  # type: ignore[attr-defined]
        assert executor.cancel(running) is False  # it has ended
        assert counts(client) == {"cancelled": 1}


def test_shutdown_cancel_futures_cancels_the_queued_and_the_sent(node: tuple[MeshProcess, str]) -> None:
    gate = threading.Event()
    pool = ThreadPoolExecutor(2)
    running = [pool.submit(gate.wait) for _ in range(2)]
    queued = [pool.submit(builtin.echo, i) for i in range(5)]
    pool.shutdown(wait=False, cancel_futures=True)
    gate.set()
    pool.shutdown(wait=True)
    assert all(f.cancelled() for f in queued) and [f.result() for f in running] == [True, True]

    proc, endpoint = node
    with MeshClient(endpoint) as client:
        executor = MeshExecutor(client, max_in_flight=2)
        running = [executor.submit("sleep", LONG) for _ in range(2)]
        queued = [executor.submit("echo", i) for i in range(5)]
        proc.wait_for("job_started", kind="sleep", count=2)
        began = time.monotonic()
        executor.shutdown(wait=True, cancel_futures=True)
        assert time.monotonic() - began < 10  # the node cancelled them; nobody waited 30 s
        assert all(f.done() for f in running + queued)  # wait=True: every job has ended
        assert all(f.cancelled() for f in queued)  # never sent
        for future in running:
            assert isinstance(future.exception(), JobCancelled)
        with pytest.raises(RuntimeError, match=STDLIB_SHUTDOWN):
            executor.submit("echo", "late")
        assert executor.stats()["sent"] == 2
        assert counts(client) == {"cancelled": 2}  # none of the queued ran, then or after


def test_a_failed_job_raises_job_failed_from_result_and_exception(client: MeshClient) -> None:
    with ThreadPoolExecutor(2) as pool:
        failed = pool.submit(builtin.fail, "disk on fire")
        assert isinstance(failed.exception(timeout=10), RuntimeError)
        with pytest.raises(RuntimeError, match="disk on fire"):
            failed.result()
        results = pool.map(builtin.sleep, [0.01, -1, 0.02])
        assert next(results) == 0.01
        with pytest.raises(ValueError):
            next(results)

    with MeshExecutor(client) as executor:
        failed = executor.submit("fail", "disk on fire")
        error = failed.exception(timeout=10)
        assert isinstance(error, JobFailed) and error.error_type == "RuntimeError"
        with pytest.raises(JobFailed, match="disk on fire"):
            failed.result()
        results = executor.map("sleep", [0.01, -1, 0.02])
        assert next(results) == 0.01
        with pytest.raises(JobFailed, match="sleep takes a number of seconds"):  # the first error, where it is
            next(results)
    # All three were sent at the map's call; the one after the failure ran too.
    assert counts(client) == {"succeeded": 2, "failed": 2}


def test_context_manager_shuts_down_and_closes_only_its_own_client(node: tuple[MeshProcess, str]) -> None:
    with ThreadPoolExecutor(2) as pool:
        pass
    with pytest.raises(RuntimeError, match=STDLIB_SHUTDOWN):
        pool.submit(builtin.echo, 1)

    _, endpoint = node
    with MeshExecutor(endpoint=endpoint, max_in_flight=2) as executor:
        futures = [executor.submit("sleep", 0.1) for _ in range(4)]
    assert all(f.done() for f in futures)  # leaving the block waited for them
    assert [f.result() for f in futures] == [0.1] * 4
    with pytest.raises(RuntimeError, match=STDLIB_SHUTDOWN):
        executor.submit("echo", 1)
    with pytest.raises(MeshError, match="closed"):  # it opened that client, so it closed it
        executor.client.submit("echo", 1)

    with MeshClient(endpoint) as client:
        with MeshExecutor(client) as executor:
            assert executor.submit("echo", "mine").result(timeout=10) == "mine"
        assert client.run("echo", "still open") == "still open"  # a client it was given stays open
        assert counts(client) == {"succeeded": 6}


def test_map_reads_an_endless_generator_lazily(client: MeshClient) -> None:
    pulled = 0

    def endless() -> Iterator[int]:
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    with MeshExecutor(client, max_in_flight=8) as executor:
        results = executor.map("echo", endless())
        assert list(itertools.islice(results, 100)) == list(range(100))
        assert pulled <= 100 + 8  # never more than the window ahead of the results taken
        results.close()  # as the standard map: the jobs not sent are cancelled
    sent = executor.stats()["sent"]
    assert 100 <= sent <= pulled
    assert counts(client) == {"succeeded": sent}  # each sent job ran once; the rest never did


def test_many_threads_submit_through_a_full_queue(client: MeshClient) -> None:
    threads, per_thread = 8, 50
    start = threading.Barrier(threads)
    results: dict[int, list[Any]] = {}

    # max_queued 8 for 400 jobs: submitters block, and go on as the window drains.
    with MeshExecutor(client, max_in_flight=4, max_queued=8) as executor:

        def submitter(t: int) -> None:
            start.wait()
            futures = [executor.submit("echo", [t, i]) for i in range(per_thread)]
            results[t] = [f.result(timeout=60) for f in futures]

        workers = [threading.Thread(target=submitter, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(60)
    assert results == {t: [[t, i] for i in range(per_thread)] for t in range(threads)}
    assert executor.stats()["sent"] == threads * per_thread
    assert counts(client) == {"succeeded": threads * per_thread}


def test_refusals_other_than_busy_reach_the_caller_at_once(client: MeshClient) -> None:
    with MeshExecutor(client) as executor:
        with pytest.raises(JobRefused) as info:
            executor.submit("transcode", b"").result(timeout=10)
        assert info.value.reason == "unknown_kind"
        with pytest.raises(TypeError):  # an option MeshClient.submit does not take: here, not later
            executor.submit("echo", 1, priority=3)
    assert executor.stats()["sent"] == 1 and executor.stats()["busy_refusals"] == 0
    assert counts(client) == {"refused": 1}


def test_busy_retries_are_bounded_then_busy_surfaces(mesh: Mesh) -> None:
    # One executor and one queue slot: two jobs fill the node.
    _, endpoint = start_node(mesh, log_level="info", executors=1, queue_size=1)
    with MeshClient(endpoint) as client:
        with MeshExecutor(client, max_in_flight=3, max_busy_retries=0) as executor:
            futures = [executor.submit("sleep", 0.5) for _ in range(3)]
            ends = [outcome(f) for f in futures]
        assert ends.count(("ok", 0.5)) == 2
        refused = futures[ends.index(("raised", "JobRefused"))].exception()
        assert isinstance(refused, JobRefused) and refused.reason == "busy"  # max_busy_retries=0: at once
        assert counts(client) == {"succeeded": 2, "refused": 1}

        # Retried for as long as the job's timeout from its first sending, and no longer.
        blockers = [client.submit("sleep", LONG) for _ in range(2)]  # the node is full
        with MeshExecutor(client) as executor:
            began = time.monotonic()
            with pytest.raises(JobRefused) as info:
                executor.submit("echo", "no room", timeout=0.5).result(timeout=10)
            assert info.value.reason == "busy"
            assert 0.5 <= time.monotonic() - began < 3
            refusals = executor.stats()["busy_refusals"]
            assert refusals > 1  # it was retried before it gave up
        for blocker in blockers:
            client.cancel(blocker)
            with pytest.raises(JobCancelled):
                blocker.result(timeout=10)
        assert counts(client) == {"succeeded": 2, "refused": 1 + refusals, "cancelled": 2}


def test_a_thousand_map_items_through_a_64_job_queue_never_see_busy(mesh: Mesh) -> None:
    """The acceptance test: a window far over what the node admits (2 running + 64
    waiting), so that the node does refuse jobs busy, and the caller sees none of it."""
    _, endpoint = start_node(mesh, log_level="info", executors=2, queue_size=64)
    payloads = [0.005 + i / 10**7 for i in range(1000)]  # 5 ms sleeps, each result its own
    with MeshClient(endpoint) as client:
        with MeshExecutor(client, max_in_flight=200) as executor:
            try:
                results = list(executor.map("sleep", payloads, timeout=60))
            except JobError as exc:  # pragma: no cover - what a failure looks like
                pytest.fail(f"a job error reached the caller: {exc!r} ({exc.reason})")
        assert results == payloads  # all, in order
        stats = executor.stats()
        node_counts = counts(client)
    assert node_counts["refused"] > 0, "the node never refused busy: the test proves nothing"
    assert node_counts == {"succeeded": 1000, "refused": stats["busy_refusals"]}  # each item ran once
    assert stats["sent"] == 1000 + stats["busy_refusals"]
    assert stats["cuts"] >= 1 and stats["window"] < 200  # the window came down to the node's room


def test_the_readme_snippet_runs_as_shown(node: tuple[MeshProcess, str]) -> None:
    text = (REPO / "README.md").read_text()
    match = re.search(r"^## MeshExecutor.*?^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert match, "README.md has no MeshExecutor section with a python snippet"
    snippet = match.group(1)
    assert DEFAULT_API_ENDPOINT in snippet
    code = snippet.replace(DEFAULT_API_ENDPOINT, node[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "0.3",
        "[0.0, 0.1, 0.2]",
        str(sum(range(1000))),
    ]
