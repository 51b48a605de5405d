"""Device identity: an Ed25519 key pair, its peer id, and the keys derived from it.

A peer id is the multibase (base58btc) encoding of the multicodec ``ed25519-pub``
prefix (0xed 0x01) followed by the 32-byte public key, as in ``did:key``: it always
starts with ``z6Mk``. Because the peer id *is* the public key, anyone holding a peer id
can derive that peer's CurveZMQ and Box keys: an allow-list of peer ids is enough to
authenticate, and two nodes can seal to each other with nothing but their ids.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
import nacl.utils
from nacl._sodium import ffi as _ffi  # PyNaCl's own binding of libsodium: see Sealer
from nacl._sodium import lib as _sodium
from zmq.utils import z85

from meshnet.errors import IdentityError, SealError

ED25519_PUB_MULTICODEC = b"\xed\x01"
SEED_BYTES = 32


B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {char: i for i, char in enumerate(B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Base58btc (Bitcoin alphabet); each leading zero byte becomes a leading '1'.

    Written here rather than taken from py-multibase, whose 2.0.0 drops leading zero
    bytes both ways: one Ed25519 seed in 256 starts with 0x00 and could not be loaded
    back from the config it was written to.
    """
    zeros = len(data) - len(data.lstrip(b"\0"))
    number = int.from_bytes(data, "big")
    digits = []
    while number:
        number, rest = divmod(number, 58)
        digits.append(B58_ALPHABET[rest])
    return "1" * zeros + "".join(reversed(digits))


def b58decode(text: str) -> bytes:
    """Inverse of :func:`b58encode`; ``ValueError`` for a character outside the alphabet."""
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"{char!r} is not a base58btc character")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def _b58(data: bytes) -> str:
    """Multibase base58btc: ``z`` then base58btc."""
    return "z" + b58encode(data)


