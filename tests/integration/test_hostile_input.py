"""Hostile input costs the daemons no more than it should: amplification shapes, readers
that never read, sizes at the limits, floods of garbage. Real relay and node processes
on loopback; each daemon's cost is read from the process itself (CPU time, RSS)."""

from __future__ import annotations

import os
import threading
from typing import Any

import cbor2
import psutil
import pytest
import zmq

from meshnet import MeshClient
from meshnet.errors import JobError
from meshnet.identity import Identity, Sealer
from meshnet.protocol import (
    NODE_TO_CLIENT,
    RELAY_TO_NODE,
    Error,
    Ping,
    Register,
    Registered,
    Send,
    Submit,
    Unroutable,
    decode,
    encode,
)
from tests.harness import Mesh, MeshProcess, SessionPeer, raw_dealer, receive

#: Attack frames sent per measurement: psutil reads CPU time in clock ticks (10 ms), so
#: the cost of one frame is the total over many, divided.
REPEATS = 50
#: What "RSS unchanged" allows for: the allocator's own noise around a few messages.
RSS_NOISE = 4 * 1024 * 1024


def shared_reference_dag(depth: int) -> list:
    """Tiny as CBOR with shared references; 8**depth leaves when walked."""
    value: list = [0] * 8
    for _ in range(depth):
        value = [value] * 8
    return value


def dag_header(depth: int, **fields: Any) -> bytes:
    return cbor2.dumps({"v": shared_reference_dag(depth), **fields}, value_sharing=True)


def cost(pid: int) -> tuple[float, int]:
    """(CPU seconds used so far, resident bytes) of process ``pid``."""
    process = psutil.Process(pid)
    times = process.cpu_times()
    return times.user + times.system, process.memory_info().rss


class RelayedLoad:
    """Relayed jobs A -> B running in the background while a test attacks; every one
    must succeed."""

    def __init__(self, api: str, peer: str):
        self.api, self.peer = api, peer
        self.stop = threading.Event()
        self.done = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with MeshClient(self.api) as client:
            while not self.stop.is_set():
                futures = [client.submit("echo", i, to=self.peer, timeout=20) for i in range(8)]
                for i, future in enumerate(futures):
                    try:
                        assert future.result(timeout=30) == i
                        self.done += 1
                    except (JobError, AssertionError, Exception) as exc:  # every outcome is counted
                        self.failures.append(repr(exc))

    def __enter__(self) -> RelayedLoad:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(60)


def measure(victim: MeshProcess, attack: Any) -> tuple[float, int]:
    """CPU seconds per attack and the RSS change, over ``REPEATS`` attacks."""
    cpu_before, rss_before = cost(victim.pid)
    for _ in range(REPEATS):
        attack()
    cpu_after, rss_after = cost(victim.pid)
    return (cpu_after - cpu_before) / REPEATS, rss_after - rss_before


