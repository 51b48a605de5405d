"""One memory budget for the whole node: many clients that never read cannot hold more
of its memory than the budget, and other clients are served meanwhile. A real node
process, its RSS sampled, raw clients that never read (tests.harness.raw_dealer)."""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack

import cbor2
import zmq

from meshnet import JobRefused, MeshClient
from meshnet.protocol import Submit, encode
from tests.harness import Mesh, raw_dealer
from tests.integration.test_hostile_input import peak_rss_during

MiB = 1024 * 1024
BUDGET = 256 * MiB
CLIENTS = 100
JOBS_EACH = 8
PAYLOAD = 4 * MiB
#: What the node holds outside its budget: its base (Python, libzmq, the code: 150 MB is
#: the issue's allowance), and per connection what ZeroMQ holds that no part can count:
#: a message it is receiving, whose whole size libzmq allocates when its header comes,
#: and one it is sending (README, "Limits"). Measured: a peak of 650-810 MiB here, where
#: the same flood held 2,988 MB before the budget.
OUTSIDE = 150 * MiB + CLIENTS * 2 * PAYLOAD


def test_a_hundred_clients_that_never_read_hold_the_node_within_its_memory_budget(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("victim", jobs={"executors": 2, "max_queued_bytes": BUDGET // 2})
    text = path.read_text() + f"\n[node]\nmemory_budget_bytes = {BUDGET}\n"
    path.write_text(text)
    node = mesh.start_node("victim", path)
    payload = cbor2.dumps(os.urandom(PAYLOAD))
    stop, peak = threading.Event(), [0]
    sampler = peak_rss_during(node.pid, stop, peak)
    read: list[int] = []

    def read_large_answers() -> None:
        """A client that reads its answers of 1 MiB while the flood goes on: never cut
        (its answers do not wait); refused busy while the budget is full, it asks again."""
        with MeshClient(endpoint) as reader:
            while len(read) < 20 and not stop.is_set():
                try:
                    assert reader.run("echo", b"r" * MiB, timeout=60) == b"r" * MiB
                    read.append(1)
                except JobRefused as exc:
                    assert exc.reason == "busy", exc
                    stop.wait(0.05)  # a client's own pace before it asks again

    reading = threading.Thread(target=read_large_answers, daemon=True)
    reading.start()
    try:
        with ExitStack() as stack, MeshClient(endpoint) as other:
            clients = [stack.enter_context(raw_dealer(endpoint, reads=False)) for _ in range(CLIENTS)]
            for n, client in enumerate(clients):
                client.setsockopt(zmq.SNDHWM, 0)
                for _ in range(JOBS_EACH):
                    client.send_multipart(encode(Submit(id=os.urandom(16), kind="echo", body=payload)), copy=False)
                if n % 10 == 0:  # meanwhile another client is served
                    assert other.run("echo", n, timeout=60) == n
            node.wait_for("client_cut", timeout=60)
            for n in range(20):
                assert other.run("echo", ["still served", n], timeout=60) == ["still served", n]
            status = other.status()
            reading.join(120)
    finally:
        stop.set()
        sampler.join(5)
    assert len(read) == 20, "the client that reads its answers did not get them"
    memory = status["memory"]
    assert memory["limit"] == BUDGET and memory["cut"] > 0
    assert memory["total"] <= BUDGET, memory
    assert 0 < peak[0] < BUDGET + OUTSIDE, f"node peak RSS {peak[0] / MiB:.0f} MiB"
