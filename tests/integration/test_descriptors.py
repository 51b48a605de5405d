"""Idle TCP connections cannot use up a node's or a relay's descriptors: real processes
started with a limit of 1,024 open files they cannot raise (``prlimit``), and 2,000 idle
connections to each listener, held by the test."""

from __future__ import annotations

import resource
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, free_port

IDLE = 2000
LIMIT = 1024
PRLIMIT = ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--"]

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux)")


@pytest.fixture(autouse=True)
def enough_descriptors_for_the_test() -> Iterator[None]:
    """The test holds thousands of connections itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 3 * IDLE + 1024
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, soft), max(want, hard)))
        except (ValueError, OSError):
            pytest.skip(f"the test needs {want} open files and may have {hard}")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@contextmanager
def idle_connections(port: int, count: int = IDLE) -> Iterator[list[socket.socket]]:
    """``count`` TCP connections to ``port`` that never send a byte, held open (those the
    other side closes stay closed)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.settimeout(5)
            try:
                sock.connect(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            socks.append(sock)
        yield socks
    finally:
        for sock in socks:
            sock.close()


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def echo_p50(api: str, count: int = 200) -> float:
    latencies = []
    with MeshClient(api) as client:
        for n in range(count):
            started = time.perf_counter()
            assert client.run("echo", n, timeout=10) == n
            latencies.append(time.perf_counter() - started)
    return sorted(latencies)[len(latencies) // 2]


def test_idle_connections_to_a_nodes_listeners_cost_it_no_service(mesh: Mesh) -> None:
    node_id, other_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(
        allowed=[node_id.peer_id, other_id.peer_id], port=free_port()
    )
    mesh.start_relay(relay_path, prefix=PRLIMIT)
    direct_port = free_port()
    link = (relay_endpoint, relay_id.peer_id)
    settings = {"direct_links": True, "stun": "off", "direct_port": direct_port}
    path, _, api = mesh.node_config("n", node_id, relay=link, relay_settings=settings)
    node = mesh.spawn("n", ["node", "--config", str(path)], prefix=PRLIMIT)
    node.wait_for("relay_registered")
    started = node.wait_for("node_started")
    assert started["open_files"] == LIMIT, "the node could raise its limit: the test tests nothing"
    before = echo_p50(api)
    with idle_connections(port_of(api)) as api_idle, idle_connections(direct_port) as direct_idle:
        assert len(api_idle) + len(direct_idle) > LIMIT, "the test did not open more than the node may hold"
        closed = node.wait_for("connection_closed")
        assert closed["listener"] in ("api", "direct")
        during = echo_p50(api)
        # A killed worker is replaced: that takes new descriptors.
        worker = next(p for p in psutil.Process(node.pid).children(recursive=True) if "worker" in " ".join(p.cmdline()))
        worker.kill()
        with MeshClient(api) as client:
            assert [client.run("echo", n, timeout=10) for n in range(10)] == list(range(10))
        # The relay restarts: the node reconnects (a new socket, and libzmq resolves again).
        relay = next(p for p in mesh.processes if p.name == "relay")
        relay.signal(signal.SIGKILL)
        relay.wait(10)
        mesh.start_relay(relay_path, name="relay-2", prefix=PRLIMIT)
        node.wait_for("relay_registered", count=2, timeout=30)
        with MeshClient(api) as client:
            assert client.run("echo", "after", timeout=10) == "after"
    assert node.popen.poll() is None, "the node died"
    assert not [line for line in node.raw if "Too many open files" in line]
    print(f"local echo p50 {before * 1000:.2f} ms before, {during * 1000:.2f} ms with idle connections")


def test_a_restarted_node_registers_with_a_relay_held_by_idle_connections(mesh: Mesh) -> None:
    node_id = Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[node_id.peer_id])
    relay = mesh.start_relay(relay_path, prefix=PRLIMIT)
    path, _, api = mesh.node_config("n", node_id, relay=(relay_endpoint, relay_id.peer_id))
    first = mesh.start_node("n", path, registered=True)
    with idle_connections(port_of(relay_endpoint)) as idle:
        assert len(idle) > LIMIT // 2
        relay.wait_for("connection_closed")
        first.signal(signal.SIGKILL)
        first.wait(10)
        again = mesh.spawn("n-again", ["node", "--config", str(path)])
        registered = again.wait_for("relay_registered", timeout=30)
        node_started = again.wait_for("node_started")
        took = _seconds(registered["timestamp"]) - _seconds(node_started["timestamp"])
        assert took < 5, f"registered {took:.1f} s after it started"
        with MeshClient(api) as client:
            assert client.run("echo", "registered", timeout=10) == "registered"
    assert relay.popen.poll() is None


def _seconds(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