@pytest.mark.parametrize("depth", [8, 12])
def test_shared_reference_headers_are_refused_cheaply_by_node_relay_and_sealed_path(mesh: Mesh, depth: int) -> None:
    attacker = Identity.generate()
    pair = mesh.start_pair(extra_allowed=(attacker.peer_id,))
    frame = dag_header(depth, t="submit", id=os.urandom(16), kind="echo")
    assert len(frame) < 400  # depth 8 is the 217-byte frame of the report

    # 1. A node's client API (no authentication on loopback).
    with raw_dealer(pair.a_api) as sock:

        def at_the_api() -> None:
            sock.send_multipart([frame, b"\xf6"])
            error = receive(sock, NODE_TO_CLIENT)
            assert isinstance(error, Error) and error.code == "invalid" and "tags" in error.message

        cpu, rss = measure(pair.a, at_the_api)
    print(f"depth {depth} at a node's API: {cpu * 1e3:.3f} ms of CPU per frame, RSS {rss / 1e6:+.1f} MB")
    assert cpu < 0.010 and rss < RSS_NOISE

    with raw_dealer(pair.relay_endpoint, attacker, pair.relay_id.peer_id) as sock:
        # 2. The relay, from an admitted peer that has not registered.
        def at_the_relay() -> None:
            sock.send(dag_header(depth, t="register", peer_id=attacker.peer_id))
            error = receive(sock, RELAY_TO_NODE)
            assert isinstance(error, Error) and error.code == "invalid" and "tags" in error.message

        cpu, rss = measure(pair.relay, at_the_relay)
        print(f"depth {depth} at the relay: {cpu * 1e3:.3f} ms of CPU per frame, RSS {rss / 1e6:+.1f} MB")
        assert cpu < 0.010 and rss < RSS_NOISE

        # 3. Node B, sealed inside a box sent through the relay. B drops it (an answer
        # to garbage could loop between nodes); a probe after it tells when B has read it.
        peer = SessionPeer(sock, attacker)
        opened = peer.submit(pair.b_id.peer_id, "echo", "hello")
        peer.pump(lambda: opened in peer.settled)
        sealer = Sealer(attacker)

        def sealed_to_b() -> None:
            inner = dag_header(depth, t="job", id=os.urandom(16), kind="echo", timeout=1.0, payload=b"")
            peer.send_raw(pair.b_id.peer_id, sealer.seal(pair.b_id.peer_id, inner), os.urandom(16))
            peer.round_trip(pair.b_id.peer_id)

        cpu, rss = measure(pair.b, sealed_to_b)
        print(f"depth {depth} sealed to a node: {cpu * 1e3:.3f} ms of CPU per frame, RSS {rss / 1e6:+.1f} MB")
        assert cpu < 0.010 and rss < RSS_NOISE
        rejected = pair.b.wait_for("sealed_message_rejected")
        assert "tags" in rejected["error"]

        # The same attacks again, while relayed jobs run: every job succeeds.
        with raw_dealer(pair.a_api) as api_sock, RelayedLoad(pair.a_api, pair.b_id.peer_id) as load:
            for _ in range(REPEATS):
                api_sock.send_multipart([frame, b"\xf6"])
                assert isinstance(receive(api_sock, NODE_TO_CLIENT), Error)
                sock.send(dag_header(depth, t="ping", seq=1))
                assert isinstance(receive(sock, RELAY_TO_NODE), Error)
                sealed_to_b()
        assert load.done > 0 and load.failures == []


def peak_rss_during(pid: int, stop: threading.Event, peak: list[int]) -> threading.Thread:
    """Samples ``pid``'s RSS until ``stop``: the measurement, not a synchronisation."""

    def sample() -> None:
        process = psutil.Process(pid)
        while not stop.wait(0.02):
            try:
                peak[0] = max(peak[0], process.memory_info().rss)
            except psutil.NoSuchProcess:
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    return thread


#: The node's documented bound for one client that never reads 2 MiB results (README,
#: "Memory"): its base, jobs.max_queued_bytes (256 MiB; 66 jobs of 2 MiB use 132),
#: api.max_unread_bytes (64 MiB) and what ZeroMQ may queue for that client (answers of
#: 4 KiB or more: at most ZMQ_BYTES_PER_CLIENT, 32 MiB).
NODE_BOUND_FOR_A_STALLED_CLIENT = 500 * 1024 * 1024


