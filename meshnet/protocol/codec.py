"""CBOR encoding and validating decoding of protocol messages.

``decode`` is the only door through which a peer's bytes enter MeshNet (``decode_inner``
for the plaintext of a sealed message). Whatever the bytes, it returns a valid message
of an expected type or raises a ``RemoteProtocolError`` (``MessageTooLarge`` for size),
never anything else, at a cost linear in their size (:mod:`strict_cbor`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import cbor2

from meshnet.errors import LocalProtocolError, MessageTooLarge, ProtocolError, RemoteProtocolError
from meshnet.protocol import strict_cbor
from meshnet.protocol.messages import JOB_ID_BYTES, PROTOCOL_VERSION, Body, Message, MessageTable, clip
from meshnet.protocol.strict_cbor import Limits

MAX_ERROR_TEXT = 1024


def encode(message: Message) -> list[Any]:
    """Frames for ``message``: the CBOR header, then the body if it has one."""
    header = {"v": PROTOCOL_VERSION, "t": message.TYPE, **message.header_fields()}
    frames: list[Any] = [cbor2.dumps(header)]
    body = getattr(message, "body", None)
    if message.BODY is Body.REQUIRED or (message.BODY is Body.OPTIONAL and body is not None):
        if body is None:
            raise LocalProtocolError(f"{message.TYPE} needs a body")
        frames.append(body)
    return frames


def _load_map(data: Any, limits: Limits, what: str) -> dict[Any, Any]:
    value = strict_cbor.loads(data, limits, what)
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} must be a CBOR map, got {strict_cbor.describe(value)}")
    return value


def _build(fields: dict[Any, Any], accept: MessageTable, body: Any, max_body: int = 0) -> Message:
    type_name = fields.get("t")
    try:
        return _build_checked(fields, accept, body, max_body)
    except RemoteProtocolError as exc:
        # The text may quote what the peer sent (a short string, clipped); it must fit
        # in the error reply it becomes.
        exc.args = (clip(str(exc), MAX_ERROR_TEXT),)
        ref = fields.get("id")
        if type_name == "submit" and isinstance(ref, bytes) and len(ref) == JOB_ID_BYTES:
            exc.ref = ref
        raise


def validate(message: Message) -> None:
    """Raise ``LocalProtocolError`` if ``message`` would be refused by its receiver."""
    for name, rule in message.RULES.items():
        try:
            rule(getattr(message, name))
        except ValueError as exc:
            shown = strict_cbor.describe(getattr(message, name))
            raise LocalProtocolError(f"{message.TYPE}.{name} = {shown}: expected {exc}") from None


def _build_checked(fields: dict[Any, Any], accept: MessageTable, body: Any, max_body: int) -> Message:
    # Error texts name what was expected and describe what came (strict_cbor.describe:
    # constant cost), never format the value itself.
    version = fields.pop("v", None)
    if type(version) is not int or version != PROTOCOL_VERSION:
        shown = strict_cbor.describe(version)
        raise RemoteProtocolError(f"unsupported protocol version {shown}; this side speaks {PROTOCOL_VERSION}")
    type_name = fields.pop("t", None)
    cls = accept.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        shown = strict_cbor.describe(type_name)
        raise RemoteProtocolError(f"unexpected message type {shown}; expected one of {', '.join(accept)}")
    rules = cls.RULES
    if not fields.keys() <= rules.keys():  # a set comparison, in C: the usual case costs little
        unknown = [k for k in fields if k not in rules]
        raise RemoteProtocolError(f"{cls.TYPE}: unknown field {strict_cbor.describe(unknown[0])}")
    # A class is hashable (mypy reads the frozen dataclasses' instance __hash__ as the class's).
    checks, whole = _plan(cls)  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for name, rule, may_be_absent in checks:
        value = fields.get(name)
        if value is None and may_be_absent:
            values[name] = None
            continue
        try:
            values[name] = rule(value)
        except ValueError as exc:
            raise RemoteProtocolError(f"{cls.TYPE}.{name}: expected {exc}") from None
    problem: RemoteProtocolError | None = None
    if cls.BODY is Body.REQUIRED and body is None:
        problem = RemoteProtocolError(f"{cls.TYPE} must have a body frame")
    elif cls.BODY is Body.NONE and body is not None:
        problem = RemoteProtocolError(f"{cls.TYPE} takes no body frame")
    elif body is not None and (size := len(memoryview(body))) > max_body:
        problem = MessageTooLarge(f"{cls.TYPE} body is {size} bytes; the limit is {max_body}")
    if cls.BODY is not Body.NONE:
        values["body"] = body if problem is None else None
    if whole:
        # Every field has its value, checked: the instance is made as __init__ would
        # make it, without a frozen dataclass's object.__setattr__ per field.
        message: Message = object.__new__(cls)
        message.__dict__.update(values)
    else:
        try:
            message = cls(**values)
        except TypeError as exc:  # a required field was absent (its rule accepted None)
            raise RemoteProtocolError(f"{cls.TYPE}: {exc}") from None
    if problem is not None:
        # The header itself was valid: whoever answers may name what it was about.
        problem.header = message
        raise problem
    return message


@functools.cache
def _plan(cls: type[Message]) -> tuple[tuple[tuple[str, Any, bool], ...], bool]:
    """How :func:`_build_checked` checks a message of ``cls``: each field's name, its rule
    (an ``optional`` one unwrapped: an absent value is None without a call), and whether
    an absent value is allowed; and whether the rules (and the body) give every field of
    the dataclass, so that no default or ``__init__`` is needed."""
    rules = tuple((name, getattr(rule, "rule", rule), hasattr(rule, "rule")) for name, rule in cls.RULES.items())
    given = set(cls.RULES) | ({"body"} if cls.BODY is not Body.NONE else set())
    fields = dataclasses.fields(cls)
    whole = {f.name for f in fields} == given and not hasattr(cls, "__post_init__")
    # A field that __init__ requires must have a rule that refuses None (its absence),
    # or __init__'s own check is still needed.
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    whole = whole and all(_refuses_none(cls.RULES[name]) for name in required if name in cls.RULES)
    return rules, whole


def _refuses_none(rule: Any) -> bool:
    try:
        rule(None)
    except ValueError:
        return True
    return False


def decode(frames: Sequence[Any], accept: MessageTable, *, max_body: int) -> Message:
    """Validate one message received as ``frames`` (bytes, memoryviews or zmq.Frames).

    Whatever the frames hold, this returns a message of a type ``accept`` holds or
    raises ``RemoteProtocolError`` (``MessageTooLarge`` for size), in time linear in
    their size (see :mod:`meshnet.protocol.strict_cbor`)."""
    if not 1 <= len(frames) <= 2:
        raise RemoteProtocolError(f"a message has 1 or 2 frames, got {len(frames)}")
    body = frames[1] if len(frames) == 2 else None
    try:
        return _build(_load_map(frames[0], accept.limits, "header"), accept, body, max_body)
    except ProtocolError:
        raise
    except Exception as exc:
        raise _unexpected(exc) from None


def _guarded(decode_step: Callable[[], Message]) -> Message:
    """Run ``decode_step``, with :func:`decode`'s guarantee: only protocol errors leave it."""
    try:
        return decode_step()
    except ProtocolError:
        raise
    except Exception as exc:
        raise _unexpected(exc) from None


