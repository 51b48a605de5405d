"""Jobs without a target find their device: requirements, load, retries elsewhere
(a real relay and three real nodes; every job's end counted on every node)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from meshnet import JobRefused, MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess

GPU = {"gpus": 1, "gpu_models": ["Test GPU 24GB"], "gpu_memory_bytes": 24 * 2**30}


@dataclass
class Device:
    name: str
    identity: Identity
    api: str
    proc: MeshProcess

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


def start_mesh(
    mesh: Mesh, jobs: dict[str, dict[str, Any]], *, heartbeat: float = 0.5, order: Callable[[str], Any] = str
) -> dict[str, Device]:
    """A relay and a node per entry of ``jobs`` (its ``[jobs]`` section), all registered;
    identities are made so that ``order`` of the names is the order of the peer ids."""
    ids = sorted((Identity.generate() for _ in jobs), key=lambda i: i.peer_id)
    names = sorted(jobs, key=order)
    relay_path, relay_id, endpoint = mesh.relay_config(allowed=[i.peer_id for i in ids], heartbeat=heartbeat)
    mesh.start_relay(relay_path)
    devices = {}
    for name, identity in zip(names, ids, strict=True):
        path, _, api = mesh.node_config(name, identity, relay=(endpoint, relay_id.peer_id), jobs=jobs[name])
        devices[name] = Device(name, identity, api, mesh.start_node(name, path, registered=True))
    return devices


def counts(device: Device) -> Counter[str]:
    with MeshClient(device.api) as client:
        return Counter(client.status()["jobs"])


def test_jobs_that_require_a_gpu_run_on_the_node_that_has_one_and_what_none_has_is_refused(mesh: Mesh) -> None:
    devices = start_mesh(
        mesh, {"a": {"executors": 2}, "b": {"executors": 2}, "g": {"executors": 2, "capabilities": GPU}}
    )
    a, g = devices["a"], devices["g"]
    with MeshClient(a.api) as client:
        futures = [client.submit("echo", n, requires={"gpus": 1}) for n in range(20)]
        assert [f.result(timeout=30) for f in futures] == list(range(20))
        assert {f.device for f in futures} == {g.peer_id}  # each result names its device
        with pytest.raises(JobRefused) as refused:
            client.run("echo", 1, requires={"gpus": 2})
        assert refused.value.reason == "no_device"
        assert "gpus >= 2" in str(refused.value)
        with pytest.raises(JobRefused) as refused:
            client.run("echo", 1, requires={"labels": {"site": "mars"}})
        assert refused.value.reason == "no_device" and "labels.site = 'mars'" in str(refused.value)
    assert counts(g)["succeeded"] == 20
    assert counts(a)["succeeded"] == 0 and counts(devices["b"])["succeeded"] == 0


def test_untargeted_jobs_handed_to_one_node_spread_over_the_mesh_and_each_runs_once(mesh: Mesh) -> None:
    devices = start_mesh(mesh, {name: {"executors": 2, "enabled": ["sleep"]} for name in ("a", "b", "c")})
    a = devices["a"]
    started = time.monotonic()
    with MeshClient(a.api) as client:
        assert list(client.map("sleep", [0.1] * 600, window=48)) == [0.1] * 600
        elapsed = time.monotonic() - started
    by_node = {name: counts(device) for name, device in devices.items()}
    assert sum(c["succeeded"] for c in by_node.values()) == 600, by_node
    assert all(c["failed"] == c["timed_out"] == c["cancelled"] == 0 for c in by_node.values()), by_node
    for name, c in by_node.items():
        assert 600 / 5 <= c["succeeded"] <= 600 / 2, (name, by_node)
    assert elapsed < 60, elapsed  # ideal 10 s: a loose bound only against a placement that serialises


def test_a_full_node_refuses_busy_and_the_job_runs_elsewhere_once(mesh: Mesh) -> None:
    # Heartbeats every 30 s: the relay never learns the load, so placement picks by
    # executors and peer id, and "x" (first by peer id) is picked though it is full.
    jobs = {
        "a": {"executors": 1, "enabled": ["sleep", "echo"]},
        "x": {"executors": 1, "queue_size": 1, "enabled": ["sleep", "echo"]},
        "y": {"executors": 1, "enabled": ["sleep", "echo"]},
    }
    devices = start_mesh(mesh, jobs, heartbeat=30.0, order=lambda name: {"x": 0, "y": 1, "a": 2}[name])
    a, x, y = devices["a"], devices["x"], devices["y"]
    with MeshClient(x.api) as on_x, MeshClient(a.api) as on_a:
        fillers = [on_x.submit("sleep", 20.0, to=x.peer_id) for _ in range(2)]  # one runs, one waits: full
        own = on_a.submit("sleep", 20.0, to=a.peer_id)  # a's one executor is busy too
        assert poll(lambda: _running(a) == 1 and _running(x) == 1)
        placed = on_a.submit("echo", "placed")
        assert placed.result(timeout=30) == "placed"
        assert placed.device in (y.peer_id, a.peer_id)
        found = a.proc.wait_for("job_placed_again", refused_by=x.peer_id, reason="busy")
        assert found["job_id"] == placed.job_id
        for future in (*fillers, own):
            on_a.cancel(future) if future is own else on_x.cancel(future)
        for future in (*fillers, own):
            future.exception(timeout=30)
    assert counts(x)["refused"] >= 1 and counts(x)["succeeded"] == 0
    ran = counts(y)["succeeded"] + counts(a)["succeeded"]
    assert ran == 1  # the placed echo, once


def poll(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """``condition()`` until it holds (nothing logs that a job started at info level)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _running(device: Device) -> int:
    with MeshClient(device.api) as client:
        return int(client.status()["running"])
