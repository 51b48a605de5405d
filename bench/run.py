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
import zmq

from bench import placement
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


def until_linked(target: Target, entry: Any) -> None:
    """A direct pair's first jobs go relayed and start the punch: run a few, and wait for
    ``entry`` (its node process) to move the peer to the link (on one host: a LAN link)."""
    driver = Driver(target)
    try:
        driver.throughput(50, 8)
    finally:
        driver.close()
    entry.wait_for("path_changed", path="lan", timeout=30)


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


class RawRelayChain:
    """The floor of the relayed route (:mod:`bench.relay_floor`): raw relay, exit node with
    ``workers`` workers, entry node; stopped together."""

    def __init__(self, workers: int):
        self.procs: list[subprocess.Popen[str]] = []
        public, secret = (key.decode() for key in zmq.curve_keypair())
        relay = f"tcp://127.0.0.1:{free_port()}"
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        base = [sys.executable, "-m", "bench.relay_floor", f"--relay-public={public}"]
        try:
            relay_proc = self._start(base + ["--role", "relay", "--endpoint", relay, f"--relay-secret={secret}"])
            self._start(base + ["--role", "exit", "--relay", relay, "--workers", str(workers)])
            assert relay_proc.stdout is not None and relay_proc.stdout.readline().strip() == "hello exit"
            self._start(base + ["--role", "entry", "--relay", relay, "--endpoint", self.endpoint])
        except BaseException:
            self.stop()
            raise
        self.target = Target("raw relayed", self.endpoint, "baseline")

    def _start(self, args: list[str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(30)


class RawDirectChain(RawRelayChain):
    """The floor of the direct route (:mod:`bench.relay_floor`, ``direct-*`` roles): an exit
    node with ``workers`` workers behind a CurveZMQ ROUTER, and an entry node connected to
    it; stopped together."""

    def __init__(self, workers: int):
        self.procs: list[subprocess.Popen[str]] = []
        public, secret = (key.decode() for key in zmq.curve_keypair())
        exit_endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        base = [sys.executable, "-m", "bench.relay_floor", f"--relay-public={public}"]
        try:
            self._start(base + ["--role", "direct-exit", "--endpoint", exit_endpoint, f"--relay-secret={secret}",
                                "--workers", str(workers)])  # fmt: skip
            self._start(base + ["--role", "direct-entry", "--endpoint", self.endpoint, "--relay", exit_endpoint])
        except BaseException:
            self.stop()
            raise
        self.target = Target("raw direct", self.endpoint, "baseline")


class Subject:
    """One server under measurement: its load generator and the figures of each round."""

    def __init__(self, key: str, label: str, target: Target, cpu_body: bytes | None, *, cpu_only: bool = False):
        self.key = key
        self.label = label
        self.cpu_body = cpu_body
        self.cpu_only = cpu_only
        self.driver = Driver(target)
        names = ["cpu_batch_s"] if cpu_only else ["jobs_per_s", "p50_us", "p99_us", "big_mb_per_s"]
        if cpu_body is not None and not cpu_only:
            names.append("cpu_batch_s")
        self.figures: dict[str, list[float]] = {name: [] for name in names}

    def warm_up(self) -> None:
        """Pool workers started, connections made, caches filled."""
        if self.cpu_only:
            assert self.cpu_body is not None
            self.driver.batch_seconds(1, "sha256", self.cpu_body)
        else:
            self.driver.throughput(200, WINDOW)

    def round(self, r: int, rounds: int) -> None:
        label = f"{self.label}: round {r + 1}/{rounds}"
        if not self.cpu_only:
            progress(f"{label} throughput")
            self.figures["jobs_per_s"].append(self.driver.throughput(THROUGHPUT_JOBS, WINDOW))
            progress(f"{label} round trips")
            times = self.driver.round_trips(ROUND_TRIPS)
            self.figures["p50_us"].append(percentile(times, 0.50) * 1e6)
            self.figures["p99_us"].append(percentile(times, 0.99) * 1e6)
            progress(f"{label} 8 MiB payloads")
            big = cbor2.dumps(os.urandom(BIG))
            seconds = self.driver.batch_seconds(BIG_JOBS, "echo", big)
            self.figures["big_mb_per_s"].append(2 * BIG_JOBS * len(big) / seconds / 1e6)
        if self.cpu_body is not None:
            progress(f"{label} CPU-bound")
            self.figures["cpu_batch_s"].append(self.driver.batch_seconds(CPU_JOBS, "sha256", self.cpu_body))

    def medians(self) -> dict[str, float]:
        return {name: median(values) for name, values in self.figures.items()}


def measure_interleaved(subjects: list[Subject], rounds: int) -> dict[str, dict[str, float]]:
    """Round by round, every subject in turn: a slow patch of this shared machine then
    lands on all of them, not on whichever was being measured at the time."""
    try:
        for subject in subjects:
            progress(f"{subject.label}: warm-up")
            subject.warm_up()
        for r in range(rounds):
            for subject in subjects:
                subject.round(r, rounds)
        return {subject.key: subject.medians() for subject in subjects}
    finally:
        for subject in subjects:
            subject.driver.close()


def measure(target: Target, label: str, rounds: int, cpu_body: bytes | None) -> dict[str, Any]:
    """Every figure of one server (medians over ``rounds``)."""
    return measure_interleaved([Subject("it", label, target, cpu_body)], rounds)["it"]


def cpu_only(target: Target, label: str, rounds: int, body: bytes) -> float:
    """Seconds for the CPU-bound batch on one server (median over ``rounds``)."""
    return measure_interleaved([Subject("it", label, target, body, cpu_only=True)], rounds)["it"]["cpu_batch_s"]


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
        baselines: list[Baseline | RawRelayChain] = []
        try:
            progress("starting baselines, a relay and nodes")
            b_nopool = Baseline("baseline (b)", 0)
            b_pool = Baseline("baseline (a)", CORES)
            b_pool1 = Baseline("baseline (a), 1 worker", 1)
            b_pebble = Baseline("pebble pool", CORES, pool="pebble")
            baselines += [b_nopool, b_pool, b_pool1, b_pebble]
            raw_chain = RawRelayChain(CORES)
            baselines.append(raw_chain)
            raw_direct = RawDirectChain(CORES)
            baselines.append(raw_direct)
            from meshnet.identity import Identity

            ids = {name: Identity.generate() for name in ("a", "b", "b1", "l1", "da", "db")}
            relay_path, relay_id, relay_endpoint = mesh.relay_config(
                allowed=[i.peer_id for i in ids.values()], heartbeat=1.0
            )
            mesh.start_relay(relay_path)
            link = (relay_endpoint, relay_id.peer_id)
            nodes = {}
            # da and db make a direct link (on loopback, as over a LAN: one IP, db dials
            # da's listener); the others stay relayed (the harness turns direct links off).
            direct = {"direct_links": True, "stun": "off"}
            for name, executors, linked in (
                ("a", CORES, True),
                ("b", CORES, True),
                ("b1", 1, True),
                ("l1", 1, False),
                ("da", CORES, True),
                ("db", CORES, True),
            ):
                path, _, api = mesh.node_config(
                    name,
                    ids[name],
                    relay=link if linked else None,
                    heartbeat=1.0,
                    jobs={"executors": executors},
                    relay_settings=direct if name in ("da", "db") else None,
                )
                nodes[name] = (mesh.start_node(name, path, registered=linked), api)
            # Pinned to the node itself: untargeted jobs on a busy node with a relay are
            # placed on its peers too (bench.placement measures that).
            local = Target("MeshNet local", nodes["a"][1], "meshnet", to=ids["a"].peer_id, batch=True)
            relayed = Target("MeshNet relayed", nodes["a"][1], "meshnet", to=ids["b"].peer_id, batch=True)
            direct_target = Target("MeshNet direct", nodes["da"][1], "meshnet", to=ids["db"].peer_id, batch=True)

            one_executor = {
                "baseline_a": b_pool1.target,
                "local": Target("local 1", nodes["l1"][1], "meshnet", batch=True),
            }
            one_executor["relayed"] = Target("relayed 1", nodes["a"][1], "meshnet", to=ids["b1"].peer_id, batch=True)
            subjects = [
                Subject("baseline_b", "baseline (b)", b_nopool.target, None),
                Subject("baseline_a", "baseline (a)", b_pool.target, body),
                Subject("pebble", "pebble pool", b_pebble.target, None),
                Subject("local", "MeshNet local", local, body),
                Subject("raw_relayed", "raw relayed route", raw_chain.target, None),
                Subject("relayed", "MeshNet relayed", relayed, body),
                Subject("raw_direct", "raw direct route", raw_direct.target, None),
                Subject("direct", "MeshNet direct", direct_target, None),
            ]
            subjects += [
                Subject(f"{key}_1", f"{key}, 1 executor", target, body, cpu_only=True)
                for key, target in one_executor.items()
            ]
            until_linked(direct_target, nodes["da"][0])  # measured once the path is direct
            results.update(measure_interleaved(subjects, rounds))
            for key in one_executor:
                results[key]["cpu_batch_1_s"] = results.pop(f"{key}_1")["cpu_batch_s"]
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


def figure_rows(cpu_jobs: int, cores: int, runner: str = "executor") -> list[tuple[str, str, str]]:
    """(title, key, format) of each figure, in the order tables print them."""
    return [
        ("no-op jobs/s (48 in flight)", "jobs_per_s", "{:,.0f}"),
        ("round trip p50 (us)", "p50_us", "{:,.0f}"),
        ("round trip p99 (us)", "p99_us", "{:,.0f}"),
        ("8 MiB echo (MB/s, both ways)", "big_mb_per_s", "{:,.0f}"),
        (f"CPU-bound, {cpu_jobs} jobs, 1 {runner} (s)", "cpu_batch_1_s", "{:.2f}"),
        (f"CPU-bound, {cpu_jobs} jobs, {cores} {runner}s (s)", "cpu_batch_s", "{:.2f}"),
        ("CPU-bound speedup", "cpu_speedup", "{:.2f}"),
    ]


def render(lines: list[list[str]]) -> list[str]:
    """Rows of cells as aligned text: the first column left, the others right, a rule
    under the header."""
    widths = [max(len(row[i]) for row in lines) for i in range(len(lines[0]))]
    out = []
    for n, row in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def table(results: dict[str, Any]) -> str:
    a, b, pebble, local, raw, relayed, raw_direct, direct, idle = (
        results[k]
        for k in (
            "baseline_a",
            "baseline_b",
            "pebble",
            "local",
            "raw_relayed",
            "relayed",
            "raw_direct",
            "direct",
            "idle",
        )
    )

    def ratio(value: float, base: float) -> str:
        return f"{value / base:.2f}x"

    rows = figure_rows(results["cpu_jobs"], results["cores"])
    header = [
        "metric",
        "baseline (b)",
        "baseline (a)",
        "pebble pool",
        "local",
        "vs (a)",
        "raw route",
        "relayed",
        "vs (a)",
        "vs raw",
        "raw direct",
        "direct",
        "vs raw",
        "vs relayed",
    ]
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
                fmt.format(raw[key]) if key in raw else "-",
                fmt.format(relayed[key]),
                ratio(relayed[key], a[key]),
                ratio(relayed[key], raw[key]) if key in raw else "-",
                fmt.format(raw_direct[key]) if key in raw_direct else "-",
                fmt.format(direct[key]) if key in direct else "-",
                ratio(direct[key], raw_direct[key]) if key in direct and key in raw_direct else "-",
                ratio(direct[key], relayed[key]) if key in direct else "-",
            ]
        )
    out = render(lines)
    out.append("")
    out.append(
        f"idle node: {idle['idle_cpu_percent']:.2f}% of a core over {IDLE_WINDOW_S:g} s; "
        f"RSS {idle['rss_mb']:.0f} MB (its {results['cores']} workers: {idle['workers_rss_mb']:.0f} MB)"
    )
    out.append(
        f"medians over {results['rounds']} rounds; {results['cores']} cores; ratios are to baseline (a), and for "
        "relayed also to the raw route (the same hops by raw pyzmq processes, CurveZMQ on the relay links), "
        "direct to the raw direct route (client, entry node, CurveZMQ link, exit node) and to relayed"
    )
    return "\n".join(out)


