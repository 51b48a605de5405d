"""Inputs for every decoder, each drawn from a ``random.Random`` and a :class:`Corpus`.

Each generator mixes three sources: purely random bytes or text; mutations of valid
samples (``tests/unit/samples.py``, encoded as they travel); and structure-aware inputs
that put an amplification shape (:mod:`tests.fuzz.cbor_shapes`, or a TOML or key-text
counterpart here) where a decoder meets it: the whole frame, ``v`` or ``t``, another
field's value, a map key, or deeper inside a field.

Everything is derived from the campaign's seed (identities included), so that the seed,
a decoder's name and an input's index reproduce the input in any process.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.public
import nacl.signing
import tomli_w

from meshnet.config import NodeConfig, RelayConfig
from meshnet.identity import B58_ALPHABET, ED25519_PUB_MULTICODEC, NONCE_SIZE, Identity, b58encode
from meshnet.protocol import SEALED_OPS, STATUSES, Message, encode, encode_inner
from meshnet.protocol.codec import cbor_head
from tests.fuzz import cbor_shapes as shapes
from tests.fuzz.cbor_shapes import cbor_map, integer, text
from tests.fuzz.mutations import mutate_bytes, mutate_text, random_bytes, random_text
from tests.unit import samples

#: The body limit the frame decoders are given (the property tests' own).
MAX_BODY = samples.MAX_BODY
#: A sealed message's size limit: larger than most inputs, smaller than the largest.
MAX_INNER = 1 << 20
FRAME_DIRECTIONS = tuple(samples.FRAME_DIRECTIONS)
MESSAGE_TYPES = sorted({name for table in samples.TABLES.values() for name in table})

Pairs = list[tuple[bytes, bytes]]


def seeded_identity(seed: int, name: str) -> Identity:
    digest = hashlib.sha256(f"meshnet-fuzz/{seed}/{name}".encode()).digest()
    return Identity(nacl.signing.SigningKey(digest))


def _swap_peers(value: Any, peers: dict[str, str]) -> Any:
    if isinstance(value, str):
        return peers.get(value, value)
    if isinstance(value, list):
        return [_swap_peers(item, peers) for item in value]
    if isinstance(value, dict):
        return {key: _swap_peers(item, peers) for key, item in value.items()}
    return value


def with_seeded_peers(message: Message, peers: dict[str, str]) -> Message:
    """``message`` with the sample module's peer ids (new at each import) replaced by
    the seed's: the samples are then the same in every worker process."""
    changes = {f.name: _swap_peers(getattr(message, f.name), peers) for f in dataclasses.fields(message)}
    return dataclasses.replace(message, **changes)


def header_pairs(header: bytes) -> Pairs:
    """A valid header's fields as (key, value) pairs of CBOR bytes, to rebuild it with one changed."""
    return [(cbor2.dumps(key), cbor2.dumps(value)) for key, value in cbor2.loads(header).items()]