def _unb58(text: str, what: str) -> bytes:
    if not isinstance(text, str) or not text.startswith("z") or len(text) > 128:
        raise IdentityError(f"{what} must be a multibase base58btc string starting with 'z'")
    try:
        return b58decode(text[1:])
    except ValueError as exc:
        raise IdentityError(f"{what} is not valid base58btc: {exc}") from None


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The raw 32-byte Ed25519 public key a peer id encodes."""
    raw = _unb58(peer_id, "peer id")
    if len(raw) != 34 or not raw.startswith(ED25519_PUB_MULTICODEC):
        raise IdentityError(f"peer id {peer_id[:16]!r} does not encode an Ed25519 public key")
    return raw[2:]


def peer_id_from_public_key(public_key: bytes) -> str:
    return _b58(ED25519_PUB_MULTICODEC + public_key)


def is_peer_id(text: object) -> bool:
    if not isinstance(text, str) or len(text) > 64:
        return False
    return _valid_peer_id(text)


@functools.lru_cache(maxsize=4096)
def _valid_peer_id(text: str) -> bool:
    # Cached: every relayed job names its peer, and checking one decodes base58 and
    # converts a curve point (tens of microseconds); a node talks to few peers.
    try:
        curve_public_key(text)
    except IdentityError:
        return False
    return True


@functools.lru_cache(maxsize=65536)
def curve_public_key(peer_id: str) -> bytes:
    """The raw Curve25519 public key of a peer (CurveZMQ and Box use the same one).

    Cached: a relay checks every registration's key with it, and the base58 decoding and
    point conversion cost about 180 µs of its CPU per registration (measured in a relay
    restart under 2,000 nodes, where registrations are the relay's work). An invalid
    peer id raises and is not cached."""
    try:
        return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(public_key_from_peer_id(peer_id))
    except nacl.exceptions.RuntimeError:
        raise IdentityError(f"peer id {peer_id[:16]!r} is not a valid Ed25519 point") from None


def curve_public_z85(peer_id: str) -> bytes:
    """The Z85 form of a peer's Curve25519 key, as pyzmq's ZAP handler reports it."""
    return z85.encode(curve_public_key(peer_id))


@dataclass(frozen=True)
class Identity:
    """An Ed25519 key pair and everything derived from it."""

    signing_key: nacl.signing.SigningKey

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_private_key(cls, text: str) -> Identity:
        """Load from the multibase form written by :meth:`private_key_text`."""
        seed = _unb58(text, "private key")
        if len(seed) != SEED_BYTES:
            raise IdentityError(f"private key must encode {SEED_BYTES} bytes, got {len(seed)}")
        return cls(nacl.signing.SigningKey(seed))

    @property
    def private_key_text(self) -> str:
        return _b58(bytes(self.signing_key))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    @property
    def curve_secret_key(self) -> bytes:
        return bytes(self.signing_key.to_curve25519_private_key())

    @property
    def curve_public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key.to_curve25519_public_key())

    def zmq_curve_keys(self) -> tuple[bytes, bytes]:
        """(public, secret) in the Z85 form pyzmq's ``curve_*key`` options take."""
        return z85.encode(self.curve_public_key), z85.encode(self.curve_secret_key)

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature


def verify(peer_id: str, data: bytes, signature: bytes) -> bool:
    try:
        nacl.signing.VerifyKey(public_key_from_peer_id(peer_id)).verify(data, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError, IdentityError):
        return False
    return True


NONCE_SIZE = nacl.public.Box.NONCE_SIZE
#: Bytes a sealed message has beyond its plaintext: the nonce and the MAC.
SEAL_OVERHEAD = NONCE_SIZE + _sodium.crypto_box_macbytes()


class Sealer:
    """Seals and opens node-to-node messages with a NaCl box per peer.

    A box authenticates both ends: a message that opens under ``box(us, A)`` was sealed
    by A (or by us), and any change to it in transit makes it fail to open. The shared
    key of each box is cached (its set-up does a scalar multiplication). Thread-safe:
    the cache is guarded and libsodium itself keeps no shared state.

    The format is PyNaCl's ``Box.encrypt``: nonce (24 bytes), MAC (16), ciphertext. It is
    written with libsodium's ``crypto_box_easy_afternm`` directly, through PyNaCl's own
    binding: the plaintext is copied once into the buffer that is sent and encrypted in
    place, and a message opens into one new buffer. ``Box.encrypt`` and ``decrypt`` make
    three to four more copies, which for an 8 MiB payload cost more than the cipher.
    """

    CACHE_SIZE = 1024

    def __init__(self, identity: Identity):
        self._secret = nacl.public.PrivateKey(identity.curve_secret_key)
        self._keys: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _key(self, peer_id: str) -> bytes:
        with self._lock:
            key = self._keys.get(peer_id)
            if key is not None:
                self._keys.move_to_end(peer_id)
                return key
        key = nacl.public.Box(self._secret, nacl.public.PublicKey(curve_public_key(peer_id))).shared_key()
        with self._lock:
            self._keys[peer_id] = key
            if len(self._keys) > self.CACHE_SIZE:
                self._keys.popitem(last=False)
        return key

    def seal(self, peer_id: str, plaintext: Any) -> bytearray:
        """Nonce (24 bytes), then the authenticated ciphertext of ``plaintext``."""
        return self.seal_parts(peer_id, [plaintext])

    def seal_parts(self, peer_id: str, parts: list[Any]) -> bytearray:
        """Seal the concatenation of ``parts`` (bytes-like) without joining them first."""
        key = self._key(peer_id)
        views = [memoryview(part).cast("B") for part in parts]
        size = sum(len(view) for view in views)
        sealed = bytearray(SEAL_OVERHEAD + size)
        sealed[:NONCE_SIZE] = nacl.utils.random(NONCE_SIZE)
        at = SEAL_OVERHEAD
        for view in views:
            sealed[at : at + len(view)] = view
            at += len(view)
        # The cdata from from_buffer is kept in a local: it pins the buffer while the cast
        # pointer into it is used.
        pinned = _ffi.from_buffer(sealed, require_writable=True)
        base = _ffi.cast("unsigned char *", pinned)
        # MAC and ciphertext overwrite the plaintext in place (libsodium allows exactly this).
        if _sodium.crypto_box_easy_afternm(base + NONCE_SIZE, base + SEAL_OVERHEAD, size, base, key) != 0:
            raise SealError("sealing failed")
        return sealed

    def open(self, peer_id: str, sealed: Any) -> bytearray:
        try:
            key = self._key(peer_id)
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, IdentityError) as exc:
            raise SealError(f"sealed message from {peer_id[:16]} did not authenticate: {exc}") from None
        view = memoryview(sealed).cast("B")
        if len(view) < SEAL_OVERHEAD:
            raise SealError(f"sealed message from {peer_id[:16]} did not authenticate: {len(view)} bytes is too short")
        plaintext = bytearray(len(view) - SEAL_OVERHEAD)
        pinned = _ffi.from_buffer(view)
        source = _ffi.cast("unsigned char *", pinned)
        target = _ffi.from_buffer(plaintext, require_writable=True)
        if _sodium.crypto_box_open_easy_afternm(target, source + NONCE_SIZE, len(view) - NONCE_SIZE, source, key) != 0:
            raise SealError(f"sealed message from {peer_id[:16]} did not authenticate: forged or corrupted")
        return plaintext
