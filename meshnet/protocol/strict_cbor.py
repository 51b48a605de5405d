"""CBOR decoding whose cost is linear in the input, with a small stated constant.

Every byte a peer sends that MeshNet decodes goes through :func:`loads`. Plain
``cbor2.loads`` is not safe for that: CBOR's shared references (tags 28/29) let a
217-byte frame stand for a value that takes gigabytes to walk or print; string
references (tags 25/256) do the same for strings; ``bigfloat`` (tag 5) computes
``2 ** exponent`` for an exponent the sender picks; integer map keys that collide in
Python's hash make building a dict quadratic. So, while decoding and before any
value is built:

* **No tags at all.** No message, payload or result of the protocol uses one. cbor2's
  own semantic tags (the ones it would decode itself) are handed to a decoder that
  refuses them, any other tag to a tag hook that does the same. Either runs once the
  tag's content is decoded, so the innermost tag of a nest is refused first and no
  reference is ever followed: the content decoded is part of the frame, read once.
* **No indefinite lengths**, **map keys are text or byte strings** (strings hash with
  a per-process random key), **no duplicate keys**.
* **Depth** at most ``limits.depth`` containers (cbor2 checks it as it descends).
* **Items** at most ``limits.items``. Every item takes at least one byte, so a frame
  of at most ``limits.items`` bytes cannot hold more; a larger frame is first
  walked by :func:`count_items`, which reads only the items' heads (a string's bytes
  are skipped, not read) and stops at the first item over the budget or the first
  declared length longer than what is left of the frame.

What that bounds (measured by ``make fuzz``, which reports the worst input it finds):
time linear in the frame's size, and memory at most the frame's own size (strings)
plus about 100 bytes per item (an empty map, the costliest item per byte, is 64 bytes
of dict and an 8-byte slot for one byte of input).
"""

from __future__ import annotations

import io
import re
import struct
import threading
from typing import Any, NamedTuple

import cbor2

from meshnet.errors import MessageTooLarge, RemoteProtocolError

#: Tags cbor2 6 decodes itself rather than handing to the tag hook: each gets a decoder
#: that refuses it. ``tests/unit/test_strict_cbor.py``
#: checks every tag up to 2**16 and the largest ones, so that a cbor2 release adding a
#: tag of its own fails the suite rather than slipping through.
CBOR2_SEMANTIC_TAGS = (
    *(0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100),
    *(256, 258, 260, 261, 1004, 43000, 55799),
)

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from


class Limits(NamedTuple):
    """What one decoded CBOR item may hold. (A named tuple: one is made per payload
    decoded, and a frozen dataclass costs several times as much to make.)"""

    #: The most bytes; checked before anything is read.
    size: int
    #: The most data items in all (every map key and value, array element, container).
    items: int
    #: The most containers nested in one another (the outermost counts as one).
    depth: int


#: Containers nested in a job's payload or result. Deep enough for any data a job
#: takes (JSON documents rarely pass 20), shallow enough that a decoder written with
#: recursion (cbor2's, a handler's) stays far from the interpreter's stack limit.
VALUE_DEPTH = 100


#: The bytes that may begin a simple value other than false, true, null or a float
#: (``0xe0``-``0xf3``: simple 0-19; ``0xf7``: undefined; ``0xf8``: a one-byte simple value).
_MAYBE_SIMPLE = re.compile(rb"[\xe0-\xf3\xf7\xf8]")


def loads_value(data: Any, what: str = "value") -> Any:
    """Decode a job's payload or result: plain CBOR data (no tags, no simple values but
    false, true and null, map keys text or byte strings), of any size. Its items are
    bounded by its size (each takes a byte at least), so decoding it takes at most about
    100 bytes of memory per byte.

    cbor2 would decode the other simple values (as ``CBORSimpleValue``, ``undefined``);
    they are found by a walk of the heads, which runs only when a byte that could start
    one appears at all (a search at C speed): most data has none, and a large byte
    string is skipped whole by the walk."""
    view = memoryview(data).cast("B")
    size = len(view)
    value = loads(data, Limits(size=size, items=size, depth=VALUE_DEPTH), what)
    if _MAYBE_SIMPLE.search(view) is not None:
        try:
            count_items(data, size, VALUE_DEPTH, plain=True)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{what} is not plain data: {exc}") from None
    return value