@dataclass(frozen=True)
class Corpus:
    """The valid samples inputs start from, and the identities they name."""

    #: The node that opens sealed messages, and the one that sealed them.
    receiver: Identity
    sender: Identity
    peer_ids: tuple[str, ...]
    #: direction -> the frames of each valid sample of that direction
    frames: dict[str, tuple[list[bytes], ...]]
    headers: tuple[bytes, ...]
    header_fields: dict[str, tuple[Pairs, ...]]
    inner: tuple[bytes, ...]
    inner_fields: tuple[Pairs, ...]
    payloads: tuple[bytes, ...]
    node_configs: tuple[str, ...]
    relay_configs: tuple[str, ...]
    key_texts: tuple[str, ...]
    box: nacl.public.Box

    @classmethod
    def build(cls, seed: int) -> Corpus:
        receiver, sender = seeded_identity(seed, "receiver"), seeded_identity(seed, "sender")
        peers = {samples.PEER: receiver.peer_id, samples.OTHER_PEER: sender.peer_id}
        messages = {d: [with_seeded_peers(m, peers) for m in samples.SAMPLES[d]] for d in samples.SAMPLES}
        frames = {d: tuple(encode(m) for m in messages[d]) for d in FRAME_DIRECTIONS}
        inner = tuple(encode_inner(m) for m in messages["NODE_TO_NODE"])
        others = tuple(seeded_identity(seed, f"peer{i}") for i in range(4))
        key_texts = tuple(t for i in (receiver, sender, *others) for t in (i.peer_id, i.private_key_text))
        return cls(
            receiver=receiver,
            sender=sender,
            peer_ids=(receiver.peer_id, sender.peer_id, *(i.peer_id for i in others)),
            frames=frames,
            headers=tuple(f[0] for d in FRAME_DIRECTIONS for f in frames[d]),
            header_fields={d: tuple(header_pairs(f[0]) for f in frames[d]) for d in FRAME_DIRECTIONS},
            inner=inner,
            inner_fields=tuple(header_pairs(data) for data in inner),
            payloads=tuple(cbor2.dumps(value) for value in PAYLOADS),
            node_configs=tuple(tomli_w.dumps(doc) for doc in node_documents(receiver, sender)),
            relay_configs=tuple(tomli_w.dumps(doc) for doc in relay_documents(receiver, sender)),
            key_texts=key_texts,
            box=nacl.public.Box(
                nacl.public.PrivateKey(sender.curve_secret_key), nacl.public.PublicKey(receiver.curve_public_key)
            ),
        )


# -- CBOR messages: frames, sealed plaintexts, payloads --


def plausible_value(rng: random.Random, corpus: Corpus, name: str) -> bytes:
    """A value that passes the rule of field ``name`` or misses it narrowly."""
    if name in ("to", "peer", "peer_id", "sender"):
        if rng.random() < 0.7:
            return text(rng.choice(corpus.peer_ids))
        return text(mutate_text(rng, corpus.peer_ids[0], corpus.peer_ids, B58_ALPHABET))
    if name in ("id", "ref", "nonce", "payload", "result"):
        return shapes.byte_string(rng.randbytes(rng.choice((16, 16, 15, 17, 24, 25, 0))))
    if name in ("timeout", "heartbeat"):
        return rng.choice((cbor2.dumps(2.5), integer(30), cbor2.dumps(0.0), integer(-1), integer(2**1100), b"\xf5"))
    if name in ("seq", "more", "v"):
        return integer(rng.choice((0, 1, 7, 2**63 - 1, 2**63, -1)))
    if name == "status":
        return text(rng.choice(STATUSES))
    if name == "op":
        return text(rng.choice(SEALED_OPS))
    if name == "t":
        return text(rng.choice(MESSAGE_TYPES))
    if name == "kind":
        return text(rng.choice(("echo", "sha256", "A", "x" * 65, "")))
    if name == "error":
        return cbor_map([(text(k), text(random_text(rng))) for k in rng.sample(("type", "message", "reason"), 2)])
    if name in ("info", "caps"):
        return cbor_map([(text(shapes.random_word(rng)), shapes.random_item(rng)) for _ in range(rng.randrange(4))])
    if name in ("listen", "peers"):
        return shapes.array([shapes.random_item(rng) for _ in range(rng.randrange(4))])
    return text(random_text(rng, size=rng.choice((0, 8, 4096, 4097))))


def message_shaped(rng: random.Random, corpus: Corpus) -> bytes:
    """A map with a known version and type name and a few fields of plausible values."""
    names = rng.sample(shapes.FIELD_NAMES, rng.randint(0, 6))
    pairs = [(text("v"), integer(1)), (text("t"), text(rng.choice(MESSAGE_TYPES)))]
    pairs += [(text(name), plausible_value(rng, corpus, name)) for name in names]
    return cbor_map(pairs)


