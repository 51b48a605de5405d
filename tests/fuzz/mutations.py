"""Random data and mutations of valid samples, for bytes and for text.

Byte mutations are the classic ones of coverage-less fuzzers (AFL's havoc stage, in
small): bit flips, interesting bytes and words, inserts, deletes, splices with another
sample, truncations and duplicated chunks. A few rounds of them keep most of a valid
message, so the decoder gets past its first checks and into the field rules.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

#: Bytes that are CBOR heads of every kind: argument widths, indefinite lengths, tags,
#: floats, simple values, reserved values and the break.
INTERESTING_BYTES = (
    0x00, 0x01, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1F, 0x20, 0x3B, 0x40, 0x5B, 0x5F, 0x60, 0x7B, 0x7F, 0x80,
    0x9B, 0x9F, 0xA0, 0xBB, 0xBF, 0xC0, 0xC2, 0xC4, 0xC5, 0xD8, 0xD9, 0xDB, 0xE0, 0xF4, 0xF7, 0xF9, 0xFB, 0xFC,
    0xFF,
)  # fmt: skip
#: Words at the edges of signed and unsigned widths, written over an argument.
INTERESTING_WORDS = (
    0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 2**63, 2**64 - 1,
)  # fmt: skip

ByteMutation = Callable[[random.Random, bytearray, Sequence[bytes]], None]


def _position(rng: random.Random, buf: bytearray | list, *, end: bool = False) -> int:
    return rng.randint(0, len(buf)) if end else rng.randrange(len(buf)) if buf else 0


def flip_bit(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    if buf:
        buf[_position(rng, buf)] ^= 1 << rng.randrange(8)


def set_interesting_byte(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    if buf:
        buf[_position(rng, buf)] = rng.choice(INTERESTING_BYTES)


def overwrite_word(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    width = rng.choice((1, 2, 4, 8))
    word = rng.choice(INTERESTING_WORDS) & ((1 << (8 * width)) - 1)
    at = _position(rng, buf, end=True)
    buf[at : at + width] = word.to_bytes(width, "big")


def insert_random(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    at = _position(rng, buf, end=True)
    buf[at:at] = rng.randbytes(rng.randint(1, 16))


def delete_range(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    if buf:
        at = _position(rng, buf)
        del buf[at : at + rng.randint(1, 16)]


def splice(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    """This sample's start, another's end."""
    donor = rng.choice(donors)
    buf[_position(rng, buf, end=True) :] = donor[rng.randint(0, len(donor)) :]


def insert_donor_chunk(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    donor = rng.choice(donors)
    start = rng.randint(0, len(donor))
    at = _position(rng, buf, end=True)
    buf[at:at] = donor[start : start + rng.randint(1, 64)]


def truncate(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    del buf[_position(rng, buf, end=True) :]


def duplicate_chunk(rng: random.Random, buf: bytearray, donors: Sequence[bytes]) -> None:
    """A chunk of the sample repeated in place: more items than the head declares, or
    the same key twice."""
    if buf:
        start = _position(rng, buf)
        chunk = bytes(buf[start : start + rng.randint(1, 32)])
        at = _position(rng, buf, end=True)
        buf[at:at] = chunk * rng.choice((1, 1, 2, 8, 100))


BYTE_MUTATIONS: tuple[ByteMutation, ...] = (
    flip_bit,
    set_interesting_byte,
    overwrite_word,
    insert_random,
    delete_range,
    splice,
    insert_donor_chunk,
    truncate,
    duplicate_chunk,
)


def mutate_bytes(rng: random.Random, sample: bytes, donors: Sequence[bytes], max_rounds: int = 8) -> bytes:
    """``sample`` after 1 to ``max_rounds`` random mutations; ``donors`` feed splices."""
    buf = bytearray(sample)
    for _ in range(rng.randint(1, max_rounds)):
        rng.choice(BYTE_MUTATIONS)(rng, buf, donors)
    return bytes(buf)


def random_size(rng: random.Random) -> int:
    """Mostly short: a decoder's first checks see every length class."""
    return rng.randint(0, rng.choice((8, 64, 512, 4096)))


def random_bytes(rng: random.Random) -> bytes:
    return rng.randbytes(random_size(rng))


# -- text --


def random_char(rng: random.Random, alphabet: str | None = None) -> str:
    """A character of ``alphabet``, or of all of Unicode (lone surrogates included) when None."""
    if alphabet:
        return rng.choice(alphabet)
    return chr(rng.choice((rng.randrange(32, 127), rng.randrange(0x80, 0x800), rng.randrange(0x110000))))


#: Characters drawn one by one at most; a longer text repeats them (drawing each of a
#: million characters would cost more than decoding them).
DRAWN_CHARS = 64


def random_text(rng: random.Random, alphabet: str | None = None, size: int | None = None) -> str:
    size = rng.randint(0, rng.choice((8, 64, 256))) if size is None else size
    drawn = "".join(random_char(rng, alphabet) for _ in range(min(size, DRAWN_CHARS)))
    return drawn if len(drawn) == size else (drawn * (size // DRAWN_CHARS + 1))[:size]


def mutate_text(
    rng: random.Random, sample: str, donors: Sequence[str], alphabet: str | None = None, max_rounds: int = 6
) -> str:
    """``sample`` after character-level mutations; new characters come from ``alphabet``
    most of the time and from all of Unicode otherwise."""
    chars = list(sample)
    for _ in range(rng.randint(1, max_rounds)):
        at = _position(rng, chars, end=True)
        choice = rng.randrange(7)
        new_char = random_char(rng, alphabet if rng.random() < 0.8 else None)
        if choice == 0 and chars:
            chars[min(at, len(chars) - 1)] = new_char
        elif choice == 1:
            chars[at:at] = [new_char] * rng.choice((1, 1, 2, 10))
        elif choice == 2:
            del chars[at : at + rng.randint(1, 8)]
        elif choice == 3:
            donor = rng.choice(donors)
            chars[at:] = donor[rng.randint(0, len(donor)) :]
        elif choice == 4:
            del chars[at:]
        elif choice == 5:
            chunk = chars[at : at + rng.randint(1, 16)]
            chars[at:at] = chunk * rng.choice((1, 2, 8))
        else:
            chars[at:at] = list(rng.choice(donors)[: rng.randint(0, 40)])
    return "".join(chars)
