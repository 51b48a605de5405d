"""The relay link's window does not get in the way of healthy traffic: bursts larger than
the window, and messages close to its size, all go through (docs/protocol.md §6.8).

A relay with a small window (1 MiB) makes the edges cheap to reach."""

from __future__ import annotations

import os

import cbor2

from meshnet import MeshClient
from meshnet.identity import Identity
from meshnet.protocol import (
    RELAY_TO_NODE,
    JobResult,
    Register,
    Registered,
    Send,
    Unroutable,
    encode,
)
from tests.harness import Mesh, MeshProcess, SessionPeer, raw_dealer, receive

WINDOW = 1024 * 1024


def small_window_pair(mesh: Mesh) -> tuple[MeshProcess, MeshProcess, MeshProcess, str, str]:
    a_id, b_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(
        allowed=[a_id.peer_id, b_id.peer_id], max_unread_bytes=WINDOW
    )
    relay = mesh.start_relay(relay_path)
    link = (relay_endpoint, relay_id.peer_id)
    a_path, _, a_api = mesh.node_config("a", a_id, relay=link)
    b_path, _, _ = mesh.node_config("b", b_id, relay=link)
    a = mesh.start_node("a", a_path, registered=True)
    b = mesh.start_node("b", b_path, registered=True)
    return relay, a, b, a_api, b_id.peer_id


def test_a_message_close_to_the_window_goes_after_small_traffic(mesh: Mesh) -> None:
    """Small messages leave less than a quarter window unacknowledged on a quiet link; a
    job near the window's size must not wait behind that for good."""
    relay, a, b, a_api, b_peer = small_window_pair(mesh)
    with MeshClient(a_api) as client:
        assert client.run("echo", "small", to=b_peer, timeout=20) == "small"
        big = os.urandom(WINDOW - 4096)
        assert client.run("echo", big, to=b_peer, timeout=20) == big
        assert client.run("echo", "after", to=b_peer, timeout=20) == "after"
    assert not relay.find("peer_not_reading")


def test_a_burst_of_jobs_and_results_larger_than_the_window_all_succeed(mesh: Mesh) -> None:
    """6 jobs of 256 KiB each way, 1.5 MiB each way through a 1 MiB window: jobs wait in
    A's queue for the relay's acks, deliveries past a node's window wait at the relay for
    it to read. Every job succeeds, none is refused or times out."""
    relay, a, b, a_api, b_peer = small_window_pair(mesh)
    payloads = [os.urandom(256 * 1024) for _ in range(6)]
    with MeshClient(a_api) as client:
        for _ in range(3):
            futures = [client.submit("echo", payload, to=b_peer, timeout=30) for payload in payloads]
            assert [future.result(timeout=60) for future in futures] == payloads
    assert not b.find("undeliverable")


def test_a_result_that_finds_its_submitters_window_full_reaches_it_once_it_reads(mesh: Mesh) -> None:
    """A submitter X (a test's own peer) whose window at the relay is full: B's result for
    X's job finds no room (the relay bounces it relay_busy), and B's session sends it
    again until X acknowledges it; once X reads what the relay holds for it, the result
    gets through, once. Nothing is lost."""
    x, y, b_id = Identity.generate(), Identity.generate(), Identity.generate()
    # Heartbeats of 10 s: X sends none while it does not read, and must not expire.
    relay_path, relay_id, relay_endpoint = mesh.relay_config(
        allowed=[b_id.peer_id, x.peer_id, y.peer_id], max_unread_bytes=WINDOW, heartbeat=10.0
    )
    mesh.start_relay(relay_path)
    b_path, _, _ = mesh.node_config("b", b_id, relay=(relay_endpoint, relay_id.peer_id), log_level="debug")
    b = mesh.start_node("b", b_path, registered=True)
    with (
        raw_dealer(relay_endpoint, x, relay_id.peer_id, reads=False) as quiet,
        raw_dealer(relay_endpoint, y, relay_id.peer_id) as filler,
    ):
        peer = SessionPeer(quiet, x)
        opened = peer.submit(b_id.peer_id, "echo", "hello")
        peer.pump(lambda: opened in peer.settled)
        filler.send_multipart(encode(Register(peer_id=y.peer_id)))
        assert isinstance(receive(filler, RELAY_TO_NODE), Registered)
        # Y fills X's window and what the relay holds past it (1 MiB each): 3 MiB sent.
        for i in range(15):
            body = os.urandom(200 * 1024)
            filler.send_multipart(encode(Send(to=x.peer_id, ref=i.to_bytes(16, "big"), op="sealed", body=body)))
        bounce = receive(filler, RELAY_TO_NODE)
        assert isinstance(bounce, Unroutable) and bounce.reason == "relay_busy"
        # X's job for B (sent without reading): B runs it, and its result (300 KiB)
        # finds no room for X.
        payload = os.urandom(300 * 1024)
        job_id = peer.submit(b_id.peer_id, "echo", payload)
        b.wait_for("job_succeeded", job_id=job_id.hex())
        # X reads now, and acknowledges what it read, as a node does.
        peer.pump(lambda: job_id in peer.settled)
        outcome = peer.settled[job_id]
        assert outcome.status == "succeeded" and cbor2.loads(outcome.result) == payload
        results = [box for box in peer.other if isinstance(box, JobResult) and box.id == job_id]
        assert results and {box.seq for box in results} == {results[0].seq}  # one message, maybe sent again
    assert not b.find("answer_dropped")
