"""Bad input reaches the relay and the nodes: each gets a clear answer, and everyone else
keeps being served."""

from __future__ import annotations

import os

import cbor2
import pytest
import zmq

from meshnet import JobRefused, MeshClient
from meshnet.errors import LocalProtocolError
from meshnet.identity import Identity
from meshnet.protocol import (
    NODE_TO_CLIENT,
    RELAY_TO_NODE,
    Error,
    PeersReply,
    PeersRequest,
    Register,
    Registered,
    Result,
    Submit,
    Unroutable,
    encode,
)
from tests.harness import Mesh, raw_dealer, receive


def test_relay_answers_malformed_and_oversized_frames_and_keeps_serving(mesh: Mesh) -> None:
    intruder = Identity.generate()
    pair = mesh.start_pair(extra_allowed=(intruder.peer_id,))
    relay, a_api, b_id = pair.relay, pair.a_api, pair.b_id
    with raw_dealer(pair.relay_endpoint, intruder, pair.relay_id.peer_id) as sock:
        sock.send(b"\xff\x00 not cbor")
        error = receive(sock, RELAY_TO_NODE)
        assert isinstance(error, Error) and error.code == "invalid" and "CBOR" in error.message
        sock.send(cbor2.dumps({"v": 1, "t": "register", "peer_id": intruder.peer_id, "caps": "lots"}))
        error = receive(sock, RELAY_TO_NODE)
        assert isinstance(error, Error) and "register.caps" in error.message
        sock.send_multipart(encode(Register(peer_id=intruder.peer_id)))
        assert isinstance(receive(sock, RELAY_TO_NODE), Registered)
        limit = 64 * 1024 * 1024 + 65536
        sock.send_multipart(
            [
                cbor2.dumps({"v": 1, "t": "send", "to": b_id.peer_id, "ref": b"r", "op": "sealed"}),
                os.urandom(limit + 10),
            ]
        )
        bounce = receive(sock, RELAY_TO_NODE)  # the send is named, so that its job can end
        assert isinstance(bounce, Unroutable) and bounce.reason == "too_large" and bounce.ref == b"r"
        assert str(limit) in bounce.message
        sock.send_multipart(encode(PeersRequest()))
        assert isinstance(receive(sock, RELAY_TO_NODE), PeersReply)  # still registered, still served
    with MeshClient(a_api) as client:
        assert client.run("echo", "unharmed", to=b_id.peer_id) == "unharmed"
    assert relay.popen.poll() is None


def test_node_claiming_another_peer_id_is_refused(mesh: Mesh) -> None:
    impostor = Identity.generate()
    pair = mesh.start_pair(extra_allowed=(impostor.peer_id,))
    a_api, a_id, b_id = pair.a_api, pair.a_id, pair.b_id
    with raw_dealer(pair.relay_endpoint, impostor, pair.relay_id.peer_id) as sock:
        sock.send_multipart(encode(Register(peer_id=b_id.peer_id)))
        error = receive(sock, RELAY_TO_NODE)
        assert isinstance(error, Error) and error.code == "identity_mismatch"
        sock.send_multipart(encode(PeersRequest()))
        error = receive(sock, RELAY_TO_NODE)
        assert isinstance(error, Error) and error.code == "not_registered"
    with MeshClient(a_api) as client:
        # B's registration was not taken over: jobs for B still reach the real B.
        assert client.run("echo", "to the real b", to=b_id.peer_id) == "to the real b"
        peers = {p["peer_id"] for p in client.peers()}
        assert peers == {a_id.peer_id, b_id.peer_id}


