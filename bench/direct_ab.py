"""A/B of the direct path: this tree's nodes against another checkout's, same run.

``python -m bench.direct_ab OTHER_CHECKOUT [--rounds N]`` starts the raw direct route,
a pair of nodes on a direct link running this tree's code and a pair running the code
in OTHER_CHECKOUT, and measures them in interleaved rounds: no-op jobs/s with 48 in
flight (``--big``: 8 MiB echoes, MB/s both ways), and CPU per job of the servers and
their workers. Prints each round and the medians. For judging a
change to the job path on a noisy machine, where runs minutes apart differ by more
than the change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import cbor2
import psutil

import tests.harness as harness
from bench.cost import cpu_seconds
from bench.load import Driver, Target
from bench.run import CORES, RawDirectChain, until_linked
from meshnet.identity import Identity
from tests.harness import Mesh

JOBS = 4000
BIG_JOBS = 6


def _pair(
    mesh: Mesh, tag: str, ids: dict[str, Identity], relay: tuple[str, str], checkout: Path
) -> tuple[Target, dict[str, psutil.Process]]:
    procs = {}
    saved, harness.REPO = harness.REPO, checkout  # nodes run the code where they start
    try:
        for name in "ab":
            path, _, api = mesh.node_config(
                f"{tag}{name}", ids[name], relay=relay, heartbeat=1.0, jobs={"executors": CORES},
                relay_settings={"direct_links": True, "stun": "off"},
            )  # fmt: skip
            procs[name] = (mesh.start_node(f"{tag}{name}", path, registered=True), api)
    finally:
        harness.REPO = saved
    target = Target(tag, procs["a"][1], "meshnet", to=ids["b"].peer_id)
    until_linked(target, procs["a"][0])
    return target, {name: psutil.Process(p.pid) for name, (p, _) in procs.items()}


def _round(target: Target, processes: dict[str, psutil.Process], big: bytes | None) -> tuple[float, float]:
    """jobs/s (MB/s with ``big``), and microseconds of CPU per job."""
    driver = Driver(target)
    try:
        if big is None:
            driver.throughput(300, 48)
            before = cpu_seconds(processes)
            rate, jobs = driver.throughput(JOBS, 48), JOBS
        else:
            driver.batch_seconds(2, "echo", big)
            before = cpu_seconds(processes)
            jobs = BIG_JOBS
            rate = 2 * jobs * len(big) / driver.batch_seconds(jobs, "echo", big) / 1e6
        after = cpu_seconds(processes)
    finally:
        driver.close()
    return rate, node_us_per_job(before, after, jobs)


def node_us_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> float:
    """Microseconds of CPU per job of the nodes and their workers (not the load generator),
    between two ``cpu_seconds`` readings."""
    nodes = sum(after[k] - before.get(k, 0.0) for k in after if k != "load generator")
    return nodes * 1e6 / jobs


def ab_parser(doc: str, rounds: int) -> argparse.ArgumentParser:
    """What every same-run A/B takes: the other checkout, its rounds, and ``--big``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="a checkout of the code to compare with (e.g. a git worktree)")
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--big", action="store_true", help="8 MiB echo payloads: MB/s, both ways")
    return parser


def ab_payload(big: bool) -> tuple[bytes | None, str]:
    """The payload of each job (None: the no-op echo) and the unit of the figures."""
    return (cbor2.dumps(os.urandom(8 * 1024 * 1024)), "MB/s") if big else (None, "jobs/s")


def main() -> int:
    args = ab_parser(__doc__, rounds=7).parse_args()
    big, unit = ab_payload(args.big)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        chain = RawDirectChain(CORES)
        try:
            ids = {name: Identity.generate() for name in ("newa", "newb", "olda", "oldb")}
            relay_path, relay_id, endpoint = mesh.relay_config(allowed=[i.peer_id for i in ids.values()], heartbeat=1.0)
            mesh.start_relay(relay_path)
            relay = (endpoint, relay_id.peer_id)
            raw = (chain.target, {f"p{i}": psutil.Process(p.pid) for i, p in enumerate(chain.procs)})
            subjects = {
                "raw direct": raw,
                "this tree": _pair(mesh, "new", {n: ids["new" + n] for n in "ab"}, relay, harness.REPO),
                str(args.other): _pair(mesh, "old", {n: ids["old" + n] for n in "ab"}, relay, args.other.resolve()),
            }
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}
            for r in range(args.rounds):
                for name, (target, processes) in subjects.items():
                    figures[name].append(_round(target, processes, big))
                    rate, cpu = figures[name][-1]
                    print(f"round {r + 1}: {name}: {rate:,.0f} {unit}, {cpu:.0f} us CPU per job", flush=True)
            raw_rates = [rate for rate, _ in figures["raw direct"]]
            for name, values in figures.items():
                ratios = [rate / base for (rate, _), base in zip(values, raw_rates, strict=True)]
                print(
                    f"median {name}: {statistics.median(v[0] for v in values):,.0f} {unit}, "
                    f"{statistics.median(v[1] for v in values):.0f} us CPU per job (servers, workers), "
                    f"{statistics.median(ratios):.2f}x raw direct"
                )
        finally:
            chain.stop()
            mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
