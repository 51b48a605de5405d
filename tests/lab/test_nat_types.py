"""The NAT type a node's host reports matches the router it sits behind, for every kind the
lab builds, against the relay's own STUN responder and against coturn (a STUN server we
did not write). `meshnet netcheck` runs inside each host's namespace, as a user would,
beside a node registered at the relay (the relay answers CHANGE-REQUEST only for the IPs
of its registered nodes)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from meshnet.identity import Identity
from tests.harness import Mesh
from tests.lab.netlab import Host, Lab
from tests.lab.nodes import STUN_PORT, node_config, spawn_node, start_relay

#: What each host's NAT is, in netcheck's words.
EXPECTED = {"public": "open", "full_cone": "full_cone", "port_restricted": "port_restricted", "symmetric": "symmetric"}


@dataclass
class World:
    lab: Lab
    hosts: dict[str, Host]
    stun_servers: dict[str, str]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("nat-types")
    lab = Lab("t")
    mesh = Mesh(tmp)
    coturn: subprocess.Popen | None = None
    try:
        relay = start_relay(lab, mesh)
        relay_host = relay.host
        turn_host = lab.public_host("turn", "198.51.100.3")
        coturn = subprocess.Popen(
            lab.command(turn_host.ns, [
                "turnserver", "-n", f"--listening-ip={turn_host.ip}", "--listening-ip=198.51.100.3",
                f"--listening-port={STUN_PORT}", "--stun-only", "--no-cli", "--no-tls", "--no-dtls",
                "--log-file=stdout", "--simple-log",
            ]),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        assert coturn.stdout is not None
        for line in coturn.stdout:  # started when it says so; its output ends if it dies
            if "Total General servers" in line or "IPv4. UDP listener opened on" in line:
                break
        hosts = {"public": lab.public_host("pub")}
        for kind in ("full_cone", "port_restricted", "symmetric"):
            hosts[kind] = lab.host_behind(lab.router(f"r-{kind[:4]}", kind), f"h-{kind[:4]}")
        for kind, host in hosts.items():
            config, _ = node_config(mesh, relay, f"n-{kind}", tmp, Identity.generate(), stun="off", direct_links=False)
            spawn_node(lab, mesh, host, f"n-{kind}", config).wait_for("relay_registered")
        yield World(lab, hosts, {"relay": f"{relay_host.ip}:{STUN_PORT}", "coturn": f"{turn_host.ip}:{STUN_PORT}"})
    finally:
        if coturn is not None:
            coturn.kill()
            coturn.wait(10)
        mesh.close()
        lab.close()


def netcheck(world: World, host: Host, server: str) -> dict:
    argv = world.lab.command(host.ns, [sys.executable, "-m", "meshnet.cli", "netcheck", "--stun", server, "--json"])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("server", ["relay", "coturn"])
@pytest.mark.parametrize("where", list(EXPECTED))
def test_the_reported_nat_type_matches_the_router(world: World, where: str, server: str) -> None:
    host = world.hosts[where]
    report = netcheck(world, host, world.stun_servers[server])
    assert report["nat_type"] == EXPECTED[where], report
    assert report["classified"] is True
    assert report["public_address"].split(":")[0] == host.public_ip, report
    assert report["mapping_varies_by_destination"] is (where == "symmetric")
