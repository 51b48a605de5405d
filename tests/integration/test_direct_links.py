"""A node's direct-link listener (actors.direct_links) with real CurveZMQ sockets on
loopback: it admits only the keys an attempt expects, and ties each connection to the key
that said hi on it, so one expected peer cannot pass for another or take its traffic."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.direct_links import DirectLinks
from meshnet.client import MeshClient
from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol.direct import BOX, BOXES, HI, MAX_BATCH, MAX_BATCH_READ, OUR_HI, PARTS, Parts
from meshnet.socket_loop import SocketLoop
from tests.harness import Mesh


class Listener:
    def __init__(self) -> None:
        self.identity = Identity.generate()
        self.loop = SocketLoop("direct-test")
        self.loop.start()
        self.ups: list[tuple[str, int]] = []
        self.messages: list[tuple[str, bytes]] = []
        self.parts: list[tuple[str, bytes, str, bytes]] = []
        self.changed = threading.Condition()
        self.links = self.loop.run_sync(
            lambda: DirectLinks(
                identity=self.identity,
                loop=self.loop,
                max_message=1 << 20,
                on_up=lambda peer, attempt: self._note(self.ups, (peer, attempt)),
                on_down=lambda *args: None,
                on_messages=self._on_messages,
            )
        )
        self.port = self.loop.run_sync(self.links.listen, 0)

    def _on_messages(self, peer: str, items: tuple[Any, ...]) -> None:
        for item in items:
            if isinstance(item, Parts):
                self._note(self.parts, (peer, bytes(item.message), item.field, bytes(item.bulk)))
            else:
                self._note(self.messages, (peer, bytes(item)))

    def _note(self, into: list, item: object) -> None:
        with self.changed:
            into.append(item)
            self.changed.notify_all()

    def wait(self, found, timeout: float = 10.0) -> None:
        with self.changed:
            assert self.changed.wait_for(found, timeout), "not within 10 s"

    def close(self) -> None:
        self.loop.run_sync(self.links.close_all)
        self.loop.stop()


@pytest.fixture
def listener() -> Iterator[Listener]:
    node = Listener()
    try:
        yield node
    finally:
        node.close()


def dialler(context: zmq.Context, me: Identity, listener: Listener, routing_id: str | None = None) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.curve_publickey, sock.curve_secretkey = me.zmq_curve_keys()
    sock.curve_serverkey = curve_public_z85(listener.identity.peer_id)
    if routing_id is not None:
        sock.routing_id = routing_id.encode()
    sock.linger = 0
    sock.connect(f"tcp://127.0.0.1:{listener.port}")
    return sock


def test_an_expected_peer_cannot_pass_for_another_or_take_its_traffic(listener: Listener) -> None:
    p, q = Identity.generate(), Identity.generate()
    listener.loop.run_sync(listener.links.expect, p.peer_id, 1)
    listener.loop.run_sync(listener.links.expect, q.peer_id, 7)
    context = zmq.Context()
    try:
        to_p = dialler(context, p, listener)
        to_p.send(HI)
        listener.wait(lambda: (p.peer_id, 1) in listener.ups)
        # Q, expected too, names itself with P's peer id as routing id and says hi.
        to_q = dialler(context, q, listener, routing_id=p.peer_id)
        to_q.send(HI)
        listener.wait(lambda: (q.peer_id, 7) in listener.ups)
        to_q.send_multipart([BOX, b"from q"])
        to_p.send_multipart([BOX, b"from p"])
        listener.wait(lambda: len(listener.messages) == 2)
        assert sorted(listener.messages) == sorted([(p.peer_id, b"from p"), (q.peer_id, b"from q")])
        assert listener.loop.run_sync(listener.links.send, p.peer_id, b"for p")
        assert to_p.poll(5000) and to_p.recv_multipart() == OUR_HI.frames()  # the listener's own hi first
        assert to_p.poll(5000) and to_p.recv_multipart() == [BOX, b"for p"]
        assert to_q.poll(5000) and to_q.recv_multipart() == OUR_HI.frames()
        assert to_q.poll(300) == 0  # nothing of P's reached Q
    finally:
        context.destroy(linger=0)


def test_a_key_no_attempt_expects_is_refused_at_the_handshake(listener: Listener) -> None:
    stranger = Identity.generate()
    context = zmq.Context()
    try:
        sock = dialler(context, stranger, listener)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        assert monitor.poll(5000)
        event = recv_monitor_message(monitor)
        assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
        sock.disable_monitor()
        monitor.close(linger=0)
    finally:
        context.destroy(linger=0)
    assert listener.ups == [] and listener.messages == []


def _send_in_one_turn(listener: Listener, peer: str, messages: list[bytes]) -> None:
    listener.loop.run_sync(lambda: [listener.links.send(peer, m) for m in messages])


def _two_diallers(
    context: zmq.Context, listener: Listener, his: tuple[list[bytes], list[bytes]]
) -> tuple[tuple[Identity, zmq.Socket], ...]:
    """Two expected peers dialled in, each saying its hi; the listener's own hi read."""
    peers = []
    for attempt, hi in enumerate(his, 1):
        me = Identity.generate()
        listener.loop.run_sync(listener.links.expect, me.peer_id, attempt)
        sock = dialler(context, me, listener)
        sock.send_multipart(hi)
        peers.append((me, sock))
    listener.wait(lambda: len(listener.ups) == 2)
    for _, sock in peers:
        assert sock.poll(5000) and sock.recv_multipart() == OUR_HI.frames()
    return tuple(peers)