class TooManyItems(RemoteProtocolError):
    """More data items than the budget allows."""


class _Refused(Exception):
    """Raised inside cbor2's callbacks; cbor2 wraps it in its own error."""


def _refuse_tag(*args: Any) -> Any:
    """cbor2's tag hook and semantic decoder, for every tag: refuse it."""
    raise _Refused("CBOR tags are not allowed")


_REFUSE_SEMANTIC = {tag: _refuse_tag for tag in CBOR2_SEMANTIC_TAGS}


def count_items(data: Any, budget: int, depth_limit: int, *, plain: bool = False) -> int:
    """The number of data items in the CBOR item ``data`` starts with, walking heads
    only. Raises ``RemoteProtocolError`` at the first thing that :func:`loads` refuses
    anyway (a tag, an indefinite length, a declared length past the end) or once
    ``budget`` items or ``depth_limit`` nested containers are exceeded: the walk's cost
    is bounded by the budget, whatever the frame says. ``plain`` also refuses the simple
    values other than false, true and null (``undefined`` and the unassigned ones)."""
    view = memoryview(data).cast("B")
    end = len(view)
    pos = 0
    items = 0
    # Items still to read in each open container, innermost last.
    open_counts = [1]
    while open_counts:
        if pos >= end:
            raise RemoteProtocolError("CBOR data ends early")
        initial = view[pos]
        pos += 1
        major, info = initial >> 5, initial & 0x1F
        if info < 24:
            argument = info
        elif info == 24 and pos + 1 <= end:
            argument = view[pos]
            pos += 1
        elif info == 25 and pos + 2 <= end:
            argument = _U16(view, pos)[0]
            pos += 2
        elif info == 26 and pos + 4 <= end:
            argument = _U32(view, pos)[0]
            pos += 4
        elif info == 27 and pos + 8 <= end:
            argument = _U64(view, pos)[0]
            pos += 8
        elif info >= 28 and major != 7 or info == 31:
            raise RemoteProtocolError("CBOR indefinite lengths are not allowed")
        elif info >= 28:
            raise RemoteProtocolError("CBOR data is malformed (reserved additional information)")
        else:
            raise RemoteProtocolError("CBOR data ends early")
        items += 1
        if items > budget:
            raise TooManyItems(f"CBOR data holds more than {budget} items")
        open_counts[-1] -= 1
        if major == 2 or major == 3:  # byte or text string: skip its bytes
            if argument > end - pos:
                raise RemoteProtocolError("CBOR data ends early (a string is longer than what is left)")
            pos += argument
        elif major == 4 or major == 5:  # array, map
            entries = argument if major == 4 else 2 * argument
            if entries > end - pos:  # each entry needs at least one byte
                raise RemoteProtocolError("CBOR data ends early (a container declares more items than fit)")
            if entries:
                if len(open_counts) > depth_limit:
                    raise RemoteProtocolError(f"CBOR data nests deeper than {depth_limit} containers")
                open_counts.append(entries)
                continue
        elif major == 6:
            raise RemoteProtocolError("CBOR tags are not allowed")
        elif plain and major == 7 and (info < 20 or info == 23 or info == 24):
            raise RemoteProtocolError("CBOR simple values other than false, true and null are not allowed")
        while open_counts and open_counts[-1] == 0:
            open_counts.pop()
    return items


def loads(data: Any, limits: Limits, what: str) -> Any:
    """Decode the one CBOR item that is the whole of ``data`` (bytes-like).

    Raises ``MessageTooLarge`` past ``limits.size`` and ``RemoteProtocolError`` for
    anything else: malformed or truncated data, bytes after the item, a tag, an
    indefinite length, a map key that is not a string, a duplicate key, or more items
    or depth than ``limits`` allow. ``what`` names the data in error texts, which
    never quote the data itself."""
    size = len(memoryview(data))
    if size > limits.size:
        raise MessageTooLarge(f"{what} is {size} bytes; the limit is {limits.size}")
    if size > limits.items:
        try:
            count_items(data, limits.items, limits.depth)
        except TooManyItems as exc:
            raise RemoteProtocolError(f"{what} is refused: {exc}") from None
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"{what} is not valid CBOR: {exc}") from None
    decoder = _decoder(limits.depth)
    decoder.fp = _source(data, size)
    try:
        value = decoder.decode()
        trailing = size - decoder.fp.tell()
    except Exception as exc:  # cbor2 reports bad input with several exception types
        # A decoder that failed half-way is not reused: its state is not to be trusted.
        del _decoders.by_depth[limits.depth]
        if isinstance(exc, RecursionError):
            raise RemoteProtocolError(f"{what} nests too deep") from None
        raise RemoteProtocolError(f"{what} is not valid CBOR: {_diagnose(data, limits, exc)}") from None
    finally:
        decoder.fp = _NOTHING  # not to keep the data (a payload of megabytes) alive
    if trailing:
        raise RemoteProtocolError(f"{what} has {trailing} bytes after its CBOR item")
    return value


