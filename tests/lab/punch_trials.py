"""Repeated hole punches between two port-restricted NATs, some with one side late.

Each trial starts a fresh pair of nodes (fresh ports, fresh NAT mappings) behind two
port-restricted NATs, has node A run a job on node B (relayed), and waits for the punch.
In one trial of four ("late") B's router drops B's SYNs towards A for a random 0.2-2 s from the
moment A dials: B's side is that late (its kernel sends the SYN again after 1 s, then 3 s,
as a real late peer's would arrive). Figures per trial: whether the path went direct,
the time from "decide to punch" to the link up (the node's own `direct_link_up`), and the
round trip of the first job then answered on the direct link.

`make lab-punch` (root) runs 100 trials and prints the figures; tests/lab/test_punch_trials.py
runs a smaller number and asserts them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh
from tests.lab.netlab import Lab, why_not_available
from tests.lab.nodes import node_config, spawn_node, start_relay

LATE_MAX_S = 2.0
#: One trial in this many has B late.
LATE_EVERY = 4
#: Long enough for three attempts (5 s each, 1 s and 4 s apart).
UP_TIMEOUT_S = 30.0


@dataclass
class Trial:
    late_s: float
    direct: bool
    #: From the punch's decision to the link up (ms), as node A measured it.
    up_ms: float | None
    #: The first job's round trip on the direct link (ms), from the client.
    first_job_ms: float | None
    reason: str = ""
    #: The local ports of each attempt's two dials, A's and B's: a retry starts from a
    #: fresh port on at least one side (the side that started the attempt that failed).
    dial_ports: list[tuple[int, int]] = field(default_factory=list)

    @property
    def total_ms(self) -> float | None:
        return None if self.up_ms is None or self.first_job_ms is None else self.up_ms + self.first_job_ms


def run(tmp: Path, trials: int, seed: int = 1) -> list[Trial]:
    """``trials`` trials, one in LATE_EVERY with B late by a random 0.2-2 s."""
    rng = random.Random(seed)
    return run_late(tmp, [rng.uniform(0.2, LATE_MAX_S) if i % LATE_EVERY == LATE_EVERY - 1 else 0.0
                          for i in range(trials)])  # fmt: skip


def run_late(tmp: Path, lateness: list[float]) -> list[Trial]:
    """A trial for each lateness (seconds B's SYNs are held; 0: on time)."""
    lab, mesh = Lab("p"), Mesh(tmp)
    try:
        relay = start_relay(lab, mesh, stun=False)
        hosts = {n: lab.host_behind(lab.router(f"r{n}", "port_restricted"), f"h{n}") for n in "ab"}
        ids = {n: Identity.generate() for n in "ab"}
        configs = {n: node_config(mesh, relay, n, tmp, ids[n], jobs={"executors": 1}, stun="off")[0] for n in "ab"}
        return [_trial(lab, mesh, hosts, ids, configs, tmp, late_s) for late_s in lateness]
    finally:
        mesh.close()
        lab.close()


def _trial(lab: Lab, mesh: Mesh, hosts, ids, configs, tmp: Path, late_s: float) -> Trial:
    procs = {n: spawn_node(lab, mesh, hosts[n], n, configs[n]) for n in "ab"}
    try:
        for proc in procs.values():
            proc.wait_for("relay_registered")
        router_b = lab.routers["rb"]
        a_public = lab.routers["ra"].wan_ip
        rule = ["FORWARD", "-i", "lan", "-p", "tcp", "--syn", "-d", a_public, "-j", "DROP"]
        release: threading.Thread | None = None
        if late_s:
            lab.exec(router_b.ns, "iptables", "-I", *rule)

            def held_until_a_dials() -> None:
                procs["a"].wait_for("direct_dialling", timeout=UP_TIMEOUT_S)
                time.sleep(late_s)  # the lateness itself, not a synchronisation
                lab.exec(router_b.ns, "iptables", "-D", *rule)

            release = threading.Thread(target=held_until_a_dials, daemon=True)
            release.start()
        with MeshClient(f"ipc://{tmp}/a.sock") as client:
            client.run("echo", "relayed", to=ids["b"].peer_id)
            up = procs["a"].wait_until(lambda: procs["a"].find("direct_link_up"), UP_TIMEOUT_S)
            a_dials = procs["a"].find("direct_dialling")
            # B's lines are read on the harness's own thread: wait for as many as A's.
            procs["b"].wait_until(lambda: len(procs["b"].find("direct_dialling")) >= len(a_dials), 5)
            b_dials = procs["b"].find("direct_dialling")
            ports = [(a["local_port"], b["local_port"]) for a, b in zip(a_dials, b_dials, strict=False)]
            if not up:
                failed = procs["a"].find("punch_failed")
                why = failed[-1]["reason"] if failed else f"no link within {UP_TIMEOUT_S:g} s"
                return Trial(late_s, False, None, None, why, ports)
            started = time.perf_counter()
            client.run("echo", "direct", to=ids["b"].peer_id)
            first_job_ms = (time.perf_counter() - started) * 1000
        if release is not None:
            release.join()
        return Trial(late_s, True, float(up[0]["ms_since_decided"]), first_job_ms, dial_ports=ports)
    finally:
        for proc in procs.values():
            proc.stop()
        mesh.processes = [p for p in mesh.processes if p not in procs.values()]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(trials: list[Trial]) -> str:
    direct = [t for t in trials if t.direct]
    late = [t for t in trials if t.late_s]
    late_direct = len([t for t in late if t.direct])
    lines = [
        f"{len(direct)} of {len(trials)} attempts ended direct "
        f"({late_direct} of {len(late)} with B 0.2-{LATE_MAX_S:g} s late)"
    ]
    for name, pick in (
        ("all", direct),
        ("on time", [t for t in direct if not t.late_s]),
        ("late", [t for t in direct if t.late_s]),
    ):
        totals = [t.total_ms for t in pick if t.total_ms is not None]
        ups = [t.up_ms for t in pick if t.up_ms is not None]
        if totals:
            lines.append(
                f"  {name:8} decide -> first job answered direct: median {statistics.median(totals):.1f} ms, "
                f"p99 {percentile(totals, 0.99):.1f} ms (decide -> link up: median {statistics.median(ups):.1f} ms)"
            )
    for t in trials:
        if not t.direct:
            lines.append(f"  relayed: late {t.late_s:.2f} s: {t.reason}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=100)
    args = parser.parse_args()
    reason = why_not_available()
    if reason is not None:
        print(f"the punch trials cannot run here: {reason}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        trials = run(Path(tmp), args.trials)
    print(summary(trials))
    return 0 if sum(t.direct for t in trials) >= 0.99 * len(trials) else 1


if __name__ == "__main__":
    sys.exit(main())