def embed(rng: random.Random, pairs: Pairs, shape: bytes) -> bytes:
    """A valid message's map with ``shape`` put where a decoder meets it."""
    pairs = list(pairs)
    where = rng.randrange(6)
    if where <= 1:  # the version or the type, read before anything else
        key = text("v" if where == 0 else "t")
        pairs = [(k, shape if k == key else v) for k, v in pairs]
    elif where == 2 and pairs:  # another field's value
        at = rng.randrange(len(pairs))
        pairs[at] = (pairs[at][0], shape)
    elif where == 3:  # a map key
        pairs.insert(rng.randint(0, len(pairs)), (shape, b"\x00"))
    elif where == 4 and pairs:  # inside a field: a list or a map
        at = rng.randrange(len(pairs))
        inside = shapes.array([shape]) if rng.random() < 0.5 else cbor_map([(text("a"), shape)])
        pairs[at] = (pairs[at][0], inside)
    else:  # a new field, maybe a known name again
        pairs.append((text(rng.choice(shapes.FIELD_NAMES)), shape))
    return cbor_map(pairs)


def with_one_field(rng: random.Random, corpus: Corpus, pairs: Pairs) -> bytes:
    """A valid sample with one field's value replaced by a plausible one (now and then
    the sample as it is): inputs that reach the field rules and the success path."""
    pairs = list(pairs)
    if pairs and rng.random() < 0.75:
        at = rng.randrange(len(pairs))
        name = cbor2.loads(pairs[at][0])
        pairs[at] = (pairs[at][0], plausible_value(rng, corpus, name if isinstance(name, str) else ""))
    return cbor_map(pairs)


def message_map(rng: random.Random, corpus: Corpus, fields: Sequence[Pairs], donors: Sequence[bytes]) -> bytes:
    """A header (or sealed plaintext): random, message-shaped, a sample with one field
    changed, a mutated sample, or a sample with an amplification shape in it."""
    roll = rng.random()
    if roll < 0.08:
        return random_bytes(rng)
    if roll < 0.14:
        return message_shaped(rng, corpus)
    if roll < 0.22:
        return with_one_field(rng, corpus, rng.choice(fields))
    if roll < 0.50:
        return mutate_bytes(rng, rng.choice(donors), donors)
    if roll < 0.95:
        return embed(rng, rng.choice(fields), shapes.amplification_shape(rng))
    return shapes.amplification_shape(rng)


def as_buffer(rng: random.Random, data: bytes, bytearray_share: float = 0.15) -> Any:
    """``data`` as bytes, a bytearray or a memoryview: the decoders read each differently
    (a large non-bytes buffer is read in place)."""
    roll = rng.random()
    if roll < bytearray_share:
        return bytearray(data)
    if roll < bytearray_share + 0.15:
        return memoryview(data)
    return data


def body_frame(rng: random.Random, corpus: Corpus) -> bytes | None:
    roll = rng.random()
    if roll < 0.45:
        return None
    if roll < 0.80:
        return rng.choice(corpus.payloads)
    if roll < 0.95:
        return random_bytes(rng)
    return b"\x00" * (MAX_BODY + rng.choice((-1, 0, 1, 1000)))  # around the body limit


def frames_input(rng: random.Random, corpus: Corpus, direction: str) -> list[Any]:
    """One message as it arrives: a header frame and an optional body frame (rarely no
    frame or a third one). Samples of the other directions come too: wrong-link types."""
    own = rng.random() < 0.7
    if own:
        fields, donors = corpus.header_fields[direction], [f[0] for f in corpus.frames[direction]]
    else:
        fields, donors = tuple(p for d in FRAME_DIRECTIONS for p in corpus.header_fields[d]), list(corpus.headers)
    frames = [as_buffer(rng, message_map(rng, corpus, fields, donors))]
    body = body_frame(rng, corpus)
    if body is not None:
        frames.append(as_buffer(rng, body))
    if rng.random() < 0.01:
        frames = [] if rng.random() < 0.5 else [*frames, b"", b"extra"][:3]
    return frames


def inner_plaintext(rng: random.Random, corpus: Corpus) -> bytes:
    return message_map(rng, corpus, corpus.inner_fields, corpus.inner)


def inner_input(rng: random.Random, corpus: Corpus) -> Any:
    """A sealed message's plaintext; often a bytearray, which is what opening one returns."""
    return as_buffer(rng, inner_plaintext(rng, corpus), bytearray_share=0.4)


def seal(rng: random.Random, corpus: Corpus, plaintext: bytes) -> bytes:
    """``plaintext`` sealed by the sender to the receiver, in the format Sealer opens,
    with a nonce from ``rng`` so that the box is reproducible."""
    nonce = rng.randbytes(NONCE_SIZE)
    return nonce + corpus.box.encrypt(plaintext, nonce).ciphertext