def targets(results: dict[str, Any]) -> str:
    a, local, relayed, idle = (results[k] for k in ("baseline_a", "local", "relayed", "idle"))
    direct, raw_direct = results["direct"], results["raw_direct"]
    checks = [
        ("direct jobs/s >= 0.8x raw direct", direct["jobs_per_s"] / raw_direct["jobs_per_s"], 0.8, True),
        ("direct jobs/s >= 2x relayed", direct["jobs_per_s"] / relayed["jobs_per_s"], 2.0, True),
        ("direct 8 MiB MB/s >= 0.5x (a)", direct["big_mb_per_s"] / a["big_mb_per_s"], 0.5, True),
        ("local jobs/s >= 0.8x (a)", local["jobs_per_s"] / a["jobs_per_s"], 0.8, True),
        ("relayed jobs/s >= 0.5x (a)", relayed["jobs_per_s"] / a["jobs_per_s"], 0.5, True),
        ("relayed p50 <= 3x (a)", relayed["p50_us"] / a["p50_us"], 3.0, False),
        ("relayed 8 MiB MB/s >= 0.5x (a)", relayed["big_mb_per_s"] / a["big_mb_per_s"], 0.5, True),
        (f"CPU speedup >= {0.95 * results['cores']:.2f}", local["cpu_speedup"], 0.95 * results["cores"], True),
        ("idle node < 1% of a core", idle["idle_cpu_percent"], 1.0, False),
        ("idle node RSS < 80 MB", idle["rss_mb"], 80.0, False),
    ]
    if "placement" in results:
        checks.append(("placement wall <= 1.15x ideal", results["placement"]["ratio"], 1.15, False))
    lines = ["targets:"]
    for name, value, bound, at_least in checks:
        met = value >= bound if at_least else value < bound if "idle" in name else value <= bound
        lines.append(f"  [{'met' if met else 'MISSED'}] {name}: {value:.3f}")
    return "\n".join(lines)


def main() -> int:
    started = time.monotonic()
    results = run()
    results["placement"] = placement.measure(rounds=3, progress=progress)
    results["seconds"] = round(time.monotonic() - started, 1)
    print(table(results))
    print(placement.line(results["placement"]))
    print(targets(results))
    path = Path(os.environ.get("BENCH_JSON", "bench-results.json"))
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {path} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
