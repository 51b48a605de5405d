"""A relay or node that cannot start says why in one line, with the fix, and exits
non-zero; a node that cannot start never registers anywhere."""

from __future__ import annotations

import socket

from meshnet import MeshClient
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
