"""``make bench``: MeshNet against its baselines, on loopback, with real processes.

Starts, in this one run: baseline (b) (raw ROUTER, no pool), baseline (a) (raw ROUTER
driving as many worker processes as MeshNet has executors, over socket pairs, the way a
node does), the same ROUTER with a pebble pool (a reference row), a relay and MeshNet
nodes; drives each with the same raw DEALER load generator; prints one table of medians
over several rounds with each MeshNet figure as a ratio to baseline (a); writes the same
figures as JSON to $BENCH_JSON (default bench-results.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import psutil

from bench.load import Driver, Target, median, percentile
from tests.harness import Mesh, free_port

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "5"))
CORES = len(os.sched_getaffinity(0))
THROUGHPUT_JOBS = 4000
WINDOW = 48  # within a node's queue (64) plus its executors
ROUND_TRIPS = 400
BIG = 8 * 1024 * 1024
BIG_JOBS = 6
CPU_DATA = os.urandom(4 * 1024 * 1024)
CPU_TARGET_S = 0.070
#: CPU-bound jobs per core in each measurement: enough that one job's scheduling luck
#: moves the speedup by little.
CPU_JOBS_PER_CORE = 8
CPU_JOBS = CPU_JOBS_PER_CORE * CORES
IDLE_WINDOW_S = 5.0


def progress(text: str) -> None:
    """One line that rewrites itself on a terminal; a line per step in a log."""
    if sys.stderr.isatty():
        sys.stderr.write(f"\r\033[K[bench] {text}")
    else:
        sys.stderr.write(f"[bench] {text}\n")
    sys.stderr.flush()


def cpu_rounds() -> int:
    """sha256 rounds over 4 MiB that take about 70 ms on this machine."""
    started = time.perf_counter()
    hashlib.sha256(CPU_DATA).digest()
    one = time.perf_counter() - started
    return max(1, round(CPU_TARGET_S / one))


class Baseline:
    def __init__(self, name: str, workers: int, pool: str = "pipes"):
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.baseline",
                "--endpoint",
                self.endpoint,
                "--workers",
                str(workers),
                "--pool",
                pool,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.target = Target(name, self.endpoint, "baseline")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def measure(target: Target, label: str, rounds: int, cpu_body: bytes | None) -> dict[str, Any]:
    driver = Driver(target)
    try:
        driver.throughput(200, WINDOW)  # warm-up: pool workers, connections, caches
        figures: dict[str, list[float]] = {"jobs_per_s": [], "p50_us": [], "p99_us": [], "big_mb_per_s": []}
        if cpu_body is not None:
            figures["cpu_batch_s"] = []
        for r in range(rounds):
            progress(f"{label}: round {r + 1}/{rounds} throughput")
            figures["jobs_per_s"].append(driver.throughput(THROUGHPUT_JOBS, WINDOW))
            progress(f"{label}: round {r + 1}/{rounds} round trips")
            times = driver.round_trips(ROUND_TRIPS)
            figures["p50_us"].append(percentile(times, 0.50) * 1e6)
            figures["p99_us"].append(percentile(times, 0.99) * 1e6)
            progress(f"{label}: round {r + 1}/{rounds} 8 MiB payloads")
            big = cbor2.dumps(os.urandom(BIG))
            seconds = driver.batch_seconds(BIG_JOBS, "echo", big)
            figures["big_mb_per_s"].append(2 * BIG_JOBS * len(big) / seconds / 1e6)
            if cpu_body is not None:
                progress(f"{label}: round {r + 1}/{rounds} CPU-bound")
                figures["cpu_batch_s"].append(driver.batch_seconds(CPU_JOBS, "sha256", cpu_body))
        return {key: median(values) for key, values in figures.items()}
    finally:
        driver.close()


def cpu_only(target: Target, label: str, rounds: int, body: bytes) -> float:
    driver = Driver(target)
    try:
        driver.batch_seconds(1, "sha256", body)
        values = []
        for r in range(rounds):
            progress(f"{label}: round {r + 1}/{rounds} CPU-bound")
            values.append(driver.batch_seconds(CPU_JOBS, "sha256", body))
        return median(values)
    finally:
        driver.close()


def idle_figures(pid: int) -> dict[str, float]:
    process = psutil.Process(pid)
    workers = process.children(recursive=True)
    before = sum(process.cpu_times()[:2])
    time.sleep(IDLE_WINDOW_S)  # the measurement window
    used = sum(process.cpu_times()[:2]) - before
    return {
        "idle_cpu_percent": 100 * used / IDLE_WINDOW_S,
        "rss_mb": process.memory_info().rss / 1e6,
        "workers_rss_mb": sum(w.memory_info().rss for w in workers if w.is_running()) / 1e6,
    }


def run() -> dict[str, Any]:
    rounds = ROUNDS
    body = cbor2.dumps({"data": CPU_DATA, "rounds": cpu_rounds()})
    results: dict[str, Any] = {"cores": CORES, "rounds": rounds, "cpu_jobs": CPU_JOBS, "machine": os.uname().machine}
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        baselines: list[Baseline] = []
        try:
            progress("starting baselines, a relay and nodes")
            b_nopool = Baseline("baseline (b)", 0)
            b_pool = Baseline("baseline (a)", CORES)
            b_pool1 = Baseline("baseline (a), 1 worker", 1)
            b_pebble = Baseline("pebble pool", CORES, pool="pebble")
            baselines += [b_nopool, b_pool, b_pool1, b_pebble]
            from meshnet.identity import Identity

            ids = {name: Identity.generate() for name in ("a", "b", "b1", "l1")}
            relay_path, relay_id, relay_endpoint = mesh.relay_config(
                allowed=[i.peer_id for i in ids.values()], heartbeat=1.0
            )
            mesh.start_relay(relay_path)
            link = (relay_endpoint, relay_id.peer_id)
            nodes = {}
            for name, executors, linked in (("a", CORES, True), ("b", CORES, True), ("b1", 1, True), ("l1", 1, False)):
                path, _, api = mesh.node_config(
                    name,
                    ids[name],
                    relay=link if linked else None,
                    heartbeat=1.0,
                    jobs={"executors": executors},
                )
                nodes[name] = (mesh.start_node(name, path, registered=linked), api)
            local = Target("MeshNet local", nodes["a"][1], "meshnet")
            relayed = Target("MeshNet relayed", nodes["a"][1], "meshnet", to=ids["b"].peer_id)

            results["baseline_b"] = measure(b_nopool.target, "baseline (b)", rounds, None)
            results["baseline_a"] = measure(b_pool.target, "baseline (a)", rounds, body)
            results["baseline_a"]["cpu_batch_1_s"] = cpu_only(b_pool1.target, "baseline (a) 1 worker", rounds, body)
            results["pebble"] = measure(b_pebble.target, "pebble pool", rounds, None)
            results["local"] = measure(local, "MeshNet local", rounds, body)
            results["local"]["cpu_batch_1_s"] = cpu_only(
                Target("local 1", nodes["l1"][1], "meshnet"), "MeshNet local, 1 executor", rounds, body
            )
            results["relayed"] = measure(relayed, "MeshNet relayed", rounds, body)
            results["relayed"]["cpu_batch_1_s"] = cpu_only(
                Target("relayed 1", nodes["a"][1], "meshnet", to=ids["b1"].peer_id),
                "MeshNet relayed, 1 executor",
                rounds,
                body,
            )
            progress(f"idle node: {IDLE_WINDOW_S:g} s of nothing")
            results["idle"] = idle_figures(nodes["a"][0].pid)
        finally:
            for baseline in baselines:
                baseline.stop()
            mesh.close()
    for key in ("baseline_a", "local", "relayed"):
        figures = results[key]
        figures["cpu_speedup"] = figures["cpu_batch_1_s"] / figures["cpu_batch_s"]
    progress("done\n")
    return results


def table(results: dict[str, Any]) -> str:
    a, b, pebble, local, relayed, idle = (
        results[k] for k in ("baseline_a", "baseline_b", "pebble", "local", "relayed", "idle")
    )

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}x"

    rows = [
        ("no-op jobs/s (48 in flight)", "jobs_per_s", "{:,.0f}"),
        ("round trip p50 (us)", "p50_us", "{:,.0f}"),
        ("round trip p99 (us)", "p99_us", "{:,.0f}"),
        ("8 MiB echo (MB/s, both ways)", "big_mb_per_s", "{:,.0f}"),
        (f"CPU-bound, {results['cpu_jobs']} jobs, 1 executor (s)", "cpu_batch_1_s", "{:.2f}"),
        (f"CPU-bound, {results['cpu_jobs']} jobs, {results['cores']} executors (s)", "cpu_batch_s", "{:.2f}"),
        ("CPU-bound speedup", "cpu_speedup", "{:.2f}"),
    ]
    header = ["metric", "baseline (b)", "baseline (a)", "pebble pool", "local", "vs (a)", "relayed", "vs (a)"]
    lines = [header]
    for title, key, fmt in rows:
        lines.append(
            [
                title,
                fmt.format(b[key]) if key in b else "-",
                fmt.format(a[key]),
                fmt.format(pebble[key]) if key in pebble else "-",
                fmt.format(local[key]),
                ratio(local[key], a[key]),
                fmt.format(relayed[key]),
                ratio(relayed[key], a[key]),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    out.append("")
    out.append(
        f"idle node: {idle['idle_cpu_percent']:.2f}% of a core over {IDLE_WINDOW_S:g} s; "
        f"RSS {idle['rss_mb']:.0f} MB (its {results['cores']} workers: {idle['workers_rss_mb']:.0f} MB)"
    )
    out.append(f"medians over {results['rounds']} rounds; {results['cores']} cores; ratios are to baseline (a)")
    return "\n".join(out)


def targets(results: dict[str, Any]) -> str:
    a, local, relayed, idle = (results[k] for k in ("baseline_a", "local", "relayed", "idle"))
    checks = [
        ("local jobs/s >= 0.8x (a)", local["jobs_per_s"] / a["jobs_per_s"], 0.8, True),
        ("relayed jobs/s >= 0.5x (a)", relayed["jobs_per_s"] / a["jobs_per_s"], 0.5, True),
        ("relayed p50 <= 3x (a)", relayed["p50_us"] / a["p50_us"], 3.0, False),
        ("relayed 8 MiB MB/s >= 0.5x (a)", relayed["big_mb_per_s"] / a["big_mb_per_s"], 0.5, True),
        (f"CPU speedup >= {0.95 * results['cores']:.2f}", local["cpu_speedup"], 0.95 * results["cores"], True),
        ("idle node < 1% of a core", idle["idle_cpu_percent"], 1.0, False),
        ("idle node RSS < 80 MB", idle["rss_mb"], 80.0, False),
    ]
    lines = ["targets:"]
    for name, value, bound, at_least in checks:
        met = value >= bound if at_least else value < bound if "idle" in name else value <= bound
        lines.append(f"  [{'met' if met else 'MISSED'}] {name}: {value:.2f}")
    return "\n".join(lines)


def main() -> int:
    started = time.monotonic()
    results = run()
    results["seconds"] = round(time.monotonic() - started, 1)
    print(table(results))
    print(targets(results))
    path = Path(os.environ.get("BENCH_JSON", "bench-results.json"))
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {path} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
