"""The STUN responder core (meshnet.stun): requests as pystun3 and RFC 5389 clients send
them, answers read back attribute by attribute; no sockets."""

from __future__ import annotations

import ipaddress
import os
import struct

from hypothesis import given
from hypothesis import strategies as st

from meshnet.stun import (
    BINDING_ERROR,
    BINDING_RESPONSE,
    CHANGE_REQUEST,
    CHANGED_ADDRESS,
    MAGIC_COOKIE,
    MAPPED_ADDRESS,
    SOURCE_ADDRESS,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    StunResponder,
)

IP1, IP2, PORT1, PORT2 = "198.51.100.1", "198.51.100.2", 3478, 3479
CLIENT = ("203.0.113.9", 40001)


def request(change: int | None = None, *, cookie: bool = False, attributes: bytes = b"") -> bytes:
    """A binding request as pystun3 writes it (a 16-byte id), or with RFC 5389's cookie."""
    txid = (MAGIC_COOKIE.to_bytes(4, "big") + os.urandom(12)) if cookie else os.urandom(16)
    body = attributes
    if change is not None:
        body += struct.pack("!HHI", CHANGE_REQUEST, 4, change)
    return struct.pack("!HH", 0x0001, len(body)) + txid + body


def attributes(answer: bytes) -> dict[int, bytes]:
    kind, length = struct.unpack_from("!HH", answer)
    assert length == len(answer) - 20
    out, at = {}, 20
    while at < len(answer):
        code, size = struct.unpack_from("!HH", answer, at)
        out[code] = answer[at + 4 : at + 4 + size]
        at += 4 + size + (-size % 4)
    return out


def address(value: bytes, xor_with: bytes | None = None) -> tuple[str, int]:
    family, port = value[1], int.from_bytes(value[2:4], "big")
    raw = value[4:]
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_with, strict=False))
    assert family == (1 if len(raw) == 4 else 2)
    return str(ipaddress.ip_address(raw)), port


def full() -> StunResponder:
    """Two addresses, two ports; the test's clients hold registered relay connections."""
    responder = StunResponder((IP1, PORT1), IP2, PORT2)
    responder.set_members([CLIENT[0], "2001:db8::7"])
    return responder


def test_a_classic_request_gets_the_mapped_source_and_changed_addresses() -> None:
    asked = request()
    reply = full().on_datagram(asked, (IP1, PORT1), CLIENT, 0.0)
    assert reply is not None and (reply.source, reply.to) == ((IP1, PORT1), CLIENT)
    assert struct.unpack_from("!H", reply.data)[0] == BINDING_RESPONSE
    assert reply.data[4:20] == asked[4:20]  # the transaction id, echoed
    found = attributes(reply.data)
    assert address(found[MAPPED_ADDRESS]) == CLIENT
    assert address(found[SOURCE_ADDRESS]) == (IP1, PORT1)
    assert address(found[CHANGED_ADDRESS]) == (IP2, PORT2)
    assert XOR_MAPPED_ADDRESS not in found  # a classic client does not know it


def test_an_rfc5389_request_also_gets_the_xor_mapped_address_ipv4_and_ipv6() -> None:
    for client in (CLIENT, ("2001:db8::7", 50000)):
        asked = request(cookie=True)
        reply = full().on_datagram(asked, (IP1, PORT1), client, 0.0)
        assert reply is not None
        found = attributes(reply.data)
        assert address(found[XOR_MAPPED_ADDRESS], asked[4:20]) == client
        assert address(found[MAPPED_ADDRESS]) == client


def test_change_request_answers_from_the_other_ip_and_or_port() -> None:
    responder = full()
    cases = [
        ((IP1, PORT1), 0x06, (IP2, PORT2)),
        ((IP1, PORT1), 0x04, (IP2, PORT1)),
        ((IP1, PORT1), 0x02, (IP1, PORT2)),
        ((IP2, PORT2), 0x02, (IP2, PORT1)),
        ((IP2, PORT2), 0x06, (IP1, PORT1)),
    ]
    for local, flags, source in cases:
        reply = responder.on_datagram(request(flags), local, CLIENT, 0.0)
        assert reply is not None and reply.source == source, (local, flags)
        assert address(attributes(reply.data)[SOURCE_ADDRESS]) == source
    assert sorted(responder.addresses) == sorted((ip, port) for ip in (IP1, IP2) for port in (PORT1, PORT2))


def test_with_one_address_a_change_it_cannot_make_is_dropped_and_the_rest_answered() -> None:
    responder = StunResponder((IP1, PORT1))
    responder.set_members([CLIENT[0]])
    assert responder.addresses == [(IP1, PORT1)]
    assert responder.on_datagram(request(0x04), (IP1, PORT1), CLIENT, 0.0) is None
    assert responder.on_datagram(request(0x02), (IP1, PORT1), CLIENT, 0.0) is None
    reply = responder.on_datagram(request(), (IP1, PORT1), CLIENT, 0.0)
    assert reply is not None and CHANGED_ADDRESS not in attributes(reply.data)
    assert responder.counts == {"change_unavailable": 2, "answered": 1}


