"""The relay's routing table and protocol logic, without sockets (relay_server.routing.RelayCore)."""

from __future__ import annotations

import copy

import cbor2
import pytest

from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol import (
    PROTOCOL_VERSION,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    Error,
    PeerDown,
    PeersReply,
    PeersRequest,
    Ping,
    Pong,
    Register,
    Registered,
    Send,
    Unroutable,
    decode,
    encode,
)
from relay_server.routing import RelayCore

HEARTBEAT = 1.0
LIVENESS = 3
MAX_BODY = 1024
OBSERVED = "1.2.3.4:5"
REF = bytes(range(16))
SOMEONE = Identity.generate().peer_id


class Node:
    def __init__(self, conn: bytes):
        self.identity = Identity.generate()
        self.peer_id = self.identity.peer_id
        self.key = curve_public_z85(self.peer_id)
        self.conn = conn


@pytest.fixture
def core():
    return RelayCore(heartbeat=HEARTBEAT, liveness=LIVENESS, max_body=MAX_BODY)


@pytest.fixture
def a():
    return Node(b"conn-a")


@pytest.fixture
def b():
    return Node(b"conn-b")


def observe():
    return OBSERVED


def send_from(core, node, message, now=0.0, *, conn=None, key=None):
    frames = message if isinstance(message, list) else encode(message)
    return core.on_message(conn or node.conn, key or node.key, frames, now, observe=observe)


def register(core, node, now=0.0, *, conn=None, caps=None, listen=None):
    message = Register(peer_id=node.peer_id, caps=caps or {}, listen=listen or [])
    return send_from(core, node, message, now, conn=conn)


def read(out):
    """The one message an Outgoing carries, as the node would decode it."""
    return decode(out.frames, RELAY_TO_NODE, max_body=MAX_BODY)


def only(outs):
    assert len(outs) == 1, outs
    return outs[0]


def table(core):
    return copy.deepcopy({peer: (e.conn, e.key) for peer, e in core.nodes.items()}), dict(core.by_conn)


# -- registration --


def test_register_with_the_matching_key_is_answered_registered(core, a):
    out = only(register(core, a))
    assert out.conn == a.conn
    assert read(out) == Registered(
        peer_id=a.peer_id, observed=OBSERVED, heartbeat=HEARTBEAT, max_body=MAX_BODY, window=core.window
    )
    assert core.nodes[a.peer_id].conn == a.conn
    assert core.by_conn[a.conn] == a.peer_id


def test_observe_is_called_only_for_registration(core, a):
    calls = []

    def counting_observe():
        calls.append(1)
        return OBSERVED

    core.on_message(a.conn, a.key, encode(Register(peer_id=a.peer_id)), 0.0, observe=counting_observe)
    core.on_message(a.conn, a.key, encode(Ping(seq=1)), 0.0, observe=counting_observe)
    assert len(calls) == 1


def test_register_claiming_another_peers_id_is_refused(core, a, b):
    before = table(core)
    out = only(core.on_message(a.conn, a.key, encode(Register(peer_id=b.peer_id)), 0.0, observe=observe))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Error) and reply.code == "identity_mismatch"
    assert b.peer_id in reply.message
    assert table(core) == before
    assert core.rejected == 1


def test_refused_impostor_does_not_displace_the_real_peer(core, a, b):
    register(core, b)
    before = table(core)
    reply = read(only(core.on_message(a.conn, a.key, encode(Register(peer_id=b.peer_id)), 1.0, observe=observe)))
    assert reply.code == "identity_mismatch"
    assert table(core) == before


@pytest.mark.parametrize("message", [Ping(seq=1), PeersRequest()], ids=["ping", "peers"])
def test_any_other_message_before_registering_is_not_registered(core, a, message):
    out = only(send_from(core, a, message))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Error) and reply.code == "not_registered"
    assert core.nodes == {}


def test_send_before_registering_bounces_the_job_and_asks_to_register(core, a):
    out = send_from(core, a, Send(to=SOMEONE, ref=REF, op="sealed", body=b"x"))
    assert [o.conn for o in out] == [a.conn, a.conn]
    bounce, error = read(out[0]), read(out[1])
    assert (
        isinstance(bounce, Unroutable) and bounce.ref == REF and bounce.op == "sealed" and bounce.reason == "no_relay"
    )
    assert isinstance(error, Error) and error.code == "not_registered"
    assert core.nodes == {}


