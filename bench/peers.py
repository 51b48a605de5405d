"""``make bench-peers``: Ray on this machine against baseline (a), in one run.

An optional extra beside ``make bench``: it runs in its own virtualenv (``.venv-peers``),
the only one that has Ray. It measures the same figures as ``bench/run.py``, with the same
payloads, rounds (``BENCH_ROUNDS``) and job bodies, and prints them as ratios to baseline
(a) (a raw ROUTER driving worker processes, started exactly as ``bench/run.py`` starts it) from
this same run; the figures also go as JSON to ``$BENCH_PEERS_JSON`` (default
bench-peers-results.json).

How Ray runs: Ray's local mode (``ray.init(local_mode=True)``, which ran tasks in the
driver's own process) was deprecated in Ray 2.0 and is gone from recent releases:
``ray.init`` raises ``RuntimeError`` for it. So Ray runs as a single-node local cluster on
this machine (its GCS, raylet, object store and worker processes, on loopback),
started by ``ray.init(address="local", num_cpus=N)``: once with one CPU per core for every
figure, then once more with ``num_cpus=1`` for the one-worker CPU-bound figure. Each task
runs the same worker function as baseline (a)'s pool, ``meshnet.jobs.worker.run_job``, in
Ray worker processes set up with ``init_worker`` (as baseline (a)'s workers are). The
client is this benchmark process itself: payloads go as ``bytes`` task arguments,
results come back with ``ray.wait`` (48 in flight for throughput) and ``ray.get``.
Everything Ray started is stopped at the end, on failure too.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import time
from typing import Any

import cbor2
import psutil

from bench.baseline import KINDS
from bench.load import median, percentile
from bench.run import (
    BIG,
    BIG_JOBS,
    CORES,
    CPU_DATA,
    CPU_JOBS,
    ROUND_TRIPS,
    ROUNDS,
    THROUGHPUT_JOBS,
    WINDOW,
    Baseline,
    cpu_only,
    cpu_rounds,
    figure_rows,
    measure,
    progress,
    render,
)

REPLY_TIMEOUT_S = 60.0
#: Ray's object store (shared memory); its default is 30% of the machine's memory.
OBJECT_STORE_BYTES = 1 << 30
MODE = "single-node local cluster (ray.init(address='local')); local_mode is no longer supported"


def _setup_worker() -> None:
    """Ray's ``worker_process_setup_hook``: what baseline (a)'s workers do when they start."""
    from meshnet.jobs.worker import init_worker

    init_worker(KINDS)


def _job(kind: str, payload: bytes) -> tuple[str, bytes | None, str, str]:
    from meshnet.jobs.worker import run_job

    return run_job(kind, payload)


class RayDriver:
    """The load generator's interface (``bench.load.Driver``), with Ray tasks."""

    def __init__(self, ray: Any, name: str):
        self.ray = ray
        self.name = name
        self.task = ray.remote(_job)

    def _check(self, outcome: tuple[str, bytes | None, str, str]) -> None:
        if outcome[0] != "succeeded":
            raise RuntimeError(f"{self.name}: a job failed: {outcome[2]}: {outcome[3]}")

    def throughput(self, n: int, window: int, kind: str = "echo", body: bytes = b"\xf6") -> float:
        """Jobs per second with up to ``window`` in flight."""
        pending: list[Any] = []
        sent = received = 0
        started = time.perf_counter()
        while received < n:
            while sent < n and len(pending) < window:
                pending.append(self.task.remote(kind, body))
                sent += 1
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=REPLY_TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"{self.name}: no reply within {REPLY_TIMEOUT_S:g} s")
            self._check(self.ray.get(ready[0]))
            received += 1
        return n / (time.perf_counter() - started)

    def round_trips(self, n: int, kind: str = "echo", body: bytes = b"\xf6") -> list[float]:
        """Seconds of each of ``n`` sequential round trips."""
        times = []
        for _ in range(n):
            started = time.perf_counter()
            self._check(self.ray.get(self.task.remote(kind, body), timeout=REPLY_TIMEOUT_S))
            times.append(time.perf_counter() - started)
        return times

    def batch_seconds(self, n: int, kind: str, body: bytes) -> float:
        """Wall time to run ``n`` jobs submitted at once."""
        started = time.perf_counter()
        refs = [self.task.remote(kind, body) for _ in range(n)]
        for outcome in self.ray.get(refs, timeout=600.0):
            self._check(outcome)
        return time.perf_counter() - started


class RaySession:
    """A single-node Ray cluster on this machine with ``num_cpus`` CPUs, stopped on exit
    with every process it started (GCS, raylet, agents, workers)."""

    def __init__(self, ray: Any, num_cpus: int):
        self.ray = ray
        self.num_cpus = num_cpus
        self.tmp = tempfile.TemporaryDirectory(prefix="ray-", ignore_cleanup_errors=True)

    def __enter__(self) -> RaySession:
        # Ray unpickles the setup hook before it puts the driver's directory on the workers'
        # sys.path: this module's functions travel by value, not as an import of bench.peers.
        self.ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            self.ray.init(
                address="local",  # a new cluster, never one that happens to run here
                num_cpus=self.num_cpus,
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                logging_level=logging.WARNING,
                runtime_env={"worker_process_setup_hook": _setup_worker},
                _temp_dir=self.tmp.name,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def footprint(self) -> dict[str, float]:
        """Ray's own processes on this machine now: how many, and their memory as PSS (the
        object store's shared pages, mapped by several of them, are counted once)."""
        processes = psutil.Process().children(recursive=True)
        pss = 0
        for process in processes:
            try:
                pss += process.memory_full_info().pss
            except psutil.Error:
                pass
        return {"processes": len(processes), "pss_mb": pss / 1e6}

    def close(self) -> None:
        descendants = psutil.Process().children(recursive=True)
        try:
            self.ray.shutdown()
        finally:
            _, alive = psutil.wait_procs(descendants, timeout=10)
            for process in alive:
                try:
                    process.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=10)
            self.tmp.cleanup()


