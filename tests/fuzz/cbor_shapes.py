"""CBOR written by hand for the fuzzer: small well-formed items, and the shapes that make
a careless decoder spend far more than the input's size.

cbor2 writes only shortest, definite, well-formed items. The heads here may be longer
than needed, indefinite, reserved, or declare far more than follows, so that a decoder
meets what a hostile peer can send rather than what a polite encoder writes. Every
shape is a function of a ``random.Random`` only, so an input is reproduced by its seed.
"""

from __future__ import annotations

import functools
import random
import struct
from collections.abc import Callable, Sequence

import cbor2

UNSIGNED, NEGATIVE, BYTES, TEXT, ARRAY, MAP, TAG, SIMPLE = range(8)
BREAK = b"\xff"
_INFO_OF_WIDTH = {1: 24, 2: 25, 4: 26, 8: 27}


def head(major: int, argument: int, width: int | None = None) -> bytes:
    """A CBOR head; ``width`` (0, 1, 2, 4 or 8 bytes of argument) forces a form longer
    than the shortest (RFC 8949 allows it; canonical encoders never write it)."""
    if width is None:
        width = 0 if argument < 24 else next(w for w in (1, 2, 4, 8) if argument < 1 << (8 * w))
    if width == 0:
        return bytes([major << 5 | argument])
    return bytes([major << 5 | _INFO_OF_WIDTH[width]]) + argument.to_bytes(width, "big")


def text(value: str) -> bytes:
    raw = value.encode("utf-8", "surrogatepass")
    return head(TEXT, len(raw)) + raw


def byte_string(value: bytes) -> bytes:
    return head(BYTES, len(value)) + value


def array(items: Sequence[bytes]) -> bytes:
    return head(ARRAY, len(items)) + b"".join(items)


def cbor_map(pairs: Sequence[tuple[bytes, bytes]]) -> bytes:
    return head(MAP, len(pairs)) + b"".join(key + value for key, value in pairs)


def tag(number: int, content: bytes = b"") -> bytes:
    """Tag ``number`` around ``content``; empty content leaves the tag without one."""
    return head(TAG, number) + content


def integer(value: int) -> bytes:
    """Any integer: a head within 64 bits, a bignum (tags 2/3) beyond."""
    if 0 <= value < 1 << 64:
        return head(UNSIGNED, value)
    if -(1 << 64) <= value < 0:
        return head(NEGATIVE, -1 - value)
    magnitude = value if value > 0 else -1 - value
    return tag(2 if value > 0 else 3, byte_string(magnitude.to_bytes((magnitude.bit_length() + 7) // 8, "big")))


# -- small well-formed items, to fill the places around a shape --

FIELD_NAMES = (
    "v", "t", "id", "kind", "to", "timeout", "seq", "status", "error", "peer", "info", "peers", "more", "code",
    "message", "peer_id", "caps", "listen", "ref", "op", "observed", "heartbeat", "sender", "reason", "payload",
    "result", "nonce", "body",
)  # fmt: skip


def random_scalar(rng: random.Random) -> bytes:
    choice = rng.randrange(8)
    if choice == 0:
        return integer(rng.choice((0, 1, 23, 24, 255, 256, 65535, 2**32, 2**63 - 1, 2**64 - 1, rng.getrandbits(64))))
    if choice == 1:
        return integer(-rng.choice((1, 24, 2**63, 2**64, rng.getrandbits(64) + 1)))
    if choice == 2:
        return byte_string(rng.randbytes(rng.choice((0, 1, 15, 16, 17, 24, rng.randrange(64)))))
    if choice == 3:
        return text(rng.choice(FIELD_NAMES) if rng.random() < 0.5 else random_word(rng))
    if choice == 4:
        return cbor2.dumps(rng.choice((0.0, -0.0, 1.5, 1e308, float("inf"), float("-inf"), float("nan"), 2.5)))
    if choice == 5:
        return rng.choice((b"\xf4", b"\xf5", b"\xf6", b"\xf7"))  # false, true, null, undefined
    if choice == 6:
        return integer(1)
    return text("")


def random_word(rng: random.Random) -> str:
    return "".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x10FFFF)))) for _ in range(rng.randrange(9)))


