"""A client that cannot reach its node says so within seconds, not after a job's timeout:
the node is not running, or it went away under the client."""

from __future__ import annotations

import signal
import time

import pytest
import zmq

from meshnet import MeshClient, NodeUnreachable
from meshnet.client import DEFAULT_CONNECT_TIMEOUT
from meshnet.protocol import CLIENT_TO_NODE, Cancel, decode
from tests.harness import Mesh, cli, free_port

#: The acceptance bound for "within a few seconds" (the connect timeout is 3 s), with a
#: generous margin for a loaded machine; a job's own timeout below is far longer.
FEW_SECONDS = 10.0


def test_client_of_a_node_that_is_not_there_fails_fast() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with MeshClient(endpoint) as client:
        started = time.monotonic()
        future = client.submit("echo", "anyone?", timeout=60)
        with pytest.raises(NodeUnreachable, match="cannot reach the node at .*is `meshnet node` running there"):
            future.result(timeout=30)
        assert time.monotonic() - started < FEW_SECONDS
        # Known unreachable now: whatever comes next fails at once, until a connection is up.
        with pytest.raises(NodeUnreachable, match="cannot reach the node"):
            client.submit("echo", "again", timeout=60)
        with pytest.raises(NodeUnreachable, match="cannot reach the node"):
            client.status()
        with pytest.raises(NodeUnreachable, match="cannot reach the node"):
            client.peers()

    for request in ("status", "peers"):
        with MeshClient(endpoint) as client:
            started = time.monotonic()
            with pytest.raises(NodeUnreachable, match="cannot reach the node"):
                getattr(client, request)(timeout=60)
            assert time.monotonic() - started < FEW_SECONDS


def test_cli_says_in_one_line_that_no_node_is_there() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    for command in (["submit", "echo", "--payload", '"x"'], ["status"], ["peers"]):
        done = cli(*command, "--node", endpoint)
        assert done.returncode != 0
        # submit names its job first (the id it chose, before the node is reached)
        lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("job ")]
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith(f"error: cannot reach the node at {endpoint}: "), lines[0]
        assert done.stdout == ""


def test_job_of_a_node_killed_under_its_client_fails_within_seconds(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("doomed", log_level="debug")
    node = mesh.start_node("doomed", path)
    with MeshClient(endpoint) as client:
        assert client.run("echo", "alive") == "alive"
        running = client.submit("sleep", 50, timeout=60)
        node.wait_for("job_started")
        node.signal(signal.SIGKILL)
        # Not timeout + 5 s: the lost connection ends the job after the connect timeout.
        with pytest.raises(NodeUnreachable, match="connection was lost"):
            running.result(timeout=DEFAULT_CONNECT_TIMEOUT + 20)
        with pytest.raises(NodeUnreachable):
            client.submit("echo", "anyone?")
    assert node.wait() == -signal.SIGKILL


def test_jobs_failed_as_unreachable_never_reach_a_node_that_comes_up_later() -> None:
    """Their futures have failed: a node started afterwards must not run them. The node
    here is a bare ROUTER, to see what arrives on the wire, in order."""
    port = free_port()
    with MeshClient(f"tcp://127.0.0.1:{port}") as client:
        stale = client.submit("echo", "stale")
        with pytest.raises(NodeUnreachable):
            stale.result(timeout=30)
        client.cancel(stale)  # queued after the failure: all a node coming up now may get
        context = zmq.Context()
        node = context.socket(zmq.ROUTER)
        try:
            node.bind(f"tcp://127.0.0.1:{port}")
            assert node.poll(20_000), "the client did not connect"
            _, *frames = node.recv_multipart()
            assert isinstance(decode(frames, CLIENT_TO_NODE, max_body=1 << 20), Cancel)
        finally:
            node.close(0)
            context.term()
