"""A client's sans-IO parts: what its socket's events mean, and what each answer ends a
future with (meshnet.client_link, meshnet.client_results)."""

from __future__ import annotations

import cbor2
import pytest
import zmq

from meshnet.client_link import CONNECTION_LOST, NOT_ZEROMQ, LinkChange, NodeLinkWatch
from meshnet.client_results import job_outcome, reply_outcome
from meshnet.errors import JobCancelled, JobFailed, JobRefused, JobTimedOut, MeshError, PeerLost, PingFailed
from meshnet.protocol import Error, PeersReply, PingReply, Result, StatusReply

JOB = bytes(range(16))


def test_a_tcp_connection_without_a_handshake_is_reported_as_not_zeromq() -> None:
    watch = NodeLinkWatch("tcp://127.0.0.1:1", 3.0, curve=False)
    assert "no connection" in watch.unreachable()
    assert watch.on_event(zmq.EVENT_CONNECTED) is LinkChange.NONE
    assert watch.trouble == NOT_ZEROMQ
    assert not watch.linked
    assert "no ZeroMQ handshake completed within 3 s" in watch.unreachable()


def test_a_link_that_comes_up_then_goes_is_lost_once() -> None:
    watch = NodeLinkWatch("tcp://127.0.0.1:1", 3.0, curve=True)
    assert watch.on_event(zmq.EVENT_DISCONNECTED) is LinkChange.NONE  # never linked: nothing lost
    assert watch.on_event(zmq.EVENT_HANDSHAKE_SUCCEEDED) is LinkChange.LINKED
    assert watch.linked
    assert watch.on_event(zmq.EVENT_CONNECTED) is LinkChange.NONE
    assert watch.on_event(zmq.EVENT_DISCONNECTED) is LinkChange.LOST
    assert watch.trouble == CONNECTION_LOST
    assert watch.on_event(zmq.EVENT_DISCONNECTED) is LinkChange.NONE


@pytest.mark.parametrize(("curve", "hint"), [(True, "is node_peer_id its peer id?"), (False, "that listens there?")])
def test_a_failed_handshake_names_what_to_check(curve: bool, hint: str) -> None:
    watch = NodeLinkWatch("tcp://127.0.0.1:1", 3.0, curve=curve)
    assert watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) is LinkChange.NONE
    assert watch.unreachable().endswith(hint)


def test_a_refused_key_is_a_refusal_not_trouble() -> None:
    watch = NodeLinkWatch("tcp://127.0.0.1:1", 3.0, curve=True)
    assert watch.on_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH) is LinkChange.REFUSED
    assert not watch.linked


def test_a_succeeded_job_gives_its_decoded_result() -> None:
    assert job_outcome(Result(id=JOB, status="succeeded", body=cbor2.dumps({"x": [1, 2]}))) == ({"x": [1, 2]}, None)
    assert job_outcome(Result(id=JOB, status="succeeded")) == (None, None)


def test_a_result_that_is_not_plain_cbor_fails_the_job() -> None:
    value, error = job_outcome(Result(id=JOB, status="succeeded", body=cbor2.dumps(cbor2.CBORTag(9999, 1))))
    assert value is None
    assert isinstance(error, JobFailed)
    assert "plain CBOR data" in str(error)
    assert error.job_id == JOB.hex()


@pytest.mark.parametrize(
    ("status", "cls"),
    [("failed", JobFailed), ("timed_out", JobTimedOut), ("refused", JobRefused), ("cancelled", JobCancelled),
     ("peer_lost", PeerLost)],
)  # fmt: skip
def test_each_terminal_status_ends_in_its_own_error(status: str, cls: type) -> None:
    error_fields = {"type": "ValueError", "message": "bad", "reason": "busy"}
    value, error = job_outcome(Result(id=JOB, status=status, error=error_fields))
    assert value is None
    assert type(error) is cls
    assert error.reason == "busy"
    # The error type leads the text of a job that failed, where it tells what raised.
    assert str(error) == ("ValueError: bad" if status == "failed" else "bad")


def test_a_reply_of_the_expected_type_is_the_answer() -> None:
    reply = StatusReply(info={"peer_id": "x"}, seq=1)
    assert reply_outcome(StatusReply, reply) == (reply, None)


def test_an_error_for_a_ping_is_a_ping_failure_with_its_code() -> None:
    _, error = reply_outcome(PingReply, Error(code="no_relay", message="no relay here", seq=1))
    assert isinstance(error, PingFailed)
    assert error.code == "no_relay"


def test_an_error_or_a_stray_reply_to_a_request_is_a_mesh_error() -> None:
    _, error = reply_outcome(PeersReply, Error(code="unavailable", message="status unavailable", seq=1))
    assert type(error) is MeshError and str(error) == "status unavailable"
    _, error = reply_outcome(PeersReply, StatusReply(info={}, seq=1))
    assert type(error) is MeshError and str(error) == "unexpected reply"