def random_item(rng: random.Random, depth: int = 0) -> bytes:
    """A small well-formed CBOR item: scalars, and arrays and maps a few levels deep."""
    choice = rng.randrange(10) if depth < 3 else 0
    if choice <= 5:
        return random_scalar(rng)
    if choice <= 7:
        return array([random_item(rng, depth + 1) for _ in range(rng.randrange(4))])
    return cbor_map([(random_key(rng), random_item(rng, depth + 1)) for _ in range(rng.randrange(4))])


def random_key(rng: random.Random) -> bytes:
    choice = rng.randrange(6)
    if choice <= 2:
        return text(rng.choice(FIELD_NAMES))
    if choice == 3:
        return text(random_word(rng))
    if choice == 4:
        return byte_string(rng.randbytes(rng.randrange(5)))
    return random_scalar(rng)


# -- amplification and malformation shapes --

#: Share of shapes drawn at their largest sizes. A large input costs as much as thousands
#: of small ones, and a few hundred large ones per decoder show what large ones show.
LARGE_SHARE = 0.03


def scale(rng: random.Random, small: Sequence[int], large: Sequence[int], share: float = LARGE_SHARE) -> int:
    """A size, depth or count: one of ``large`` now and then (``share``), of ``small`` otherwise."""
    return rng.choice(large if rng.random() < share else small)


def shared_reference_dag(rng: random.Random) -> bytes:
    """L0 = [0]*8, L(n+1) = [L(n)]*8, with value sharing: 8**depth leaves in some 30*depth
    bytes (the 217-byte frame of the original report is depth 8)."""
    value: list = [0] * 8
    for _ in range(rng.randint(1, 12)):
        value = [value] * 8
    return cbor2.dumps(value, value_sharing=True)


def self_reference(rng: random.Random) -> bytes:
    """A container that holds itself: a decoder that follows references loops forever."""
    container: list | dict = [] if rng.random() < 0.5 else {}
    if isinstance(container, list):
        container.extend([container] * rng.randint(1, 4))
    else:
        container["v"] = container
    return cbor2.dumps(container, value_sharing=True)


def hand_references(rng: random.Random) -> bytes:
    """References cbor2 will not write: to indexes never marked, huge, nested, or string
    references outside a namespace."""
    index = integer(rng.choice((0, 1, 7, 2**32, 2**64 - 1, rng.getrandbits(64))))
    choices = (
        tag(29, index),
        tag(28, array([tag(29, integer(0))] * rng.randint(1, 64))),
        tag(28, tag(28, tag(28, array([tag(29, integer(0)), tag(29, integer(1)), tag(29, integer(2))])))),
        tag(25, index),
        tag(256, array([text("abcd"), tag(25, integer(0))] * rng.randint(1, 64))),
        tag(256, tag(256, tag(25, index))),
    )
    return rng.choice(choices)


def string_references(rng: random.Random) -> bytes:
    """Repeated strings written once and referred to (tags 256/25)."""
    # cbor2 writes only valid UTF-8: lone surrogates become "?".
    word = "x" * rng.randint(3, 64) if rng.random() < 0.5 else random_word(rng).encode(errors="replace").decode() * 8
    values: list = [word] * scale(rng, (2, 10, 100), (1000, 10_000))
    if rng.random() < 0.3:
        values = [values, {word: values}]
    return cbor2.dumps(values, string_referencing=True)