def _unexpected(exc: Exception) -> RemoteProtocolError:
    """Any error but a protocol error is a bug in a decoder, and still must not escape as
    anything but a typed error (``unexpected`` marks it, for the fuzzer and the logs)."""
    error = RemoteProtocolError(f"the message could not be decoded ({type(exc).__name__})")
    error.unexpected = True
    return error


#: A byte string this long or longer is left out of the CBOR encoding and passed on as
#: the buffer it is (see :func:`encode_inner_parts`).
BULK_BYTES = 64 * 1024
#: Exact types :func:`encode_inner_parts` writes as they are (subclasses take the long way).
_PLAIN = frozenset({str, int, float, bool, dict, list, bytes})


def encode_inner(message: Message) -> bytes:
    """One CBOR map for a node-to-node message, to be sealed."""
    return b"".join(encode_inner_parts(message))


def encode_inner_parts(message: Message) -> list[Any]:
    """:func:`encode_inner`'s bytes as pieces whose concatenation is that map: a large
    byte string (a payload, a result) is its CBOR head and then its own buffer, not a
    copy, so that the sealer copies it once, into the sealed message."""
    fields: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE}
    bulk = False
    for name in message.RULES:
        value = getattr(message, name)
        kind = type(value)
        if kind in _PLAIN:  # most fields: nothing to look at
            if kind is bytes and len(value) >= BULK_BYTES:
                bulk = True
        elif value is None:
            continue
        elif not isinstance(value, (str, int, float, dict, list, bytes)):  # bytearray, memoryview, a ZeroMQ frame
            value = memoryview(value).cast("B")
            bulk = bulk or len(value) >= BULK_BYTES
            if len(value) < BULK_BYTES:
                value = bytes(value)
        elif isinstance(value, bytes):
            bulk = bulk or len(value) >= BULK_BYTES
        fields[name] = value
    if not bulk:
        return [cbor2.dumps(fields)]
    parts: list[Any] = [cbor_head(5, len(fields))]
    for name, value in fields.items():
        parts.append(cbor2.dumps(name))
        if isinstance(value, (bytes, memoryview)) and len(value) >= BULK_BYTES:
            parts += [cbor_head(2, len(value)), value]
        else:
            parts.append(cbor2.dumps(value))
    return parts


