"""A STUN binding responder, sans-IO: datagrams in, datagrams out.

The relay answers STUN binding requests so that nodes can learn their public address and
classify their NAT against it (with pystun3, or any STUN client), no third-party server
needed. It speaks both generations of the protocol:

- RFC 3489 ("classic"), as pystun3 and other NAT classifiers use it: ``MAPPED-ADDRESS``,
  ``SOURCE-ADDRESS`` (where the answer comes from), ``CHANGED-ADDRESS`` (the other
  address and port), and ``CHANGE-REQUEST``: the answer comes from the other address
  and/or port, which tells a full-cone NAT from a restricted one. That needs two
  addresses and two ports: with fewer, a request for a change it cannot make is dropped,
  as a classic server without them would (a client then times out and reads "blocked"
  for that test; an error answer would make pystun3 ask again for ever).
- RFC 5389 (a request whose transaction id starts with the magic cookie): the same, plus
  ``XOR-MAPPED-ADDRESS``, which middleboxes that rewrite addresses in payloads leave alone.

Anything that is not a well-formed binding request is dropped unanswered and counted, and
requests over ``MAX_REQUEST_BYTES`` are not read. A UDP answer goes to whatever source
the datagram claims, so the responder must not be a reflector a forger can aim:

- a success answer is at most 68 bytes (IPv4; 104 for IPv6) against a request of at
  least 20, and goes only to the request's own source;
- every datagram takes a token from its source IP's bucket (``PER_SOURCE_RATE``) and from
  the responder's (``TOTAL_RATE``) before it is even parsed: one without is dropped, so a
  flood of spoofed requests draws at most ``TOTAL_RATE`` answers a second, whatever
  sources it claims, and no one source more than ``PER_SOURCE_RATE``;
- ``CHANGE-REQUEST`` (an answer from another address or port, which gets past filters
  that expect answers from where the request went) is honoured only for a source IP that
  holds a registered relay connection (:meth:`StunResponder.set_members`): the nodes
  that classify their NAT against this relay. Anyone else gets no answer to it, as from a
  server without a second address.
"""

from __future__ import annotations

import ipaddress
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from meshnet.ratelimit import SourceBuckets, TokenBucket

#: RFC 5389 §6: the fixed value in bytes 4-8 of every RFC 5389 message.
MAGIC_COOKIE = 0x2112A442
HEADER_BYTES = 20
#: RFC 5389 §7.1: a request over UDP fits the path MTU; 548 bytes is the IPv4 minimum
#: reassembly size less headers. Nothing a binding request needs comes close.
MAX_REQUEST_BYTES = 548

BINDING_REQUEST = 0x0001
BINDING_RESPONSE = 0x0101
BINDING_ERROR = 0x0111

MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
SOURCE_ADDRESS = 0x0004
CHANGED_ADDRESS = 0x0005
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
XOR_MAPPED_ADDRESS = 0x0020
#: RFC 5389's attributes a binding request may carry that this responder ignores
#: (FINGERPRINT is checked by nobody here; SOFTWARE is informational). RFC 3489 clients
#: send only CHANGE-REQUEST (and, from old clients, RESPONSE-ADDRESS, refused: it asks
#: for an answer to a third address, which is how a reflector is made).
IGNORED = {0x8022, 0x8028}

CHANGE_IP = 0x04
CHANGE_PORT = 0x02

#: Answers one source IP draws a second, after a burst: a NAT classification (RFC 3489's
#: tests, a few requests each, retried) needs about ten at once.
PER_SOURCE_RATE = 5.0
PER_SOURCE_BURST = 20
#: Answers the responder sends a second in all, after a burst: room for a few hundred
#: nodes classifying at once (a relay restart), and a bound on what spoofed requests draw.
TOTAL_RATE = 200.0
TOTAL_BURST = 400

Address = tuple[str, int]


class StunError(ValueError):
    """A datagram that is not a binding request this responder answers."""