def test_a_client_that_never_reads_is_pushed_back_and_dropped_within_the_nodes_bound(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("victim")
    node = mesh.start_node("victim", path)
    payload = cbor2.dumps(os.urandom(2 * 1024 * 1024))
    stop, peak = threading.Event(), [0]
    sampler = peak_rss_during(node.pid, stop, peak)
    try:
        with raw_dealer(endpoint, reads=False) as flood, MeshClient(endpoint) as other:
            flood.setsockopt(zmq.SNDHWM, 0)
            for i in range(400):  # 800 MiB of jobs whose results are never read
                flood.send_multipart(encode(Submit(id=os.urandom(16), kind="echo", body=payload)))
                if i % 50 == 0:  # meanwhile another client is served as usual
                    assert other.run("echo", i, timeout=30) == i
            dropped = node.wait_for("client_dropped", timeout=60)
            assert "api.max_unread_bytes" in dropped["reason"]
            assert node.find("client_pushed_back")
            for i in range(20):
                assert other.run("echo", ["still served", i], timeout=30) == ["still served", i]
    finally:
        stop.set()
        sampler.join(5)
    print(f"node peak RSS under a client that never reads: {peak[0] / 1e6:.0f} MB")
    assert 0 < peak[0] < NODE_BOUND_FOR_A_STALLED_CLIENT


#: The relay's documented bound for one node that never reads: its base, one window
#: (relay.max_unread_bytes, 64 MiB) and one message past it.
RELAY_BOUND_FOR_A_STALLED_PEER = 250 * 1024 * 1024


def test_a_peer_that_never_reads_costs_the_relay_one_window_and_senders_get_relay_busy(mesh: Mesh) -> None:
    stalled, sender = Identity.generate(), Identity.generate()
    pair = mesh.start_pair(extra_allowed=(stalled.peer_id, sender.peer_id))
    stop, peak = threading.Event(), [0]
    sampler = peak_rss_during(pair.relay.pid, stop, peak)
    body = os.urandom(2 * 1024 * 1024)
    outcomes: dict[str, int] = {}
    try:
        with (
            raw_dealer(pair.relay_endpoint, stalled, pair.relay_id.peer_id, reads=False) as quiet,
            raw_dealer(pair.relay_endpoint, sender, pair.relay_id.peer_id) as loud,
            RelayedLoad(pair.a_api, pair.b_id.peer_id) as load,
        ):
            quiet.send_multipart(encode(Register(peer_id=stalled.peer_id)))
            assert isinstance(receive(quiet, RELAY_TO_NODE), Registered)  # and never reads again
            loud.send_multipart(encode(Register(peer_id=sender.peer_id)))
            assert isinstance(receive(loud, RELAY_TO_NODE), Registered)
            # The stalled peer keeps its heartbeat (else the relay expires it): the worst
            # case, a node alive but reading nothing.
            heartbeat = encode(Ping(seq=1))
            for i in range(400):  # 800 MiB for a peer that reads nothing
                ref = i.to_bytes(16, "big")
                loud.send_multipart(encode(Send(to=stalled.peer_id, ref=ref, op="sealed", body=body)))
                quiet.send_multipart(heartbeat)
                while loud.poll(0):
                    answer = decode(loud.recv_multipart(), RELAY_TO_NODE, max_body=1 << 30)
                    if isinstance(answer, Unroutable):
                        outcomes[answer.reason] = outcomes.get(answer.reason, 0) + 1
            while sum(outcomes.values()) < 300:  # the rest of the bounces
                quiet.send_multipart(heartbeat)
                answer = receive(loud, RELAY_TO_NODE, 30_000)
                if isinstance(answer, Unroutable):
                    outcomes[answer.reason] = outcomes.get(answer.reason, 0) + 1
            pair.relay.wait_for("peer_not_reading", peer_id=stalled.peer_id)
        assert load.done > 0 and load.failures == []
    finally:
        stop.set()
        sampler.join(5)
    print(f"relay peak RSS with a peer that never reads: {peak[0] / 1e6:.0f} MB; bounces {outcomes}")
    assert set(outcomes) == {"relay_busy"}
    assert 0 < peak[0] < RELAY_BOUND_FOR_A_STALLED_PEER


def test_sends_of_every_size_around_the_limits_are_delivered_or_refused_too_large(mesh: Mesh) -> None:
    """Relay max 3 MiB; B decodes deliver bodies up to 1 MiB + 64 KiB (its max payload
    1 MiB plus room for sealing). Sizes around both limits, and around both plus the
    bytes framing and CurveZMQ add: each ends delivered or refused too_large at the
    sender, and B keeps its relay link."""
    raw = Identity.generate()
    relay_limit = 3 * 1024 * 1024
    b_limit = 1024 * 1024 + 65536
    a_id, b_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(
        allowed=[a_id.peer_id, b_id.peer_id, raw.peer_id], max_message_bytes=relay_limit
    )
    relay = mesh.start_relay(relay_path)
    link = (relay_endpoint, relay_id.peer_id)
    a_path, _, a_api = mesh.node_config("a", a_id, relay=link)
    b_path, _, _ = mesh.node_config("b", b_id, relay=link, jobs={"max_payload_bytes": 1024 * 1024})
    mesh.start_node("a", a_path, registered=True)
    b = mesh.start_node("b", b_path, registered=True)
    sizes = sorted({limit + delta for limit in (relay_limit, b_limit) for delta in (-64, -34, -33, -1, 0, 1, 33, 64)})
    results: dict[int, str] = {}
    with raw_dealer(relay_endpoint, raw, relay_id.peer_id) as sock:
        peer = SessionPeer(sock, raw)
        opened = peer.submit(b_id.peer_id, "echo", "hello")
        peer.pump(lambda: opened in peer.settled)
        for size in sizes:
            ref = size.to_bytes(16, "big")
            peer.send_raw(b_id.peer_id, os.urandom(size), ref)
            # B drops a box that does not open, without a word; a probe after it is
            # answered once B has read on (the relay keeps the order of what it forwards).
            peer.round_trip(b_id.peer_id)
            bounces = [m for m in peer.other if isinstance(m, Unroutable) and m.ref == ref]
            assert all(bounce.reason == "too_large" for bounce in bounces), bounces
            results[size] = "too_large" if bounces else "delivered"
    assert all(results[s] == "delivered" for s in sizes if s <= b_limit)
    assert all(results[s] == "too_large" for s in sizes if s > b_limit)
    assert len(b.find("relay_registered")) == 1 and not b.find("relay_reconnected") and not b.find("relay_lost")
    # Jobs from a real node around B's limit: each ends, succeeded or refused too_large.
    with MeshClient(a_api) as client:
        statuses = []
        for size in (1024 * 1024 - 100, 1024 * 1024 + 100, b_limit - 60, b_limit + 100):
            try:
                assert len(client.run("echo", os.urandom(size), to=b_id.peer_id, timeout=30)) == size
                statuses.append("succeeded")
            except JobError as exc:
                assert exc.reason == "too_large", exc
                statuses.append("too_large")
        assert statuses[0] == "succeeded" and statuses[1:] == ["too_large"] * 3
        assert client.run("echo", "b kept its link", to=b_id.peer_id) == "b kept its link"
    assert len(b.find("relay_registered")) == 1
    assert relay.popen.poll() is None


def test_a_flood_of_bad_frames_writes_one_log_line_not_one_per_frame(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("quiet")
    node = mesh.start_node("quiet", path)
    with raw_dealer(endpoint) as sock:
        for _ in range(2000):
            sock.send(b"\xff not cbor")
        for _ in range(2000):
            error = receive(sock, NODE_TO_CLIENT)
            assert isinstance(error, Error) and error.code == "invalid"
    with MeshClient(endpoint) as client:
        assert client.run("echo", "served") == "served"
    assert len(node.find("client_message_rejected")) == 1
    assert sum(len(line) for line in node.raw) < 20_000


def test_a_relay_restart_draws_one_register_per_node(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", "before", to=pair.b_id.peer_id) == "before"
        pair.relay.stop()
        # Jobs sent while the relay is down wait in the node's socket, and reach the new
        # relay before the node's register does: each is answered not_registered.
        futures = [client.submit("echo", i, to=pair.b_id.peer_id, timeout=10) for i in range(40)]
        restarted = mesh.start_relay(pair.relay_path, "relay-again")
        pair.a.wait_for("relay_registered", count=2)
        for future in futures:
            try:
                future.result(timeout=30)
            except JobError:
                pass  # refused no_relay, or lost with the old relay: each job ends once
        assert client.run("echo", "after", to=pair.b_id.peer_id) == "after"
    assert len(restarted.find("peer_registered", peer_id=pair.a_id.peer_id)) == 1
    assert len(pair.a.find("relay_forgot_us")) <= 1
