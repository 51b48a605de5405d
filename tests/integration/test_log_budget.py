"""What strangers and peers cost the log: repeated events from one source get a line and
then a count; nothing about an unauthenticated connection is logged per connection.
Real relay and node processes; their whole stderr is measured."""

from __future__ import annotations

import os
import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from meshnet import MeshClient
from meshnet.identity import Identity, curve_public_z85
from tests.harness import Mesh, MeshProcess, SessionPeer, raw_dealer

HANDSHAKES = 10_000
LOG_BUDGET = 100_000
SOCKETS = 64


def log_bytes(process: MeshProcess) -> int:
    return sum(len(line) + 1 for line in process.raw)


def refused_handshakes(endpoint: str, server_peer_id: str, count: int) -> int:
    """CurveZMQ handshakes with made-up keys against ``endpoint`` until ``count`` were
    refused, ``SOCKETS`` at a time (libzmq does not connect again after its key was
    refused: each socket is connected anew); how many were."""
    context = zmq.Context()
    sockets: dict[zmq.Socket, zmq.Socket] = {}  # monitor -> its socket
    poller = zmq.Poller()
    try:
        for n in range(SOCKETS):
            sock = context.socket(zmq.DEALER)
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = curve_public_z85(server_peer_id)
            sock.setsockopt(zmq.LINGER, 0)
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH, addr=f"inproc://budget-{n}")
            sock.connect(endpoint)
            sockets[monitor] = sock
            poller.register(monitor, zmq.POLLIN)
        refused = 0
        deadline = time.monotonic() + 100
        while refused < count:
            assert time.monotonic() < deadline, f"only {refused} handshakes refused in 100 s"
            for monitor, _ in poller.poll(1000):
                recv_monitor_message(monitor)
                refused += 1
                sock = sockets[monitor]
                sock.disconnect(endpoint)
                sock.connect(endpoint)
        return refused
    finally:
        for monitor, sock in sockets.items():
            sock.disable_monitor()
            sock.close(0)
            monitor.close(0)
        context.term()


def test_ten_thousand_handshakes_with_unknown_keys_cost_the_relay_and_the_node_little_log(mesh: Mesh) -> None:
    node_id, client_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[node_id.peer_id])
    relay = mesh.start_relay(relay_path)
    link = (relay_endpoint, relay_id.peer_id)
    path, _, api = mesh.node_config("n", node_id, relay=link, api={"allowed_clients": [client_id.peer_id]})
    node = mesh.start_node("n", path, registered=True)
    relay_before, node_before = log_bytes(relay), log_bytes(node)
    assert refused_handshakes(relay_endpoint, relay_id.peer_id, HANDSHAKES) >= HANDSHAKES
    assert refused_handshakes(api, node_id.peer_id, HANDSHAKES) >= HANDSHAKES
    relay.wait_for("connection_refused")
    node.wait_for("client_refused")
    assert log_bytes(relay) - relay_before < LOG_BUDGET, relay.raw[-5:]
    assert log_bytes(node) - node_before < LOG_BUDGET, node.raw[-5:]
    # The allowed client is served as ever.
    with MeshClient(api, identity=client_id, node_peer_id=node_id.peer_id) as client:
        assert client.run("echo", "still here") == "still here"


def test_bad_first_frames_from_new_connections_cost_the_node_little_log(mesh: Mesh) -> None:
    path, _, api = mesh.node_config("n")
    node = mesh.start_node("n", path)
    before = log_bytes(node)
    for _ in range(2000):
        with raw_dealer(api) as sock:
            sock.send(b"\xff not a header")
            # Its error answer came: the frame reached the node (closed at once, with no
            # linger, a loaded machine's socket could drop it unsent).
            assert sock.poll(10_000)
    node.wait_for("client_message_rejected")
    assert log_bytes(node) - before < LOG_BUDGET // 10, node.raw[-5:]
    with MeshClient(api) as client:
        assert client.run("echo", 1) == 1


def test_a_peer_streaming_jobs_of_a_kind_the_node_does_not_run_costs_it_a_line_not_one_per_job(mesh: Mesh) -> None:
    node_id, peer_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[node_id.peer_id, peer_id.peer_id])
    mesh.start_relay(relay_path)
    path, _, _ = mesh.node_config("n", node_id, relay=(relay_endpoint, relay_id.peer_id))
    node = mesh.start_node("n", path, registered=True)
    before = log_bytes(node)
    with raw_dealer(relay_endpoint, peer_id, relay_id.peer_id) as sock:
        peer = SessionPeer(sock, peer_id)
        jobs = [peer.submit(node_id.peer_id, "no-such-kind", os.urandom(8).hex()) for _ in range(1000)]
        peer.pump(lambda: len(peer.settled) == len(jobs), timeout=60)
    assert {outcome.reason for outcome in peer.settled.values()} == {"unknown_kind"}
    assert len(node.find("job_refused")) == 1
    assert log_bytes(node) - before < 5_000, node.raw[-5:]
