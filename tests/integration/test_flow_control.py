"""The relay link's window does not get in the way of healthy traffic: bursts larger than
the window, and messages close to its size, all go through (docs/protocol.md §6.8).

A relay with a small window (1 MiB) makes the edges cheap to reach."""

from __future__ import annotations

import os

import cbor2
import pytest

from meshnet import MeshClient
from meshnet.identity import Identity, Sealer
from meshnet.protocol import (
    NODE_TO_NODE,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    Job,
    Register,
    Registered,
    Send,
    Unroutable,
    decode,
    decode_inner,
    encode,
    encode_inner,
)
from tests.harness import Mesh, MeshProcess, raw_dealer, receive

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


def test_a_result_bounced_relay_busy_is_sent_again_once_its_submitter_reads(mesh: Mesh) -> None:
    """A submitter X (a raw peer) whose window at the relay is full: B's result for X's
    job is bounced relay_busy; B sends it again, with growing delays; once X reads what
    the relay holds for it, the result gets through. Nothing is lost, nothing logged
    undeliverable."""
    x, y, b_id = Identity.generate(), Identity.generate(), Identity.generate()
    # Heartbeats of 10 s: X sends none while it does not read, and must not expire.
    relay_path, relay_id, relay_endpoint = mesh.relay_config(
        allowed=[b_id.peer_id, x.peer_id, y.peer_id], max_unread_bytes=WINDOW, heartbeat=10.0
    )
    mesh.start_relay(relay_path)
    b_path, _, _ = mesh.node_config("b", b_id, relay=(relay_endpoint, relay_id.peer_id))
    b = mesh.start_node("b", b_path, registered=True)
    with (
        raw_dealer(relay_endpoint, x, relay_id.peer_id, reads=False) as quiet,
        raw_dealer(relay_endpoint, y, relay_id.peer_id) as filler,
    ):
        for sock, identity in ((quiet, x), (filler, y)):
            sock.send_multipart(encode(Register(peer_id=identity.peer_id)))
            assert isinstance(receive(sock, RELAY_TO_NODE), Registered)
        # Y fills X's window and what the relay holds past it (1 MiB each): 3 MiB sent.
        for i in range(15):
            body = os.urandom(200 * 1024)
            filler.send_multipart(encode(Send(to=x.peer_id, ref=i.to_bytes(16, "big"), op="cancel", body=body)))
        bounce = receive(filler, RELAY_TO_NODE)
        assert isinstance(bounce, Unroutable) and bounce.reason == "relay_busy"
        # X's job for B: B runs it, and its result (300 KiB) finds no room for X.
        job_id = os.urandom(16)
        payload = os.urandom(300 * 1024)
        job = encode_inner(Job(id=job_id, kind="echo", timeout=30.0, payload=cbor2.dumps(payload)))
        sealer = Sealer(x)
        quiet.send_multipart(encode(Send(to=b_id.peer_id, ref=job_id, op="job", body=sealer.seal(b_id.peer_id, job))))
        b.wait_for("result_held_back", job_id=job_id.hex())
        # X reads now, and acknowledges what it read, as a node does.
        received = 0
        while True:
            frames = quiet.recv_multipart() if quiet.poll(30_000) else pytest.fail("no result from b")
            message = decode(frames, RELAY_TO_NODE, max_body=1 << 30)
            if isinstance(message, Ack):
                continue
            received += sum(len(frame) for frame in frames)
            quiet.send_multipart(encode(Ack(received=received)))
            if isinstance(message, Deliver) and message.ref == job_id:
                break
        result = decode_inner(sealer.open(b_id.peer_id, message.body), NODE_TO_NODE, max_size=1 << 20)
        assert result.status == "succeeded" and cbor2.loads(result.result) == payload
    assert not b.find("undeliverable")
