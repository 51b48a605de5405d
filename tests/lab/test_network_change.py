"""A node that moves to another network: the relay then sees it from another public IP,
and the node finds out its LAN address and NAT type again (a NAT type learnt on the old
network would plan punches that cannot work on the new one)."""

from __future__ import annotations

from pathlib import Path

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh
from tests.lab.netlab import Lab
from tests.lab.nodes import node_config, spawn_node, start_relay


def test_a_node_that_moves_to_another_nat_classifies_it_again(tmp_path: Path) -> None:
    lab, mesh = Lab("n"), Mesh(tmp_path)
    try:
        relay = start_relay(lab, mesh)
        home, away = lab.router("rh", "port_restricted"), lab.router("rw", "symmetric")
        host = lab.host_behind(home, "mover")
        # A second interface on the other router's LAN, unused until the move.
        lab.wire(host.ns, "eth1", away.ns, "lan")
        lab.exec(host.ns, "ip", "addr", "add", f"{away.lan_prefix}.10/24", "dev", "eth1")
        config, api = node_config(mesh, relay, "mover", tmp_path, Identity.generate())
        node = spawn_node(lab, mesh, host, "mover", config)
        first = node.wait_for("nat_classified", timeout=60)
        assert first["nat"] == "port_restricted"
        with MeshClient(api) as client:
            assert client.status()["relay"]["observed"].startswith(home.wan_ip + ":")
        # The move: the old link goes down, the default route goes through the other NAT.
        lab.exec(host.ns, "ip", "link", "set", "eth0", "down")
        lab.exec(host.ns, "ip", "route", "replace", "default", "via", f"{away.lan_prefix}.1", "dev", "eth1")
        changed = node.wait_for("network_changed", timeout=60)
        assert (changed["was"], changed["now"]) == (home.wan_ip, away.wan_ip)
        second = node.wait_for("nat_classified", count=2, timeout=60)
        assert second["nat"] == "symmetric"
        with MeshClient(api) as client:
            relay_status = client.status()["relay"]
        assert relay_status["nat"]["nat_type"] == "symmetric"
        assert relay_status["observed"].startswith(away.wan_ip + ":")
    finally:
        mesh.close()
        lab.close()
