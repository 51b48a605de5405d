"""The MeshNet wire protocol: message types, CBOR codec, validation. No I/O here."""

from meshnet.protocol.codec import (
    decode,
    decode_inner,
    decode_inner_split,
    encode,
    encode_inner,
    encode_inner_parts,
    split_bulk,
    validate,
)
from meshnet.protocol.messages import *  # noqa: F403
from meshnet.protocol.messages import __all__ as _messages_all

__all__ = [
    "decode",
    "decode_inner",
    "decode_inner_split",
    "encode",
    "encode_inner",
    "encode_inner_parts",
    "split_bulk",
    "validate",
    *_messages_all,
]
