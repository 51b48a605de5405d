"""The direct-link protocol (docs/protocol.md §7.8): what two nodes say to each other on
a CurveZMQ connection of their own, as values and frames. No I/O here.

A link message is one multipart message (a listener's ROUTER sees a routing id before it,
which is not part of the message)::

    [b"hi"] or [b"hi", features]      a side's first word: what it reads beyond boxes
    [b"box", message]                 one node-to-node message (§7), in the clear
    [b"boxes", m1, ..., mN]           several, taken one by one, in order
    [b"parts", field, message, bulk]  one message whose bulk field is a frame of its own
    [b"ping"], [b"pong"], [b"bye"]

:func:`decode_link` is the only door through which a link's frames enter a node: whatever
they are, it returns one of the values below or raises a ``RemoteProtocolError``, at a
cost linear in their number (it does not look inside the messages a box carries: the
session does, with :func:`decode_carried`, one message at a time, so that one bad message
does not cost the others of its batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from meshnet.errors import LocalProtocolError, RemoteProtocolError
from meshnet.protocol.codec import decode_inner, decode_inner_split
from meshnet.protocol.messages import Message, MessageTable

HI = b"hi"
BOX = b"box"
BOXES = b"boxes"
PARTS = b"parts"
PING = b"ping"
PONG = b"pong"
BYE = b"bye"
#: What a hi's features say: the sender reads ``[boxes, ...]``, and ``[parts, ...]``.
READS_BOXES = "boxes"
READS_PARTS = "parts"
#: Boxes one batch carries at most when this node sends it; a message of BULK_BYTES or
#: more goes alone (it costs far more than its send: it is not held back for others).
MAX_BATCH = 8
#: Boxes in one batch this node reads (a peer may batch more than this node does).
MAX_BATCH_READ = 64
#: Frames of one link message at most: ``parts`` has four.
MAX_FRAMES = MAX_BATCH_READ + 1
#: A hi's features frame at most (unknown words are ignored; a frame this size is not a
#: list of words).
MAX_FEATURES = 256
#: A parts message's field name at most (``payload`` or ``result`` today).
MAX_FIELD = 32


@dataclass(frozen=True, slots=True)
class Hi:
    """A side's first word. On a dialled link, the listener ties the connection to the key
    that said it; ``batches`` and ``parts``: what else the sender reads."""

    batches: bool = False
    parts: bool = False

    def frames(self) -> list[bytes]:
        words = [word for word, said in ((READS_BOXES, self.batches), (READS_PARTS, self.parts)) if said]
        return [HI, " ".join(words).encode("ascii")] if words else [HI]


@dataclass(frozen=True, slots=True)
class Boxes:
    """One or more node-to-node messages (``[box, m]`` or ``[boxes, m1, ...]``), each a
    buffer as it came (:func:`decode_carried` validates it)."""

    messages: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Parts:
    """One node-to-node message whose bulk field ``field`` came as a frame of its own:
    ``message`` is the CBOR map of its other fields, ``bulk`` that field's bytes."""

    field: str
    message: Any
    bulk: Any


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class Bye:
    pass


LinkMessage = Hi | Boxes | Parts | Ping | Pong | Bye
#: What a link's ``boxes`` and ``parts`` carry, one message each.
Carried = Any  # a buffer (one message's CBOR map) or a Parts

OUR_HI = Hi(batches=True, parts=True)
_SINGLE: dict[bytes, LinkMessage] = {PING: Ping(), PONG: Pong(), BYE: Bye()}
_KINDS = (HI, BOX, BOXES, PARTS, PING, PONG, BYE)
_LONGEST_KIND = max(len(kind) for kind in _KINDS)


def decode_link(frames: Sequence[Any]) -> LinkMessage:
    """The link message ``frames`` make (each frame bytes, a buffer or a ``zmq.Frame``),
    or ``RemoteProtocolError`` saying why they make none."""
    if not frames:
        raise RemoteProtocolError("a link message needs at least one frame")
    if len(frames) > MAX_FRAMES:
        raise RemoteProtocolError(f"a link message has at most {MAX_FRAMES} frames, not {len(frames)}")
    first = frames[0]
    kind = bytes(first) if len(first) <= _LONGEST_KIND else b""
    rest = len(frames) - 1
    if kind == BOX and rest == 1:
        return Boxes((frames[1],))
    if kind == BOXES and 1 <= rest <= MAX_BATCH_READ:
        return Boxes(tuple(frames[1:]))
    if kind in _SINGLE and rest == 0:
        return _SINGLE[kind]
    if kind == PARTS and rest == 3:
        return Parts(_field_name(frames[1]), frames[2], frames[3])
    if kind == HI and rest <= 1:
        return _hi(frames[1] if rest else b"")
    if kind in _KINDS:
        raise RemoteProtocolError(f"a {kind.decode()!r} link message cannot have {rest} frames after its kind")
    raise RemoteProtocolError(
        "not a link message: the first frame must be one of hi, box, boxes, parts, ping, pong, bye"
    )


def _hi(features: Any) -> Hi:
    if len(features) > MAX_FEATURES:
        raise RemoteProtocolError(f"a hi's features are at most {MAX_FEATURES} bytes, not {len(features)}")
    words = bytes(features).decode("ascii", "replace").split()
    return Hi(batches=READS_BOXES in words, parts=READS_PARTS in words)


def _field_name(frame: Any) -> str:
    if not 0 < len(frame) <= MAX_FIELD:
        raise RemoteProtocolError(f"a parts message's field name is 1 to {MAX_FIELD} bytes, not {len(frame)}")
    name = bytes(frame)
    if not name.isascii() or not name.replace(b"_", b"").isalnum():
        raise RemoteProtocolError("a parts message's field name must be ASCII letters, digits and _")
    return name.decode("ascii")


def decode_carried(item: Carried, accept: MessageTable, *, max_size: int) -> Message:
    """One node-to-node message a link carried (an item of :class:`Boxes`'s ``messages``,
    or a :class:`Parts`), validated as an opened sealed box is."""
    if isinstance(item, Parts):
        return decode_inner_split(item.message, item.field, item.bulk, accept, max_size=max_size)
    return decode_inner(item, accept, max_size=max_size)


def carried(message: LinkMessage) -> tuple[Carried, ...]:
    """The node-to-node messages ``message`` carries, in order (none for a control word)."""
    if isinstance(message, Boxes):
        return message.messages
    if isinstance(message, Parts):
        return (message,)
    return ()


def box_frames(messages: Sequence[Any]) -> list[Any]:
    """The frames of a link message carrying ``messages`` (encoded node-to-node messages):
    ``[box, m]`` for one, ``[boxes, m1, ...]`` for more (at most MAX_BATCH_READ)."""
    if len(messages) == 1:
        return [BOX, messages[0]]
    if not 1 < len(messages) <= MAX_BATCH_READ:
        raise LocalProtocolError(f"a batch carries 1 to {MAX_BATCH_READ} messages, not {len(messages)}")
    return [BOXES, *messages]


def parts_frames(message: Any, field: str, bulk: Any) -> list[Any]:
    """The frames of a message sent in parts: ``message``, ``field`` and ``bulk`` as
    :func:`meshnet.protocol.split_bulk` made them (``bulk`` not copied)."""
    return [PARTS, field.encode("ascii"), message, bulk]
