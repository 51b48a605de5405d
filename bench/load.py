"""Load generators: a raw DEALER that speaks either MeshNet's client protocol or the
baseline's, so that both servers are driven by the same client code."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import cbor2
import zmq


@dataclass(frozen=True)
class Target:
    """Where to send jobs and in which protocol."""

    name: str
    endpoint: str
    protocol: str  # "meshnet" or "baseline"
    to: str | None = None  # MeshNet only: the peer that runs the jobs
    #: MeshNet only: say ``batch`` in each submit, and read ``results`` (several jobs'
    #: ends in one message), as MeshClient does; off to drive a checkout that predates it.
    batch: bool = False

    def request(self, job_id: bytes, kind: str, body: bytes, timeout: float) -> list[Any]:
        # Both protocols are built with one cbor2.dumps and read with one cbor2.loads,
        # without validation: the load generator shares the machine's cores with the
        # servers it measures, so it must cost the same for both.
        if self.protocol == "meshnet":
            header = {"v": 1, "t": "submit", "id": job_id, "kind": kind, "timeout": timeout}
            if self.to is not None:
                header["to"] = self.to
            if self.batch:
                header["batch"] = True
            return [cbor2.dumps(header), body]
        return [cbor2.dumps({"id": job_id, "kind": kind}), body]

    def replies(self, frames: list[Any]) -> list[tuple[bytes, bool, Any]]:
        """The jobs' ends one message carries: (id, succeeded, result)."""
        if self.protocol == "meshnet":
            header = cbor2.loads(frames[0].bytes)
            if header["t"] == "results":
                return [(r["id"], r["status"] == "succeeded", r.get("result")) for r in header["results"]]
            return [(header["id"], header["status"] == "succeeded", frames[1] if len(frames) > 1 else None)]
        job_id, status, body = frames
        return [(bytes(job_id), bytes(status) == b"ok", body)]


class Driver:
    """One DEALER connection to a target."""

    def __init__(self, target: Target):
        self.target = target
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.setsockopt(zmq.RCVHWM, 100_000)
        self.sock.connect(target.endpoint)

    def close(self) -> None:
        self.sock.close(0)
        self.context.term()

    def _receive(self, timeout_ms: int = 60_000) -> int:
        """Read one message; how many jobs' ends it carried (every one a success)."""
        if not self.sock.poll(timeout_ms):
            raise TimeoutError(f"{self.target.name}: no reply within {timeout_ms} ms")
        ends = self.target.replies(self.sock.recv_multipart(copy=False))
        if not all(ok for _, ok, _ in ends):
            raise RuntimeError(f"{self.target.name}: a job failed")
        return len(ends)

    def throughput(self, n: int, window: int, kind: str = "echo", body: bytes = b"\xf6") -> float:
        """Jobs per second with up to ``window`` in flight."""
        sent = received = 0
        started = time.perf_counter()
        while received < n:
            while sent < n and sent - received < window:
                self.sock.send_multipart(self.target.request(os.urandom(16), kind, body, 60.0), copy=False)
                sent += 1
            received += self._receive()
        return n / (time.perf_counter() - started)

    def round_trips(self, n: int, kind: str = "echo", body: bytes = b"\xf6") -> list[float]:
        """Seconds of each of ``n`` sequential round trips."""
        times = []
        for _ in range(n):
            started = time.perf_counter()
            self.sock.send_multipart(self.target.request(os.urandom(16), kind, body, 60.0), copy=False)
            self._receive()
            times.append(time.perf_counter() - started)
        return times

    def batch_seconds(self, n: int, kind: str, body: bytes) -> float:
        """Wall time to run ``n`` jobs submitted at once."""
        started = time.perf_counter()
        for _ in range(n):
            self.sock.send_multipart(self.target.request(os.urandom(16), kind, body, 600.0), copy=False)
        received = 0
        while received < n:
            received += self._receive()
        return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values)
