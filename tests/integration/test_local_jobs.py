"""Jobs run on the node the client talks to: results, failures, timeouts, crashes, the queue."""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshnet import JobCancelled, JobFailed, JobRefused, JobTimedOut, MeshClient
from tests.harness import Mesh


@pytest.fixture(scope="module")
def local_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    mesh = Mesh(tmp_path_factory.mktemp("local"))
    try:
        path, _, endpoint = mesh.node_config(
            "local", jobs={"enabled": ["echo", "sha256", "sleep", "fail", "crash"], "executors": 2}
        )
        proc = mesh.start_node("local", path)
        yield endpoint, proc
    finally:
        mesh.close()


@pytest.fixture
def client(local_node: tuple[str, object]) -> Iterator[MeshClient]:
    with MeshClient(local_node[0]) as c:
        yield c


def test_echo_and_sha256_return_real_results(client: MeshClient) -> None:
    assert client.run("echo", {"a": [1, 2.5, "x", b"\x00\xff"]}) == {"a": [1, 2.5, "x", b"\x00\xff"]}
    data = os.urandom(100_000)
    assert client.run("sha256", data) == hashlib.sha256(data).hexdigest()
    assert client.run("sha256", {"data": b"ab", "rounds": 3}) == hashlib.sha256(b"ababab").hexdigest()


def test_map_returns_results_in_order(client: MeshClient) -> None:
    assert list(client.map("echo", range(200))) == list(range(200))


def test_kind_not_enabled_is_refused_clearly(client: MeshClient) -> None:
    with pytest.raises(JobRefused) as info:
        client.run("transcode", b"")
    assert info.value.reason == "unknown_kind"
    assert "not enabled" in str(info.value)


def test_failing_handler_reports_its_error(client: MeshClient) -> None:
    with pytest.raises(JobFailed) as info:
        client.run("fail", "disk on fire")
    assert info.value.error_type == "RuntimeError"
    assert "disk on fire" in str(info.value)


def test_sleep_past_timeout_is_reported_within_two_seconds_and_next_job_runs(client: MeshClient) -> None:
    started = time.monotonic()
    with pytest.raises(JobTimedOut):
        client.run("sleep", 10, timeout=1)
    assert time.monotonic() - started < 2.0
    assert client.run("echo", "after") == "after"


def test_crash_fails_alone_and_the_pool_heals(client: MeshClient) -> None:
    neighbours = [client.submit("sleep", 0.3) for _ in range(1)]
    with pytest.raises(JobFailed) as info:
        client.run("crash", None)
    assert info.value.error_type == "WorkerCrashed"
    assert [f.result(timeout=10) for f in neighbours] == [0.3]
    assert client.run("echo", "next") == "next"
    assert list(client.map("echo", range(10))) == list(range(10))


def test_cancel_a_waiting_job(client: MeshClient) -> None:
    blockers = [client.submit("sleep", 1.0) for _ in range(2)]  # both executors busy
    waiting = client.submit("echo", "never")
    client.cancel(waiting)
    with pytest.raises(JobCancelled):
        waiting.result(timeout=10)
    assert [f.result(timeout=10) for f in blockers] == [1.0, 1.0]


def test_status_counts_terminal_statuses(client: MeshClient) -> None:
    before = client.status()["jobs"]
    client.run("echo", 1)
    with pytest.raises(JobRefused):
        client.run("nope", 1)
    after = client.status()["jobs"]
    assert after.get("succeeded", 0) == before.get("succeeded", 0) + 1
    assert after.get("refused", 0) == before.get("refused", 0) + 1


def test_full_queue_refuses_busy_and_every_job_ends_once(mesh: Mesh, tmp_path: Path) -> None:
    path, _, endpoint = mesh.node_config("busy", jobs={"executors": 1, "queue_size": 3})
    mesh.start_node("busy", path)
    with MeshClient(endpoint) as client:
        futures = [client.submit("sleep", 0.5, timeout=30) for _ in range(10)]
        outcomes: Counter[str] = Counter()
        for future in futures:
            try:
                future.result(timeout=30)
                outcomes["succeeded"] += 1
            except JobRefused as exc:
                outcomes[f"refused:{exc.reason}"] += 1
        # One running, three waiting: the other six come back busy at once.
        assert outcomes == Counter({"succeeded": 4, "refused:busy": 6})
        assert sum(outcomes.values()) == len(futures)
        counts = client.status()["jobs"]
        assert counts == {"succeeded": 4, "refused": 6}


def test_timeout_counts_time_spent_waiting_in_the_queue(client: MeshClient) -> None:
    blockers = [client.submit("sleep", 1.5) for _ in range(2)]  # both executors busy
    with pytest.raises(JobTimedOut) as info:
        client.run("echo", "too late", timeout=0.5)
    assert "waited in the queue" in str(info.value) and "never started" in str(info.value)
    assert not any(f.done() for f in blockers)  # it ended at its timeout, not when a slot freed
    assert [f.result(timeout=10) for f in blockers] == [1.5, 1.5]


def test_only_the_submitting_connection_can_cancel_a_job(local_node: tuple[str, object]) -> None:
    with MeshClient(local_node[0]) as owner, MeshClient(local_node[0]) as other:
        blockers = [owner.submit("sleep", 1.0) for _ in range(2)]
        waiting = owner.submit("echo", "mine")
        assert owner.status()["queued"] == 1  # answered after the node took the job in
        other.cancel(waiting)  # same job id, another connection: ignored
        other.status()  # answered after the node handled the cancel
        assert waiting.result(timeout=10) == "mine"
        assert [f.result(timeout=10) for f in blockers] == [1.0, 1.0]
