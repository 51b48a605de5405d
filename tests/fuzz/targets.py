"""The decoders the campaign drives: every door through which untrusted bytes or text
enter MeshNet, each with the errors it may raise and the promise its result keeps."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshnet.config import NodeConfig, RelayConfig, load_node_config, load_relay_config
from meshnet.errors import ConfigError, IdentityError, RemoteProtocolError, SealError
from meshnet.identity import Identity, Sealer, curve_public_key, is_peer_id, public_key_from_peer_id
from meshnet.protocol import decode, decode_inner
from meshnet.protocol.batch import MAX_BATCH_MESSAGES, split_batch
from meshnet.protocol.direct import LinkMessage, carried, decode_carried, decode_link
from meshnet.protocol.messages import Message, MessageTable
from meshnet.protocol.strict_cbor import loads_value
from tests.fuzz import generators
from tests.fuzz.checker import Target
from tests.fuzz.generators import MAX_BODY, MAX_INNER, Corpus
from tests.unit.samples import TABLES


def unexpected_marked(exc: BaseException) -> str | None:
    """A protocol error a decoder did not foresee (a bug turned into a typed error)."""
    if getattr(exc, "unexpected", False):
        return f"unexpected=True: {exc}"
    return None


def message_of(table: MessageTable) -> Callable[[Any], str | None]:
    def check(message: Any) -> str | None:
        if table.get(getattr(type(message), "TYPE", None)) is not type(message):
            return f"decoded to {type(message).__name__}, which {table.name} does not carry"
        return None

    return check


PLAIN_SCALARS = (type(None), bool, int, float, str, bytes)


def plain_data(value: Any) -> str | None:
    """Plain CBOR data only: null, bool, numbers, strings, lists, and maps keyed by strings.
    Iterative, and linear in the value: loads_value builds at most an item per byte."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            if not all(isinstance(key, (str, bytes)) for key in item):
                return "decoded to a map with a key that is not a string"
            stack.extend(item.values())
        elif not isinstance(item, PLAIN_SCALARS):
            return f"decoded to a value of type {type(item).__name__}"
    return None


def is_instance(*types: type, size: int | None = None) -> Callable[[Any], str | None]:
    def check(result: Any) -> str | None:
        if not isinstance(result, types) or (isinstance(result, bool) and bool not in types):
            return f"returned a {type(result).__name__}"
        if size is not None and len(result) != size:
            return f"returned {len(result)} bytes"
        return None

    return check


def frame_target(direction: str) -> Target:
    table = TABLES[direction]
    return Target(
        name=direction.lower(),
        call=f"decode(frames, {direction}, max_body={MAX_BODY})",
        decode=lambda frames: decode(frames, table, max_body=MAX_BODY),
        allowed=(RemoteProtocolError,),
        generate=lambda rng, corpus: generators.frames_input(rng, corpus, direction),
        check_result=message_of(table),
        check_error=unexpected_marked,
    )


def inner_target() -> Target:
    table = TABLES["NODE_TO_NODE"]
    return Target(
        name="node_to_node",
        call=f"decode_inner(data, NODE_TO_NODE, max_size={MAX_INNER})",
        decode=lambda data: decode_inner(data, table, max_size=MAX_INNER),
        allowed=(RemoteProtocolError,),
        generate=generators.inner_input,
        check_result=message_of(table),
        check_error=unexpected_marked,
    )


def link_target() -> Target:
    """A direct link's frames: the link message, and each node-to-node message it carries
    (a link message with one bad message in it counts as refused here; a node drops that
    one message only)."""
    table = TABLES["NODE_TO_NODE"]

    def decode_all(frames: list[Any]) -> tuple[LinkMessage, list[Message]]:
        link = decode_link(frames)
        return link, [decode_carried(item, table, max_size=MAX_INNER) for item in carried(link)]

    def check(result: tuple[LinkMessage, list[Message]]) -> str | None:
        link, messages = result
        if not isinstance(link, LinkMessage):
            return f"decoded to a {type(link).__name__}, not a link message"
        return next(filter(None, map(message_of(table), messages)), None)

    return Target(
        name="direct_link",
        call=f"decode_link(frames), then decode_carried(each, NODE_TO_NODE, max_size={MAX_INNER})",
        decode=decode_all,
        allowed=(RemoteProtocolError,),
        generate=generators.link_input,
        check_result=check,
        check_error=unexpected_marked,
    )


