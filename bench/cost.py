"""CPU cost per job, by process and thread: where a throughput gap comes from.

``python -m bench.cost`` runs baseline (a), a local MeshNet node, the raw relayed route
and MeshNet's relayed path side by side, drives each with the same load generator, and
prints microseconds of CPU per job for each process of it (its ZeroMQ I/O threads apart
from its Python threads) and for the load generator, and the pages all of them faulted in
per job. On a small machine every process shares the cores, so jobs/s follows the total.
``--big`` does the same with 8 MiB echo payloads (milliseconds per job). ``--direct``
measures the direct path instead: the raw direct route and two MeshNet nodes on a direct
link, in alternating rounds.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import psutil

from bench.load import Driver, Target
from bench.run import CORES, Baseline, RawDirectChain, RawRelayChain, until_linked
from meshnet.identity import Identity
from tests.harness import Mesh

Run = tuple[str, Target, dict[str, psutil.Process]]

JOBS = 6000
BIG_JOBS = 12


def _threads(process: psutil.Process) -> dict[str, float]:
    """CPU seconds by kind of thread: ZeroMQ's I/O threads, and the rest (Python's)."""
    totals = {"zmq": 0.0, "python": 0.0}
    for thread in process.threads():
        try:
            name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
        except OSError:
            name = ""
        totals["zmq" if name.startswith("ZMQbg") else "python"] += thread.user_time + thread.system_time
    return totals


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds so far: of each process by kind of thread (``NAME zmq``, ``NAME
    python``), of its worker processes (``NAME workers``), and of this one (``load
    generator``)."""
    seconds: dict[str, float] = {}
    for name, process in processes.items():
        for kind, value in _threads(process).items():
            seconds[f"{name} {kind}"] = value
        workers = 0.0
        for child in process.children(recursive=True):
            try:
                workers += sum(child.cpu_times()[:2])
            except psutil.NoSuchProcess:
                pass
        if workers:
            seconds[f"{name} workers"] = workers
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds["load generator"] = usage.ru_utime + usage.ru_stime
    return seconds


def minor_faults(processes: dict[str, psutil.Process]) -> int:
    """Pages faulted in so far by ``processes``, their workers and this process: what a
    buffer given back to the system and allocated again costs (about a microsecond per
    4 KiB page, in the kernel, on whichever thread touches it first)."""
    total = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for process in processes.values():
        for each in (process, *process.children(recursive=True)):
            try:
                # Field 10 of /proc/PID/stat, counted after the command name's ")".
                total += int(Path(f"/proc/{each.pid}/stat").read_text().rpartition(")")[2].split()[7])
            except (OSError, psutil.NoSuchProcess):
                pass
    return total


def measure(name: str, target: Target, processes: dict[str, psutil.Process], big: bool) -> str:
    driver = Driver(target)
    try:
        if big:
            body = cbor2.dumps(os.urandom(8 * 1024 * 1024))
            driver.batch_seconds(2, "echo", body)
            jobs, unit, scale = BIG_JOBS, "ms", 1e3
        else:
            driver.throughput(500, 48)
            jobs, unit, scale = JOBS, "us", 1e6
        before, faults_before = cpu_seconds(processes), minor_faults(processes)
        started = time.perf_counter()
        if big:
            driver.batch_seconds(jobs, "echo", body)
        else:
            driver.throughput(jobs, 48)
        wall = time.perf_counter() - started
        after, faults = cpu_seconds(processes), minor_faults(processes) - faults_before
        used = {key: after[key] - before.get(key, 0.0) for key in after}
        parts = ", ".join(f"{key} {value * scale / jobs:.0f}" for key, value in used.items() if value > 0)
        return (
            f"{name}: {jobs / wall:,.0f} jobs/s; CPU {unit} per job: total {sum(used.values()) * scale / jobs:.0f} "
            f"({parts}); cores busy {sum(used.values()) / wall:.2f} of {CORES}; "
            f"page faults per job {faults / jobs:,.0f}"
        )
    finally:
        driver.close()


def _relayed_runs(mesh: Mesh, stack: list[Any]) -> list[Run]:
    baseline = Baseline("baseline (a)", CORES)
    stack.append(baseline)
    chain = RawRelayChain(CORES)
    stack.append(chain)
    nodes, ids, relay = _nodes(mesh, direct=False)
    entry, exit_node, raw_relay = (psutil.Process(p.pid) for p in reversed(chain.procs))
    return [
        ("baseline (a)", baseline.target, {"server": psutil.Process(baseline.proc.pid)}),
        # Pinned to the node itself: on a node with a relay, untargeted jobs may be placed
        # on its peers when its executors are busy.
        (
            "MeshNet local",
            Target("local", nodes["a"][1], "meshnet", to=ids["a"].peer_id, batch=True),
            {"node": nodes["a"][0]},
        ),
        ("raw relayed route", chain.target, {"entry": entry, "relay": raw_relay, "exit": exit_node}),
        (
            "MeshNet relayed",
            Target("relayed", nodes["a"][1], "meshnet", to=ids["b"].peer_id, batch=True),
            {"A": nodes["a"][0], "relay": relay, "B": nodes["b"][0]},
        ),
    ]


def _direct_runs(mesh: Mesh, stack: list[Any]) -> list[Run]:
    chain = RawDirectChain(CORES)
    stack.append(chain)
    nodes, ids, _ = _nodes(mesh, direct=True)
    target = Target("direct", nodes["a"][1], "meshnet", to=ids["b"].peer_id, batch=True)
    until_linked(target, nodes["a"][2])
    entry, exit_node = (psutil.Process(p.pid) for p in reversed(chain.procs))
    return [
        ("raw direct route", chain.target, {"entry": entry, "exit": exit_node}),
        ("MeshNet direct", target, {"A": nodes["a"][0], "B": nodes["b"][0]}),
    ]


def _nodes(mesh: Mesh, direct: bool) -> tuple[dict[str, Any], dict[str, Identity], psutil.Process]:
    """Nodes a and b on one relay (on a direct link between them with ``direct``)."""
    ids = {name: Identity.generate() for name in "ab"}
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[i.peer_id for i in ids.values()], heartbeat=1.0)
    relay = mesh.start_relay(relay_path)
    nodes = {}
    for name in "ab":
        path, _, api = mesh.node_config(
            name,
            ids[name],
            relay=(relay_endpoint, relay_id.peer_id),
            heartbeat=1.0,
            jobs={"executors": CORES},
            relay_settings={"direct_links": True, "stun": "off"} if direct else None,
        )
        proc = mesh.start_node(name, path, registered=True)
        nodes[name] = (psutil.Process(proc.pid), api, proc)
    return nodes, ids, psutil.Process(relay.pid)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big", action="store_true", help="8 MiB echo payloads instead of no-op jobs")
    parser.add_argument("--direct", action="store_true", help="the direct path and its raw route")
    parser.add_argument("--rounds", type=int, default=1, help="measure every row this many times, in turn")
    args = parser.parse_args()
    stack: list[Any] = []
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        try:
            runs = _direct_runs(mesh, stack) if args.direct else _relayed_runs(mesh, stack)
            for _ in range(args.rounds):
                for name, target, processes in runs:
                    print(measure(name, target, processes, args.big), flush=True)
        finally:
            for part in reversed(stack):
                part.stop()
            mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
