"""Several node-to-node messages sealed as one box: a batch.

Under load a node has several messages for one peer in one loop turn (jobs read from a
client together, results of workers that finished together, their acknowledgements).
Sealed one by one, each costs a seal, a frame, the relay's routing and the peer's open.
A batch is sealed once: its plaintext is a CBOR array of byte strings, each one
node-to-node message exactly as :func:`encode_inner` writes it. A single message's
plaintext is a CBOR map, so the first byte tells the two apart (major type 4 against 5).
A node sends batches only to a peer whose ``hello`` said how many messages it reads in
one (``batch``); docs/protocol.md §4.7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from meshnet.errors import RemoteProtocolError
from meshnet.protocol.codec import cbor_head, encode_inner_parts
from meshnet.protocol.messages import Message

#: The most messages a batch carries, and what this node tells its peers it reads.
MAX_BATCH_MESSAGES = 64
#: A message whose payload or result is this large goes alone (a batch is for many small
#: messages: a large one gains nothing, and would hold the others to its size).
BATCH_BULK_BYTES = 16 * 1024
#: A batch is sealed once it holds this many bytes, whatever the turn has still.
MAX_BATCH_BYTES = 256 * 1024

_ARRAY, _BYTES = 4, 2


def encode_batch_parts(messages: Sequence[Message]) -> list[Any]:
    """The plaintext of a batch of ``messages`` (2 to MAX_BATCH_MESSAGES), as pieces
    whose concatenation it is: a large field stays its own buffer, copied once, by the
    sealer."""
    parts: list[Any] = [cbor_head(_ARRAY, len(messages))]
    for message in messages:
        inner = encode_inner_parts(message)
        parts.append(cbor_head(_BYTES, sum(map(_size, inner))))
        parts += inner
    return parts


def is_batch(plaintext: Any) -> bool:
    """Whether a sealed body's plaintext is a batch (a CBOR array), not one message."""
    return len(plaintext) > 0 and plaintext[0] >> 5 == _ARRAY


def split_batch(plaintext: Any, max_messages: int = MAX_BATCH_MESSAGES) -> list[memoryview]:
    """The encoded messages of a batch, each a view of ``plaintext`` (no copy), to be
    decoded with :func:`decode_inner`. Raises ``RemoteProtocolError`` unless it is an
    array of 1 to ``max_messages`` byte strings, each head in its shortest form, and
    nothing after them: at a cost linear in the count, never in the bytes."""
    view = memoryview(plaintext).cast("B")
    count, at = _read_head(view, 0, _ARRAY, "a batch")
    if not 1 <= count <= max_messages:
        raise RemoteProtocolError(f"a batch carries 1 to {max_messages} messages, not {count}")
    items: list[memoryview] = []
    for _ in range(count):
        size, at = _read_head(view, at, _BYTES, "a batched message")
        if size > len(view) - at:
            raise RemoteProtocolError(f"a batched message of {size} bytes runs past the batch's end")
        items.append(view[at : at + size])
        at += size
    if at != len(view):
        raise RemoteProtocolError(f"{len(view) - at} bytes after a batch's last message")
    return items


def _read_head(view: memoryview, at: int, major: int, what: str) -> tuple[int, int]:
    """The argument of the CBOR head at ``at`` of major type ``major``, and where it ends."""
    if at >= len(view):
        raise RemoteProtocolError(f"{what} is cut short")
    first = view[at]
    if first >> 5 != major:
        raise RemoteProtocolError(f"{what} must be a CBOR {'array' if major == _ARRAY else 'byte string'}")
    info = first & 0x1F
    if info < 24:
        return info, at + 1
    if info > 27:
        raise RemoteProtocolError(f"{what} must have a definite length")
    size = 1 << (info - 24)
    if at + 1 + size > len(view):
        raise RemoteProtocolError(f"{what} is cut short")
    value = int.from_bytes(view[at + 1 : at + 1 + size], "big")
    if value < (24 if size == 1 else 1 << (4 * size)):
        raise RemoteProtocolError(f"{what}'s length is not in its shortest form")
    return value, at + 1 + size


def _size(part: Any) -> int:
    return len(part) if isinstance(part, bytes) else memoryview(part).nbytes
