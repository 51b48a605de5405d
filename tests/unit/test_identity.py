"""Identities, peer ids and sealing (meshnet.identity)."""

from __future__ import annotations

import nacl.public
import nacl.signing
import pytest

from meshnet.errors import IdentityError, SealError
from meshnet.identity import (
    Identity,
    Sealer,
    b58decode,
    b58encode,
    curve_public_key,
    curve_public_z85,
    is_peer_id,
    public_key_from_peer_id,
    verify,
)


def b58(raw: bytes) -> str:
    return "z" + b58encode(raw)


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
        (
            b"The quick brown fox jumps over the lazy dog.",
            "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z",
        ),
        (bytes.fromhex("0000287fb4cd"), "11233QC4"),
        (b"", ""),
        (b"\0", "1"),
    ],
)
def test_base58btc_matches_the_standard_vectors(raw: bytes, text: str) -> None:
    assert b58encode(raw) == text
    assert b58decode(text) == raw


def test_private_key_with_leading_zero_bytes_round_trips() -> None:
    for seed in (b"\0" + bytes(range(1, 32)), b"\0\0" + bytes(30)[:-1] + b"\x01"):
        identity = Identity(nacl.signing.SigningKey(seed))
        assert identity.private_key_text.startswith("z1")
        loaded = Identity.from_private_key(identity.private_key_text)
        assert loaded.peer_id == identity.peer_id


@pytest.fixture(scope="module")
def alice():
    return Identity.generate()


@pytest.fixture(scope="module")
def bob():
    return Identity.generate()


@pytest.fixture(scope="module")
def carol():
    return Identity.generate()


# -- peer ids and keys --


def test_peer_id_is_a_did_key_style_ed25519_id(alice):
    assert alice.peer_id.startswith("z6Mk")
    assert is_peer_id(alice.peer_id)
    assert public_key_from_peer_id(alice.peer_id) == alice.public_key


def test_generated_identities_differ(alice, bob):
    assert alice.peer_id != bob.peer_id
    assert alice.private_key_text != bob.private_key_text


def test_private_key_text_round_trips(alice):
    loaded = Identity.from_private_key(alice.private_key_text)
    assert loaded.peer_id == alice.peer_id
    assert loaded.private_key_text == alice.private_key_text
    assert loaded.curve_secret_key == alice.curve_secret_key


def test_private_key_text_does_not_contain_the_peer_id(alice):
    assert alice.private_key_text != alice.peer_id
    assert alice.private_key_text.startswith("z")


def test_curve_key_derived_from_peer_id_equals_the_identitys_own(alice):
    assert curve_public_key(alice.peer_id) == alice.curve_public_key
    assert curve_public_z85(alice.peer_id) == alice.zmq_curve_keys()[0]


def test_zmq_curve_keys_are_z85_of_40_characters(alice):
    public, secret = alice.zmq_curve_keys()
    assert len(public) == 40 and len(secret) == 40
    assert public != secret


def test_signature_verifies_only_for_the_signer_and_the_data(alice, bob):
    signature = alice.sign(b"hello")
    assert verify(alice.peer_id, b"hello", signature)
    assert not verify(alice.peer_id, b"hellO", signature)
    assert not verify(bob.peer_id, b"hello", signature)
    assert not verify("garbage", b"hello", signature)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "abc",
        "z",
        "z6Mk",
        "zzzzzzzz",
        "z0OIl",  # characters outside base58
        b58(b"\xec\x01" + b"\x07" * 32),  # x25519 multicodec, not ed25519
        b58(b"\xed\x01" + b"\x07" * 31),  # key one byte short
        b58(b"\xed\x01" + b"\x01" + b"\x00" * 31),  # small-order point
        b58(b"\xed\x01" + b"\xff" * 32),  # not a point on the curve
    ],
)
def test_garbage_peer_ids_raise_identity_error(text):
    with pytest.raises(IdentityError):
        curve_public_key(text)
    assert not is_peer_id(text)


@pytest.mark.parametrize("value", [None, 42, b"z6Mk", ["z6Mk"], "z" * 65])
def test_is_peer_id_is_false_for_junk(value):
    assert is_peer_id(value) is False


def test_is_peer_id_is_false_for_a_truncated_or_extended_peer_id(alice):
    assert not is_peer_id(alice.peer_id[:-1])
    assert not is_peer_id(alice.peer_id + "z")