def batch_target() -> Target:
    """A batch's plaintext: its messages split out, then each decoded (a node drops a
    batch whole if any of its messages is refused)."""
    table = TABLES["NODE_TO_NODE"]

    def decode_all(data: Any) -> list[Message]:
        return [decode_inner(item, table, max_size=MAX_INNER) for item in split_batch(data)]

    def check(messages: list[Message]) -> str | None:
        if not 1 <= len(messages) <= MAX_BATCH_MESSAGES:
            return f"decoded to {len(messages)} messages"
        return next(filter(None, map(message_of(table), messages)), None)

    return Target(
        name="batch",
        call=f"split_batch(data), then decode_inner(each, NODE_TO_NODE, max_size={MAX_INNER})",
        decode=decode_all,
        allowed=(RemoteProtocolError,),
        generate=generators.batch_input,
        check_result=check,
        check_error=unexpected_marked,
    )


def sealed_target(corpus: Corpus) -> Target:
    sealer = Sealer(corpus.receiver)
    table = TABLES["NODE_TO_NODE"]

    def open_and_decode(data: tuple[str, bytes]) -> Any:
        peer_id, sealed = data
        return decode_inner(sealer.open(peer_id, sealed), table, max_size=MAX_INNER)

    return Target(
        name="sealed",
        call="decode_inner(Sealer(identity).open(peer_id, data), NODE_TO_NODE, ...)",
        decode=open_and_decode,
        allowed=(SealError, RemoteProtocolError),
        generate=generators.sealed_input,
        check_result=message_of(table),
        check_error=unexpected_marked,
    )


def value_target() -> Target:
    return Target(
        name="value",
        call="strict_cbor.loads_value(data)",
        decode=loads_value,
        allowed=(RemoteProtocolError,),
        generate=generators.value_input,
        check_result=plain_data,
        check_error=unexpected_marked,
    )


def config_target(
    name: str, load: Callable[[Path], Any], config_type: type, generate: Callable, workdir: Path
) -> Target:
    """A loader of config files; each input is written to a file of this process's own
    under ``workdir`` (the write is timed with the load: a few microseconds)."""
    path = workdir / f"{name}-{os.getpid()}.toml"

    def write_and_load(content: bytes) -> Any:
        path.write_bytes(content)
        return load(path)

    return Target(
        name=name,
        call=f"{load.__name__}(path)",
        decode=write_and_load,
        allowed=(ConfigError,),
        generate=generate,
        check_result=is_instance(config_type),
    )


def key_targets() -> list[Target]:
    generate = generators.key_text
    return [
        Target(
            "private_key",
            "Identity.from_private_key(text)",
            Identity.from_private_key,
            (IdentityError,),
            generate,
            is_instance(Identity),
        ),
        Target(
            "peer_id",
            "public_key_from_peer_id(text)",
            public_key_from_peer_id,
            (IdentityError,),
            generate,
            is_instance(bytes, size=32),
        ),
        Target("is_peer_id", "is_peer_id(text)", is_peer_id, (), generate, is_instance(bool)),
        Target(
            "curve_public_key",
            "curve_public_key(text)",
            curve_public_key,
            (IdentityError,),
            generate,
            is_instance(bytes, size=32),
        ),
    ]


def build_targets(seed: int, workdir: Path) -> tuple[dict[str, Target], Corpus]:
    """Every decoder, in report order, and the corpus their inputs are drawn from;
    config files are written under ``workdir``."""
    corpus = Corpus.build(seed)
    targets = [
        *(frame_target(direction) for direction in generators.FRAME_DIRECTIONS),
        inner_target(),
        link_target(),
        batch_target(),
        sealed_target(corpus),
        value_target(),
        config_target("node_config", load_node_config, NodeConfig, generators.node_config_input, workdir),
        config_target("relay_config", load_relay_config, RelayConfig, generators.relay_config_input, workdir),
        *key_targets(),
    ]
    return {target.name: target for target in targets}, corpus