def sealed_input(rng: random.Random, corpus: Corpus) -> tuple[str, bytes]:
    """(the sender's peer id as the receiver was told it, the sealed bytes)."""
    roll = rng.random()
    sender = corpus.sender.peer_id
    if roll < 0.55:
        return sender, seal(rng, corpus, inner_plaintext(rng, corpus))
    if roll < 0.75:
        boxes = [seal(rng, corpus, data) for data in corpus.inner[:2]]
        return sender, mutate_bytes(rng, boxes[0], boxes, max_rounds=3)
    if roll < 0.90:
        return sender, rng.randbytes(rng.randint(0, rng.choice((40, 41, 100, 1000))))
    wrong_peer = rng.choice((rng.choice(corpus.peer_ids), mutate_text(rng, sender, corpus.peer_ids, B58_ALPHABET)))
    return wrong_peer, seal(rng, corpus, rng.choice(corpus.inner))


def batch_input(rng: random.Random, corpus: Corpus) -> Any:
    """A batch's plaintext (docs/protocol.md §7.2): arrays of node-to-node messages valid
    or not, of any count; heads in long forms, indefinite, cut short, with bytes after."""
    roll = rng.random()
    count = rng.choice((1, 2, 3, 8, 64, 65, rng.randint(0, 70)))
    well_formed = roll < 0.45  # mostly valid messages: a batch is refused whole for one bad one
    items = [
        rng.choice(corpus.inner) if well_formed and rng.random() < 0.95 else inner_plaintext(rng, corpus)
        for _ in range(min(count, 70))
    ]
    data = cbor_head(4, count) + b"".join(cbor_head(2, len(item)) + item for item in items)
    if well_formed:
        return as_buffer(rng, data, bytearray_share=0.4)
    if roll < 0.75:
        data = mutate_bytes(rng, data, corpus.inner[:2], max_rounds=3)
    elif roll < 0.85:  # a head in a longer form than it needs, or indefinite
        data = rng.choice((b"\x98\x02", b"\x99\x00\x02", b"\x9f", b"\x82\x5f")) + data[1:]
    elif roll < 0.95:
        data = data[: rng.randrange(len(data) + 1)] + (random_bytes(rng) if rng.random() < 0.5 else b"")
    else:
        data = bytes([0x80 | rng.randrange(32)]) + random_bytes(rng)
    return as_buffer(rng, data, bytearray_share=0.4)


#: The kinds of a direct link's messages (docs/protocol.md §7.8).
LINK_KINDS = (b"hi", b"box", b"boxes", b"parts", b"ping", b"pong", b"bye")


def carried_message(rng: random.Random, corpus: Corpus) -> bytes:
    """A node-to-node message a link carries: a valid sample as it is, or an input of the
    sealed-plaintext decoder (a link's messages come in the clear)."""
    return rng.choice(corpus.inner) if rng.random() < 0.5 else inner_plaintext(rng, corpus)


def parts_of(rng: random.Random, corpus: Corpus) -> list[Any]:
    """``[parts, field, message, bulk]`` from a sample that has a bulk field (its other
    fields as the message), with the field's name and the message now and then wrong."""
    splittable = [m for m in map(cbor2.loads, corpus.inner) if m.get("t") in ("job", "job_result")]
    message = dict(rng.choice(splittable))
    field = "payload" if message["t"] == "job" else "result"
    bulk = message.pop(field, b"")
    roll = rng.random()
    if roll < 0.15:
        field = rng.choice(("payload", "result", "id", "", "payload\x00", "x" * 33, "r\u00e9sult"))
    elif roll < 0.25:
        message[field] = bulk  # the field twice: in the message and apart
    data = cbor2.dumps(message)
    if rng.random() < 0.2:
        data = mutate_bytes(rng, data, corpus.inner)
    if rng.random() < 0.3:
        bulk = random_bytes(rng)
    return [b"parts", field.encode("utf-8", "surrogatepass"), data, bulk]


