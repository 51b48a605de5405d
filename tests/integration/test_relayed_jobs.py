"""Jobs that travel client → node A → relay → node B and back, with real processes."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import cbor2
import pytest
import zmq

from meshnet import JobRefused, MeshClient, PeerLost
from meshnet.errors import JobTimedOut
from meshnet.identity import Identity
from meshnet.protocol import NODE_TO_CLIENT, Result, StatusReply, StatusRequest, Submit, decode, encode
from tests.harness import Mesh


def test_thousand_relayed_jobs_each_return_exactly_once(mesh: Mesh) -> None:
    pair = mesh.start_pair()
    a_api, b_api, b_id = pair.a_api, pair.b_api, pair.b_id
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.connect(a_api)
    try:
        expected: dict[bytes, int] = {}
        received: Counter[bytes] = Counter()
        results: dict[bytes, bytes] = {}
        pending = 0

        def collect(block: bool) -> None:
            nonlocal pending
            while sock.poll(10_000 if block else 0):
                message = decode(sock.recv_multipart(), NODE_TO_CLIENT, max_body=1 << 20)
                assert isinstance(message, Result), message
                assert message.status == "succeeded", message.error
                received[message.id] += 1
                results[message.id] = message.body
                pending -= 1
                if not block or pending < 48:
                    return
            if block:
                raise AssertionError("no result within 10 s")

        for i in range(1000):
            job_id = os.urandom(16)
            expected[job_id] = i
            sock.send_multipart(encode(Submit(id=job_id, kind="echo", body=cbor2.dumps(i), to=b_id.peer_id)))
            pending += 1
            if pending >= 64:  # stay within B's queue (2 executors + 64 waiting)
                collect(block=True)
            collect(block=False)
        while pending:
            collect(block=True)
        # Anything duplicated would have arrived before this status reply is answered.
        sock.send_multipart(encode(StatusRequest()))
        while True:
            message = decode(sock.recv_multipart(), NODE_TO_CLIENT, max_body=1 << 20)
            if isinstance(message, StatusReply):
                break
            received[message.id] += 1
        assert set(received) == set(expected)
        assert set(received.values()) == {1}
        assert all(cbor2.loads(results[job_id]) == value for job_id, value in expected.items())
        assert message.info["relay"]["forwarded"] == {"succeeded": 1000}
    finally:
        sock.close(0)
        context.term()
    with MeshClient(b_api) as client:
        assert client.status()["jobs"] == {"succeeded": 1000}


def test_refusals_peer_not_connected_kind_not_enabled_timeout_too_long(mesh: Mesh) -> None:
    pair = mesh.start_pair(b_jobs={"max_timeout": 100})
    a_api, b_id = pair.a_api, pair.b_id
    stranger = Identity.generate().peer_id
    with MeshClient(a_api) as client:
        with pytest.raises(JobRefused) as info:
            client.run("echo", 1, to=stranger)
        assert info.value.reason == "peer_not_connected"
        assert stranger in str(info.value)
        with pytest.raises(JobRefused) as info:
            client.run("crash", 1, to=b_id.peer_id)
        assert info.value.reason == "unknown_kind"
        with pytest.raises(JobRefused) as info:  # within A's max_timeout, beyond B's
            client.run("echo", 1, to=b_id.peer_id, timeout=1000)
        assert info.value.reason == "invalid" and "max_timeout" in str(info.value)
        assert client.run("echo", "still fine", to=b_id.peer_id) == "still fine"


def test_peer_killed_mid_job_ends_as_peer_lost(mesh: Mesh) -> None:
    pair = mesh.start_pair(b_log="debug")
    a_api, node_b, b_id = pair.a_api, pair.b, pair.b_id
    with MeshClient(a_api) as client:
        futures = [client.submit("sleep", 30, to=b_id.peer_id, timeout=60) for _ in range(3)]
        node_b.wait_for("job_started", count=2)  # two running, one waiting in B's queue
        node_b.signal(signal.SIGKILL)
        started = time.monotonic()
        statuses = []
        for future in futures:
            with pytest.raises((PeerLost, JobTimedOut)) as info:
                future.result(timeout=30)
            statuses.append(info.value.status)
        assert set(statuses) == {"peer_lost"}
        # The relay expires B after heartbeat * liveness (0.5 s * 3) and tells A.
        assert time.monotonic() - started < 10
