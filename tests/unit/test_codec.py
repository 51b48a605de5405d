"""Encoding and validating decoding of protocol messages (meshnet.protocol.codec)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.errors import LocalProtocolError, MessageTooLarge, RemoteProtocolError
from meshnet.protocol import (
    CLIENT_TO_NODE,
    MAX_HEADER_BYTES,
    NODE_TO_CLIENT,
    NODE_TO_NODE,
    NODE_TO_RELAY,
    PROTOCOL_VERSION,
    Cancel,
    Job,
    JobResult,
    PeerAck,
    Result,
    Submit,
    decode,
    decode_inner,
    decode_inner_split,
    encode,
    encode_inner,
    encode_inner_parts,
    split_bulk,
    validate,
)
from meshnet.protocol.codec import BULK_BYTES

from .samples import FRAME_DIRECTIONS, JOB_ID, MAX_BODY, PAYLOAD, PEER, SAMPLES, TABLES


def header(**fields):
    return cbor2.dumps({"v": PROTOCOL_VERSION, **fields})


def submit_header(**overrides):
    fields = {"t": "submit", "id": JOB_ID, "kind": "echo", **overrides}
    return header(**{k: v for k, v in fields.items() if v is not ...})


def rejected(frames, accept=CLIENT_TO_NODE, *, max_body=MAX_BODY, error=RemoteProtocolError):
    with pytest.raises(error) as info:
        decode(frames, accept, max_body=max_body)
    return info.value


# -- round trips --


@pytest.mark.parametrize("direction", [*FRAME_DIRECTIONS, "NODE_TO_NODE"])
def test_samples_cover_every_message_type_of_the_direction(direction):
    assert {type(m).TYPE for m in SAMPLES[direction]} == set(TABLES[direction])


@pytest.mark.parametrize(
    "direction,message",
    [(d, m) for d in FRAME_DIRECTIONS for m in SAMPLES[d]],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_every_frame_message_round_trips(direction, message):
    frames = encode(message)
    assert all(isinstance(f, bytes) for f in frames)
    assert decode(frames, TABLES[direction], max_body=MAX_BODY) == message


@pytest.mark.parametrize("message", SAMPLES["NODE_TO_NODE"], ids=lambda m: type(m).__name__)
def test_every_node_to_node_message_round_trips_through_inner_encoding(message):
    data = encode_inner(message)
    assert isinstance(data, bytes)
    assert decode_inner(data, NODE_TO_NODE, max_size=MAX_BODY) == message


def test_body_travels_as_its_own_frame_untouched():
    message = Submit(id=JOB_ID, kind="echo", body=PAYLOAD)
    frames = encode(message)
    assert len(frames) == 2
    assert frames[1] is PAYLOAD
    assert PAYLOAD not in frames[0]


def test_absent_optional_fields_are_left_out_of_the_header():
    fields = cbor2.loads(encode(Submit(id=JOB_ID, kind="echo", body=b""))[0])
    assert fields == {"v": PROTOCOL_VERSION, "t": "submit", "id": JOB_ID, "kind": "echo"}


def test_result_without_body_is_one_frame_and_with_body_two():
    assert len(encode(Result(id=JOB_ID, status="failed", error={"message": "x"}))) == 1
    assert len(encode(Result(id=JOB_ID, status="succeeded", body=b"\xf6"))) == 2


def test_decode_accepts_memoryview_frames():
    frames = [memoryview(f) for f in encode(Submit(id=JOB_ID, kind="echo", body=PAYLOAD))]
    message = decode(frames, CLIENT_TO_NODE, max_body=MAX_BODY)
    assert message.id == JOB_ID and bytes(message.body) == PAYLOAD


def test_decoded_error_map_is_filled_with_empty_type_and_reason():
    frames = [header(t="result", id=JOB_ID, status="failed", error={"message": "boom"})]
    message = decode(frames, NODE_TO_CLIENT, max_body=MAX_BODY)
    assert message.error == {"type": "", "message": "boom", "reason": ""}


def test_encode_refuses_a_required_body_of_none():
    with pytest.raises(LocalProtocolError, match="needs a body"):
        encode(Submit(id=JOB_ID, kind="echo", body=None))


# -- rejections --


def test_header_that_is_not_cbor_is_rejected():
    error = rejected([b"\xa1\x61", b""])
    assert "not valid CBOR" in str(error)


def test_header_that_is_not_a_map_is_rejected():
    error = rejected([cbor2.dumps(["submit", JOB_ID]), b""])
    assert "must be a CBOR map" in str(error) and "an array" in str(error)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_protocol_version_is_rejected(version):
    fields = {"t": "cancel", "id": JOB_ID}
    if version is not None:
        fields["v"] = version
    error = rejected([cbor2.dumps(fields)])
    assert "unsupported protocol version" in str(error)
    assert repr(version) in str(error)


def test_unknown_message_type_is_rejected_naming_accepted_types():
    error = rejected([header(t="launch_missiles")])
    assert "unexpected message type 'launch_missiles'" in str(error)
    assert "submit" in str(error) and "cancel" in str(error)


def test_missing_message_type_is_rejected():
    error = rejected([header(id=JOB_ID)])
    assert "unexpected message type None" in str(error)


@pytest.mark.parametrize(
    "frames,accept",
    [
        ([header(t="result", id=JOB_ID, status="succeeded")], CLIENT_TO_NODE),
        ([header(t="submit", id=JOB_ID, kind="echo"), b""], NODE_TO_CLIENT),
        ([header(t="deliver", sender=PEER, ref=JOB_ID), b""], NODE_TO_RELAY),
        ([header(t="job_cancel", id=JOB_ID)], CLIENT_TO_NODE),
    ],
    ids=["result-to-node", "submit-to-client", "deliver-to-relay", "inner-on-the-wire"],
)
def test_type_of_another_direction_is_rejected(frames, accept):
    error = rejected(frames, accept)
    assert "unexpected message type" in str(error)


def test_unknown_field_is_rejected_by_name():
    error = rejected([header(t="cancel", id=JOB_ID, priority=9)])
    assert "cancel: unknown field 'priority'" in str(error)


def test_missing_required_field_is_rejected_by_name():
    error = rejected([submit_header(kind=...), b""])
    assert "submit.kind: expected" in str(error)


@pytest.mark.parametrize(
    "field,value",
    [
        ("kind", 5),
        ("kind", "Not A Kind"),
        ("to", "not-a-peer"),
        ("timeout", "soon"),
        ("timeout", -1),
        ("timeout", float("inf")),
        ("timeout", True),
    ],
)
def test_field_of_wrong_type_or_value_is_rejected(field, value):
    error = rejected([submit_header(**{field: value}), b""])
    assert f"submit.{field}: expected" in str(error)


@pytest.mark.parametrize("length", [0, 15, 17, 32])
def test_job_id_of_wrong_length_is_rejected(length):
    error = rejected([header(t="cancel", id=b"\x01" * length)])
    assert "cancel.id: expected a byte string of 16 bytes" in str(error)
    assert error.ref is None


def test_job_id_as_text_is_rejected():
    error = rejected([header(t="cancel", id=JOB_ID.hex()[:16])])
    assert "cancel.id" in str(error)


def test_header_over_the_limit_is_too_large_before_decoding():
    error = rejected([b"\x00" * (MAX_HEADER_BYTES + 1), b""], NODE_TO_CLIENT, error=MessageTooLarge)
    assert str(MAX_HEADER_BYTES) in str(error)
    assert error.code == "too_large"


@pytest.mark.parametrize("table", [CLIENT_TO_NODE, NODE_TO_RELAY], ids=lambda t: t.name)
def test_links_that_carry_no_lists_take_smaller_headers(table):
    assert table.header_bytes < MAX_HEADER_BYTES
    error = rejected([b"\x00" * (table.header_bytes + 1), b""], table, error=MessageTooLarge)
    assert str(table.header_bytes) in str(error)


def test_header_at_the_limit_is_not_too_large():
    fields = {"v": PROTOCOL_VERSION, "t": "status_reply", "info": {"pad": []}}
    while len(cbor2.dumps(fields)) + 4100 < MAX_HEADER_BYTES:
        fields["info"]["pad"].append("x" * 4000)
    fields["info"]["pad"].append("x" * (MAX_HEADER_BYTES - len(cbor2.dumps(fields)) - 3))
    data = cbor2.dumps(fields)
    while len(data) > MAX_HEADER_BYTES:  # the last text's length prefix grew
        fields["info"]["pad"][-1] = fields["info"]["pad"][-1][:-1]
        data = cbor2.dumps(fields)
    assert len(data) == MAX_HEADER_BYTES
    assert decode([data], NODE_TO_CLIENT, max_body=MAX_BODY).info["pad"]


def test_body_over_max_body_is_too_large():
    error = rejected([submit_header(), b"x" * 101], max_body=100, error=MessageTooLarge)
    assert "101" in str(error) and "100" in str(error)


def test_body_at_max_body_is_accepted():
    assert decode([submit_header(), b"x" * 100], CLIENT_TO_NODE, max_body=100).body == b"x" * 100


def test_missing_required_body_is_rejected():
    error = rejected([submit_header()])
    assert "submit must have a body frame" in str(error)


def test_body_where_none_is_allowed_is_rejected():
    error = rejected([header(t="cancel", id=JOB_ID), b""])
    assert "cancel takes no body frame" in str(error)


@pytest.mark.parametrize("count", [0, 3])
def test_zero_or_three_frames_are_rejected(count):
    frames = [submit_header(), b"", b""][:count]
    error = rejected(frames)
    assert f"got {count}" in str(error)


def test_rejection_of_submit_with_valid_id_carries_the_id_as_ref():
    error = rejected([submit_header(kind="NOT VALID"), b""])
    assert error.ref == JOB_ID


def test_rejection_of_submit_without_body_carries_the_id_as_ref():
    assert rejected([submit_header()]).ref == JOB_ID


def test_rejection_without_readable_id_has_no_ref():
    assert rejected([submit_header(id=b"short", kind="NOT VALID"), b""]).ref is None


def test_timeout_too_large_for_a_float_is_a_remote_protocol_error():
    rejected([submit_header(timeout=2**1100), b""])


def test_kind_with_trailing_newline_is_rejected():
    rejected([submit_header(kind="echo\n"), b""])


# -- decode_inner --


def test_decode_inner_rejects_frame_message_types():
    with pytest.raises(RemoteProtocolError, match="unexpected message type 'submit'"):
        decode_inner(submit_header(), NODE_TO_NODE, max_size=MAX_BODY)


def test_decode_inner_enforces_max_size():
    data = encode_inner(Job(id=JOB_ID, kind="echo", timeout=1.0, payload=b"x" * 200))
    with pytest.raises(MessageTooLarge):
        decode_inner(data, NODE_TO_NODE, max_size=len(data) - 1)
    assert decode_inner(data, NODE_TO_NODE, max_size=len(data)).payload == b"x" * 200


def test_decode_inner_rejects_garbage_with_remote_protocol_error():
    with pytest.raises(RemoteProtocolError, match="sealed message is not valid CBOR"):
        decode_inner(b"\xff", NODE_TO_NODE, max_size=MAX_BODY)


def test_only_a_submit_rejection_carries_its_id_as_ref():
    # Any other message naming a job (a cancel, a sealed job) must not end that job by
    # being invalid: only a submit's own refusal is that job's terminal status.
    job = {"v": PROTOCOL_VERSION, "t": "job", "sid": 1, "ctr": 1, "id": JOB_ID, "kind": "echo", "timeout": 0}
    data = cbor2.dumps({**job, "payload": b""})
    with pytest.raises(RemoteProtocolError, match="job.timeout") as info:
        decode_inner(data, NODE_TO_NODE, max_size=MAX_BODY)
    assert info.value.ref is None
    cancel = cbor2.dumps({"v": PROTOCOL_VERSION, "t": "cancel", "id": JOB_ID, "extra": 1})
    with pytest.raises(RemoteProtocolError) as info:
        decode([cancel], CLIENT_TO_NODE, max_body=MAX_BODY)
    assert info.value.ref is None


def test_decode_inner_job_timeout_too_large_for_a_float_is_a_remote_protocol_error():
    data = cbor2.dumps(
        {"v": PROTOCOL_VERSION, "t": "job", "id": JOB_ID, "kind": "echo", "timeout": 2**1100, "payload": b""}
    )
    with pytest.raises(RemoteProtocolError):
        decode_inner(data, NODE_TO_NODE, max_size=MAX_BODY)


# -- validate --


def test_validate_accepts_a_good_submit():
    validate(Submit(id=JOB_ID, kind="echo", body=PAYLOAD, to=PEER, timeout=3))


@pytest.mark.parametrize(
    "message,field",
    [
        (Submit(id=JOB_ID, kind="echo", to="z6MkNotAPeer"), "to"),
        (Submit(id=JOB_ID, kind="Echo Job"), "kind"),
        (Submit(id=JOB_ID, kind=""), "kind"),
        (Submit(id=b"short", kind="echo"), "id"),
        (Submit(id=JOB_ID, kind="echo", timeout=0), "timeout"),
        (Cancel(id=b""), "id"),
    ],
)
def test_validate_raises_local_protocol_error_naming_the_field(message, field):
    with pytest.raises(LocalProtocolError) as info:
        validate(message)
    assert f"{message.TYPE}.{field}" in str(info.value)
    assert "expected" in str(info.value)
    assert not isinstance(info.value, RemoteProtocolError)


@settings(max_examples=60, deadline=None)
@given(
    size=st.sampled_from([0, 23, 24, 255, 256, 65_535, 65_536, 70_000, 300_000]),
    wrap=st.sampled_from([bytes, bytearray, memoryview]),
    succeeded=st.booleans(),
)
def test_inner_parts_join_to_exactly_the_cbor_of_the_message(size: int, wrap: Any, succeeded: bool) -> None:
    """The pieces the sealer copies (a large payload left as its own buffer) are the
    same bytes as one CBOR map of the message, whatever buffer type the payload is."""
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    job = Job(id=JOB_ID, kind="echo", timeout=1.5, payload=wrap(data))
    result = JobResult(
        id=JOB_ID, job_seq=1, status="succeeded" if succeeded else "failed", result=wrap(data) if succeeded else None
    )
    for message, plain in (
        (job, replace(job, payload=data)),
        (result, replace(result, result=data if succeeded else None)),
    ):
        parts = encode_inner_parts(message)
        assert b"".join(bytes(p) for p in parts) == cbor2.dumps({"v": 1, "t": message.TYPE, **plain.header_fields()})
        if size >= 65_536 and (message is job or succeeded):
            assert any(p is data or (isinstance(p, memoryview) and len(p) == size) for p in parts)  # not copied
        assert decode_inner(b"".join(bytes(p) for p in parts), NODE_TO_NODE, max_size=1 << 20) == plain


# -- a message's bulk field apart (a direct link's [parts, ...]) --


BIG = bytes(range(256)) * (BULK_BYTES // 256)
LIMIT = 4 * BULK_BYTES


@pytest.mark.parametrize(
    "message",
    [
        Job(id=JOB_ID, kind="echo", timeout=5.0, payload=BIG, sid=7, ctr=3, seq=2, ack=1),
        JobResult(id=JOB_ID, job_seq=4, status="succeeded", result=BIG, sid=7, ctr=9, seq=5),
    ],
)
def test_a_bulk_field_apart_decodes_to_the_same_message_without_a_copy(message: Any) -> None:
    split = split_bulk(message)
    assert split is not None
    header, name, bulk = split
    assert bulk is getattr(message, name) and len(header) < 200  # the payload is not in it
    decoded = decode_inner_split(header, name, bulk, NODE_TO_NODE, max_size=LIMIT)
    value = getattr(decoded, name)
    assert isinstance(value, memoryview) and value.obj is bulk  # the frame itself, no copy
    assert bytes(value) == BIG
    assert replace(decoded, **{name: bytes(value)}) == message
    assert decode_inner(encode_inner(message), NODE_TO_NODE, max_size=LIMIT) == message


def test_small_payloads_and_other_messages_are_not_split() -> None:
    assert split_bulk(Job(id=JOB_ID, kind="echo", timeout=5.0, payload=b"x" * (BULK_BYTES - 1), sid=7)) is None
    assert split_bulk(JobResult(id=JOB_ID, job_seq=4, status="failed", sid=7)) is None
    assert split_bulk(PeerAck(sid=7, ack=3)) is None


def test_a_bulk_field_apart_is_checked_as_the_whole_message_would_be() -> None:
    job = Job(id=JOB_ID, kind="echo", timeout=5.0, payload=BIG, sid=7, ctr=3, seq=2)
    header, name, bulk = split_bulk(job)  # type: ignore[misc]
    with pytest.raises(RemoteProtocolError, match="does not belong"):
        decode_inner_split(header, "result", bulk, NODE_TO_NODE, max_size=LIMIT)  # not a job's bulk field
    whole = cbor2.dumps({**cbor2.loads(header), "payload": b"also here"})
    with pytest.raises(RemoteProtocolError, match="does not belong"):
        decode_inner_split(whole, name, bulk, NODE_TO_NODE, max_size=LIMIT)  # the field twice
    ack = encode_inner(PeerAck(sid=7, ack=3))
    with pytest.raises(RemoteProtocolError, match="does not belong"):
        decode_inner_split(ack, name, bulk, NODE_TO_NODE, max_size=LIMIT)  # a message with no bulk field
    with pytest.raises(MessageTooLarge):
        decode_inner_split(header, name, bulk, NODE_TO_NODE, max_size=len(BIG))
    bad = cbor2.dumps({**cbor2.loads(header), "kind": "NOT A KIND"})
    with pytest.raises(RemoteProtocolError, match="job.kind"):
        decode_inner_split(bad, name, bulk, NODE_TO_NODE, max_size=LIMIT)
    with pytest.raises(RemoteProtocolError):
        decode_inner_split(b"\xff\x00", name, bulk, NODE_TO_NODE, max_size=LIMIT)
