"""``meshnet ping``: round trips to a peer through a real relay (and over a direct link
on loopback, which two nodes on one host make as over a LAN), the path each took, and
one clear error for a peer that cannot be asked."""

from __future__ import annotations

import re
import time

import pytest

from meshnet.client import MeshClient
from meshnet.errors import PingFailed
from meshnet.identity import Identity
from tests.harness import Mesh, cli

PONG = re.compile(r"^pong from (\S+) via (relay|direct|lan)(?: (\S+))? in ([0-9.]+) ms")


def pongs(stdout: str) -> list[tuple[str, str, str | None, float]]:
    found = [PONG.match(line) for line in stdout.splitlines()]
    return [(m[1], m[2], m[3], float(m[4])) for m in found if m]


def test_ping_through_the_relay_prints_each_round_trip_and_the_peers_rtt_shows(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    b = pair.b_id.peer_id
    done = cli("ping", b, "--count", "3", "--interval", "0", "--node", pair.a_api)
    assert done.returncode == 0, done.stderr
    got = pongs(done.stdout)
    assert [(peer, path) for peer, path, _, _ in got] == [(b, "relay")] * 3
    assert all(0 < ms < 2000 for *_, ms in got)
    assert re.search(r"^3 answered; rtt min [0-9.]+ ms, median [0-9.]+ ms, max [0-9.]+ ms$", done.stdout, re.M)
    with MeshClient(pair.a_api) as client:
        [seen] = [p for p in client.peers() if p["peer_id"] == b]
        assert seen["path"] == "relayed" and seen["rtt_ms"] > 0
        relay = client.status()["relay"]
        assert relay["peers"][b]["path"] == "relayed" and relay["peers"][b]["rtt_ms"] > 0
        # The heartbeat (every 0.5 s here) measures the relay's own round trip: polled
        # for, as no log line says it was answered.
        deadline = time.monotonic() + 10
        while relay["rtt_ms"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
            relay = client.status()["relay"]
        assert relay["rtt_ms"] is not None and relay["rtt_ms"] > 0


def test_a_peer_that_cannot_be_asked_gets_one_clear_error(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    stranger = Identity.generate().peer_id
    with MeshClient(pair.a_api) as client:
        started = time.monotonic()
        with pytest.raises(PingFailed, match="not connected") as unknown:
            client.ping(stranger, timeout=5.0)
        assert unknown.value.code == "peer_not_connected"
        assert time.monotonic() - started < 4, "the relay's answer ends it, not the timeout"
        with pytest.raises(PingFailed, match="own peer id") as itself:
            client.ping(pair.a_id.peer_id)
        assert itself.value.code == "invalid"
        assert client.ping(pair.b_id.peer_id)["path"] == "relay", "the node goes on answering"
    done = cli("ping", stranger, "--count", "2", "--node", pair.a_api)
    assert done.returncode == 1
    assert f"no pong from {stranger}:" in done.stdout and "Traceback" not in done.stderr
    assert len(done.stdout.splitlines()) == 1, "stops at the first error that no retry mends"


def test_a_node_without_a_relay_has_no_peer_to_ping(mesh: Mesh) -> None:
    path, _, api = mesh.node_config("alone")
    mesh.start_node("alone", path)
    with MeshClient(api) as client, pytest.raises(PingFailed, match="no relay") as alone:
        client.ping(Identity.generate().peer_id)
    assert alone.value.code == "no_relay"


def test_ping_moves_from_the_relay_to_a_lan_link_and_stops_there(mesh: Mesh) -> None:
    # Two nodes on one host reach the relay from one IP: as behind one NAT, they link over
    # the LAN (loopback here). The first ping asks for that link, as `tailscale ping` does.
    pair = mesh.start_pair(relay_settings={"direct_links": True, "stun": "off"})
    b = pair.b_id.peer_id
    done = cli("ping", b, "--count", "50", "--interval", "0.2", "--node", pair.a_api)
    assert done.returncode == 0, done.stderr
    got = pongs(done.stdout)
    assert got[0][1] == "relay", "before the link is up, the relay carries the ping"
    assert got[-1][1] == "lan" and re.fullmatch(r"127\.0\.0\.1:\d+", got[-1][2] or ""), done.stdout
    assert all(path == "relay" for _, path, _, _ in got[:-1]), "stops at the first pong over the link"
    with MeshClient(pair.a_api) as client:
        [seen] = [p for p in client.peers() if p["peer_id"] == b]
        assert seen["path"] == "lan" and seen["rtt_ms"] > 0