#: Nesting depths: just past the wire's limit (12), the payload limit (100), around
#: Python's recursion limit (1000), and far past it.
DEPTHS = (13, 64, 101, 999, 1001)
LARGE_DEPTHS = (5000, 20_000, 100_000)
#: What opens one level of nesting, and what closes it.
NESTERS = (
    (b"\x81", b""),  # array of one
    (b"\xa1\x61a", b""),  # map of one, key "a"
    (b"\xc6", b""),  # tag 6
    (b"\xd8\x1c\x81", b""),  # shareable (tag 28) array of one
    (b"\xd9\x01\x00\x81", b""),  # string-reference namespace (tag 256) array of one
    (b"\x9f", BREAK),  # indefinite array
    (b"\xbf\x61a", BREAK),  # indefinite map
)


def deep_nesting(rng: random.Random) -> bytes:
    depth = scale(rng, DEPTHS, LARGE_DEPTHS)
    innermost = rng.choice((b"\x00", b"\xa0", b"\x80", b"", b"\xff"))
    if depth <= 5000 and rng.random() < 0.3:  # each level its own kind of container
        levels = [rng.choice(NESTERS) for _ in range(depth)]
        return b"".join(o for o, _ in levels) + innermost + b"".join(c for _, c in reversed(levels))
    opener, closer = rng.choice(NESTERS)
    return opener * depth + innermost + closer * depth


HUGE_COUNTS = (2**16, 2**20, 2**31, 2**32 - 1, 2**32, 2**40, 2**63, 2**64 - 1)


def huge_declared(rng: random.Random) -> bytes:
    """A string or container that declares far more than follows (e.g. 0x9b + 2**40)."""
    major = rng.choice((BYTES, TEXT, ARRAY, MAP))
    count = rng.choice(HUGE_COUNTS)
    width = 8 if rng.random() < 0.5 else None
    return head(major, count, width) + rng.randbytes(rng.randrange(17))


#: Tag numbers past 300: the edges of each argument width and of 64 bits.
LARGE_TAGS = (
    1004, 43000, 55799, 65535, 65536, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1,
)  # fmt: skip


def any_tag(rng: random.Random) -> bytes:
    """Every tag number 0..300 and samples up to 2**64-1, with content that suits it, any
    content, or none at all."""
    number = rng.randint(0, 300) if rng.random() < 0.7 else rng.choice((*LARGE_TAGS, rng.getrandbits(64)))
    width = None if rng.random() < 0.8 else rng.choice([w for w in (1, 2, 4, 8) if number < 1 << (8 * w)])
    roll = rng.random()
    if roll < 0.2:
        content = b""
    elif roll < 0.5:
        content = random_item(rng)
    else:
        content = tag_content(rng, number)
    return head(TAG, number, width) + content


def tag_content(rng: random.Random, number: int) -> bytes:
    """Content of the type tag ``number`` is defined on, with edge values."""
    if number in (2, 3):  # bignums
        return byte_string(rng.randbytes(scale(rng, (0, 1, 8, 9, 64), (4096,))))
    if number in (4, 5):  # decimal fraction, bigfloat: [exponent, mantissa]
        return big_exponent_pair(rng)
    if number == 0:
        return text(rng.choice(("2013-03-21T20:04:00Z", "9999-99-99T99:99:99Z", "", "x" * 1000)))
    if number == 1:
        return rng.choice((integer(2**63), integer(-(2**63)), cbor2.dumps(float("nan")), cbor2.dumps(1e308)))
    if number == 30:  # rational: denominator zero or huge
        return array([integer(1), integer(rng.choice((0, 2**64 - 1)))])
    if number in (37, 52, 54, 260, 261):  # uuid, addresses, networks
        return byte_string(rng.randbytes(rng.choice((0, 4, 15, 16, 17, 33))))
    if number in (258, 256):  # set, string-reference namespace
        return array([integer(1)] * rng.randint(0, 100))
    if number in (24, 55799):  # embedded CBOR, self-described CBOR: wrap an item
        return byte_string(random_item(rng)) if number == 24 else random_item(rng)
    return rng.choice((random_item(rng), text("a" * rng.randrange(100)), byte_string(b"")))