def measure_ray(ray: Any, label: str, rounds: int, cpu_body: bytes) -> dict[str, float]:
    """``bench.run.measure`` with Ray tasks in place of a DEALER."""
    driver = RayDriver(ray, label)
    driver.throughput(200, WINDOW)  # warm-up: worker processes, connections, caches
    figures: dict[str, list[float]] = {
        "jobs_per_s": [],
        "p50_us": [],
        "p99_us": [],
        "big_mb_per_s": [],
        "cpu_batch_s": [],
    }
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
        progress(f"{label}: round {r + 1}/{rounds} CPU-bound")
        figures["cpu_batch_s"].append(driver.batch_seconds(CPU_JOBS, "sha256", cpu_body))
    return {key: median(values) for key, values in figures.items()}


def cpu_only_ray(ray: Any, label: str, rounds: int, body: bytes) -> float:
    """``bench.run.cpu_only`` with Ray tasks."""
    driver = RayDriver(ray, label)
    driver.batch_seconds(1, "sha256", body)
    values = []
    for r in range(rounds):
        progress(f"{label}: round {r + 1}/{rounds} CPU-bound")
        values.append(driver.batch_seconds(CPU_JOBS, "sha256", body))
    return median(values)


def run(ray: Any) -> dict[str, Any]:
    rounds = ROUNDS
    body = cbor2.dumps({"data": CPU_DATA, "rounds": cpu_rounds()})
    results: dict[str, Any] = {"cores": CORES, "rounds": rounds, "machine": os.uname().machine}

    # Baseline (a) first, with Ray not yet started, so that neither runs beside the other.
    baselines: list[Baseline] = []
    try:
        progress("starting baseline (a)")
        b_pool = Baseline("baseline (a)", CORES)
        baselines.append(b_pool)
        b_pool1 = Baseline("baseline (a), 1 worker", 1)
        baselines.append(b_pool1)
        results["baseline_a"] = measure(b_pool.target, "baseline (a)", rounds, body)
        results["baseline_a"]["cpu_batch_1_s"] = cpu_only(b_pool1.target, "baseline (a) 1 worker", rounds, body)
    finally:
        for baseline in baselines:
            baseline.stop()

    label = f"Ray, {CORES} CPUs"
    progress(f"starting Ray {ray.__version__}, a single-node local cluster of {CORES} CPUs")
    with RaySession(ray, CORES) as session:
        results["ray"] = measure_ray(ray, label, rounds, body)
        results["ray"]["footprint"] = session.footprint()
    progress(f"starting Ray {ray.__version__}, a single-node local cluster of 1 CPU")
    with RaySession(ray, 1):
        results["ray"]["cpu_batch_1_s"] = cpu_only_ray(ray, "Ray, 1 CPU", rounds, body)
    results["ray"]["version"] = ray.__version__
    results["ray"]["mode"] = MODE

    for key in ("baseline_a", "ray"):
        figures = results[key]
        figures["cpu_speedup"] = figures["cpu_batch_1_s"] / figures["cpu_batch_s"]
    progress("done\n")
    return results


def table(results: dict[str, Any]) -> str:
    a, r, cores = results["baseline_a"], results["ray"], results["cores"]
    rows = figure_rows(CPU_JOBS, cores, "worker")
    header = ["metric", "baseline (a)", f"Ray {r['version']}", "vs (a)"]
    lines = [header]
    for title, key, fmt in rows:
        lines.append([title, fmt.format(a[key]), fmt.format(r[key]), f"{r[key] / a[key]:.2f}x"])
    out = render(lines)
    out.append("")
    out.append(f"Ray {r['version']}: {r['mode']}")
    out.append(
        f"  {cores} CPUs (1 CPU for the 1-worker row); tasks run meshnet.jobs.worker.run_job; "
        "the client is this process (ray.wait/ray.get)"
    )
    out.append(
        f"  Ray's own processes with {cores} CPUs, after the runs: {r['footprint']['processes']:.0f}, "
        f"{r['footprint']['pss_mb']:.0f} MB (PSS)"
    )
    out.append(f"medians over {results['rounds']} rounds; {cores} cores; ratios are Ray / baseline (a)")
    return "\n".join(out)


def main() -> int:
    # SIGTERM unwinds like Ctrl-C, so that what this run started (baselines, Ray) is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports: a benchmark only
    try:
        import ray
    except ImportError:
        print("error: Ray is not installed in this environment; run `make bench-peers`", file=sys.stderr)
        return 2
    started = time.monotonic()
    results = run(ray)
    results["seconds"] = round(time.monotonic() - started, 1)
    print(table(results))
    path = os.environ.get("BENCH_PEERS_JSON", "bench-peers-results.json")
    with open(path, "w") as out:
        out.write(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {path} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
