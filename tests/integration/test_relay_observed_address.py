"""The address the relay observes for a node is the one a peer will see when the node
punches from the same local port: the node connects to the relay from one local port,
and keeps it through the relay's restarts (libzmq reconnects from it)."""

from __future__ import annotations

import signal

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, free_port


def relay_status(api: str) -> dict:
    with MeshClient(api) as client:
        return client.status()["relay"]


def observed_by_peers(api: str, peer_id: str) -> str:
    with MeshClient(api) as client:
        return next(p["observed"] for p in client.peers() if p["peer_id"] == peer_id)


def test_the_relay_observes_the_local_port_and_a_relay_restart_keeps_it(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    before = relay_status(pair.a_api)
    port = before["local_port"]
    assert isinstance(port, int) and port > 0
    assert before["observed"] == f"127.0.0.1:{port}"
    assert observed_by_peers(pair.b_api, pair.a_id.peer_id) == f"127.0.0.1:{port}"

    pair.relay.signal(signal.SIGKILL)
    pair.relay.wait(10)
    mesh.start_relay(pair.relay_path, "relay-2")
    pair.a.wait_for("relay_registered", count=2)
    pair.b.wait_for("relay_registered", count=2)
    after = relay_status(pair.a_api)
    assert (after["local_port"], after["observed"]) == (port, f"127.0.0.1:{port}")
    assert observed_by_peers(pair.b_api, pair.a_id.peer_id) == f"127.0.0.1:{port}"


def test_a_configured_local_port_is_the_one_the_relay_observes(mesh: Mesh) -> None:
    relay_path, relay_id, relay_endpoint = mesh.relay_config(access="open")
    mesh.start_relay(relay_path)
    port = free_port()
    path, _, api = mesh.node_config(
        "a", Identity.generate(), relay=(relay_endpoint, relay_id.peer_id), relay_settings={"local_port": port}
    )
    node = mesh.start_node("a", path, registered=True)
    assert node.wait_for("relay_registered")["observed"] == f"127.0.0.1:{port}"
    assert relay_status(api)["local_port"] == port