def hi_features(rng: random.Random) -> bytes:
    words = [rng.choice(("boxes", "parts", "future", "", "BOXES")) for _ in range(rng.randrange(5))]
    roll = rng.random()
    if roll < 0.1:
        return random_bytes(rng)
    if roll < 0.15:
        return b"boxes " * 60  # past the features' limit
    return " ".join(words).encode()


def link_input(rng: random.Random, corpus: Corpus) -> list[Any]:
    """A direct link's message as it arrives: mostly well-formed around node-to-node
    messages valid or not; and wrong kinds, frame counts, features and field names."""
    roll = rng.random()
    if roll < 0.25:
        frames = [b"box", carried_message(rng, corpus)]
    elif roll < 0.45:
        count = rng.choice((1, 2, 8, 64, 65, rng.randint(2, 70)))
        frames = [b"boxes", *(carried_message(rng, corpus) for _ in range(count))]
    elif roll < 0.60:
        frames = parts_of(rng, corpus)
    elif roll < 0.75:
        frames = [b"hi", hi_features(rng)] if rng.random() < 0.8 else [b"hi"]
    elif roll < 0.85:
        frames = [rng.choice((b"ping", b"pong", b"bye"))]
    else:  # a kind with the wrong frames after it, or no kind at all
        kind = rng.choice((*LINK_KINDS, random_bytes(rng)[:8], b"", b"box\x00", b"boxes" * 3))
        frames = [kind, *(rng.choice((b"", random_bytes(rng), *corpus.inner[:3])) for _ in range(rng.randrange(6)))]
        if rng.random() < 0.02:
            frames = []
    return [as_buffer(rng, frame) for frame in frames]


#: Job payloads and results as clients send them.
PAYLOADS = (
    {"data": b"abc", "rounds": 2},
    "hi",
    {"prompt": "hello"},
    list(range(100)),
    10,
    {"seconds": 1.5},
    {"a": {"b": {"c": [1, 2, {"d": None}]}}},
    b"bytes",
    None,
    [1.5, True, None, "x", b"y", {"a": [1]}, -(2**63), 2**64 - 1],
)


def value_input(rng: random.Random, corpus: Corpus) -> Any:
    """A job's payload or result: random, a mutated valid one, a shape alone or inside
    a plausible payload, or a large valid one."""
    roll = rng.random()
    if roll < 0.10:
        data = random_bytes(rng)
    elif roll < 0.15:
        data = shapes.random_item(rng)
    elif roll < 0.45:
        data = mutate_bytes(rng, rng.choice(corpus.payloads), corpus.payloads)
    elif roll < 0.99:
        shape = shapes.amplification_shape(rng)
        wrappers = (
            shape,
            cbor_map([(text("data"), shape), (text("rounds"), integer(2))]),
            shapes.array([integer(1), shape]),
            cbor_map([(shape, integer(1))]),
        )
        data = rng.choice(wrappers)
    else:
        data = cbor2.dumps(rng.choice(([0] * rng.choice((10_000, 300_000)), "x" * 2**20, {"data": b"\x00" * 2**20})))
    return as_buffer(rng, data)


# -- config files --


def config_keys(config_type: type) -> dict[str, tuple[str, ...]]:
    """Section name -> its keys, read from the config's dataclasses (so that a key added
    to the config is fuzzed without a change here)."""
    sections = (f for f in dataclasses.fields(config_type) if f.name != "path")
    return {f.name: tuple(k.name for k in dataclasses.fields(f.default_factory)) for f in sections}  # type: ignore[arg-type]


NODE_KEYS = config_keys(NodeConfig)
RELAY_KEYS = config_keys(RelayConfig)
TOML_CHARS = "[]{}=\".,#\n\\ '-+_:0123456789eEinfatruz.\t"


def node_documents(receiver: Identity, sender: Identity) -> list[dict[str, Any]]:
    full = {
        "identity": {"private_key": receiver.private_key_text, "peer_id": receiver.peer_id},
        "api": {"endpoint": "tcp://127.0.0.1:7710", "allowed_clients": [sender.peer_id]},
        "relay": {"endpoint": "tcp://127.0.0.1:7700", "peer_id": sender.peer_id, "listen": ["tcp://10.0.0.1:7711"]},
        "jobs": {"enabled": ["echo"], "executors": 2, "capabilities": {"gpus": 1, "labels": ["a"]}},
        "log": {"format": "json", "level": "debug"},
    }
    return [full, {"identity": {"private_key": receiver.private_key_text}}]