def test_message_on_a_registered_connection_with_another_key_is_not_registered(core, a, b):
    register(core, a)
    reply = read(only(send_from(core, a, Ping(seq=1), key=b.key)))
    assert reply.code == "not_registered"


def test_reregistering_on_a_new_connection_replaces_the_old_one(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    told, out = register(core, a, 1.0, conn=b"conn-a2")
    # The old connection is told (a second process with the same key reads it; a node's
    # own dead connection does not), and is served no more.
    assert told.conn == a.conn and read(told).code == "replaced" and "another connection" in read(told).message
    assert out.conn == b"conn-a2"
    assert isinstance(read(out), Registered)
    assert core.nodes[a.peer_id].conn == b"conn-a2"
    assert a.conn not in core.by_conn
    assert read(only(send_from(core, a, Ping(seq=2), conn=a.conn))).code == "not_registered"
    delivered = only(send_from(core, b, Send(to=a.peer_id, ref=REF, op="sealed", body=b"x")))
    assert delivered.conn == b"conn-a2"


def test_reregistering_keeps_correspondents_so_peer_down_still_reaches_them(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x"), 0.0)
    register(core, b, 1.0, conn=b"conn-b2")
    send_from(core, a, Ping(seq=1), 4.5)
    outs = core.on_tick(4.5)  # b silent since 1.0
    assert [(o.conn, read(o)) for o in outs] == [(a.conn, PeerDown(peer_id=b.peer_id))]


# -- forwarding --


def test_send_to_a_registered_peer_is_delivered_from_the_senders_registered_id(core, a, b):
    register(core, a)
    register(core, b)
    body = b"\x00sealed job\xff"
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=body)))
    assert out.conn == b.conn
    assert out.frames[1] is body
    delivered = read(out)
    assert delivered == Deliver(sender=a.peer_id, ref=REF, op="sealed", body=body)
    assert delivered.body is body
    assert out.bounce_to == a.conn
    assert core.forwarded == 1


def test_send_to_an_unknown_peer_is_unroutable_to_the_sender(core, a):
    register(core, a)
    stranger = Identity.generate().peer_id
    out = only(send_from(core, a, Send(to=stranger, ref=REF, op="sealed", body=b"x")))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Unroutable)
    assert (reply.to, reply.ref, reply.reason) == (stranger, REF, "peer_not_connected")
    assert core.forwarded == 0