def cbor_head(major: int, n: int) -> bytes:
    """A CBOR head in its shortest form (RFC 8949 §3), as cbor2 writes it."""
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise LocalProtocolError(f"a CBOR length of {n} does not fit 64 bits")


def decode_inner(data: Any, accept: MessageTable, *, max_size: int) -> Message:
    """Validate one node-to-node message (the plaintext of a sealed body), as
    :func:`decode` does a header."""
    limits = _inner_limits(max_size, accept.max_items, accept.depth)
    return _guarded(lambda: _build(_load_map(data, limits, "sealed message"), accept, None))


#: The one field of each node-to-node message that may be a payload of megabytes: what a
#: direct link carries as a frame of its own (:func:`split_bulk`).
BULK_FIELDS = {"job": "payload", "job_result": "result"}


def split_bulk(message: Message) -> tuple[bytes, str, Any] | None:
    """``message`` as the CBOR map of every field but its bulk one, that field's name, and
    its value as it is (no copy); None when it has no value of at least BULK_BYTES."""
    name = BULK_FIELDS.get(message.TYPE)
    value = getattr(message, name) if name is not None else None
    if name is None or value is None or len(memoryview(value)) < BULK_BYTES:
        return None
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": message.TYPE}
    for field in message.RULES:
        other = getattr(message, field)
        if field == name or other is None:
            continue
        if type(other) not in _PLAIN:
            return None  # a buffer in a small field: the whole message, the usual way
        header[field] = other
    return cbor2.dumps(header), name, value


def decode_inner_split(data: Any, name: str, bulk: Any, accept: MessageTable, *, max_size: int) -> Message:
    """A node-to-node message that came as :func:`split_bulk` made it: validated as
    :func:`decode_inner` validates the whole, with ``bulk`` (a buffer, kept as it is: no
    copy) as its field ``name``, which must be the bulk field of its type."""
    size = len(memoryview(data)) + len(memoryview(bulk))
    if size > max_size:
        raise MessageTooLarge(f"sealed message is {size} bytes; the limit is {max_size}")
    limits = _inner_limits(max_size, accept.max_items, accept.depth)

    def build() -> Message:
        fields = _load_map(data, limits, "sealed message")
        type_name = fields.get("t")
        if not isinstance(type_name, str) or BULK_FIELDS.get(type_name) != name or name in fields:
            raise RemoteProtocolError(f"a bulk {strict_cbor.describe(name)} does not belong to this message")
        fields[name] = b""  # checked by the field's own rule as a byte string, then put in
        message = _build(fields, accept, None)
        message.__dict__[name] = memoryview(bulk).cast("B")
        return message

    return _guarded(build)


@functools.lru_cache(maxsize=16)
def _inner_limits(size: int, items: int, depth: int) -> Limits:
    return Limits(size=size, items=items, depth=depth)
