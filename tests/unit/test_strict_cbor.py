"""The strict CBOR decoder: every input costs time and memory linear in its size."""

from __future__ import annotations

import io

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.errors import MessageTooLarge, RemoteProtocolError
from meshnet.protocol import strict_cbor
from meshnet.protocol.strict_cbor import CBOR2_SEMANTIC_TAGS, Limits, count_items, describe, loads, loads_value
from tests.fuzz.cbor_shapes import head

LIMITS = Limits(size=1 << 20, items=1024, depth=12)


def shared_reference_dag(depth: int) -> list:
    """A value that is tiny as CBOR with shared references and 8**depth leaves walked."""
    value: list = [0] * 8
    for _ in range(depth):
        value = [value] * 8
    return value


def refused(data: bytes, limits: Limits = LIMITS) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        loads(data, limits, "header")
    return info.value


@pytest.mark.parametrize("depth", [3, 8, 12])
def test_shared_references_are_refused_while_decoding(depth):
    data = cbor2.dumps({"v": shared_reference_dag(depth), "t": "submit"}, value_sharing=True)
    assert len(data) < 400  # the 217-byte frame of the report is depth 8
    error = refused(data, Limits(size=1 << 20, items=1024, depth=64))
    assert "tags are not allowed" in str(error)


def test_string_references_are_refused():
    data = cbor2.dumps(["a long string that repeats"] * 10, string_referencing=True)
    assert "tags are not allowed" in str(refused(data))


def test_every_tag_is_refused():
    """Every tag cbor2 might decode itself, and every other one up to 2**16 and at the
    top of the range. If a cbor2 release decodes a new tag itself, this fails: add the
    tag to CBOR2_SEMANTIC_TAGS."""
    for tag in [*range(1 << 16), 2**32 - 1, 2**32, 2**63, 2**64 - 1]:
        data = head(6, tag) + b"\x00"
        with pytest.raises(RemoteProtocolError, match="tags are not allowed"):
            loads(data, LIMITS, "header")


def test_cbor2_decodes_only_the_listed_tags_itself():
    called: list[int] = []

    def hook(*args):  # (decoder, tag) in some cbor2 releases, (tag, immutable) in others
        called.extend(a.tag for a in args if isinstance(a, cbor2.CBORTag))
        return None

    decoded_by_cbor2 = []
    for tag in range(1 << 16):
        before = len(called)
        try:
            cbor2.CBORDecoder(io.BytesIO(head(6, tag) + b"\x00"), tag_hook=hook).decode()
        except Exception:
            pass
        if len(called) == before:
            decoded_by_cbor2.append(tag)
    assert sorted(decoded_by_cbor2) == sorted(CBOR2_SEMANTIC_TAGS)


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"\x9f\x00\xff", "indefinite"),  # indefinite array
        (b"\x5f\x41a\xff", "indefinite"),  # indefinite byte string
        (b"\xa1\x01\x02", "text string or byte string"),  # integer map key
        (b"\xa1\x81\x00\x02", "text string or byte string"),  # array as a key
        (b"\xa2\x61a\x01\x61a\x02", "Duplicate"),
        (b"\x81" * 13 + b"\x00", "nests deeper than 12"),
        (b"\x9b" + (2**40).to_bytes(8, "big"), "ends early"),  # 2**40 items declared, none sent
        (b"\x5b" + (2**40).to_bytes(8, "big"), "ends early"),
        (b"\x01\x02", "after its CBOR item"),
        (b"", "ends early"),
        (b"\xfc", "not valid CBOR"),  # reserved simple value encoding
    ],
)
def test_malformed_or_disallowed_shapes_get_one_typed_error(data, expected):
    assert expected in str(refused(data))


def test_a_frame_larger_than_its_item_budget_is_counted_before_anything_is_built():
    many = head(4, 5000) + b"\xa0" * 5000  # five thousand empty maps: 5 KB
    error = refused(many)
    assert "more than 1024 items" in str(error)
    assert loads(many, Limits(size=1 << 20, items=5001, depth=12), "x") == [{}] * 5000


