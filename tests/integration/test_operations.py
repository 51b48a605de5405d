"""Running MeshNet as an operator does: first start, restarts, shutdown, idle cost, config."""

from __future__ import annotations

import signal
import stat
import time
from pathlib import Path

import psutil
import pytest
import tomli_w

from meshnet import JobCancelled, JobRefused, MeshClient
from meshnet.config import DEFAULT_API_ENDPOINT
from meshnet.errors import MeshError
from meshnet.identity import Identity
from tests.harness import Mesh, cli, free_port


def test_first_start_creates_config_and_serves_the_readme_submit(mesh: Mesh, tmp_path: Path) -> None:
    env = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path), "MESHNET_LOG_FORMAT": "json"}
    node = mesh.spawn("first", ["node"], env)
    created = node.wait_for("config_created")
    node.wait_for("node_started")
    path = Path(created["path"])
    assert path == tmp_path / "xdg" / "meshnet" / "node.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert node.find("running_alone")
    done = cli("submit", "echo", "--payload", '"hi"', "--node", DEFAULT_API_ENDPOINT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '"hi"'
    assert cli("id", env=env).stdout.strip() == created["peer_id"]


def test_relay_restart_under_running_nodes(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "before", to=pair.b_id.peer_id) == "before"
        pair.relay.stop()
        restarted = mesh.start_relay(pair.relay_path, "relay-again")
        restarted.wait_for("peer_registered", count=2)
        pair.a.wait_for("relay_registered", count=2)
        pair.b.wait_for("relay_registered", count=2)
        assert client.run("echo", "after", to=pair.b_id.peer_id) == "after"
        assert client.status()["relay"]["state"] == "registered"


def test_idle_node_uses_under_one_percent_of_a_core(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", 1) == 1  # the pool has started its workers
    processes = [psutil.Process(pair.a.pid), *pair.a.descendants()]
    before = sum(sum(p.cpu_times()[:2]) for p in processes)
    started = time.monotonic()
    time.sleep(10)  # the measurement window itself, not a wait for anything
    used = sum(sum(p.cpu_times()[:2]) for p in processes) - before
    share = used / (time.monotonic() - started)
    print(f"idle node with its workers: {share * 100:.2f}% of a core")
    assert share < 0.01


def test_sigterm_finishes_running_jobs_reports_the_rest_and_leaves_no_process(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("drain", jobs={"executors": 2, "drain_grace": 10}, log_level="debug")
    node = mesh.start_node("drain", path)
    with MeshClient(endpoint) as client:
        running = [client.submit("sleep", 1.0) for _ in range(2)]
        waiting = client.submit("sleep", 1.0)
        node.wait_for("job_started", count=2)
        children = node.descendants()
        assert children, "the pool has worker processes"
        node.signal(signal.SIGTERM)
        node.wait_for("node_draining")
        with pytest.raises(JobRefused) as info:
            client.run("echo", "late")
        assert info.value.reason == "draining"
        assert [f.result(timeout=15) for f in running] == [1.0, 1.0]
        with pytest.raises(JobCancelled):
            waiting.result(timeout=15)
    assert node.wait(30) == 0
    left = [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]


def test_sigterm_kills_jobs_past_the_grace_and_reports_them(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("grace", jobs={"executors": 1, "drain_grace": 1}, log_level="debug")
    node = mesh.start_node("grace", path)
    with MeshClient(endpoint) as client:
        stuck = client.submit("sleep", 60, timeout=120)
        node.wait_for("job_started")
        children = node.descendants()
        node.signal(signal.SIGTERM)
        started = time.monotonic()
        with pytest.raises(JobCancelled) as info:
            stuck.result(timeout=20)
        assert "did not finish within 1 s" in str(info.value)
        assert time.monotonic() - started < 10
    assert node.wait(30) == 0
    assert not [p for p in children if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_bad_config_stops_start_up_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    identity = Identity.generate()
    path.write_text(tomli_w.dumps({"identity": {"private_key": identity.private_key_text}, "jobs": {"queue_size": 0}}))
    done = cli("node", "--config", str(path))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ")
    assert str(path) in lines[-1] and "jobs.queue_size" in lines[-1] and "expected" in lines[-1]
    assert "Traceback" not in done.stderr
    path.write_text("[jobs\nqueue_size = 3")
    done = cli("node", "--config", str(path))
    assert done.returncode != 0 and "not valid TOML" in done.stderr and "Traceback" not in done.stderr


def test_public_api_endpoint_requires_allowed_clients(mesh: Mesh, tmp_path: Path) -> None:
    port = free_port()
    path, node_id, _ = mesh.node_config("open", api={"endpoint": f"tcp://0.0.0.0:{port}"})
    done = cli("node", "--config", str(path))
    assert done.returncode != 0
    assert "api.allowed_clients" in done.stderr and "Traceback" not in done.stderr

    client_id, stranger = Identity.generate(), Identity.generate()
    path, node_id, _ = mesh.node_config(
        "curve", api={"endpoint": f"tcp://0.0.0.0:{port}", "allowed_clients": [client_id.peer_id]}
    )
    node = mesh.start_node("curve", path)
    endpoint = f"tcp://127.0.0.1:{port}"
    with MeshClient(endpoint, identity=client_id, node_peer_id=node_id.peer_id) as client:
        assert client.run("echo", "admitted") == "admitted"
    refused = MeshClient(endpoint, identity=stranger, node_peer_id=node_id.peer_id)
    with refused, pytest.raises(MeshError, match="refused this client's key"):
        refused.run("echo", "refused", timeout=30)
    node.wait_for("client_refused")


def test_plugin_kind_from_an_entry_point(mesh: Mesh, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "meshnet_reverse-1.0.dist-info").mkdir(parents=True)
    (site / "meshnet_reverse-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: meshnet-reverse\nVersion: 1.0\n"
    )
    (site / "meshnet_reverse-1.0.dist-info" / "entry_points.txt").write_text(
        "[meshnet.jobs]\nreverse = meshnet_reverse:reverse\n"
    )
    (site / "meshnet_reverse.py").write_text("def reverse(payload):\n    return payload[::-1]\n")
    env = {"PYTHONPATH": str(site)}
    path, _, endpoint = mesh.node_config("plugin", jobs={"enabled": ["echo", "reverse"]})
    mesh.start_node("plugin", path, env=env)
    with MeshClient(endpoint) as client:
        assert client.run("reverse", "stressed") == "desserts"
    done = cli("node", "--config", str(path))  # without the plugin installed
    assert done.returncode != 0 and "'reverse', which is not a known job kind" in done.stderr


def test_sigterm_ends_forwarded_jobs_and_tells_their_clients(mesh: Mesh) -> None:
    pair = mesh.start_pair(a_jobs={"drain_grace": 1}, b_log="debug")
    with MeshClient(pair.a_api) as client:
        remote = client.submit("sleep", 30, to=pair.b_id.peer_id, timeout=60)
        pair.b.wait_for("job_started")
        pair.a.signal(signal.SIGTERM)
        with pytest.raises(JobCancelled) as info:
            remote.result(timeout=20)
        assert "before the peer answered" in str(info.value)
    assert pair.a.wait(30) == 0
    # A told B to stop the job it no longer waits for.
    pair.b.wait_for("job_cancelled")