def relay_documents(receiver: Identity, sender: Identity) -> list[dict[str, Any]]:
    full = {
        "identity": {"private_key": receiver.private_key_text, "peer_id": receiver.peer_id},
        "relay": {"bind": "tcp://127.0.0.1:7700", "access": "allow-list", "allowed_peers": [sender.peer_id]},
        "log": {"format": "console", "level": "info"},
    }
    return [full, {"identity": {"private_key": receiver.private_key_text}, "relay": {"access": "open"}}]


def toml_value(rng: random.Random, corpus: Corpus) -> Any:
    """A value of every TOML type, at the edges of what each key accepts."""
    choices = (
        True, 0, -1, 1, 64, 2**63 - 1, -(2**63), 2**64, 10**309, -(10**309), 1.5, 0.0, -0.0, float("nan"),
        float("inf"), 1e-320,
        "", "auto", "tcp://127.0.0.1:7700", "ipc:///tmp/x", "udp://x", "console", "json", "debug", "open",
        "allow-list", "x" * 10_000, [], ["echo", "sha256"], [1, "a"], [[[]]], {}, {"gpus": 1},
        {"a": {"b": {"c": {"d": 1}}}}, {"t": datetime.time(1, 2)}, datetime.date(2024, 2, 29),
        datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.timezone.utc),
    )  # fmt: skip
    roll = rng.random()
    if roll < 0.3:
        return rng.choice(corpus.key_texts)
    if roll < 0.4:
        return mutate_text(rng, rng.choice(corpus.key_texts), corpus.key_texts, B58_ALPHABET)
    if roll < 0.45:
        return [rng.choice(corpus.peer_ids)] * rng.randint(0, 3)
    return rng.choice(choices)