@dataclass(frozen=True)
class BindingRequest:
    #: All 16 bytes after the length: the magic cookie and the 12-byte id (RFC 5389), or
    #: the 16-byte id of RFC 3489.
    transaction_id: bytes
    change_ip: bool = False
    change_port: bool = False
    #: Comprehension-required attributes this responder does not know (RFC 5389 only).
    unknown: tuple[int, ...] = ()

    @property
    def rfc5389(self) -> bool:
        return self.transaction_id[:4] == MAGIC_COOKIE.to_bytes(4, "big")


def parse_request(data: bytes) -> BindingRequest:
    """``data`` as a binding request; :class:`StunError` when it is anything else."""
    if len(data) < HEADER_BYTES or len(data) > MAX_REQUEST_BYTES:
        raise StunError(f"{len(data)} bytes is not the size of a STUN binding request")
    kind, length = struct.unpack_from("!HH", data)
    if kind != BINDING_REQUEST:
        raise StunError(f"message type 0x{kind:04x} is not a binding request")
    if length != len(data) - HEADER_BYTES or length % 4:
        raise StunError(f"length {length} does not match the {len(data) - HEADER_BYTES} bytes after the header")
    request = BindingRequest(bytes(data[4:HEADER_BYTES]))
    change = 0
    unknown: list[int] = []
    at = HEADER_BYTES
    while at < len(data):
        if at + 4 > len(data):
            raise StunError("an attribute header runs past the end")
        attribute, size = struct.unpack_from("!HH", data, at)
        at += 4
        if at + size > len(data):
            raise StunError(f"attribute 0x{attribute:04x} runs past the end")
        value = data[at : at + size]
        at += (size + 3) & ~3  # RFC 5389 pads to 4 bytes; RFC 3489's sizes are multiples of 4
        if attribute == CHANGE_REQUEST:
            if size != 4:
                raise StunError(f"CHANGE-REQUEST of {size} bytes")
            change = int.from_bytes(value, "big")
        elif attribute < 0x8000 and attribute not in IGNORED:
            unknown.append(attribute)
    if unknown and not request.rfc5389:
        raise StunError("RFC 3489 request with attributes this responder does not answer: " + _hex(unknown))
    return BindingRequest(
        request.transaction_id, bool(change & CHANGE_IP), bool(change & CHANGE_PORT), tuple(unknown[:8])
    )


def _hex(codes: list[int]) -> str:
    return ", ".join(f"0x{code:04x}" for code in codes)


def _address_value(address: Address, xor_with: bytes | None = None) -> bytes:
    ip = ipaddress.ip_address(address[0])
    raw = ip.packed
    port = address[1]
    if xor_with is not None:
        port ^= MAGIC_COOKIE >> 16
        raw = bytes(a ^ b for a, b in zip(raw, xor_with, strict=False))
    return struct.pack("!BBH", 0, 1 if ip.version == 4 else 2, port) + raw


def _attribute(kind: int, value: bytes) -> bytes:
    return struct.pack("!HH", kind, len(value)) + value + b"\0" * (-len(value) % 4)


def binding_response(
    request: BindingRequest, mapped: Address, source: Address | None, changed: Address | None
) -> bytes:
    """The success answer to ``request`` from a client seen at ``mapped``, sent from
    ``source`` (None: not known), naming ``changed`` as the other address (None: none)."""
    body = _attribute(MAPPED_ADDRESS, _address_value(mapped))
    if request.rfc5389:
        body += _attribute(XOR_MAPPED_ADDRESS, _address_value(mapped, request.transaction_id))
    if source is not None:
        body += _attribute(SOURCE_ADDRESS, _address_value(source))
    if changed is not None:
        body += _attribute(CHANGED_ADDRESS, _address_value(changed))
    return struct.pack("!HH", BINDING_RESPONSE, len(body)) + request.transaction_id + body


