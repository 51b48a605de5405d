"""Property tests: whatever bytes a peer sends, decoding either yields a valid message of
an accepted type or raises RemoteProtocolError (MessageTooLarge for size), nothing else.

Integers include bignums far past a float's range: a number too large for a float
must be refused like any other bad value.
"""

from __future__ import annotations

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.errors import RemoteProtocolError
from meshnet.protocol import NODE_TO_NODE, PROTOCOL_VERSION, STATUSES, decode, decode_inner, encode, encode_inner

from .samples import FRAME_DIRECTIONS, JOB_ID, MAX_BODY, PEER, SAMPLES, TABLES

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FIELD_NAMES = sorted(
    {"v", "t", "body", *(name for table in TABLES.values() for cls in table.values() for name in cls.RULES)}
)
TYPE_NAMES = sorted({name for table in TABLES.values() for name in table})

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**1100), max_value=2**1100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=24),
    st.binary(max_size=24),
    st.sampled_from(TYPE_NAMES),
)
keys = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8), st.integers(-5, 5), st.binary(max_size=4))
cbor_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=16,
)
bodies = st.one_of(st.none(), st.binary(max_size=64))

FRAME_SAMPLES = [(d, m) for d in FRAME_DIRECTIONS for m in SAMPLES[d]]
INNER_SAMPLES = SAMPLES["NODE_TO_NODE"]
mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=1 << 20),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


def decodes_or_refuses(frames, accept):
    """Decode; a RemoteProtocolError is a refusal, any other exception fails the test."""
    try:
        message = decode(frames, accept, max_body=MAX_BODY)
    except RemoteProtocolError:
        return None
    assert accept.get(type(message).TYPE) is type(message)
    return message


def inner_decodes_or_refuses(data):
    try:
        message = decode_inner(data, NODE_TO_NODE, max_size=MAX_BODY)
    except RemoteProtocolError:
        return None
    assert NODE_TO_NODE.get(type(message).TYPE) is type(message)
    return message


def frames_of(header, body):
    return [header] if body is None else [header, body]


def mutate(data: bytes, ops) -> bytes:
    buf = bytearray(data)
    for op, position, byte in ops:
        if op == "flip" and buf:
            buf[position % len(buf)] ^= 1 << (byte % 8)
        elif op == "insert":
            buf.insert(position % (len(buf) + 1), byte)
        elif op == "delete" and buf:
            del buf[position % len(buf)]
        elif op == "truncate":
            del buf[position % (len(buf) + 1) :]
    return bytes(buf)


# -- random bytes --


@pytest.mark.parametrize("direction", FRAME_DIRECTIONS)
@PROPERTY
@given(header=st.binary(max_size=256), body=bodies)
def test_random_bytes_only_raise_remote_protocol_error(direction, header, body):
    decodes_or_refuses(frames_of(header, body), TABLES[direction])


@PROPERTY
@given(data=st.binary(max_size=256))
def test_random_bytes_inner_only_raise_remote_protocol_error(data):
    inner_decodes_or_refuses(data)


# -- random CBOR values --


@pytest.mark.parametrize("direction", FRAME_DIRECTIONS)
@PROPERTY
@given(value=cbor_values, body=bodies)
def test_random_cbor_values_only_raise_remote_protocol_error(direction, value, body):
    decodes_or_refuses(frames_of(cbor2.dumps(value), body), TABLES[direction])


@PROPERTY
@given(value=cbor_values)
def test_random_cbor_values_inner_only_raise_remote_protocol_error(value):
    inner_decodes_or_refuses(cbor2.dumps(value))