def test_small_messages_of_one_turn_go_as_one_batch_to_a_peer_that_reads_batches(listener: Listener) -> None:
    context = zmq.Context()
    try:
        # The second reads single boxes only.
        (batching, to_batching), (plain, to_plain) = _two_diallers(context, listener, ([HI, BOXES], [HI]))

        small = [f"job {i}".encode() for i in range(MAX_BATCH + 3)]
        big = b"x" * (64 * 1024)
        _send_in_one_turn(listener, batching.peer_id, [*small[:2], big, *small[2:]])
        received = []
        while to_batching.poll(1000):
            received.append(to_batching.recv_multipart())
        # In order: the two before the large one as a batch, the large one alone, then
        # the rest in batches of at most MAX_BATCH (one left over goes as a box).
        assert received == [
            [BOXES, *small[:2]],
            [BOX, big],
            [BOXES, *small[2 : 2 + MAX_BATCH]],
            [BOX, small[-1]],
        ]

        _send_in_one_turn(listener, plain.peer_id, small[:3])
        assert [to_plain.recv_multipart() for _ in range(3)] == [[BOX, m] for m in small[:3]]
        assert to_plain.poll(300) == 0

        # Batches in the other direction are read box by box, in order; one longer than
        # this node reads is dropped whole, and the link goes on.
        to_batching.send_multipart([BOXES, *[b"too many"] * (MAX_BATCH_READ + 1)])
        to_batching.send_multipart([BOXES, b"one", b"two", b"three"])
        listener.wait(lambda: len(listener.messages) == 3)
        assert listener.messages == [(batching.peer_id, m) for m in (b"one", b"two", b"three")]
    finally:
        context.destroy(linger=0)


def test_a_payload_goes_apart_from_its_message_only_to_a_peer_that_reads_parts(listener: Listener) -> None:
    context = zmq.Context()
    try:
        (reads, to_reads), (plain, to_plain) = _two_diallers(context, listener, ([HI, b"parts"], [HI, BOXES]))
        payload = b"p" * 100_000
        assert listener.loop.run_sync(listener.links.reads_parts, reads.peer_id)
        assert not listener.loop.run_sync(listener.links.reads_parts, plain.peer_id)
        assert listener.loop.run_sync(listener.links.send_parts, reads.peer_id, b"message", "payload", payload)
        assert to_reads.poll(5000) and to_reads.recv_multipart() == [PARTS, b"payload", b"message", payload]
        assert not listener.loop.run_sync(listener.links.send_parts, plain.peer_id, b"message", "payload", payload)
        assert to_plain.poll(300) == 0

        to_reads.send_multipart([PARTS, b"result", b"answer", payload])
        listener.wait(lambda: len(listener.parts) == 1)
        assert listener.parts == [(reads.peer_id, b"answer", "result", payload)]
    finally:
        context.destroy(linger=0)


def test_large_and_small_payloads_cross_a_lan_link_intact_and_in_any_mix(mesh: Mesh) -> None:
    # Two nodes on one host link over the LAN (loopback): jobs with payloads past the
    # size that goes apart from its message, and small ones in batches, all come back whole.
    pair = mesh.start_pair(relay_settings={"direct_links": True, "stun": "off"})
    b = pair.b_id.peer_id
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", b"first", to=b) == b"first"  # on the relay; starts the link
        pair.a.wait_for("path_changed", path="lan", timeout=20)
        pair.b.wait_for("path_changed", path="lan", timeout=20)
        payloads = [os.urandom(size) for size in (70_000, 3, 2 * 1024 * 1024, 0, 64 * 1024, 10, 1_000_000)] * 4
        assert list(client.map("echo", payloads, to=b, window=16)) == payloads
        jobs_sent = client.status()["relay"]["boxes_sent"]
    with MeshClient(pair.b_api) as at_b:
        results_sent = at_b.status()["relay"]["boxes_sent"]
    # Every job went on the link, and every result came back on it.
    assert jobs_sent.get("lan", 0) >= len(payloads) and results_sent.get("lan", 0) >= len(payloads)
