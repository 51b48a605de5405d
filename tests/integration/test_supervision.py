"""The node's actors off the job loop are supervised: one that raises is restarted and the
node goes on serving jobs; past its restart budget the node stops, with one line that
says why and a non-zero exit status.

Real node processes; ``MESHNET_FAULTS`` makes a named actor raise on its next messages
(actors.supervision). ``identity`` answers the node's status; ``network_check`` finds
out the node's LAN address and NAT type once it registers, and again after a failure.
"""

from __future__ import annotations

import pytest

from actors.supervision import RestartBudget
from meshnet.client import MeshClient
from meshnet.errors import MeshError
from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess

BUDGET = RestartBudget().max_restarts


def start_node(mesh: Mesh, faults: str) -> tuple[MeshProcess, str]:
    node_id = Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[node_id.peer_id])
    mesh.start_relay(relay_path)
    settings = {"direct_links": True, "stun": "off"}
    path, _, api = mesh.node_config("n", node_id, relay=(relay_endpoint, relay_id.peer_id), relay_settings=settings)
    node = mesh.start_node("n", path, registered=True, env={"MESHNET_FAULTS": faults})
    return node, api


def touch(actor: str, client: MeshClient) -> None:
    """Give ``actor`` a message: a status (identity); the network check goes by itself."""
    if actor == "identity":
        try:
            client.status()
        except MeshError:
            pass  # the status the failing actor was asked for is unavailable: said, not lost


@pytest.mark.parametrize("actor", ["identity", "network_check"])
def test_an_off_loop_actor_that_raises_is_restarted_and_the_node_serves_on(mesh: Mesh, actor: str) -> None:
    node, api = start_node(mesh, f"{actor}:1")
    with MeshClient(api) as client:
        touch(actor, client)
        restarted = node.wait_for("actor_restarted", actor=actor)
        assert "MESHNET_FAULTS" in restarted["error"]
        if actor == "network_check":  # asked again, it answers this time
            node.wait_for("network_checked", timeout=10)
        status = client.status()
        assert status["peer_id"] and status["identity"]["peer_id"] == status["peer_id"]
        assert [client.run("echo", i) for i in range(20)] == list(range(20))
    assert node.popen.poll() is None
    assert node.find("node_failed") == []


@pytest.mark.parametrize("actor", ["identity", "network_check"])
def test_past_its_restart_budget_a_failing_actor_stops_the_node_with_one_error(mesh: Mesh, actor: str) -> None:
    node, api = start_node(mesh, f"{actor}:{BUDGET + 1}")
    with MeshClient(api) as client:
        for _ in range(BUDGET + 1):
            if node.popen.poll() is not None:
                break
            touch(actor, client)
    assert node.popen.wait(30) != 0
    node.wait_for("node_stopped")
    [failed] = node.find("node_failed")
    assert failed["level"] == "error" and actor in failed["error"] and "MESHNET_FAULTS" in failed["error"]
    assert len(node.find("actor_restarted", actor=actor)) == BUDGET
