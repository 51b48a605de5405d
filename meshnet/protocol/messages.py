"""Every message of the protocol, with the rules each field must satisfy.

A message travels as one or two ZeroMQ frames: a CBOR *header* map carrying
``v`` (protocol version), ``t`` (message type) and the fields below, and, for the
types whose ``BODY`` says so, a *body* frame of raw bytes (a job's payload or result,
already CBOR-encoded, or a sealed node-to-node message). Bodies stay out of the header
so that large payloads are forwarded without being decoded or copied.

Node-to-node messages (``job``, ``job_result``, ``job_cancel``) never appear on a
socket in the clear: each is CBOR-encoded as one map and sealed into the body of a
relay ``send``/``deliver``. ``docs/protocol.md`` is the same description for people.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

from meshnet.identity import is_peer_id
from meshnet.protocol.strict_cbor import Limits
from meshnet.requirements import check_requirements

__all__ = [
    "PROTOCOL_VERSION",
    "JOB_ID_BYTES",
    "SEALED_OPS",
    "MAX_TEXT",
    "clip",
    "plain_value",
    "MAX_HEADER_BYTES",
    "MAX_DEPTH_ON_WIRE",
    "MAX_FRAMES",
    "MAX_LIST",
    "BODY_SLACK",
    "frame_limit",
    "STATUSES",
    "REFUSAL_REASONS",
    "ERROR_CODES",
    "Body",
    "Message",
    "MessageTable",
    "Submit",
    "Cancel",
    "StatusRequest",
    "PeersRequest",
    "PingPeer",
    "PingReply",
    "Result",
    "Results",
    "MAX_RESULTS",
    "BATCH_RESULT_BYTES",
    "StatusReply",
    "PeersReply",
    "Error",
    "Register",
    "Registered",
    "Ack",
    "Ping",
    "Pong",
    "Send",
    "Deliver",
    "Unroutable",
    "PeerDown",
    "MAX_SACK",
    "SESSION_RULES",
    "Sealed",
    "Hello",
    "PeerAck",
    "Job",
    "JobResult",
    "JobCancel",
    "Punch",
    "CLIENT_TO_NODE",
    "NODE_TO_CLIENT",
    "NODE_TO_RELAY",
    "RELAY_TO_NODE",
    "NODE_TO_NODE",
]

PROTOCOL_VERSION = 1
JOB_ID_BYTES = 16
#: Headers carry ids, names and maps of metadata; payloads belong in the body. The
#: largest header is a relay's list of peers: 4096 peers of some 200 bytes each. Each
#: link has its own, smaller limit where its headers are small (see the tables below).
MAX_HEADER_BYTES = 1024 * 1024
#: Containers nested in a decoded header or sealed message, the outermost map included:
#: the deepest field allowed (a ``status_reply.info`` of plain data, 8 levels below its
#: own map) needs 10.
MAX_DEPTH_ON_WIRE = 12
#: A message is a header frame and at most one body frame.
MAX_FRAMES = 2
#: Room for what travels with a body: the 40 bytes sealing adds, CBOR framing.
BODY_SLACK = 64 * 1024


def frame_limit(max_body: int) -> int:
    """The ``MAXMSGSIZE`` for a socket whose bodies may reach ``max_body`` bytes: any
    frame past it makes libzmq drop the connection, before buffering more of it.
    Within it, a message over the protocol's limits gets a clear answer instead."""
    return max(max_body, MAX_HEADER_BYTES) + BODY_SLACK


MAX_TEXT = 4096
MAX_LIST = 4096
KIND_PATTERN = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")

STATUSES = ("succeeded", "failed", "timed_out", "refused", "cancelled", "peer_lost")
#: Why a job was refused; carried in ``error.reason``.
REFUSAL_REASONS = (
    "busy",
    "unknown_kind",
    "invalid",
    "too_large",
    "duplicate",
    "draining",
    "peer_not_connected",
    "no_relay",
    "relay_busy",
)
#: Codes of ``error`` messages: ``invalid`` and ``too_large`` for a message that could not
#: be decoded; ``not_registered`` (register first), ``identity_mismatch`` (the peer id is
#: not the connection's key), ``no_relay`` (the node has no relay link now) and
#: ``unavailable`` (the node could not gather what was asked); ``duplicate`` (a ``submit``
#: whose id is in flight already, from this client: the job in flight goes on);
#: ``replaced`` (the relay took this node's registration over for another connection
#: with the same key: two processes run with one identity); for a ``ping_peer``,
#: ``peer_not_connected`` (the relay knows no such peer) and ``timed_out`` (no answer
#: within its timeout).
ERROR_CODES = (
    "invalid",
    "too_large",
    "not_registered",
    "identity_mismatch",
    "no_relay",
    "unavailable",
    "duplicate",
    "replaced",
    "peer_not_connected",
    "timed_out",
)


