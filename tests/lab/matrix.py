"""The NAT lab matrix: a node on a host of each kind, every pair of them exchanging jobs,
and the path each pair ends on. `make lab-matrix` prints it as a table (root, with the
lab's tools); tests/lab/test_matrix.py asserts it.

Kinds: a public host, a host behind a full-cone (1:1) NAT, behind a port-restricted NAT,
behind a symmetric NAT, and two hosts behind one (port-restricted) NAT.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess
from tests.lab.netlab import Host, Lab, why_not_available
from tests.lab.nodes import node_config, spawn_node, start_relay

KINDS = ("public", "full_cone", "port_restricted", "symmetric", "same_nat")
#: Where a direct link is possible (the rest stay relayed): public or full cone with
#: anything, port-restricted with port-restricted, and two hosts behind one NAT.
DIRECT = {
    frozenset(pair)
    for pair in [
        *[("public", k) for k in KINDS],
        *[("full_cone", k) for k in KINDS],
        ("port_restricted", "port_restricted"),
        ("port_restricted", "same_nat"),
        ("same_nat", "same_nat"),
    ]
}
JOBS_PER_PAIR = 20


def expected_path(a: str, b: str) -> str:
    """``lan`` for two hosts behind one NAT, ``direct`` for another pair that can link."""
    if a == b == "same_nat":
        return "lan"
    return "direct" if frozenset({a, b}) in DIRECT else "relayed"


SETTLE_S = 30.0


@dataclass
class Node:
    kind: str
    host: Host
    proc: MeshProcess
    api: str
    identity: Identity


@dataclass
class Row:
    a: str
    b: str
    expected: str
    path: str
    jobs_ok: int
    detail: str

    @property
    def ok(self) -> bool:
        return self.path == self.expected and self.jobs_ok == JOBS_PER_PAIR


def build(lab: Lab, mesh: Mesh, tmp: Path) -> list[Node]:
    relay = start_relay(lab, mesh)
    hosts: list[tuple[str, Host]] = []
    for i in (1, 2):
        hosts.append(("public", lab.public_host(f"pub{i}")))
    for kind, tag in (("full_cone", "fc"), ("port_restricted", "pr"), ("symmetric", "sy")):
        for i in (1, 2):
            hosts.append((kind, lab.host_behind(lab.router(f"r{tag}{i}", kind), f"{tag}{i}")))
    shared = lab.router("rln", "port_restricted")
    hosts += [("same_nat", lab.host_behind(shared, "ln1")), ("same_nat", lab.host_behind(shared, "ln2"))]
    nodes = []
    for kind, host in hosts:
        identity = Identity.generate()
        config, api = node_config(mesh, relay, host.name, tmp, identity)
        nodes.append(Node(kind, host, spawn_node(lab, mesh, host, host.name, config), api, identity))
    for node in nodes:
        node.proc.wait_for("nat_classified", timeout=60)
    return nodes


def pairs(nodes: list[Node]) -> list[tuple[Node, Node]]:
    """One pair per unordered pair of kinds; two nodes of one kind for a kind with itself."""
    first = {kind: [n for n in nodes if n.kind == kind] for kind in KINDS}
    out = []
    for x, y in itertools.combinations_with_replacement(KINDS, 2):
        out.append((first[x][0], first[y][1] if x == y else first[y][0]))
    return out


def settle(a: Node, b: Node, timeout: float) -> tuple[str, str]:
    """The path a's jobs to b end on: direct (or lan) once a logs it, relayed once the pair is
    skipped (or no punch succeeds within ``timeout``)."""
    peer = b.identity.peer_id

    def decided() -> tuple[str, str] | None:
        for path in ("direct", "lan"):
            if a.proc.find("path_changed", peer=peer, path=path):
                return path, ""
        skipped = a.proc.find("punch_skipped", peer=peer)
        return ("relayed", skipped[0]["reason"]) if skipped else None

    outcome = a.proc.wait_until(decided, timeout)
    if outcome is not None:
        return outcome
    failed = a.proc.find("punch_failed", peer=peer)
    return "relayed", failed[-1]["reason"] if failed else "no punch decision in time"


def run(tmp: Path) -> list[Row]:
    lab, mesh = Lab("m"), Mesh(tmp)
    try:
        nodes = build(lab, mesh, tmp)
        rows = []
        for a, b in pairs(nodes):
            with MeshClient(a.api) as client:
                client.run("echo", "hello", to=b.identity.peer_id)
                path, detail = settle(a, b, SETTLE_S)
                results = list(client.map("echo", range(JOBS_PER_PAIR), to=b.identity.peer_id))
            expected = expected_path(a.kind, b.kind)
            ok = sum(1 for i, r in enumerate(results) if r == i)
            rows.append(Row(a.kind, b.kind, expected, path, ok, detail))
        return rows
    finally:
        mesh.close()
        lab.close()


def table(rows: list[Row]) -> str:
    lines = [f"{'A':16} {'B':16} {'expected':9} {'path':8} {'jobs':>5}  note", "-" * 90]
    for row in rows:
        mark = "" if row.ok else "  <-- MISMATCH"
        lines.append(
            f"{row.a:16} {row.b:16} {row.expected:9} {row.path:8} {row.jobs_ok:>2}/{JOBS_PER_PAIR}  {row.detail}{mark}"
        )
    return "\n".join(lines)


def main() -> int:
    reason = why_not_available()
    if reason is not None:
        print(f"the lab matrix cannot run here: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        rows = run(Path(tmp))
    print(table(rows))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
