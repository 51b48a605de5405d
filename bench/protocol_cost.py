"""What the node-to-node protocol alone costs per job: no sockets, no processes.

``python -m bench.protocol_cost`` sends no-op jobs from one session core to another in one
thread, as a direct link carries them: jobs in batches of 8, each box encoded, decoded and
validated by the node-to-node codec, each job answered at once. It prints microseconds of
CPU per job (both nodes' shares together) for three stacks over the same jobs, measured in
interleaved rounds (medians):

- ``cbor2 only``: each job's two boxes (the job, its result) as plain ``cbor2.dumps`` and
  ``cbor2.loads`` of the same maps: the least any encoding of them costs;
- ``codec``: the same boxes through ``encode_inner`` / ``decode_inner`` (validation);
- ``sessions + codec``: two ``SessionCore``s exchanging the jobs, their numbering, acks,
  exactly-once ledger and settling included.

The last is a floor under the Python CPU that two MeshNet nodes spend per direct job
beside what a raw route's processes spend (``bench.cost --direct``): a node also reads and
answers the client, runs the pool and serves its sockets.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections.abc import Callable

import cbor2

from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import NODE_TO_NODE, decode_inner, encode_inner
from meshnet.protocol.messages import Job, JobResult
from meshnet.session import Execute, SessionCore, Settled, Transmit

BATCH = 8
MAX_SIZE = 64 * 1024 * 1024
DONE = Outcome("succeeded", result=b"\xf6")


def _boxes() -> tuple[Job, JobResult]:
    header = {"sid": 1 << 40, "rsid": 1 << 41, "ctr": 1000, "ack": 500}
    job = Job(id=os.urandom(16), kind="echo", timeout=60.0, payload=b"\xf6", seq=501, **header)
    result = JobResult(id=job.id, job_seq=501, status="succeeded", result=b"\xf6", seq=502, **header)
    return job, result


def cbor_only(jobs: int) -> None:
    maps = [{"v": 1, "t": box.TYPE, **box.header_fields()} for box in _boxes()]
    for _ in range(jobs):
        for fields in maps:
            cbor2.loads(cbor2.dumps(fields))


def codec(jobs: int) -> None:
    boxes = _boxes()
    for _ in range(jobs):
        for box in boxes:
            decode_inner(encode_inner(box), NODE_TO_NODE, max_size=MAX_SIZE)


class SessionPair:
    """Node a submits to node b; every box crosses as encoded bytes."""

    def __init__(self) -> None:
        sids = itertools.count(1)
        self.cores = {name: SessionCore(budget=1 << 30, new_sid=lambda: next(sids)) for name in "ab"}
        self.wire: list[tuple[str, bytes]] = []
        self.runs: list[tuple[str, str, bytes]] = []
        self.settled = 0
        self.now = 0.0
        for name, core in self.cores.items():
            self._apply(name, core.on_path("relay", True, 0.0))

    def _apply(self, name: str, events: list) -> None:
        other = "b" if name == "a" else "a"
        for event in events:
            if isinstance(event, Transmit):
                self.wire.append((other, encode_inner(event.box)))
            elif isinstance(event, Execute):
                self.runs.append((name, event.peer, event.job.id))
            elif isinstance(event, Settled):
                self.settled += 1

    def jobs(self, jobs: int) -> None:
        for _ in range(0, jobs, BATCH):
            for _ in range(BATCH):
                spec = JobSpec(id=os.urandom(16), kind="echo", payload=b"\xf6", timeout=60.0, origin="c")
                self._apply("a", self.cores["a"].submit(spec, "b", self.now))
            while self.wire or self.runs:
                for name, data in self.wire:
                    box = decode_inner(data, NODE_TO_NODE, max_size=MAX_SIZE)
                    self._apply(name, self.cores[name].on_box("b" if name == "a" else "a", box, self.now))
                self.wire.clear()
                for name, peer, job_id in self.runs:
                    self._apply(name, self.cores[name].job_finished(peer, job_id, DONE, self.now))
                self.runs.clear()
            self.now += 0.001


def _cpu_us_per_job(run: Callable[[int], None], jobs: int) -> float:
    started = time.thread_time()
    run(jobs)
    return (time.thread_time() - started) * 1e6 / jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per round and stack")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pair = SessionPair()
    stacks: dict[str, Callable[[int], None]] = {"cbor2 only": cbor_only, "codec": codec, "sessions + codec": pair.jobs}
    for run in stacks.values():
        run(1000)  # warm: caches, the sessions opened
    figures: dict[str, list[float]] = {name: [] for name in stacks}
    for _ in range(args.rounds):
        for name, run in stacks.items():
            figures[name].append(_cpu_us_per_job(run, args.jobs))
    expected = 1000 + args.rounds * args.jobs
    if pair.settled != expected:
        print(f"error: {pair.settled} of {expected} jobs settled", file=sys.stderr)
        return 1
    for name, values in figures.items():
        print(f"{name}: {statistics.median(values):.1f} us CPU per job (both nodes), rounds {len(values)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