def test_undeliverable_because_the_queue_is_full_bounces_relay_busy(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x")))
    bounce = only(core.on_undeliverable(out, queue_full=True))
    assert bounce.conn == a.conn
    reply = read(bounce)
    assert isinstance(reply, Unroutable)
    assert (reply.to, reply.ref, reply.reason) == (b.peer_id, REF, "relay_busy")


def test_undeliverable_because_the_peer_is_gone_bounces_peer_not_connected(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x")))
    reply = read(only(core.on_undeliverable(out, queue_full=False)))
    assert (reply.to, reply.ref, reply.reason) == (b.peer_id, REF, "peer_not_connected")


def test_undeliverable_reply_is_dropped_not_bounced(core, a):
    out = only(register(core, a))
    assert core.on_undeliverable(out, queue_full=True) == []


# -- ping and peers --


def test_ping_is_answered_with_pong_of_the_same_seq_and_acknowledges_what_was_read(core, a):
    register(core, a)
    pong, ack = send_from(core, a, Ping(seq=42), 0.5)
    assert pong.conn == ack.conn == a.conn
    assert read(pong) == Pong(seq=42)
    # A heartbeat acknowledges whatever the relay read: the ping itself, here.
    assert read(ack) == Ack(received=len(encode(Ping(seq=42))[0]))
    assert core.nodes[a.peer_id].last_seen == 0.5


def test_peers_request_lists_registered_peers(core, a, b):
    register(core, a, 0.0, caps={"gpus": 1}, listen=["tcp://10.0.0.1:7711"])
    register(core, b, 1.0)
    reply = read(only(send_from(core, b, PeersRequest(), 3.0)))
    assert isinstance(reply, PeersReply)
    peers = {p["peer_id"]: p for p in reply.peers}
    assert set(peers) == {a.peer_id, b.peer_id}
    assert peers[a.peer_id]["caps"] == {"gpus": 1}
    assert peers[a.peer_id]["listen"] == ["tcp://10.0.0.1:7711"]
    assert peers[a.peer_id]["observed"] == OBSERVED
    assert peers[a.peer_id]["connected_for"] == 3.0
    assert peers[b.peer_id]["connected_for"] == 2.0


def test_a_heartbeat_load_and_round_trip_are_listed_until_the_next_heartbeat_says_otherwise(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    listed = {p["peer_id"]: p for p in read(only(send_from(core, b, PeersRequest(), 1.0))).peers}
    assert "load" not in listed[a.peer_id] and "rtt" not in listed[a.peer_id]  # nothing told yet
    send_from(core, a, Ping(seq=1, load={"busy": 2, "free": 0, "queued": 5}, rtt=0.0015), 2.0)
    listed = {p["peer_id"]: p for p in read(only(send_from(core, b, PeersRequest(), 3.0))).peers}
    assert listed[a.peer_id]["load"] == {"busy": 2, "free": 0, "queued": 5}
    assert listed[a.peer_id]["rtt"] == 0.0015
    send_from(core, a, Ping(seq=2), 4.0)  # a heartbeat without them keeps the last told
    send_from(core, a, Ping(seq=3, load={"busy": 0, "free": 2, "queued": 0}), 5.0)
    listed = {p["peer_id"]: p for p in read(only(send_from(core, b, PeersRequest(), 6.0))).peers}
    assert listed[a.peer_id]["load"] == {"busy": 0, "free": 2, "queued": 0}
    assert listed[a.peer_id]["rtt"] == 0.0015


@pytest.mark.parametrize(
    "load",
    [{"busy": 1, "free": 1}, {"busy": -1, "free": 1, "queued": 0}, {"busy": 1, "free": 1, "queued": 0, "x": 1}, [1]],
)
def test_a_heartbeat_with_a_malformed_load_is_refused_and_changes_nothing(core, a, load):
    register(core, a, 0.0)
    header = {"v": PROTOCOL_VERSION, "t": "ping", "seq": 1, "load": load}
    replies = [read(out) for out in send_from(core, a, [cbor2.dumps(header)], 1.0)]
    assert [type(r) for r in replies] == [Error]
    assert "ping.load" in replies[0].message
    assert core.registry.devices[a.peer_id].load is None


def test_a_listing_pages_through_every_peer_in_peer_id_order(core):
    nodes = [Node(f"conn-{n}".encode()) for n in range(5)]
    for node in nodes:
        register(core, node)
    asker = nodes[0]
    seen, after, pages = [], None, 0
    while True:
        reply = read(only(send_from(core, asker, PeersRequest(seq=pages, after=after, limit=2))))
        pages += 1
        seen += [p["peer_id"] for p in reply.peers]
        assert reply.seq == pages - 1
        if reply.next is None:
            assert reply.more is None
            break
        assert reply.next == reply.peers[-1]["peer_id"] and reply.more == 5 - len(seen)
        after = reply.next
    assert pages == 3
    assert seen == sorted(node.peer_id for node in nodes)


def test_a_query_with_requirements_lists_the_devices_that_meet_them_most_free_first(core):
    cpu, gpu, busy_gpu, asker = (Node(f"conn-{n}".encode()) for n in range(4))
    register(core, cpu, caps={"gpus": 0, "executors": 2})
    register(core, gpu, caps={"gpus": 1, "executors": 2})
    register(core, busy_gpu, caps={"gpus": 2, "executors": 8})
    register(core, asker)
    send_from(core, busy_gpu, Ping(seq=1, load={"busy": 8, "free": 0, "queued": 4}), 1.0)
    send_from(core, gpu, Ping(seq=1, load={"busy": 0, "free": 2, "queued": 0}), 1.0)
    reply = read(only(send_from(core, asker, PeersRequest(seq=9, requires={"gpus": 1}), 2.0)))
    assert [p["peer_id"] for p in reply.peers] == [gpu.peer_id, busy_gpu.peer_id]
    assert reply.peers[0]["load"] == {"busy": 0, "free": 2, "queued": 0}
    assert reply.unmet is None and reply.more is None
    reply = read(only(send_from(core, asker, PeersRequest(requires={"gpus": 1}, limit=1), 2.0)))
    assert [p["peer_id"] for p in reply.peers] == [gpu.peer_id] and reply.more == 1
    reply = read(only(send_from(core, asker, PeersRequest(requires={"gpus": 4}), 2.0)))
    assert reply.peers == [] and reply.unmet == "no device has gpus >= 4"


@pytest.mark.parametrize(
    "fields",
    [{"requires": {"gpu": 1}}, {"requires": {"gpus": "one"}}, {"limit": 0}, {"limit": 5000}, {"after": "nope"}],
)
def test_a_malformed_query_is_refused_as_invalid(core, a, fields):
    register(core, a)
    header = {"v": PROTOCOL_VERSION, "t": "peers", **fields}
    replies = [read(out) for out in send_from(core, a, [cbor2.dumps(header)], 1.0)]
    assert [(type(r), r.code) for r in replies] == [(Error, "invalid")]


def test_a_peer_that_leaves_leaves_the_registry(core, a, b):
    register(core, a, caps={"gpus": 1})
    register(core, b)
    assert a.peer_id in core.registry.devices
    core.on_tick(HEARTBEAT * (LIVENESS + 2))  # both silent past liveness: expired
    assert len(core.registry) == 0 and not core.nodes


def test_a_peers_request_naming_one_peer_says_where_the_relay_sees_it_alone(core, a, b):
    register(core, a, 0.0)
    register(core, b, 1.0)
    reply = read(only(send_from(core, b, PeersRequest(seq=7, peer_id=a.peer_id), 3.0)))
    assert isinstance(reply, PeersReply) and reply.seq == 7
    assert [(p["peer_id"], p["observed"]) for p in reply.peers] == [(a.peer_id, OBSERVED)]
    gone = read(only(send_from(core, b, PeersRequest(seq=8, peer_id=SOMEONE), 3.0)))
    assert isinstance(gone, PeersReply) and gone.peers == []


# -- malformed input --


MALFORMED = {
    "not-cbor": [b"\xa1\x61"],
    "not-a-map": [cbor2.dumps([1, 2])],
    "wrong-version": [cbor2.dumps({"v": 99, "t": "ping", "seq": 0})],
    "unknown-type": [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "teleport"})],
    "relay-to-node-type": [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "pong", "seq": 0})],
    "unknown-field": [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "ping", "seq": 0, "x": 1})],
    "bad-seq": [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "ping", "seq": -1})],
    "ping-with-body": [*encode(Ping(seq=0)), b"x"],
    "three-frames": [b"", b"", b""],
    "no-frames": [],
}


