"""The direct-link codec (meshnet.protocol.direct, docs/protocol.md §7.8): what a node
sends decodes to what it meant, whatever else arrives is refused with a typed error, and
the messages a link carries are validated as opened sealed boxes are."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshnet.errors import LocalProtocolError, RemoteProtocolError
from meshnet.protocol import NODE_TO_NODE, encode_inner, split_bulk
from meshnet.protocol.codec import BULK_BYTES
from meshnet.protocol.direct import (
    MAX_BATCH_READ,
    MAX_FRAMES,
    OUR_HI,
    Boxes,
    Bye,
    Hi,
    Parts,
    Ping,
    Pong,
    box_frames,
    carried,
    decode_carried,
    decode_link,
    parts_frames,
)
from meshnet.protocol.messages import Job
from tests.unit.samples import SAMPLES

INNER = [encode_inner(message) for message in SAMPLES["NODE_TO_NODE"]]
MAX_SIZE = 1 << 24

buffers = st.one_of(
    st.binary(max_size=64), st.binary(max_size=64).map(bytearray), st.binary(max_size=64).map(memoryview)
)


@given(st.booleans(), st.booleans())
def test_a_hi_says_what_its_sender_reads(batches: bool, parts: bool) -> None:
    hi = Hi(batches=batches, parts=parts)
    assert decode_link(hi.frames()) == hi
    assert decode_link(OUR_HI.frames()) == Hi(True, True)


def test_a_hi_ignores_words_it_does_not_know_and_refuses_features_too_long_to_be_words() -> None:
    assert decode_link([b"hi", b"future  parts\tboxes later"]) == Hi(batches=True, parts=True)
    assert decode_link([b"hi", b"\xff\xfe"]) == Hi()
    with pytest.raises(RemoteProtocolError, match="features are at most"):
        decode_link([b"hi", b"boxes " * 60])


@given(st.lists(st.sampled_from(INNER), min_size=1, max_size=MAX_BATCH_READ))
def test_boxes_carry_their_messages_in_order_each_decoded_as_sent(messages: list[bytes]) -> None:
    link = decode_link(box_frames(messages))
    assert isinstance(link, Boxes) and list(link.messages) == messages
    decoded = [decode_carried(item, NODE_TO_NODE, max_size=MAX_SIZE) for item in carried(link)]
    assert [encode_inner(m) for m in decoded] == messages


def test_a_batch_past_what_a_node_reads_is_refused_whole() -> None:
    with pytest.raises(RemoteProtocolError, match="at most"):
        decode_link([b"boxes", *INNER[:1] * (MAX_BATCH_READ + 1)])
    with pytest.raises(LocalProtocolError):
        box_frames(INNER[:1] * (MAX_BATCH_READ + 1))


def test_a_payload_in_parts_is_the_same_job_without_a_copy() -> None:
    payload = bytes(range(256)) * (BULK_BYTES // 256 + 1)
    job = Job(sid=7, ctr=3, seq=1, id=b"j" * 16, kind="echo", timeout=5.0, payload=payload)
    split = split_bulk(job)
    assert split is not None
    link = decode_link(parts_frames(*split))
    assert isinstance(link, Parts) and link.field == "payload"
    (item,) = carried(link)
    decoded = decode_carried(item, NODE_TO_NODE, max_size=MAX_SIZE)
    assert encode_inner(decoded) == encode_inner(job)


@pytest.mark.parametrize(
    ("frames", "why"),
    [
        ([], "at least one frame"),
        ([b"box"], "cannot have 0 frames"),
        ([b"box", b"a", b"b"], "cannot have 2 frames"),
        ([b"boxes"], "cannot have 0 frames"),
        ([b"ping", b"x"], "cannot have 1 frames"),
        ([b"hi", b"a", b"b"], "cannot have 2 frames"),
        ([b"parts", b"payload", b"m"], "cannot have 2 frames"),
        ([b"parts", b"", b"m", b"b"], "field name is 1 to"),
        ([b"parts", b"pay load", b"m", b"b"], "letters, digits"),
        ([b"parts", "résult".encode(), b"m", b"b"], "letters, digits"),
        ([b"BOX", b"m"], "not a link message"),
        ([b"box\x00", b"m"], "not a link message"),
        ([b"x" * 1000], "not a link message"),
        ([b"ping"] * (MAX_FRAMES + 1), "at most"),
    ],
)
def test_what_is_no_link_message_is_refused_saying_why(frames: list[bytes], why: str) -> None:
    with pytest.raises(RemoteProtocolError, match=why):
        decode_link(frames)


def test_control_words_are_one_frame_each() -> None:
    assert [decode_link([word]) for word in (b"ping", b"pong", b"bye")] == [Ping(), Pong(), Bye()]
    assert carried(Ping()) == ()


def test_a_bulk_field_that_is_not_the_messages_own_is_refused() -> None:
    job_result = next(m for m in SAMPLES["NODE_TO_NODE"] if m.TYPE == "job_result")
    data = encode_inner(job_result)
    with pytest.raises(RemoteProtocolError, match="does not belong"):
        decode_carried(Parts("payload", data, b"x"), NODE_TO_NODE, max_size=MAX_SIZE)


@given(st.lists(buffers, max_size=MAX_FRAMES + 2))
def test_any_frames_decode_to_a_link_message_or_a_typed_error(frames: list[Any]) -> None:
    try:
        link = decode_link(frames)
    except RemoteProtocolError:
        return
    for item in carried(link):
        try:
            decode_carried(item, NODE_TO_NODE, max_size=MAX_SIZE)
        except RemoteProtocolError:
            pass