def unknown_attributes_response(request: BindingRequest) -> bytes:
    """RFC 5389 §7.3.1: error 420 naming the comprehension-required attributes not known."""
    reason = b"Unknown Attribute"
    error = _attribute(ERROR_CODE, struct.pack("!HBB", 0, 4, 20) + reason)
    listed = b"".join(struct.pack("!H", code) for code in request.unknown)
    body = error + _attribute(UNKNOWN_ATTRIBUTES, listed)
    return struct.pack("!HH", BINDING_ERROR, len(body)) + request.transaction_id + body


@dataclass(frozen=True)
class Reply:
    """Send ``data`` to ``to`` from the socket bound at ``source``."""

    source: Address
    to: Address
    data: bytes


class StunResponder:
    """Answers binding requests arriving on the sockets bound at ``primary`` and, when
    given, at the other IP ``alternate_ip`` and the other port ``alternate_port`` (every
    combination of the two IPs and two ports: the daemon binds one socket for each of
    :attr:`addresses`)."""

    def __init__(
        self,
        primary: Address,
        alternate_ip: str | None = None,
        alternate_port: int | None = None,
        *,
        per_source: tuple[float, float] = (PER_SOURCE_RATE, PER_SOURCE_BURST),
        total: tuple[float, float] = (TOTAL_RATE, TOTAL_BURST),
    ):
        self.primary = primary
        ips = [primary[0]] + ([alternate_ip] if alternate_ip else [])
        ports = [primary[1]] + ([alternate_port] if alternate_port else [])
        self.addresses: list[Address] = [(ip, port) for ip in ips for port in ports]
        self._ips, self._ports = ips, ports
        #: The address classic clients are told to try next: both changed, when both exist.
        self.changed: Address | None = (ips[-1], ports[-1]) if len(ips) == 2 and len(ports) == 2 else None
        self.counts: Counter[str] = Counter()
        self.sources = SourceBuckets(*per_source)
        self.total = TokenBucket(*total)
        #: Source IPs that may ask for a CHANGE-REQUEST: those of registered nodes.
        self.members: frozenset[str] = frozenset()

    def set_members(self, ips: Iterable[str]) -> None:
        """The IPs that hold a registered relay connection now (their CHANGE-REQUESTs are
        honoured)."""
        self.members = frozenset(ips)

    def on_datagram(self, data: bytes, local: Address, remote: Address, now: float) -> Reply | None:
        """A datagram from ``remote`` that arrived on the socket bound at ``local``, at
        ``now``: the answer to send, or None (not a request we answer, or over a rate;
        counted in :attr:`counts`)."""
        if not self.sources.take(remote[0], now) or not self.total.take(now):
            self.counts["rate_limited"] += 1
            return None
        try:
            request = parse_request(data)
        except StunError:
            self.counts["dropped"] += 1
            return None
        if request.unknown:
            self.counts["unknown_attributes"] += 1
            return Reply(local, remote, unknown_attributes_response(request))
        if (request.change_ip or request.change_port) and remote[0] not in self.members:
            self.counts["change_refused"] += 1
            return None
        source = self._changed(local, request)
        if source is None:
            self.counts["change_unavailable"] += 1
            return None
        self.counts["answered"] += 1
        known = source if source[0] not in ("0.0.0.0", "::") else None
        return Reply(source, remote, binding_response(request, remote, known, self.changed))

    def _changed(self, local: Address, request: BindingRequest) -> Address | None:
        """Where the answer goes from: ``local``, with the IP and/or port swapped for the
        other one when asked (None: there is no other one)."""
        ip, port = local
        if request.change_ip:
            if len(self._ips) < 2:
                return None
            ip = self._ips[1] if ip == self._ips[0] else self._ips[0]
        if request.change_port:
            if len(self._ports) < 2:
                return None
            port = self._ports[1] if port == self._ports[0] else self._ports[0]
        return ip, port