def random_document(rng: random.Random, corpus: Corpus, sections: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """A config with the identity it needs and random values under known (and a few
    unknown) sections and keys."""
    document: dict[str, Any] = {"identity": {"private_key": corpus.receiver.private_key_text}}
    names = [*sections, "bogus"]
    for section in rng.sample(names, rng.randint(0, len(names))):
        keys = [*sections.get(section, ()), "typo"]
        table = document.setdefault(section, {})
        for key in rng.sample(keys, rng.randint(0, min(3, len(keys)))):
            table[key] = toml_value(rng, corpus)
    return document


DIGIT_COUNTS = (19, 20, 309, 4300, 4301)
LARGE_DIGIT_COUNTS = (10_000, 100_000)
#: Around tomllib's own recursion (some 400 levels of arrays or inline tables), and past
#: it. Large TOML inputs are rarer than large CBOR ones: tomllib's cost per byte is some
#: ten times cbor2's, and dotted keys 8000 deep take a second (its cost is quadratic in
#: their depth, a slow input the campaign is to find, not to repeat).
TOML_DEPTHS = (10, 100, 300, 400, 999)
LARGE_TOML_DEPTHS = (3000, 8000)
LARGE_TOML_SHARE = 0.01


def toml_shape(rng: random.Random, key: str) -> str:
    """A TOML line (or lines) for ``key`` that is costly or odd to parse: deep nesting,
    long numbers, many keys, long strings, odd characters."""
    depth = shapes.scale(rng, TOML_DEPTHS, LARGE_TOML_DEPTHS, LARGE_TOML_SHARE)
    digits = shapes.scale(rng, DIGIT_COUNTS, LARGE_DIGIT_COUNTS, LARGE_TOML_SHARE)
    choices = (
        lambda: f"{key} = " + "[" * depth + "]" * depth,
        lambda: f"{key} = " + "{ a = " * depth + "1" + " }" * depth,
        lambda: f"{key} = " + rng.choice(("", "-", "+")) + "1" + "0" * (digits - 1),
        lambda: f"{key} = 0x" + "f" * digits,
        lambda: f"{key} = 1" + "0" * digits + ".5",
        lambda: f"{key} = 1e" + "9" * min(digits, 400),
        lambda: f"{key} = " + "_".join("1" * min(digits, 2000)),
        lambda: "\n".join(f"k{i} = {i}" for i in range(shapes.scale(rng, (100, 257), (5000,), LARGE_TOML_SHARE))),
        lambda: ".".join(["a"] * depth) + " = 1",
        lambda: "[" + ".".join(["a"] * depth) + "]",
        lambda: "[[x]]\n" * depth,
        lambda: f'{key} = "' + "z" * shapes.scale(rng, (64, 129), (10_000, 2**20), LARGE_TOML_SHARE) + '"',
        lambda: f'{key} = "' + "\\u0000" * depth + '"',
        lambda: f"{key} = '''" + "a\n" * depth + "'''",
        lambda: f"{key} = 1\n{key} = 2",
        lambda: f"{key} = " + rng.choice(("1979-05-27T07:32:00Z", "9999-12-31", "0000-00-00", "24:00:00", "nan")),
        lambda: f'{key} = "a\x00b"' + rng.choice(("\r", "\ufeff", "\x7f", "\n\n")),
    )
    return rng.choice(choices)()


def config_input(
    rng: random.Random, corpus: Corpus, sections: dict[str, tuple[str, ...]], valid: Sequence[str]
) -> bytes:
    """The bytes of a config file."""
    roll = rng.random()
    if roll < 0.30:
        content = tomli_w.dumps(random_document(rng, corpus, sections))
    elif roll < 0.55:
        content = mutate_text(rng, rng.choice(valid), valid, TOML_CHARS)
    elif roll < 0.85:
        section = rng.choice([*sections, "bogus"])
        key = rng.choice([*sections.get(section, ()), "typo"])
        content = f"{rng.choice(valid)}\n[{section}]\n{toml_shape(rng, key)}\n"
    elif roll < 0.95:
        content = random_text(rng, TOML_CHARS if rng.random() < 0.5 else None)
    else:
        return random_bytes(rng)
    return content.encode("utf-8", "surrogatepass")


def node_config_input(rng: random.Random, corpus: Corpus) -> bytes:
    return config_input(rng, corpus, NODE_KEYS, corpus.node_configs)


def relay_config_input(rng: random.Random, corpus: Corpus) -> bytes:
    return config_input(rng, corpus, RELAY_KEYS, corpus.relay_configs)


# -- key texts --

#: Key-sized byte strings: an Ed25519 point of small order, a non-canonical encoding, zeros.
ODD_POINTS = (b"\x01" + b"\x00" * 31, b"\xff" * 32, b"\x00" * 32, b"\xec" + b"\xff" * 30 + b"\x7f")
PREFIXES = (ED25519_PUB_MULTICODEC, ED25519_PUB_MULTICODEC, b"", b"\xed", b"\x00\xed\x01", b"\xe7\x01")
#: Lengths around the limits: a peer id's 48 characters, is_peer_id's 64, the decoder's 128.
KEY_LENGTHS = (0, 1, 43, 44, 45, 47, 48, 49, 63, 64, 65, 127, 128, 129)


def key_text(rng: random.Random, corpus: Corpus) -> str:
    roll = rng.random()
    if roll < 0.35:
        return mutate_text(rng, rng.choice(corpus.key_texts), corpus.key_texts, B58_ALPHABET)
    if roll < 0.55:
        return "z" + random_text(rng, B58_ALPHABET, rng.choice(KEY_LENGTHS))
    if roll < 0.75:
        body = rng.choice((rng.randbytes(rng.choice((31, 32, 33))), rng.choice(ODD_POINTS)))
        return "z" + b58encode(b"\x00" * rng.choice((0, 0, 1, 5)) + rng.choice(PREFIXES) + body)
    if roll < 0.85:
        return rng.choice(corpus.key_texts)
    if roll < 0.98:
        return random_text(rng, None)
    return rng.choice(("z", "")) + rng.choice(("1", "z", "\u0661")) * rng.choice((1000, 2**20))