#: One decoder per thread and depth, reused: building one with these options costs as
#: much as decoding a small header with it.
_decoders = threading.local()
_NOTHING = io.BytesIO(b"")


def _decoder(depth: int) -> cbor2.CBORDecoder:
    by_depth: dict[int, cbor2.CBORDecoder]
    try:
        by_depth = _decoders.by_depth
    except AttributeError:
        by_depth = _decoders.by_depth = {}
    decoder = by_depth.get(depth)
    if decoder is None:
        decoder = by_depth[depth] = cbor2.CBORDecoder(
            _NOTHING,
            tag_hook=_refuse_tag,
            semantic_decoders=_REFUSE_SEMANTIC,
            max_depth=depth,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=True,
        )
    return decoder


#: A buffer other than ``bytes`` this large is read in place (see :func:`_source`).
IN_PLACE_BYTES = 64 * 1024


def _source(data: Any, size: int) -> Any:
    """The file cbor2 reads ``data`` from. ``io.BytesIO`` shares a ``bytes`` object's
    buffer and lets cbor2 read ahead (fast per item), but copies any other buffer: a
    large ``bytearray`` (an opened sealed message, megabytes of payload in a few items)
    is read in place instead, and a small one copied once."""
    if type(data) is bytes:
        return io.BytesIO(data)
    if size < IN_PLACE_BYTES:
        return io.BytesIO(bytes(data))
    return _Reader(data)


class _Reader:
    """The smallest file cbor2 reads from: ``read`` and ``tell`` over a buffer, with no
    copy of the buffer itself. cbor2 reads a file that cannot seek exactly as much as
    each item needs: a call per item, so this is for buffers of few, large items."""

    __slots__ = ("_view", "_pos")

    def __init__(self, data: Any):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        start = self._pos
        stop = len(self._view) if n < 0 else min(len(self._view), start + n)
        self._pos = stop
        return self._view[start:stop].tobytes()

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


#: Items a failed decode's diagnosis reads at most.
DIAGNOSIS_ITEMS = 4096


def _diagnose(data: Any, limits: Limits, exc: BaseException) -> str:
    """Why ``data`` failed to decode, in the words of the first problem in document
    order: cbor2 decodes a tag's content before it meets the tag, so a nest of tags
    fails on its depth first, though the tag is what is wrong. A walk of the heads (at
    most ``DIAGNOSIS_ITEMS``) names it; otherwise cbor2's own reason is given."""
    try:
        count_items(data, min(limits.items, DIAGNOSIS_ITEMS), limits.depth)
    except TooManyItems:
        pass
    except RemoteProtocolError as problem:
        return str(problem)
    return _cause(exc)


def _cause(exc: BaseException) -> str:
    """cbor2's reason, without the values it may quote (a long key, say), cut short."""
    reasons: list[str] = []
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(reasons) < 3:
        seen.add(id(exc))
        text = str(exc)[:160] if isinstance(exc, (_Refused, cbor2.CBORError)) else type(exc).__name__
        if text and text not in reasons:
            reasons.append(text)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return ": ".join(reasons) or "malformed"


def describe(value: Any) -> str:
    """A short description of an untrusted value for an error text: its type and size,
    and for a short string or a number the value itself. Costs O(1) whatever the value
    (never ``repr`` of a whole peer-supplied value: that can be arbitrarily costly)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value) if -(2**64) < value < 2**64 else "a very large integer"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        shown = value[:40]
        return repr(shown) if len(value) <= 40 else f"{shown!r}... ({len(value)} characters)"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"a byte string of {len(value)} bytes"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return f"a map of {len(value)} entries"
    return f"a value of type {type(value).__name__}"