#: values that pass some field's rule, so that random maps get past the first checks
plausible = st.one_of(
    st.sampled_from([JOB_ID, PEER, "echo", "succeeded", "job", "tcp://1.2.3.4:5", 1, 2.5, {"message": "m"}, {}, []]),
    st.sampled_from(STATUSES),
    st.binary(min_size=16, max_size=16),
)
field_values = st.one_of(
    plausible,
    scalars,
    st.lists(st.one_of(plausible, scalars), max_size=3),
    st.dictionaries(
        st.one_of(st.sampled_from(["type", "message", "reason"]), st.text(max_size=6)), scalars, max_size=3
    ),
)


@st.composite
def message_shaped(draw):
    """A map with a known type name and a random subset of that type's fields (plus maybe a stray one)."""
    type_name = draw(st.sampled_from(TYPE_NAMES))
    cls = next(table[type_name] for table in TABLES.values() if type_name in table)
    names = draw(st.lists(st.sampled_from(sorted(cls.RULES)), unique=True)) if cls.RULES else []
    if draw(st.integers(0, 9)) == 0:
        names.append(draw(keys))
    fields = {name: draw(field_values) for name in names}
    fields["v"] = draw(st.one_of(st.just(PROTOCOL_VERSION), st.just(PROTOCOL_VERSION), scalars))
    fields["t"] = type_name
    return fields


@pytest.mark.parametrize("direction", FRAME_DIRECTIONS)
@PROPERTY
@given(fields=message_shaped(), body=bodies)
def test_message_shaped_maps_only_raise_remote_protocol_error(direction, fields, body):
    decodes_or_refuses(frames_of(cbor2.dumps(fields), body), TABLES[direction])


@PROPERTY
@given(fields=message_shaped())
def test_message_shaped_maps_inner_only_raise_remote_protocol_error(fields):
    inner_decodes_or_refuses(cbor2.dumps(fields))


# -- mutated valid frames --


@PROPERTY
@given(sample=st.sampled_from(FRAME_SAMPLES), ops=mutations, drop_body=st.booleans())
def test_mutated_valid_headers_only_raise_remote_protocol_error(sample, ops, drop_body):
    direction, message = sample
    frames = encode(message)
    frames[0] = mutate(frames[0], ops)
    if drop_body:
        frames = frames[:1]
    decodes_or_refuses(frames, TABLES[direction])


@PROPERTY
@given(message=st.sampled_from(INNER_SAMPLES), ops=mutations)
def test_mutated_valid_inner_messages_only_raise_remote_protocol_error(message, ops):
    inner_decodes_or_refuses(mutate(encode_inner(message), ops))


# -- one field replaced --


@PROPERTY
@given(sample=st.sampled_from(FRAME_SAMPLES), data=st.data())
def test_valid_header_with_one_field_replaced_decodes_or_raises_remote_protocol_error(sample, data):
    direction, message = sample
    frames = encode(message)
    fields = cbor2.loads(frames[0])
    key = data.draw(st.one_of(st.sampled_from(sorted(fields)), keys), label="key")
    fields[key] = data.draw(cbor_values, label="value")
    frames[0] = cbor2.dumps(fields)
    decoded = decodes_or_refuses(frames, TABLES[direction])
    if decoded is not None and key not in ("v", "t"):
        assert type(decoded) is type(message)


@PROPERTY
@given(message=st.sampled_from(INNER_SAMPLES), data=st.data())
def test_valid_inner_message_with_one_field_replaced_decodes_or_raises_remote_protocol_error(message, data):
    fields = cbor2.loads(encode_inner(message))
    key = data.draw(st.one_of(st.sampled_from(sorted(fields)), keys), label="key")
    fields[key] = data.draw(cbor_values, label="value")
    decoded = inner_decodes_or_refuses(cbor2.dumps(fields))
    if decoded is not None and key not in ("v", "t"):
        assert type(decoded) is type(message)


# -- sanity: the properties can see a success --


@pytest.mark.parametrize("direction,message", FRAME_SAMPLES, ids=lambda v: v if isinstance(v, str) else v.TYPE)
def test_unmutated_samples_decode(direction, message):
    assert decodes_or_refuses(encode(message), TABLES[direction]) == message