def test_public_key_from_non_string_raises_identity_error():
    with pytest.raises(IdentityError):
        public_key_from_peer_id(12345)


@pytest.mark.parametrize("text", ["", "not-a-key", "z", b58(b"\x01" * 31), b58(b"\x01" * 33), 7])
def test_bad_private_key_text_raises_identity_error(text):
    with pytest.raises(IdentityError):
        Identity.from_private_key(text)


# -- sealing --


def test_recipient_opens_what_was_sealed_for_it(alice, bob):
    sealed = Sealer(alice).seal(bob.peer_id, b"a job for bob")
    assert Sealer(bob).open(alice.peer_id, sealed) == b"a job for bob"


def test_sealed_text_hides_the_plaintext_and_differs_each_time(alice, bob):
    sealer = Sealer(alice)
    first, second = sealer.seal(bob.peer_id, b"secret payload"), sealer.seal(bob.peer_id, b"secret payload")
    assert b"secret payload" not in first
    assert first != second


def test_sealer_opens_a_memoryview(alice, bob):
    sealed = Sealer(alice).seal(bob.peer_id, b"x")
    assert Sealer(bob).open(alice.peer_id, memoryview(sealed)) == b"x"


def test_every_single_flipped_bit_makes_open_fail(alice, bob):
    sealed = Sealer(alice).seal(bob.peer_id, b"payload")
    opener = Sealer(bob)
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SealError):
            opener.open(alice.peer_id, bytes(tampered))


@pytest.mark.parametrize("cut", [0, 1, 23, 24, 39])
def test_truncated_sealed_message_raises_seal_error(alice, bob, cut):
    sealed = Sealer(alice).seal(bob.peer_id, b"payload")
    with pytest.raises(SealError):
        Sealer(bob).open(alice.peer_id, sealed[:cut])


def test_third_party_cannot_open(alice, bob, carol):
    sealed = Sealer(alice).seal(bob.peer_id, b"for bob only")
    with pytest.raises(SealError):
        Sealer(carol).open(alice.peer_id, sealed)


def test_opening_with_the_wrong_claimed_sender_fails(alice, bob, carol):
    sealed = Sealer(alice).seal(bob.peer_id, b"from alice")
    with pytest.raises(SealError):
        Sealer(bob).open(carol.peer_id, sealed)


def test_opening_with_a_garbage_sender_raises_seal_error(alice, bob):
    sealed = Sealer(alice).seal(bob.peer_id, b"x")
    with pytest.raises(SealError):
        Sealer(bob).open("not-a-peer-id", sealed)


def test_sealing_for_a_garbage_peer_id_raises_identity_error(alice):
    with pytest.raises(IdentityError):
        Sealer(alice).seal("z6MkNope", b"x")


def test_sealer_cache_eviction_keeps_working(alice, bob, carol, monkeypatch):
    monkeypatch.setattr(Sealer, "CACHE_SIZE", 1)
    sealer = Sealer(alice)
    for peer in (bob, carol, bob, carol):
        assert Sealer(peer).open(alice.peer_id, sealer.seal(peer.peer_id, b"hi")) == b"hi"
    assert len(sealer._keys) == 1


def test_sealed_messages_are_pynacl_boxes_both_ways(alice, bob):
    """The in-place sealing writes exactly PyNaCl's Box format, so either side may use either."""
    box_to_bob = nacl.public.Box(
        nacl.public.PrivateKey(alice.curve_secret_key), nacl.public.PublicKey(bob.curve_public_key)
    )
    box_at_bob = nacl.public.Box(
        nacl.public.PrivateKey(bob.curve_secret_key), nacl.public.PublicKey(alice.curve_public_key)
    )
    parts = [b"head", memoryview(b"x" * 70_000), bytearray(b"tail")]
    assert box_at_bob.decrypt(bytes(Sealer(alice).seal_parts(bob.peer_id, parts))) == b"head" + b"x" * 70_000 + b"tail"
    assert Sealer(bob).open(alice.peer_id, bytes(box_to_bob.encrypt(b"from pynacl"))) == b"from pynacl"
    assert Sealer(bob).open(alice.peer_id, Sealer(alice).seal(bob.peer_id, b"")) == b""