def test_node_with_a_key_the_relay_does_not_allow_is_refused(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    relay, a_api, b_id = pair.relay, pair.a_api, pair.b_id
    stranger = Identity.generate()
    path, _, _ = mesh.node_config("stranger", stranger, relay=(pair.relay_endpoint, pair.relay_id.peer_id))
    node = mesh.start_node("stranger", path)
    refusal = node.wait_for("relay_refused_us")
    assert stranger.peer_id in refusal["fix"]
    relay.wait_for("connection_refused")
    assert not node.find("relay_registered")
    with MeshClient(a_api) as client:
        assert client.run("echo", 1, to=b_id.peer_id) == 1
        assert stranger.peer_id not in {p["peer_id"] for p in client.peers()}


def test_node_api_answers_malformed_and_oversized_requests(mesh: Mesh) -> None:
    path, _, endpoint = mesh.node_config("api", jobs={"max_payload_bytes": 1024})
    mesh.start_node("api", path)
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(endpoint)
    try:
        sock.send(b"\x9f\x9f\x9f")  # truncated CBOR
        error = receive(sock, NODE_TO_CLIENT)
        assert isinstance(error, Error) and error.code == "invalid"
        job_id = os.urandom(16)
        sock.send_multipart(encode(Submit(id=job_id, kind="echo", body=cbor2.dumps(b"x" * 2000))))
        result = receive(sock, NODE_TO_CLIENT)
        assert isinstance(result, Result) and result.id == job_id
        assert result.status == "refused" and result.error["reason"] == "too_large"
        job_id = os.urandom(16)
        sock.send(cbor2.dumps({"v": 1, "t": "submit", "id": job_id, "kind": "Echo!"}))
        result = receive(sock, NODE_TO_CLIENT)
        assert isinstance(result, Result) and result.id == job_id and result.error["reason"] == "invalid"
    finally:
        sock.close(0)
        context.term()
    with MeshClient(endpoint, max_payload=1024) as client:
        assert client.run("echo", "fine") == "fine"
        with pytest.raises(LocalProtocolError):
            client.submit("echo", b"y" * 2000)
        with pytest.raises(LocalProtocolError):
            client.submit("echo", 1, to="not-a-peer")
        with pytest.raises(JobRefused) as info:
            MeshClient.run(client, "echo", 1, timeout=10**9)
        assert info.value.reason == "invalid"


def test_messages_of_many_frames_are_dropped_without_harm(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(pair.a_api)
    try:
        sock.send_multipart([b"x" * 1000] * 300)
        job_id = os.urandom(16)
        sock.send_multipart(encode(Submit(id=job_id, kind="echo", body=cbor2.dumps("next"))))
        result = receive(sock, NODE_TO_CLIENT)
        assert isinstance(result, Result) and result.id == job_id and cbor2.loads(result.body) == "next"
    finally:
        sock.close(0)
        context.term()
    pair.a.wait_for("client_message_rejected")
    with MeshClient(pair.a_api) as client:
        assert client.run("echo", 1, to=pair.b_id.peer_id) == 1


@pytest.mark.parametrize("where", ["here", "on_b"])
def test_a_duplicate_job_id_is_refused_with_an_error_and_the_original_keeps_its_result(mesh: Mesh, where: str) -> None:
    pair = mesh.start_pair()
    to = None if where == "here" else pair.b_id.peer_id
    job_id = os.urandom(16)
    with raw_dealer(pair.a_api) as sock:
        sock.send_multipart(encode(Submit(id=job_id, kind="sleep", body=cbor2.dumps(0.5), to=to, timeout=30)))
        sock.send_multipart(encode(Submit(id=job_id, kind="echo", body=cbor2.dumps("again"), to=to, timeout=30)))
        # An invalid submit reusing the id is refused the same way: with an error.
        sock.send_multipart([cbor2.dumps({"v": 1, "t": "submit", "id": job_id, "kind": "Not A Kind"}), b"\xf6"])
        answers = [receive(sock, NODE_TO_CLIENT) for _ in range(3)]
    errors = [a for a in answers if isinstance(a, Error)]
    results = [a for a in answers if isinstance(a, Result)]
    assert [e.code for e in errors] == ["duplicate", "invalid"] and all(e.id == job_id for e in errors)
    assert "in flight already" in errors[0].message
    assert len(results) == 1 and results[0].id == job_id and results[0].status == "succeeded"
    assert cbor2.loads(results[0].body) == 0.5