def big_exponent_pair(rng: random.Random) -> bytes:
    exponent = rng.choice((2**63 - 1, -(2**63), 10**6, -(10**6), 2**64 - 1, -(2**64), 2**100, -(2**100)))
    mantissa = rng.choice((1, -1, 0, 2**64 - 1, 2**200))
    return array([integer(exponent), integer(mantissa)])


def indefinite(rng: random.Random) -> bytes:
    """Indefinite-length items, well-formed, unterminated or with chunks of the wrong kind."""
    chunks = scale(rng, range(9), (10_000, 100_000))
    shapes = (
        b"\x5f" + byte_string(b"ab") * chunks + BREAK,
        b"\x7f" + text("ab") * chunks + BREAK,
        b"\x9f" + b"\x00" * chunks + BREAK,
        b"\xbf" + (text("a") + b"\x00") * min(chunks, 1) + BREAK,
        b"\x5f" + text("a") + BREAK,  # text chunk in a byte string
        b"\x5f\x5f" + BREAK + BREAK,  # indefinite chunk in an indefinite string
        b"\x9f" * chunks,  # never closed
        BREAK,  # a break with nothing to close
        b"\xbf\x61a" + BREAK,  # a key without a value
        b"\x9f" + random_item(rng) + BREAK,
    )
    return rng.choice(shapes)


#: On 64-bit CPython, hash(k * (2**61 - 1)) == 0 for every k: such keys all collide.
HASH_MODULUS = 2**61 - 1


def colliding_keys(rng: random.Random) -> bytes:
    """A map whose integer keys all share one hash: building it as a dict is quadratic."""
    if rng.random() < 0.2:  # keys equal across types (1, 1.0, true): duplicates to Python
        keys = [integer(1), cbor2.dumps(1.0), b"\xf5", cbor2.dumps(1.0, canonical=True)]
        return head(MAP, len(keys)) + b"".join(key + b"\x00" for key in keys)
    return _colliding_map(scale(rng, (8, 64, 512), (4096, 30_000)), rng.choice((1, -1)))


@functools.cache
def _colliding_map(count: int, sign: int) -> bytes:
    # Cached: a few shapes, each costly to write item by item and used thousands of times.
    return head(MAP, count) + b"".join(integer(sign * k * HASH_MODULUS) + b"\x00" for k in range(1, count + 1))


STRING_LENGTHS = (0, 1, 23, 24, 255, 256, 4096, 4097)
LARGE_STRING_LENGTHS = (65_535, 65_536, 100_000, 2**20 - 16, 2**20 + 1)
#: ASCII, an invalid UTF-8 byte, a two-byte character, an encoded surrogate (invalid).
STRING_FILLS = (b"a", b"\xff", b"\xc3\xa9", b"\xed\xa0\x80")