def test_what_is_not_a_binding_request_is_dropped_unanswered() -> None:
    responder = full()
    good = request(0x06)
    bad = [
        b"",
        good[:19],  # shorter than a header
        struct.pack("!HH", 0x0101, 0) + good[4:20],  # a response, not a request
        good[:2] + struct.pack("!H", 12) + good[4:],  # the length disagrees with the bytes
        good[:-1],  # an attribute cut short
        struct.pack("!HH", 0x0001, 4) + good[4:20] + struct.pack("!HH", 0x0003, 8),  # runs past the end
        request(attributes=struct.pack("!HH", CHANGE_REQUEST, 8) + bytes(8)),  # CHANGE-REQUEST of 8 bytes
        request(attributes=struct.pack("!HHI", 0x0002, 4, 0)),  # RESPONSE-ADDRESS: a reflector's tool
        request(attributes=bytes(600)),  # larger than any request
    ]
    for data in bad:
        assert responder.on_datagram(data, (IP1, PORT1), CLIENT, 0.0) is None, data[:24]
    assert responder.counts == {"dropped": len(bad)}


def test_an_rfc5389_request_with_an_unknown_required_attribute_gets_error_420() -> None:
    asked = request(cookie=True, attributes=struct.pack("!HHI", 0x0042, 4, 0))
    reply = full().on_datagram(asked, (IP1, PORT1), CLIENT, 0.0)
    assert reply is not None and struct.unpack_from("!H", reply.data)[0] == BINDING_ERROR
    found = attributes(reply.data)
    assert found[0x0009][2:4] == bytes([4, 20])  # class 4, number 20
    assert found[UNKNOWN_ATTRIBUTES] == b"\x00\x42"


@given(st.binary(max_size=700), st.booleans())
def test_any_datagram_is_answered_small_or_not_at_all(data: bytes, prefixed: bool) -> None:
    if prefixed:  # mostly past the first checks
        data = struct.pack("!HH", 0x0001, max(0, len(data) - 16)) + data
    reply = full().on_datagram(data, (IP1, PORT1), ("2001:db8::7", 50000), 0.0)
    assert reply is None or (reply.to == ("2001:db8::7", 50000) and len(reply.data) <= 104)


def test_the_relay_answers_stun_on_its_bind_ip_unless_told_otherwise() -> None:
    from meshnet.config import StunSection
    from relay_server.stun_server import stun_addresses

    default = StunSection()
    assert stun_addresses(default, "tcp://198.51.100.1:7700") == ["198.51.100.1"]
    assert stun_addresses(default, "tcp://*:7700") == ["0.0.0.0"]
    assert stun_addresses(default, "tcp://relay.example:7700") == ["0.0.0.0"]
    assert stun_addresses(default, "ipc:///tmp/relay") == []
    two = StunSection(addresses=["198.51.100.1", "198.51.100.2"])
    assert stun_addresses(two, "tcp://0.0.0.0:7700") == ["198.51.100.1", "198.51.100.2"]


def test_a_change_request_is_answered_only_for_an_ip_with_a_registered_relay_connection() -> None:
    responder = full()
    stranger = ("203.0.113.50", 40000)
    assert responder.on_datagram(request(0x06), (IP1, PORT1), stranger, 0.0) is None
    assert responder.on_datagram(request(0x02), (IP1, PORT1), stranger, 0.0) is None
    assert responder.on_datagram(request(), (IP1, PORT1), stranger, 0.0) is not None  # a plain binding
    assert responder.counts == {"change_refused": 2, "answered": 1}
    responder.set_members([stranger[0]])
    assert responder.on_datagram(request(0x06), (IP1, PORT1), stranger, 0.0) is not None


def test_each_source_and_the_responder_draw_at_most_their_rate_of_answers() -> None:
    responder = StunResponder((IP1, PORT1), per_source=(5.0, 20), total=(100.0, 200))
    one = [responder.on_datagram(request(), (IP1, PORT1), CLIENT, 0.0) for _ in range(50)]
    assert sum(reply is not None for reply in one) == 20
    assert sum(responder.on_datagram(request(), (IP1, PORT1), CLIENT, 1.0) is not None for _ in range(50)) == 5
    # Spoofed sources, each new: the responder's own bucket holds them to its rate.
    answered = sum(
        responder.on_datagram(request(), (IP1, PORT1), (f"10.{n // 65536}.{n // 256 % 256}.{n % 256}", 1), 2.0)
        is not None
        for n in range(5000)
    )
    assert answered == 200  # the whole burst (refilled by then), no more
    assert responder.counts["rate_limited"] == 30 + 45 + 5000 - answered
