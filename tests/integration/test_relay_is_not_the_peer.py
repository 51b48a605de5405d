"""The relay is one path to a peer, not the peer: killing it delays relayed jobs, never
ends them; only the peer's own death does, within a stated bound.

A stream of relayed jobs (echo, and 50 ms sleeps among them; 48 in flight) runs from a
client of node A to node B while the relay is killed with SIGKILL and started again on
the same port. Every job's result reaches the client exactly once, and B's own log
shows that none ran twice.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from meshnet import MeshClient
from meshnet.errors import JobError, PeerLost
from meshnet.session import PEER_DOWN_CHECK, PEER_SILENCE
from tests.harness import Mesh, Pair, stream_jobs

JOBS = 2000
IN_FLIGHT = 48


def payload_of(i: int) -> tuple[str, object]:
    return ("sleep", 0.05) if i % 10 == 0 else ("echo", i)


def stream(pair: Pair, jobs: int, at_done: dict[int, threading.Thread]) -> tuple[dict[int, object], list]:
    """Run ``jobs`` relayed jobs with ``IN_FLIGHT`` at once; start each thread of
    ``at_done`` once that many have ended. Returns the results by job and the errors."""

    def started(ended: int) -> None:
        thread = at_done.pop(ended, None)
        if thread is not None:
            thread.start()

    results = stream_jobs(pair.a_api, pair.b_id.peer_id, jobs, payload_of, in_flight=IN_FLIGHT, on_ended=started)
    errors = [(i, end) for i, end in results.items() if isinstance(end, JobError)]
    return results, errors


def kill_and_restart(mesh: Mesh, pair: Pair, down_for: float, name: str) -> threading.Thread:
    def run() -> None:
        relay = next(p for p in reversed(mesh.processes) if p.name.startswith("relay"))
        relay.signal(signal.SIGKILL)
        relay.wait(10)
        threading.Event().wait(down_for)  # the outage itself, not a synchronisation
        mesh.start_relay(pair.relay_path, name)

    return threading.Thread(target=run, daemon=True)


def assert_every_job_succeeded_once(pair: Pair, results: dict[int, object], errors: list) -> None:
    assert errors == [], errors[:5]
    assert len(results) == JOBS
    for i, result in results.items():
        kind, payload = payload_of(i)
        assert result == payload, (i, result)
    assert not pair.a.find("job_peer_lost") and not pair.a.find("job_timed_out")
    pair.b.wait_for("job_succeeded", count=JOBS, timeout=10)  # B's log, read on the harness's thread
    ran = Counter(line["job_id"] for line in pair.b.find("job_succeeded"))
    assert len(ran) == JOBS and set(ran.values()) == {1}, "a job ran twice on B"


@pytest.mark.parametrize("down_for", [0.0, 5.0], ids=["restarted_at_once", "down_for_5_s"])
def test_relayed_jobs_survive_the_relay_killed_and_restarted_twice(mesh: Mesh, down_for: float) -> None:
    pair = mesh.start_pair(b_log="debug")
    threads = {
        JOBS // 4: kill_and_restart(mesh, pair, down_for, "relay-2"),
        JOBS * 3 // 5: kill_and_restart(mesh, pair, down_for, "relay-3"),
    }
    started = list(threads.values())
    results, errors = stream(pair, JOBS, threads)
    for thread in started:
        thread.join(30)
    assert not threads, "the stream ended before both relay kills"
    assert_every_job_succeeded_once(pair, results, errors)
    assert len(pair.a.find("relay_registered")) >= 3 and len(pair.b.find("relay_registered")) >= 3


def test_jobs_on_a_node_killed_mid_stream_end_peer_lost_within_the_stated_bound(mesh: Mesh) -> None:
    """The relay expires B (its heartbeat 0.5 s × liveness 3) and tells A, which probes B
    and, hearing nothing for PEER_DOWN_CHECK, ends its jobs on B peer_lost; should no
    peer_down come, A's own bound is PEER_SILENCE."""
    pair = mesh.start_pair(b_log="debug")
    with MeshClient(pair.a_api) as client:
        before = [client.submit("echo", i, to=pair.b_id.peer_id, timeout=60) for i in range(20)]
        assert [f.result(timeout=30) for f in before] == list(range(20))
        futures = [client.submit("sleep", 2.0, to=pair.b_id.peer_id, timeout=60) for _ in range(10)]
        pair.b.wait_for("job_started", count=22)  # the first two sleeps run
        killed_at = time.monotonic()
        pair.b.signal(signal.SIGKILL)
        outcomes = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=PEER_SILENCE + 10))
            except PeerLost as exc:
                outcomes.append(exc)
        took = time.monotonic() - killed_at
    assert all(isinstance(o, PeerLost) for o in outcomes), outcomes
    assert took < 0.5 * 3 + PEER_DOWN_CHECK + 2.0, f"peer_lost came {took:.1f} s after the kill"
    # Its log lines come through a pipe the harness reads on its own thread: waited for,
    # since the client can have the results before the harness has read the last line.
    pair.a.wait_for("job_peer_lost", count=10, timeout=5)
    assert len(pair.a.find("job_peer_lost")) == 10
    # A keeps serving: a local job still runs.
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "still here") == "still here"


def test_a_node_stopped_with_sigterm_delivers_the_answers_of_its_peers_jobs(mesh: Mesh) -> None:
    """B drains on SIGTERM: the jobs it runs for A finish within its grace, and their
    answers reach A before B's link closes (they are sent until A acknowledges them)."""
    pair = mesh.start_pair(b_jobs={"drain_grace": 10}, b_log="debug")
    with MeshClient(pair.a_api) as client:
        futures = [client.submit("sleep", 0.5, to=pair.b_id.peer_id, timeout=30) for _ in range(2)]
        pair.b.wait_for("job_started", count=2)
        pair.b.signal(signal.SIGTERM)
        assert [future.result(timeout=20) for future in futures] == [0.5, 0.5]
    assert pair.b.wait(30) == 0
    assert not pair.a.find("job_peer_lost")