def test_declared_lengths_longer_than_the_frame_stop_the_count_at_once():
    frame = head(4, 2**40) + b"\x00" * 2000
    with pytest.raises(RemoteProtocolError, match="declares more items than fit"):
        count_items(frame, 1024, 12)
    frame = head(2, 2**40) + b"\x00" * 2000
    with pytest.raises(RemoteProtocolError, match="longer than what is left"):
        count_items(frame, 1024, 12)


def test_a_tag_deep_in_a_large_frame_is_refused_by_the_count():
    frame = cbor2.dumps({"pad": "x" * 5000, "v": cbor2.CBORTag(28, [1])})
    with pytest.raises(RemoteProtocolError, match="tags are not allowed"):
        count_items(frame, 1024, 12)
    assert "tags are not allowed" in str(refused(frame))


def test_size_is_checked_before_decoding():
    with pytest.raises(MessageTooLarge, match="the limit is 10"):
        loads(b"\x00" * 11, Limits(size=10, items=10, depth=4), "header")


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=50)
    | st.binary(max_size=50),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=40,
)


def items_in(value) -> int:
    if isinstance(value, list):
        return 1 + sum(items_in(v) for v in value)
    if isinstance(value, dict):
        return 1 + sum(1 + items_in(v) for v in value.values())
    return 1


@settings(max_examples=300, deadline=None)
@given(plain)
def test_count_items_counts_every_key_value_and_element(value):
    data = cbor2.dumps(value)
    assert count_items(data, 1 << 20, 64) == items_in(value)
    with pytest.raises(RemoteProtocolError):
        count_items(data, items_in(value) - 1, 64)


@settings(max_examples=300, deadline=None)
@given(plain)
def test_plain_values_round_trip(value):
    data = cbor2.dumps(value)
    decoded = loads_value(data)
    assert cbor2.dumps(decoded) == data
    assert cbor2.dumps(loads_value(bytearray(data))) == data


def test_large_buffers_are_read_in_place():
    data = bytearray(cbor2.dumps({"payload": b"x" * (strict_cbor.IN_PLACE_BYTES + 1)}))
    assert loads_value(memoryview(data)) == {"payload": b"x" * (strict_cbor.IN_PLACE_BYTES + 1)}


def test_payload_values_refuse_tags_and_integer_keys():
    with pytest.raises(RemoteProtocolError, match="tags"):
        loads_value(cbor2.dumps(cbor2.CBORTag(1, 0)))
    with pytest.raises(RemoteProtocolError, match="text string or byte string"):
        loads_value(cbor2.dumps({1: "a"}))


@pytest.mark.parametrize(
    "value, shown",
    [
        (None, "None"),
        (True, "True"),
        (7, "7"),
        (2**100, "a very large integer"),
        (1.5, "1.5"),
        ("ping", "'ping'"),
        ("x" * 10_000, "'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (10000 characters)"),
        (b"\x00" * 10, "a byte string of 10 bytes"),
        ([1] * 10**6, "an array of 1000000 items"),
        ({"a": 1}, "a map of 1 entries"),
        (cbor2.CBORTag(1, 2), "a value of type CBORTag"),
    ],
)
def test_describe_never_formats_a_whole_value(value, shown):
    assert describe(value) == shown


@pytest.mark.parametrize("data", ["f8fc", "e0", "f3", "f7", "a26464617461f066726f756e647302", "8201f7"])
def test_payload_values_refuse_simple_values_but_false_true_and_null(data):
    with pytest.raises(RemoteProtocolError, match="simple values"):
        loads_value(bytes.fromhex(data))


def test_bytes_that_look_like_simple_values_inside_strings_are_plain():
    value = [b"\xf7\xe0\xf8", "\u00f7", True, None, 1.5]
    assert loads_value(cbor2.dumps(value)) == value