@pytest.mark.parametrize("frames", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_frames_get_error_invalid_and_leave_the_table_unchanged(core, a, b, frames):
    register(core, a)
    register(core, b)
    before = table(core)
    out = only(core.on_message(a.conn, a.key, frames, 1.0, observe=observe))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Error) and reply.code == "invalid"
    assert table(core) == before
    assert core.rejected == 1


def test_send_without_body_is_bounced_invalid_naming_its_job(core, a, b):
    register(core, a)
    register(core, b)
    frames = [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "send", "to": b.peer_id, "ref": REF, "op": "sealed"})]
    reply = read(only(send_from(core, a, frames)))
    assert isinstance(reply, Unroutable) and reply.ref == REF and reply.op == "sealed" and reply.reason == "invalid"
    assert core.rejected == 1


def test_oversized_body_is_bounced_too_large_naming_the_relay_limit(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * (MAX_BODY + 1))))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Unroutable) and reply.reason == "too_large" and reply.ref == REF
    assert str(MAX_BODY) in reply.message


def test_body_over_the_receiving_nodes_limit_is_bounced_too_large(core, a, b):
    register(core, a)
    send_from(core, b, Register(peer_id=b.peer_id, max_body=100))
    assert core.nodes[b.peer_id].max_body == 100
    reply = read(only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * 101))))
    assert isinstance(reply, Unroutable) and reply.reason == "too_large" and "at most 100" in reply.message
    delivered = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * 100)))
    assert delivered.conn == b.conn and isinstance(read(delivered), Deliver)


