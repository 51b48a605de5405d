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

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
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


def curve_public_key(peer_id: str) -> bytes:
    """The raw Curve25519 public key of a peer (CurveZMQ and Box use the same one)."""
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


class Sealer:
    """Seals and opens node-to-node messages with a NaCl Box per peer.

    A Box authenticates both ends: a message that opens under ``Box(us, A)`` was sealed
    by A (or by us), and any change to it in transit makes it fail to open. Boxes are
    cached (their set-up does a scalar multiplication). Thread-safe: the cache is
    guarded and libsodium itself keeps no shared state.
    """

    CACHE_SIZE = 1024

    def __init__(self, identity: Identity):
        self._secret = nacl.public.PrivateKey(identity.curve_secret_key)
        self._boxes: OrderedDict[str, nacl.public.Box] = OrderedDict()
        self._lock = threading.Lock()

    def _box(self, peer_id: str) -> nacl.public.Box:
        with self._lock:
            box = self._boxes.get(peer_id)
            if box is not None:
                self._boxes.move_to_end(peer_id)
                return box
        box = nacl.public.Box(self._secret, nacl.public.PublicKey(curve_public_key(peer_id)))
        with self._lock:
            self._boxes[peer_id] = box
            if len(self._boxes) > self.CACHE_SIZE:
                self._boxes.popitem(last=False)
        return box

    def seal(self, peer_id: str, plaintext: bytes) -> bytes:
        """Nonce (24 bytes) followed by the authenticated ciphertext."""
        return bytes(self._box(peer_id).encrypt(plaintext))

    def open(self, peer_id: str, sealed: bytes) -> bytes:
        try:
            return self._box(peer_id).decrypt(bytes(sealed))
        except (nacl.exceptions.CryptoError, nacl.exceptions.ValueError, IdentityError) as exc:
            raise SealError(f"sealed message from {peer_id[:16]} did not authenticate: {exc}") from None