class Body(Enum):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


# -- field rules: each returns the cleaned value or raises ValueError(what was expected) --


def job_id(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != JOB_ID_BYTES:
        raise ValueError(f"a byte string of {JOB_ID_BYTES} bytes")
    return value


def kind(value: Any) -> str:
    if not isinstance(value, str) or not KIND_PATTERN.fullmatch(value):
        raise ValueError("a job kind: lowercase letters, digits, '_', '.', '-', at most 64")
    return value


def peer_id(value: Any) -> str:
    if not is_peer_id(value):
        raise ValueError("a peer id")
    return str(value)


def optional(rule: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        return None if value is None else rule(value)

    check.__name__ = f"optional_{rule.__name__}"
    check.rule = rule  # type: ignore[attr-defined]  # the decoder calls it directly (codec._plan)
    return check


def seconds(value: Any) -> float:
    try:
        valid = not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < float(value) < math.inf
    except OverflowError:  # an integer too large for a float (CBOR bignums have no bound)
        valid = False
    if not valid:
        raise ValueError("a finite number of seconds greater than 0")
    return float(value)


def clip(message: str, limit: int = MAX_TEXT) -> str:
    """``message`` cut to fit a text field: error texts may quote what a peer sent."""
    return message if len(message) <= limit else message[: limit - 3] + "..."


def text(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError(f"a text string of at most {MAX_TEXT} characters")
    return value


def status(value: Any) -> str:
    if value not in STATUSES:
        raise ValueError("one of " + ", ".join(STATUSES))
    return str(value)


def error(value: Any) -> dict[str, str] | None:
    """``{"type": str, "message": str, "reason": str}``; ``reason`` may be empty."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - {"type", "message", "reason"} or "message" not in value:
        raise ValueError("a map with 'message' and optional 'type' and 'reason'")
    return {k: text(value.get(k, "")) for k in ("type", "message", "reason")}


#: Metadata maps (capabilities, status) may nest this deep and hold this many values in
#: all. Counted per visit: CBOR's shared references (tags 28/29) can make a small
#: message decode into a value that refers to one map many times, or to itself, and
#: re-encoding it (in every ``peers_reply``) would cost time and memory exponential in
#: its size.
MAX_DEPTH = 8
MAX_VALUES = 65536
_SCALARS = (type(None), bool, float)


def plain_value(value: Any, what: str = "value", *, max_depth: int = MAX_DEPTH, max_values: int = MAX_VALUES) -> Any:
    """Check ``value`` is plain data: null, bool, int, float, text, bytes, lists, and
    maps with text keys, within the limits above. Returns it unchanged."""
    budget = [max_values]

    def walk(item: Any, depth: int) -> None:
        budget[0] -= 1
        if budget[0] < 0 or depth > max_depth:
            raise ValueError(f"{what} of plain data at most {max_depth} deep and {max_values} values in all")
        if isinstance(item, _SCALARS):
            return
        if isinstance(item, int):
            if not -(2**63) <= item < 2**64:
                raise ValueError(f"{what} with integers of at most 64 bits")
        elif isinstance(item, (str, bytes)):
            if len(item) > MAX_TEXT:
                raise ValueError(f"{what} with strings of at most {MAX_TEXT} characters")
        elif isinstance(item, list):
            for element in item:
                walk(element, depth + 1)
        elif isinstance(item, dict):
            for key, element in item.items():
                if not isinstance(key, str):
                    raise ValueError(f"{what} whose maps have text keys")
                walk(element, depth + 1)
        else:
            raise ValueError(f"{what} of plain data (null, bool, numbers, text, bytes, lists, maps)")

    walk(value, 0)
    return value


def small_map(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("a map with text keys")
    checked: dict[str, Any] = plain_value(value, "a map")
    return checked


#: A node's capabilities: small enough that a relay's list of thousands of peers stays
#: within a header, and shallow enough to nest inside that list.
MAX_CAPS_DEPTH = 3
MAX_CAPS_VALUES = 256


def capabilities(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("a map with text keys")
    checked: dict[str, Any] = plain_value(value, "a map", max_depth=MAX_CAPS_DEPTH, max_values=MAX_CAPS_VALUES)
    return checked


#: Addresses a node may announce: a few interfaces and ports, each a short endpoint.
MAX_LISTEN = 64
MAX_ADDRESS = 256


def addresses(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_LISTEN:
        raise ValueError(f"a list of at most {MAX_LISTEN} addresses")
    if not all(isinstance(v, str) and len(v) <= MAX_ADDRESS for v in value):
        raise ValueError(f"a list of addresses, each a text of at most {MAX_ADDRESS} characters")
    return list(value)


#: The most data items a header of a link that carries lists of peers may hold (the
#: decoder counts them before it builds anything): 4096 peers of about 30 items each,
#: and room for capabilities.
MAX_LIST_ITEMS = 1 << 17


def map_list(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or len(value) > MAX_LIST or not all(isinstance(v, dict) for v in value):
        raise ValueError(f"a list of at most {MAX_LIST} maps")
    # A list of peers, each with its capabilities: deeper and larger than one map, and
    # bounded by the items its link's header may hold.
    checked: list[dict[str, Any]] = plain_value(
        value, "a list of maps", max_depth=MAX_CAPS_DEPTH + 3, max_values=MAX_LIST_ITEMS
    )
    return checked


def byte_string(value: Any) -> bytes:
    if not isinstance(value, bytes):
        raise ValueError("a byte string")
    return value


def optional_byte_string(value: Any) -> bytes | None:
    return None if value is None else byte_string(value)


#: The one kind of body a relay forwards between nodes: a sealed node-to-node message.
#: The relay knows nothing of what is inside, so new node-to-node messages need no relay
#: change; ``op`` stays on the link so that another kind could be added beside it.
SEALED_OPS = ("sealed",)


def op(value: Any) -> str:
    if value not in SEALED_OPS:
        raise ValueError("one of " + ", ".join(SEALED_OPS))
    return str(value)


def seq(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError("an unsigned integer")
    return value


def requirements(value: Any) -> dict[str, Any]:
    return check_requirements(value)


def list_limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIST:
        raise ValueError(f"an integer from 1 to {MAX_LIST}")
    return value


#: What a node's heartbeat says of its load (``ping.load``): each a count; ``ran``
#: (the jobs it has run to an end since it started) may be left out.
LOAD_FIELDS = ("busy", "free", "queued")
LOAD_OPTIONAL = ("ran",)


def load(value: Any) -> dict[str, int]:
    if not isinstance(value, dict) or not set(LOAD_FIELDS) <= set(value) <= {*LOAD_FIELDS, *LOAD_OPTIONAL}:
        raise ValueError(f"a map of {', '.join(LOAD_FIELDS)} (and optionally {', '.join(LOAD_OPTIONAL)})")
    for number in value.values():
        seq(number)
    return value


# -- messages --


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str] = ""
    BODY: ClassVar[Body] = Body.NONE
    #: field name -> rule; fields whose rule accepts None may be left out on the wire.
    RULES: ClassVar[dict[str, Callable[[Any], Any]]] = {}

    def header_fields(self) -> dict[str, Any]:
        return {name: value for name in self.RULES if (value := getattr(self, name)) is not None}


# client -> node


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


@dataclass(frozen=True)
class Submit(Message):
    """Run ``kind`` on ``body`` (the CBOR-encoded payload) on peer ``to``, or, ``to``
    absent, where the node places it: on a device that meets ``requires``
    (meshnet.placement). ``batch``: the client reads ``results`` (several jobs' ends in
    one message)."""

    TYPE = "submit"
    BODY = Body.REQUIRED
    RULES = {
        "id": job_id,
        "kind": kind,
        "to": optional(peer_id),
        "timeout": optional(seconds),
        "batch": optional(flag),
        "requires": optional(requirements),
    }
    id: bytes
    kind: str
    body: Any = b""
    to: str | None = None
    timeout: float | None = None
    batch: bool | None = None
    requires: dict[str, Any] | None = None


@dataclass(frozen=True)
class Cancel(Message):
    TYPE = "cancel"
    RULES = {"id": job_id}
    id: bytes


@dataclass(frozen=True)
class StatusRequest(Message):
    """``seq``, if given, comes back in the reply, to match replies with requests."""

    TYPE = "status"
    RULES = {"seq": optional(seq)}
    seq: int | None = None


@dataclass(frozen=True)
class PeersRequest(Message):
    """The peers a relay (or a node, for its client) knows. ``peer_id`` (node to relay
    only): that peer alone, so that a node learns where the relay sees it before it dials
    the address a peer gave (meshnet.holepunch)."""

    TYPE = "peers"
    RULES = {
        "seq": optional(seq),
        "peer_id": optional(peer_id),
        "requires": optional(requirements),
        "after": optional(peer_id),
        "limit": optional(list_limit),
    }
    seq: int | None = None
    peer_id: str | None = None
    #: Only the devices that meet these requirements, best first (meshnet.requirements).
    requires: dict[str, Any] | None = None
    #: A listing's next page: the peers after this peer id (the last one's ``next``).
    after: str | None = None
    #: At most this many peers in the reply.
    limit: int | None = None


@dataclass(frozen=True)
class PingPeer(Message):
    """Measure one round trip to peer ``peer`` on its current path (``meshnet ping``);
    answered by a ``ping_reply``, or an ``error`` with the request's ``seq``."""

    TYPE = "ping_peer"
    RULES = {"peer": peer_id, "seq": optional(seq), "timeout": optional(seconds)}
    peer: str
    seq: int | None = None
    timeout: float | None = None


# node -> client


@dataclass(frozen=True)
class Result(Message):
    """The one terminal status of a job; ``body`` is the CBOR result when it succeeded."""

    TYPE = "result"
    BODY = Body.OPTIONAL
    RULES = {"id": job_id, "status": status, "error": error, "peer": optional(peer_id)}
    id: bytes
    status: str
    error: dict[str, str] | None = None
    body: Any = None
    peer: str | None = None


#: The most job ends one ``results`` carries; a result of this size or more goes alone.
MAX_RESULTS = 64
BATCH_RESULT_BYTES = 16 * 1024
_RESULT_FIELDS = frozenset({"id", "status", "error", "peer", "result"})


def result_list(value: Any) -> tuple[Result, ...]:
    """The entries of a ``results``: 1 to MAX_RESULTS maps, each a ``result``'s fields
    with its result value inline (``result``, the CBOR-encoded value, when it succeeded)."""
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_RESULTS:
        raise ValueError(f"a list of 1 to {MAX_RESULTS} maps")
    results = []
    for entry in value:
        if not isinstance(entry, dict) or not entry.keys() <= _RESULT_FIELDS:
            raise ValueError("maps of id, status, and optional error, peer and result")
        body = entry.get("result")
        results.append(
            Result(
                id=job_id(entry.get("id")),
                status=status(entry.get("status")),
                error=error(entry.get("error")),
                body=None if body is None else byte_string(body),
                peer=optional(peer_id)(entry.get("peer")),
            )
        )
    return tuple(results)


@dataclass(frozen=True)
class Results(Message):
    """Several jobs' terminal statuses, each as its ``result`` would say it, to a client
    whose submits said ``batch``: the ends of one turn of the node's loop, together."""

    TYPE = "results"
    RULES = {"results": result_list}
    results: tuple[Result, ...]

    def header_fields(self) -> dict[str, Any]:
        entries = []
        for result in self.results:
            entry: dict[str, Any] = {"id": result.id, "status": result.status}
            if result.error is not None:
                entry["error"] = result.error
            if result.peer is not None:
                entry["peer"] = result.peer
            if result.body is not None:
                entry["result"] = bytes(result.body)
            entries.append(entry)
        return {"results": entries}


@dataclass(frozen=True)
class StatusReply(Message):
    TYPE = "status_reply"
    RULES = {"info": small_map, "seq": optional(seq)}
    info: dict[str, Any]
    seq: int | None = None


@dataclass(frozen=True)
class PeersReply(Message):
    """The peers a relay knows; ``more`` counts those left out to keep the reply within
    a header's size."""

    TYPE = "peers_reply"
    RULES = {
        "peers": map_list,
        "seq": optional(seq),
        "more": optional(seq),
        "next": optional(peer_id),
        "unmet": optional(text),
    }
    peers: list[dict[str, Any]]
    seq: int | None = None
    more: int | None = None
    #: Where the next page starts (a listing's, when ``more`` are left): ask again with
    #: ``after`` = this.
    next: str | None = None
    #: Why no device meets a query's requirements (none listed).
    unmet: str | None = None


@dataclass(frozen=True)
class PingReply(Message):
    """A peer answered a ``ping_peer``: after ``rtt`` seconds, on ``path`` (``relay``,
    ``direct`` or ``lan``: the path its answer came back on), at ``address`` on a direct
    or LAN link. ``sent`` is the path the ping went out on."""

    TYPE = "ping_reply"
    RULES = {
        "peer": peer_id,
        "rtt": seconds,
        "path": text,
        "sent": text,
        "address": optional(text),
        "seq": optional(seq),
    }
    peer: str
    rtt: float
    path: str
    sent: str
    address: str | None = None
    seq: int | None = None


@dataclass(frozen=True)
class Error(Message):
    """A request could not be handled at all (malformed, unknown, not registered)."""

    TYPE = "error"
    RULES = {"code": text, "message": text, "seq": optional(seq), "id": optional(job_id)}
    code: str
    message: str
    #: The ``seq`` of the request it answers, when that request had one.
    seq: int | None = None
    #: A ``submit`` refused because its id is in flight already: that id. An ``error``
    #: never ends a job: the job in flight under the id goes on to its own ``result``.
    id: bytes | None = None


# node -> relay


@dataclass(frozen=True)
class Register(Message):
    """``max_body``: the largest ``deliver`` body this node takes (its socket drops the
    connection past that, plus room for framing): the relay refuses larger ``send``s to
    it with ``too_large``. Absent: the relay's own limit."""

    TYPE = "register"
    RULES = {"peer_id": peer_id, "caps": capabilities, "listen": addresses, "max_body": optional(seq)}
    peer_id: str
    caps: dict[str, Any] = field(default_factory=dict)
    listen: list[str] = field(default_factory=list)
    max_body: int | None = None


@dataclass(frozen=True)
class Ping(Message):
    """A node's heartbeat. ``load``: its executors busy and free and its jobs queued now;
    ``rtt``: the round trip of its last heartbeat (seconds). Both optional: the relay's
    registry keeps the last it was told."""

    TYPE = "ping"
    RULES = {"seq": seq, "load": optional(load), "rtt": optional(seconds)}
    seq: int = 0
    load: dict[str, int] | None = None
    rtt: float | None = None


@dataclass(frozen=True)
class Send(Message):
    """Forward the sealed ``body`` to peer ``to``; ``ref`` names the job it concerns."""

    TYPE = "send"
    BODY = Body.REQUIRED
    RULES = {"to": peer_id, "ref": byte_string, "op": op}
    to: str
    ref: bytes
    op: str
    body: Any = b""


# relay -> node


@dataclass(frozen=True)
class Registered(Message):
    """``max_body``: the largest ``send`` body the relay takes. ``window``: the bytes
    each end may have in flight on this link before the other acknowledges them
    (``ack``); see :mod:`meshnet.flow`."""

    TYPE = "registered"
    RULES = {
        "peer_id": peer_id,
        "observed": text,
        "heartbeat": seconds,
        "max_body": optional(seq),
        "window": optional(seq),
    }
    peer_id: str
    observed: str
    heartbeat: float
    max_body: int | None = None
    window: int | None = None


@dataclass(frozen=True)
class Ack(Message):
    """Flow control, both ways on a relay link: ``received`` bytes of messages (``ack``
    not counted) read since registration (:mod:`meshnet.flow`)."""

    TYPE = "ack"
    RULES = {"received": seq}
    received: int


@dataclass(frozen=True)
class Pong(Message):
    TYPE = "pong"
    RULES = {"seq": seq}
    seq: int = 0


@dataclass(frozen=True)
class Deliver(Message):
    TYPE = "deliver"
    BODY = Body.REQUIRED
    RULES = {"sender": peer_id, "ref": byte_string, "op": op}
    sender: str
    ref: bytes
    op: str
    body: Any = b""


@dataclass(frozen=True)
class Unroutable(Message):
    """A ``send`` could not be delivered; ``reason`` is a refusal reason and ``op`` the
    bounced send's, so that the sender can tell a job never delivered (refused) from an
    answer or cancel that found its peer gone."""

    TYPE = "unroutable"
    RULES = {"to": peer_id, "ref": byte_string, "op": op, "reason": text, "message": text}
    to: str
    ref: bytes
    op: str
    reason: str
    message: str


@dataclass(frozen=True)
class PeerDown(Message):
    TYPE = "peer_down"
    RULES = {"peer_id": peer_id}
    peer_id: str


# node <-> node (sealed inside send/deliver bodies)

#: The most sequence numbers a selective acknowledgement lists (those received above the
#: cumulative ``ack``); a peer that has more out of order learns of the rest later.
MAX_SACK = 64


def sack_list(value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) > MAX_SACK:
        raise ValueError(f"a list of at most {MAX_SACK} unsigned integers")
    for item in value:
        seq(item)
    return value


#: The session header every sealed node-to-node message carries (meshnet.session):
#: ``sid`` the sender's session id, ``rsid`` the receiver's as the sender knows it (absent
#: only in a ``hello`` to a peer not yet known), ``ctr`` the sender's counter of sealed
#: messages in this session (each copy sent gets a new one: the receiver drops a counter
#: it has seen, so a replayed box is recognised), ``ack`` the highest sequence number up
#: to which the sender has received every message of the receiver's stream, ``sack`` those
#: received above it, ``seq`` the message's own place in the sender's stream (absent on
#: ``hello`` and ``peer_ack``, which are not acknowledged).
SESSION_RULES: dict[str, Callable[[Any], Any]] = {
    "sid": seq,
    "rsid": optional(seq),
    "ctr": seq,
    "ack": optional(seq),
    "sack": optional(sack_list),
    "seq": optional(seq),
}


@dataclass(frozen=True)
class Sealed(Message):
    """A node-to-node message: sealed for its receiver, with its session header."""

    sid: int = field(default=0, kw_only=True)
    rsid: int | None = field(default=None, kw_only=True)
    ctr: int = field(default=0, kw_only=True)
    ack: int | None = field(default=None, kw_only=True)
    sack: list[int] | None = field(default=None, kw_only=True)
    seq: int | None = field(default=None, kw_only=True)


@dataclass(frozen=True)
class Hello(Sealed):
    """Opens a session, or tells the peer this side's current session id: answered with a
    ``hello`` whenever its ``rsid`` is not the receiver's session id. ``max_payload``: the
    largest job payload or result the sender takes (its ``jobs.max_payload_bytes``), so
    that a job or result over it is refused ``too_large`` by the side that has it, before
    it is sent, on every path (absent: not said). ``batch``: the most messages the sender
    reads in one sealed batch (meshnet.protocol.batch; absent: it reads none)."""

    TYPE = "hello"
    RULES = {**SESSION_RULES, "max_payload": optional(seq), "batch": optional(seq)}
    max_payload: int | None = None
    batch: int | None = None


@dataclass(frozen=True)
class PeerAck(Sealed):
    """Acknowledges what was received (``ack``, ``sack``) when nothing else is going the
    other way. ``probe``: answer at once (the sender has heard nothing for a while).
    ``ping``: answer at once with a ``peer_ack`` whose ``pong`` is this number (a round
    trip measured: ``meshnet ping``, and each new path); neither is sent again if lost."""

    TYPE = "peer_ack"
    RULES = {**SESSION_RULES, "probe": optional(flag), "ping": optional(seq), "pong": optional(seq)}
    probe: bool | None = None
    ping: int | None = None
    pong: int | None = None


@dataclass(frozen=True)
class Job(Sealed):
    TYPE = "job"
    RULES = {**SESSION_RULES, "id": job_id, "kind": kind, "timeout": seconds, "payload": byte_string}
    id: bytes
    kind: str
    timeout: float
    payload: bytes


@dataclass(frozen=True)
class JobResult(Sealed):
    """A job's terminal status, sent by the node that ran (or refused) it. ``job_seq`` is
    the ``seq`` of the job's message in the submitter's stream: a submitter that reused
    the id since (the first job ended there) tells this answer from the new job's."""

    TYPE = "job_result"
    RULES = {
        **SESSION_RULES,
        "id": job_id,
        "job_seq": seq,
        "status": status,
        "error": error,
        "result": optional_byte_string,
    }
    id: bytes
    job_seq: int
    status: str
    error: dict[str, str] | None = None
    result: bytes | None = None


@dataclass(frozen=True)
class JobCancel(Sealed):
    """Stop job ``id``, sent as message ``job_seq`` of this stream, if it runs, and do
    not run it if it arrives later. The seq, not the id alone, names the job: a cancel of
    a job that ended is not taken for one of a later job reusing its id."""

    TYPE = "job_cancel"
    RULES = {**SESSION_RULES, "id": job_id, "job_seq": seq}
    id: bytes
    job_seq: int


def punch_stage(value: Any) -> str:
    if value not in ("connect", "answer", "sync", "refuse"):
        raise ValueError("one of 'connect', 'answer', 'sync', 'refuse'")
    return str(value)


@dataclass(frozen=True)
class Punch(Sealed):
    """Hole-punch coordination (meshnet.holepunch, after libp2p's DCUtR). ``connect``
    offers a direct link with the sender's candidates (the TCP address the relay observes
    for it, and its NAT type), and ``answer`` answers it with the other side's; ``sync``
    tells the answering side to dial now; ``refuse`` answers an offer this pair will not
    try, with the reason. ``attempt`` is numbered by the side that offered."""

    TYPE = "punch"
    RULES = {
        **SESSION_RULES,
        "stage": punch_stage,
        "attempt": seq,
        "observed": optional(text),
        "nat": optional(text),
        "listen": optional(text),
        "lan": optional(text),
        "punch": optional(flag),
        "reason": optional(text),
    }
    stage: str
    attempt: int
    observed: str | None = None
    nat: str | None = None
    #: Where the sender's direct listener is reachable from the internet (its public IP
    #: and the listener's port; told by a node whose NAT forwards that port, or none).
    listen: str | None = None
    #: Where it is reachable on its own network (its LAN address and the listener's port).
    lan: str | None = None
    #: A dial to a listener failed between this pair before: plan a simultaneous open
    #: (both sides then do, whatever their NAT types say of listeners).
    punch: bool | None = None
    reason: str | None = None


class MessageTable(dict[str, type[Message]]):
    """The message types one side accepts on one link (type name -> class), and what a
    header there may hold: ``header_bytes`` and ``items`` (data items in all, counted
    before anything is built). Headers are small on links that carry no lists; where
    they are small, a hostile sender's worst header costs little to decode."""

    def __init__(self, name: str, *classes: type[Message], header_bytes: int, items: int):
        super().__init__((cls.TYPE, cls) for cls in classes)
        self.name = name
        self.limits = Limits(size=header_bytes, items=items, depth=MAX_DEPTH_ON_WIRE)

    @property
    def header_bytes(self) -> int:
        return self.limits.size

    @property
    def max_items(self) -> int:
        """CBOR data items a header here may hold (its ``items`` would be dict's)."""
        return self.limits.items

    @property
    def depth(self) -> int:
        return self.limits.depth


#: A submit is about 150 bytes and 13 items; room is left for job requirements to come.
CLIENT_TO_NODE = MessageTable(
    "client to node", Submit, Cancel, StatusRequest, PeersRequest, PingPeer, header_bytes=64 * 1024, items=1024
)
#: Status and the relay's list of peers, passed on.
NODE_TO_CLIENT = MessageTable(
    "node to client",
    Result,
    Results,
    StatusReply,
    PeersReply,
    PingReply,
    Error,
    header_bytes=MAX_HEADER_BYTES,
    items=MAX_LIST_ITEMS,
)
#: A register carries capabilities (at most 256 values) and listen addresses.
NODE_TO_RELAY = MessageTable(
    "node to relay", Register, Ping, Send, PeersRequest, Ack, header_bytes=64 * 1024, items=4096
)
RELAY_TO_NODE = MessageTable(
    "relay to node",
    Registered,
    Pong,
    Deliver,
    Unroutable,
    PeerDown,
    PeersReply,
    Error,
    Ack,
    header_bytes=MAX_HEADER_BYTES,
    items=MAX_LIST_ITEMS,
)
#: Sealed messages: a map of at most 11 fields (an error map and a list of at most
#: ``MAX_SACK`` in them); their size is the receiving node's body limit, so that a
#: payload fits.
NODE_TO_NODE = MessageTable("node to node", Hello, PeerAck, Job, JobResult, JobCancel, Punch, header_bytes=0, items=512)