def long_string(rng: random.Random) -> bytes:
    length = scale(rng, STRING_LENGTHS, LARGE_STRING_LENGTHS)
    fill = rng.choice(STRING_FILLS)
    body = (fill * (length // len(fill) + 1))[:length]
    declared = length if rng.random() < 0.8 else length + rng.randint(1, 1000)
    return head(rng.choice((BYTES, TEXT)), declared) + body


def big_numbers(rng: random.Random) -> bytes:
    """Bignums (tags 2/3) of many bytes, bigfloats and decimal fractions (tags 4/5) whose
    exponent makes ``2 ** exponent`` unbounded, and the 64-bit edges."""
    choices = (
        lambda: tag(rng.choice((2, 3)), byte_string(rng.randbytes(scale(rng, (8, 9, 64), (4096, 100_000))))),
        lambda: tag(rng.choice((4, 5)), big_exponent_pair(rng)),
        lambda: head(rng.choice((UNSIGNED, NEGATIVE)), rng.choice((2**64 - 1, 2**63, 2**63 - 1))),
        lambda: tag(2, byte_string(b"\x00" * rng.choice((0, 1, 100)) + b"\x01")),  # 1 as a bignum
    )
    return rng.choice(choices)()


#: Float bit patterns by width: NaNs (quiet, signalling, with payloads), infinities,
#: negative zero, the smallest subnormal, the largest finite value.
FLOAT_PATTERNS = {
    2: (0x7E00, 0x7C01, 0xFE00, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF),
    4: (0x7FC00000, 0x7F800001, 0xFFC00000, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x7F7FFFFF),
    8: (0x7FF8000000000000, 0x7FF0000000000001, 0x7FF0000000000000, 0xFFF0000000000000, 0x8000000000000000, 1),
}
_FLOAT_HEAD = {2: 0xF9, 4: 0xFA, 8: 0xFB}


def floats(rng: random.Random) -> bytes:
    width = rng.choice((2, 4, 8))
    bits = rng.choice(FLOAT_PATTERNS[width]) if rng.random() < 0.6 else rng.getrandbits(8 * width)
    return bytes([_FLOAT_HEAD[width]]) + bits.to_bytes(width, "big")


def simple_values(rng: random.Random) -> bytes:
    """Simple values 0..255 (two-byte forms below 32 are invalid), reserved heads 0xfc-0xfe."""
    choices = (
        bytes([0xE0 + rng.randrange(24)]),
        b"\xf8" + bytes([rng.randrange(256)]),
        bytes([rng.choice((0xFC, 0xFD, 0xFE))]),
        struct.pack(">Bf", 0xFA, 1.0),
    )
    return rng.choice(choices)


def non_shortest(rng: random.Random) -> bytes:
    """Small arguments in long heads: valid CBOR that canonical encoders never write."""
    major = rng.choice((UNSIGNED, NEGATIVE, BYTES, TEXT, ARRAY, MAP, TAG))
    argument = rng.randrange(24)
    encoded = head(major, argument, rng.choice((1, 2, 4, 8)))
    if major in (BYTES, TEXT):
        return encoded + b"a" * argument
    if major == ARRAY:
        return encoded + b"\x00" * argument
    if major == MAP:
        return encoded + (text("k") + b"\x00") * argument
    return encoded + (b"\x00" if major == TAG else b"")


def bad_utf8(rng: random.Random) -> bytes:
    raw = rng.choice((b"\xc0\x80", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\xef\xbb\xbfv", b"\x80"))
    return head(TEXT, len(raw)) + raw


def duplicate_keys(rng: random.Random) -> bytes:
    key = text(rng.choice(FIELD_NAMES)) if rng.random() < 0.7 else random_key(rng)
    return cbor_map([(key, random_item(rng)), (key, random_item(rng))])


WIDE_COUNTS = (25, 257, 1025, 4097)
LARGE_WIDE_COUNTS = (65_537, 131_073, 2**20)


def wide_containers(rng: random.Random) -> bytes:
    """Many one-byte items: past each link's item budget, each item a container or not."""
    count = scale(rng, WIDE_COUNTS, LARGE_WIDE_COUNTS)
    item = rng.choice((b"\x00", b"\x80", b"\xa0", b"\xf6"))
    if rng.random() < 0.5:
        return head(ARRAY, count) + item * count
    return _map_of_distinct_keys(min(count, 131_073), item)


@functools.cache
def _map_of_distinct_keys(count: int, value: bytes) -> bytes:
    return head(MAP, count) + b"".join(byte_string(i.to_bytes(4, "big")) + value for i in range(count))


#: Every shape, each equally likely.
SHAPES: tuple[Callable[[random.Random], bytes], ...] = (
    shared_reference_dag,
    self_reference,
    hand_references,
    string_references,
    deep_nesting,
    huge_declared,
    any_tag,
    indefinite,
    colliding_keys,
    long_string,
    big_numbers,
    floats,
    simple_values,
    non_shortest,
    bad_utf8,
    duplicate_keys,
    wide_containers,
)


def amplification_shape(rng: random.Random) -> bytes:
    """One CBOR item (or something that starts like one) of a random shape."""
    return rng.choice(SHAPES)(rng)