def test_a_node_announcing_more_than_the_relay_takes_is_held_to_the_relay_limit(core, a):
    send_from(core, a, Register(peer_id=a.peer_id, max_body=10 * MAX_BODY))
    assert core.nodes[a.peer_id].max_body == MAX_BODY


# -- flow control: the relay holds at most a window of unread bytes for a node --


def window_core(window):
    return RelayCore(heartbeat=HEARTBEAT, liveness=LIVENESS, max_body=MAX_BODY, window=window)


def no_acks(outs):
    """What the relay sent but its acknowledgements of what it read."""
    return [out for out in outs if not isinstance(read(out), Ack)]


def send_job(core, sender, to, size, ref=REF):
    """The one thing the relay sends for a job of ``size`` bytes (acks aside)."""
    return only(no_acks(send_from(core, sender, Send(to=to.peer_id, ref=ref, op="sealed", body=b"x" * size))))


def test_forwards_beyond_a_nodes_unread_window_are_held_then_bounced_relay_busy():
    core = window_core(2000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    delivered, held, bounced = [], 0, []
    for i in range(10):
        outs = no_acks(send_from(core, a, Send(to=b.peer_id, ref=bytes([i]) * 16, op="sealed", body=b"x" * 500)))
        if not outs:
            held += 1
        elif outs[0].conn == b.conn:
            delivered.append(outs[0])
        else:
            bounced.append(outs[0])
    # 3 deliveries of ~600 bytes fit the window of 2000, 3 more wait for b to read
    assert (len(delivered), held, len(bounced)) == (3, 3, 4)
    assert all(read(out).reason == "relay_busy" for out in bounced)
    assert "has not read" in read(bounced[0]).message
    assert core.nodes[b.peer_id].flow.in_flight == sum(out.counted for out in delivered)
    assert core.held_back == 4


def test_an_ack_sends_what_was_held_and_opens_the_window_again():
    core = window_core(2000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    sent = [send_job(core, a, b, 500) for _ in range(3)]
    assert no_acks(send_from(core, a, Send(to=b.peer_id, ref=b"h" * 16, op="sealed", body=b"x" * 500))) == []
    released = send_from(core, b, Ack(received=sum(out.counted for out in sent)))
    assert [read(out).ref for out in released] == [b"h" * 16] and released[0].conn == b.conn
    assert send_job(core, a, b, 500).conn == b.conn


def core_holding_one_delivery_for_b() -> tuple[RelayCore, Node, Node]:
    """A relay whose window for b is full, and one delivery from a held for b."""
    core = window_core(2000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    for _ in range(3):
        send_job(core, a, b, 500)
    assert no_acks(send_from(core, a, Send(to=b.peer_id, ref=b"h" * 16, op="sealed", body=b"x" * 500))) == []
    return core, a, b


def test_deliveries_held_for_a_node_that_leaves_go_back_to_their_senders():
    core, a, b = core_holding_one_delivery_for_b()
    register(core, a, now=100.0)  # a stays; b goes silent and expires
    outs = core.on_tick(100.0)
    bounces = [read(out) for out in outs if out.conn == a.conn and isinstance(read(out), Unroutable)]
    assert [(u.ref, u.reason) for u in bounces] == [(b"h" * 16, "peer_not_connected")]


def test_deliveries_held_for_a_node_follow_it_to_its_new_connection():
    core, a, b = core_holding_one_delivery_for_b()
    told, *outs = register(core, b, conn=b"conn-b2")
    assert told.conn == b.conn and read(told).code == "replaced"
    assert isinstance(read(outs[0]), Registered)
    assert [(out.conn, read(out).ref) for out in outs[1:]] == [(b"conn-b2", b"h" * 16)]


def test_an_ack_for_more_than_was_sent_counts_as_everything():
    core = window_core(2000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    send_job(core, a, b, 500)
    send_from(core, b, Ack(received=10**12))
    assert core.nodes[b.peer_id].flow.in_flight == 0


def test_one_message_larger_than_the_window_goes_when_nothing_is_in_flight():
    core = window_core(110)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    assert send_job(core, a, b, 900).conn == b.conn
    assert no_acks(send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x"))) == []  # held
    assert read(send_job(core, a, b, 200)).reason == "relay_busy"  # past what is held too


def test_replies_to_a_node_that_does_not_read_them_are_dropped():
    core = window_core(1000)
    a = Node(b"conn-a")
    register(core, a)
    answered = sum(len(no_acks(send_from(core, a, Ping(seq=i)))) for i in range(200))
    assert answered < 200
    assert core.held_back == 200 - answered


def test_the_relay_acknowledges_what_it_reads_every_quarter_window():
    core = window_core(4000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    acks = []
    for _ in range(20):
        for out in send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * 100)):
            if out.conn == a.conn:
                acks.append(read(out))
        send_from(core, b, Ack(received=core.nodes[b.peer_id].flow.sent))
    assert acks and all(isinstance(ack, Ack) for ack in acks)
    assert acks[-1].received == core.nodes[a.peer_id].flow.acked
    assert 2 <= len(acks) <= 4


def test_undeliverable_counted_messages_are_taken_out_of_the_window():
    core = window_core(10_000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    out = send_job(core, a, b, 500)
    assert core.nodes[b.peer_id].flow.in_flight == out.counted
    core.on_undeliverable(out, queue_full=True)
    assert core.nodes[b.peer_id].flow.in_flight == 0


def test_malformed_register_does_not_register(core, a):
    frames = [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "register", "peer_id": a.peer_id, "caps": [], "listen": []})]
    reply = read(only(core.on_message(a.conn, a.key, frames, 0.0, observe=observe)))
    assert reply.code == "invalid"
    assert core.nodes == {} and core.by_conn == {}


@pytest.mark.parametrize(
    "fields",
    [{"v": PROTOCOL_VERSION, "t": "x" * 5000}, {"v": PROTOCOL_VERSION, "t": "ping", "seq": 0, "y" * 5000: 1}],
    ids=["long-type", "long-field-name"],
)
def test_error_reply_to_a_malformed_message_is_itself_a_valid_message(core, a, fields):
    out = only(core.on_message(a.conn, a.key, [cbor2.dumps(fields)], 0.0, observe=observe))
    reply = read(out)
    assert isinstance(reply, Error) and reply.code == "invalid"


# -- expiry --


def test_silent_node_is_removed_and_its_correspondents_told(core, a, b):
    c = Node(b"conn-c")
    for node in (a, b, c):
        register(core, node, 0.0)
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x"), 0.5)
    send_from(core, a, Ping(seq=1), 2.5)
    send_from(core, c, Ping(seq=1), 2.5)
    assert core.on_tick(3.0) == []  # b silent for exactly heartbeat * liveness: still there
    outs = core.on_tick(3.01)
    assert b.peer_id not in core.nodes and b.conn not in core.by_conn
    assert [(o.conn, read(o)) for o in outs] == [(a.conn, PeerDown(peer_id=b.peer_id))]
    assert set(core.nodes) == {a.peer_id, c.peer_id}


def test_expired_node_must_register_again(core, a):
    register(core, a, 0.0)
    core.on_tick(10.0)
    assert read(only(send_from(core, a, Ping(seq=1), 10.0))).code == "not_registered"
    assert isinstance(read(only(register(core, a, 10.0))), Registered)


def test_peer_down_is_not_sent_to_a_correspondent_that_is_gone_too(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x"), 0.0)
    assert core.on_tick(5.0) == []
    assert core.nodes == {}


def test_next_deadline_follows_the_quietest_node(core, a, b):
    assert core.next_deadline() is None
    register(core, a, 0.0)
    register(core, b, 2.0)
    assert core.next_deadline() == HEARTBEAT * LIVENESS
    send_from(core, a, Ping(seq=1), 4.0)
    assert core.next_deadline() == 2.0 + HEARTBEAT * LIVENESS


def twin_peer_id(peer_id: str) -> str:
    """The peer id whose Ed25519 key differs only in its sign bit: same CurveZMQ key."""
    from meshnet.identity import peer_id_from_public_key, public_key_from_peer_id

    key = bytearray(public_key_from_peer_id(peer_id))
    key[31] ^= 0x80
    return peer_id_from_public_key(bytes(key))


def test_allow_list_binds_the_peer_id_not_only_its_curve_key(a):
    core = RelayCore(heartbeat=HEARTBEAT, liveness=LIVENESS, max_body=MAX_BODY, allowed_peers=frozenset([a.peer_id]))
    twin = twin_peer_id(a.peer_id)
    assert curve_public_z85(twin) == a.key  # ZAP cannot tell the two apart
    reply = read(only(send_from(core, a, Register(peer_id=twin))))
    assert isinstance(reply, Error) and reply.code == "identity_mismatch" and "allowed_peers" in reply.message
    assert core.nodes == {}
    assert isinstance(read(only(register(core, a))), Registered)


def test_register_with_shared_reference_bomb_in_caps_is_refused(core, a):
    nested: list = [1]
    for _ in range(40):
        nested = [nested, nested]  # 2**40 leaves once expanded, a few hundred bytes shared
    header = cbor2.dumps({"v": 1, "t": "register", "peer_id": a.peer_id, "caps": {"x": nested}}, value_sharing=True)
    assert len(header) < 1000
    reply = read(only(send_from(core, a, [header])))
    # Refused while decoding, before any reference is followed.
    assert isinstance(reply, Error) and reply.code == "invalid" and "not valid CBOR" in reply.message
    assert core.nodes == {}


def test_capabilities_must_nest_shallowly_enough_to_fit_in_a_peers_reply(core, a):
    reply = read(only(register(core, a, caps={"gpu": {"model": {"memory": {"gb": 24}}}})))
    assert isinstance(reply, Error) and "register.caps" in reply.message
    assert isinstance(read(only(register(core, a, caps={"gpu": {"model": "x", "memory_gb": 24}}))), Registered)


def test_peers_reply_stays_within_a_header_and_counts_who_was_left_out(core, monkeypatch):
    import relay_server.routing as routing

    nodes = [Node(f"conn-{i}".encode()) for i in range(5)]
    for node in nodes:
        register(core, node)
    one = core.nodes[nodes[0].peer_id].described_size
    monkeypatch.setattr(routing, "PEERS_REPLY_BUDGET", 2 * one + one // 2)
    reply = read(only(send_from(core, nodes[0], PeersRequest(seq=7))))
    assert isinstance(reply, PeersReply) and reply.seq == 7
    assert len(reply.peers) == 2 and reply.more == 3


def test_peers_reply_stays_within_the_items_a_node_decodes(core, monkeypatch):
    import relay_server.routing as routing

    nodes = [Node(f"conn-{i}".encode()) for i in range(5)]
    for node in nodes:
        register(core, node, caps={"kinds": ["echo"] * 50})
    one = core.nodes[nodes[0].peer_id].described_items
    assert one > 50
    monkeypatch.setattr(routing, "PEERS_REPLY_ITEMS", 3 * one)
    reply = read(only(send_from(core, nodes[0], PeersRequest(seq=8))))
    assert len(reply.peers) == 3 and reply.more == 2


def test_a_message_near_the_window_goes_after_a_quiet_remainder_left_unacknowledged():
    """Small traffic leaves less than a quarter window unacknowledged; a message close to
    the window's size must still go, not wait for an ack that a quiet link never sends."""
    core = RelayCore(heartbeat=HEARTBEAT, liveness=LIVENESS, max_body=10_000, window=4000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    send_job(core, a, b, 100)  # read by b, below a quarter window: not acknowledged
    assert 0 < core.nodes[b.peer_id].flow.in_flight < 1000
    outs = send_from(core, a, Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * 3500))
    assert [out.conn for out in outs if out.counted] == [b.conn]  # delivered, not bounced


def test_a_message_the_relay_could_not_decode_still_counts_as_read():
    """The node counted it as sent: if the relay did not count it, the two ends' counts
    would drift apart until the window never opened again."""
    core = window_core(1_000_000)
    a, b = Node(b"conn-a"), Node(b"conn-b")
    register(core, a)
    register(core, b)
    oversized = encode(Send(to=b.peer_id, ref=REF, op="sealed", body=b"x" * (MAX_BODY + 1)))
    bounce = only(send_from(core, a, oversized))
    assert read(bounce).reason == "too_large"
    assert core.nodes[a.peer_id].flow.received == sum(len(frame) for frame in oversized)
