"""The relay's routing table and protocol logic, without sockets (relay_server.routing.RelayCore)."""

from __future__ import annotations

import copy

import cbor2
import pytest

from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol import (
    PROTOCOL_VERSION,
    RELAY_TO_NODE,
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
    assert read(out) == Registered(peer_id=a.peer_id, observed=OBSERVED, heartbeat=HEARTBEAT)
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
    out = send_from(core, a, Send(to=SOMEONE, ref=REF, op="job", body=b"x"))
    assert [o.conn for o in out] == [a.conn, a.conn]
    bounce, error = read(out[0]), read(out[1])
    assert isinstance(bounce, Unroutable) and bounce.ref == REF and bounce.op == "job" and bounce.reason == "no_relay"
    assert isinstance(error, Error) and error.code == "not_registered"
    assert core.nodes == {}


def test_message_on_a_registered_connection_with_another_key_is_not_registered(core, a, b):
    register(core, a)
    reply = read(only(send_from(core, a, Ping(seq=1), key=b.key)))
    assert reply.code == "not_registered"


def test_reregistering_on_a_new_connection_replaces_the_old_one(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    out = only(register(core, a, 1.0, conn=b"conn-a2"))
    assert out.conn == b"conn-a2"
    assert isinstance(read(out), Registered)
    assert core.nodes[a.peer_id].conn == b"conn-a2"
    assert a.conn not in core.by_conn
    assert read(only(send_from(core, a, Ping(seq=2), conn=a.conn))).code == "not_registered"
    delivered = only(send_from(core, b, Send(to=a.peer_id, ref=REF, op="job", body=b"x")))
    assert delivered.conn == b"conn-a2"


def test_reregistering_keeps_correspondents_so_peer_down_still_reaches_them(core, a, b):
    register(core, a, 0.0)
    register(core, b, 0.0)
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x"), 0.0)
    register(core, b, 1.0, conn=b"conn-b2")
    send_from(core, a, Ping(seq=1), 4.5)
    outs = core.on_tick(4.5)  # b silent since 1.0
    assert [(o.conn, read(o)) for o in outs] == [(a.conn, PeerDown(peer_id=b.peer_id))]


# -- forwarding --


def test_send_to_a_registered_peer_is_delivered_from_the_senders_registered_id(core, a, b):
    register(core, a)
    register(core, b)
    body = b"\x00sealed job\xff"
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=body)))
    assert out.conn == b.conn
    assert out.frames[1] is body
    delivered = read(out)
    assert delivered == Deliver(sender=a.peer_id, ref=REF, op="job", body=body)
    assert delivered.body is body
    assert out.bounce_to == a.conn
    assert core.forwarded == 1


def test_send_to_an_unknown_peer_is_unroutable_to_the_sender(core, a):
    register(core, a)
    stranger = Identity.generate().peer_id
    out = only(send_from(core, a, Send(to=stranger, ref=REF, op="job", body=b"x")))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Unroutable)
    assert (reply.to, reply.ref, reply.reason) == (stranger, REF, "peer_not_connected")
    assert core.forwarded == 0


def test_undeliverable_because_the_queue_is_full_bounces_relay_busy(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x")))
    bounce = only(core.on_undeliverable(out, queue_full=True))
    assert bounce.conn == a.conn
    reply = read(bounce)
    assert isinstance(reply, Unroutable)
    assert (reply.to, reply.ref, reply.reason) == (b.peer_id, REF, "relay_busy")


def test_undeliverable_because_the_peer_is_gone_bounces_peer_not_connected(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x")))
    reply = read(only(core.on_undeliverable(out, queue_full=False)))
    assert (reply.to, reply.ref, reply.reason) == (b.peer_id, REF, "peer_not_connected")


def test_undeliverable_reply_is_dropped_not_bounced(core, a):
    out = only(register(core, a))
    assert core.on_undeliverable(out, queue_full=True) == []


# -- ping and peers --


def test_ping_is_answered_with_pong_of_the_same_seq(core, a):
    register(core, a)
    out = only(send_from(core, a, Ping(seq=42), 0.5))
    assert out.conn == a.conn
    assert read(out) == Pong(seq=42)
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
    "send-without-body": [cbor2.dumps({"v": PROTOCOL_VERSION, "t": "send", "to": SOMEONE, "ref": REF, "op": "job"})],
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


def test_oversized_body_gets_error_too_large(core, a, b):
    register(core, a)
    register(core, b)
    out = only(send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x" * (MAX_BODY + 1))))
    assert out.conn == a.conn
    reply = read(out)
    assert isinstance(reply, Error) and reply.code == "too_large"


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
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x"), 0.5)
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
    send_from(core, a, Send(to=b.peer_id, ref=REF, op="job", body=b"x"), 0.0)
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
