"""CPU cost per no-op job, by process: the server, its pool workers and the load generator.

``python -m bench.cost`` runs baseline (a) and a local MeshNet node side by side and prints
microseconds of CPU per job for each part. It says where a throughput gap comes from when
the machine's cores are the limit (which is the case on a small machine: everything shares them).
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.load import Driver, Target
from bench.run import CORES, Baseline
from tests.harness import Mesh

JOBS = 6000


def _cpu(process: psutil.Process) -> tuple[float, float]:
    times = process.cpu_times()
    return times.user, times.system


def _children_cpu(process: psutil.Process) -> float:
    total = 0.0
    for child in process.children(recursive=True):
        try:
            total += sum(_cpu(child))
        except psutil.NoSuchProcess:
            pass
    return total


def _self_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(name: str, target: Target, pid: int) -> str:
    driver = Driver(target)
    try:
        driver.throughput(500, 48)
        process = psutil.Process(pid)
        user0, sys0 = _cpu(process)
        kids0, me0 = _children_cpu(process), _self_cpu()
        started = time.perf_counter()
        rate = driver.throughput(JOBS, 48)
        wall = time.perf_counter() - started
        user1, sys1 = _cpu(process)
        kids, me = _children_cpu(process) - kids0, _self_cpu() - me0
        server = (user1 - user0) + (sys1 - sys0)
        per = 1e6 / JOBS
        return (
            f"{name}: {rate:,.0f} jobs/s; CPU per job: server {server * per:.0f} us "
            f"(user {(user1 - user0) * per:.0f}, system {(sys1 - sys0) * per:.0f}), "
            f"workers {kids * per:.0f} us, load generator {me * per:.0f} us; "
            f"cores busy {(server + kids + me) / wall:.2f} of {CORES}"
        )
    finally:
        driver.close()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        baseline = Baseline("baseline (a)", CORES)
        try:
            path, _, api = mesh.node_config("a", jobs={"executors": CORES})
            node = mesh.start_node("a", path)
            print(measure("baseline (a)", baseline.target, baseline.proc.pid))
            print(measure("MeshNet local", Target("local", api, "meshnet"), node.pid))
        finally:
            baseline.stop()
            mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
