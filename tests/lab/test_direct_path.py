"""Two nodes behind two port-restricted NATs, with the relay on the internet: their jobs
start relayed, a hole is punched, and the path moves to a direct link; jobs complete
throughout. Everything real: namespaces, iptables NATs, the relay and node processes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess
from tests.lab.netlab import Lab
from tests.lab.nodes import node_config, start_relay


@dataclass
class Pair:
    lab: Lab
    a: MeshProcess
    b: MeshProcess
    a_api: str
    b_api: str
    b_id: Identity
    a_id: Identity


def start_pair(lab: Lab, mesh: Mesh, tmp: Path, kind_a: str, kind_b: str, b_log: str = "info") -> Pair:
    relay = start_relay(lab, mesh)
    procs, apis, ids = {}, {}, {}
    for name, kind in (("a", kind_a), ("b", kind_b)):
        host = lab.host_behind(lab.router(f"r{name}", kind), f"h{name}")
        ids[name] = Identity.generate()
        config, apis[name] = node_config(mesh, relay, name, tmp, ids[name], log_level=b_log if name == "b" else "info")
        procs[name] = mesh.start_node(name, config, registered=True, prefix=lab.command(host.ns, []))
    return Pair(lab, procs["a"], procs["b"], apis["a"], apis["b"], ids["b"], ids["a"])


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[Lab, Mesh, Path]]:
    lab, mesh = Lab("d"), Mesh(tmp_path)
    try:
        yield lab, mesh, tmp_path
    finally:
        mesh.close()
        lab.close()


def test_two_port_restricted_nats_move_their_jobs_to_a_direct_link(lab: tuple[Lab, Mesh, Path]) -> None:
    pair = start_pair(*lab, "port_restricted", "port_restricted")
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "first", to=pair.b_id.peer_id) == "first"  # relayed
        assert pair.a.wait_for("nat_classified")["nat"] == "port_restricted"
        pair.a.wait_for("path_changed", path="direct", timeout=15)
        pair.b.wait_for("path_changed", path="direct", timeout=15)
        assert list(client.map("echo", range(200), to=pair.b_id.peer_id)) == list(range(200))
        sent = client.status()["relay"]["boxes_sent"]
        peers = {p["peer_id"]: p for p in client.peers()}
    # The 200 jobs went on the direct link (the relay carried the first job, the punch's
    # messages and whatever was in flight as the path moved).
    assert sent["direct"] >= 200 and sent["relay"] < 50, sent
    assert peers[pair.b_id.peer_id]["path"] == "direct"
    up = pair.a.find("direct_link_up")
    assert len(up) == 1 and up[0]["ms_since_decided"] < 1000, up


def run_stream(client: MeshClient, to: str, jobs: int, at_done: dict[int, Callable[[], None]]) -> list[Any]:
    """``jobs`` jobs to ``to`` (echo and 20 ms sleeps, 32 in flight); ``at_done[n]`` runs
    once n have ended. Each job's result, or the exception it ended with."""
    results: list[Any] = [None] * jobs
    pending: dict[Future, int] = {}
    done = 0
    for i in range(jobs):
        kind, payload = ("sleep", 0.02) if i % 2 else ("echo", i)
        pending[client.submit(kind, payload, to=to, timeout=60)] = i
        while len(pending) >= 32 or (i == jobs - 1 and pending):
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED, timeout=120)
            assert finished, "no job ended within 120 s"
            for future in finished:
                index = pending.pop(future)
                try:
                    results[index] = future.result()
                except Exception as exc:  # the test asserts there is none
                    results[index] = exc
                done += 1
                action = at_done.pop(done, None)
                if action is not None:
                    action()
    return results


def test_a_stream_survives_relay_to_direct_and_a_cut_direct_link_back_to_relay(lab: tuple[Lab, Mesh, Path]) -> None:
    the_lab = lab[0]
    pair = start_pair(*lab, "port_restricted", "port_restricted", b_log="debug")
    router_a = the_lab.routers["ra"]
    b_public = the_lab.routers["rb"].wan_ip
    jobs = 1000

    def cut_direct_link() -> None:
        pair.a.wait_for("path_changed", path="direct", timeout=15)
        for direction in ("-d", "-s"):  # A's router drops everything to and from B's public address
            the_lab.exec(router_a.ns, "iptables", "-I", "FORWARD", direction, b_public, "-j", "DROP")

    with MeshClient(pair.a_api) as client:
        results = run_stream(client, pair.b_id.peer_id, jobs, {300: cut_direct_link})
    expected = [0.02 if i % 2 else i for i in range(jobs)]
    assert [r for r in results if isinstance(r, Exception)] == []
    assert results == expected, results[:6]
    moves = [(e["path"], e["reason"]) for e in pair.a.find("path_changed")]
    assert [path for path, _ in moves][:2] == ["direct", "relay"], moves
    assert "went silent" in moves[1][1] or "disconnected" in moves[1][1], moves  # pings or libzmq's heartbeats
    # The cut came mid-stream: the jobs after it went back on the relay.
    assert len(pair.a.find("direct_link_down")) >= 1
    pair.b.wait_for("job_succeeded", count=jobs, timeout=10)  # B's log, read on the harness's thread
    ran = Counter(e["job_id"] for e in pair.b.find("job_succeeded"))
    assert len(ran) == jobs and set(ran.values()) == {1}, "a job ran twice, or not at all, on B"


def test_a_full_cone_nat_whose_listener_is_unreachable_is_punched_instead(lab: tuple[Lab, Mesh, Path]) -> None:
    # STUN calls A's NAT full cone (UDP is), but it forwards no TCP port A never sent from:
    # B's dial to A's listener fails, and the next attempt punches through.
    pair = start_pair(*lab, "udp_full_cone", "port_restricted")
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "first", to=pair.b_id.peer_id) == "first"
        assert pair.a.wait_for("nat_classified")["nat"] == "full_cone"
        failed = pair.b.wait_for("punch_failed", timeout=30)
        assert "not connected" in failed["reason"]
        pair.a.wait_for("path_changed", path="direct", timeout=30)
        assert list(client.map("echo", range(50), to=pair.b_id.peer_id)) == list(range(50))
        assert {p["peer_id"]: p for p in client.peers()}[pair.b_id.peer_id]["path"] == "direct"
    b_dials, a_dials = pair.b.find("direct_dialling"), pair.a.find("direct_dialling")
    # B dialled A's listener first (A did not dial), then both dialled: a punch, from B to
    # the address the relay observed for A, not the listener's.
    assert len(b_dials) >= 2 and a_dials and a_dials[0]["attempt"] == b_dials[-1]["attempt"], (a_dials, b_dials)
    assert b_dials[0]["remote"] != b_dials[-1]["remote"]
