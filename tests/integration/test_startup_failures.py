"""A relay or node that cannot start says why in one line, with the fix, and exits
non-zero; a node that cannot start never registers anywhere."""

from __future__ import annotations

import socket

import pytest

from meshnet import JobRefused, MeshClient
from tests.harness import Mesh, cli


def test_relay_on_a_port_in_use_prints_one_line(mesh: Mesh) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        path, _, endpoint = mesh.relay_config(port=port)
        done = cli("relay", "--config", str(path))
    assert done.returncode != 0
    assert done.stderr.splitlines() == [
        f"error: relay.bind = {endpoint} cannot be bound (Address already in use): "
        f"another process listens there; stop it or set relay.bind in {path}"
    ]


def test_second_node_on_a_taken_api_endpoint_fails_before_it_registers(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    # The same identity and API endpoint as the running node A: an operator starting A twice.
    a_path = mesh.tmp / "node-a.toml"
    assert pair.a_api in a_path.read_text()
    done = cli("node", "--config", str(a_path))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: api.endpoint = {pair.a_api} cannot be bound (Address already in use): ")
    assert f"set api.endpoint in {a_path}" in errors[0]
    # A still holds its registration and runs relayed jobs, both ways.
    with MeshClient(pair.b_api) as client:
        assert client.run("echo", "to a", to=pair.a_id.peer_id) == "to a"
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "from a", to=pair.b_id.peer_id) == "from a"
    assert len(pair.relay.find("peer_registered", peer_id=pair.a_id.peer_id)) == 1


def test_two_nodes_with_one_identity_do_not_flap_the_older_one_says_why_once(mesh: Mesh) -> None:
    """Two processes with one identity on different API endpoints (a copied config): the
    one that registered last holds the place at the relay; the older one is told, logs
    one clear error, and stays off the relay. Jobs for that identity all go to one."""
    pair = mesh.start_pair(b_log="debug")
    twin_path, _, twin_api = mesh.node_config("b-twin", pair.b_id, relay=(pair.relay_endpoint, pair.relay_id.peer_id))
    text = twin_path.read_text().replace('level = "info"', 'level = "debug"')
    twin_path.write_text(text)
    twin = mesh.start_node("b-twin", twin_path, registered=True)
    displaced = pair.b.wait_for("identity_in_use")
    assert "another connection" in displaced["reason"] and "meshnet init" in displaced["fix"]
    with MeshClient(pair.a_api) as client:
        assert [client.run("echo", i, to=pair.b_id.peer_id) for i in range(20)] == list(range(20))
    with MeshClient(pair.b_api) as client:  # the displaced node says so to its own clients
        with pytest.raises(JobRefused, match="took its place at the relay"):
            client.run("echo", "out", to=pair.a_id.peer_id)
        assert client.run("echo", "here") == "here"  # and still runs local jobs
    twin.wait_for("job_succeeded", count=20, timeout=10)  # its log, read on the harness's thread
    assert len(twin.find("job_succeeded")) == 20 and not pair.b.find(
        "job_succeeded", kind="echo", submitter=pair.a_id.peer_id
    )
    assert len(pair.b.find("identity_in_use")) == 1
    assert len(pair.b.find("relay_registered")) == 1 and not pair.b.find("relay_forgot_us")
    assert len(pair.relay.find("peer_registered", peer_id=pair.b_id.peer_id)) == 2
