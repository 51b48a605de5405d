"""The node-to-node and relay vectors of ``docs/protocol.md`` (§7.7, §9.2, §9.3), made by the
code: two session cores open a session and run a job, the relay's routing core forwards
and bounces the boxes, and each message is encoded (and sealed, with fixed nonces) as a
node does it. Each block must appear verbatim in the document and decode back.

Run as a script (``python -m tests.unit.test_protocol_vectors``) to print the blocks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import nacl.public
import nacl.signing

from meshnet.identity import Identity, Sealer, curve_public_z85
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import (
    NODE_TO_NODE,
    RELAY_TO_NODE,
    Deliver,
    Hello,
    Job,
    JobCancel,
    JobResult,
    PeerAck,
    Register,
    Send,
    Unroutable,
    decode,
    decode_inner,
    encode,
    encode_inner,
)
from meshnet.protocol.batch import encode_batch_parts, split_batch
from meshnet.session import Execute, SessionCore, Settled, Transmit, box_ref
from relay_server.routing import RelayCore

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
JOB_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
PAYLOAD = bytes.fromhex("a1617801")  # CBOR {"x": 1}
#: The session ids the two nodes take (the wall clock in nanoseconds, as a node takes them).
SID_A = 1_700_000_000_000_000_000
SID_B = 1_700_000_000_250_000_000
NONCE_JOB = bytes(range(24))
NONCE_RESULT = bytes(range(100, 124))
MAX_SIZE = 1 << 20
BUSY = Outcome.refused("busy", "all 8 executors are busy and the queue of 64 is full")

A = Identity(nacl.signing.SigningKey(bytes(range(32))))
B = Identity(nacl.signing.SigningKey(bytes(range(32, 64))))


# -- notation --


def diagnostic(value: Any) -> str:
    """RFC 8949 §8 diagnostic notation, as the document writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"h'{bytes(value).hex()}'"
    if isinstance(value, list):
        return "[" + ", ".join(diagnostic(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{diagnostic(k)}: {diagnostic(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def wrapped(data: bytes) -> str:
    """Hex, 48 bytes a line."""
    text = bytes(data).hex()
    return "\n".join(text[i : i + 96] for i in range(0, len(text), 96))


def fields(message: Any) -> dict[str, Any]:
    return {"v": 1, "t": message.TYPE, **message.header_fields()}


def plaintext_block(message: Any) -> str:
    data = encode_inner(message)
    return f"plaintext (diagnostic): {diagnostic(fields(message))}\nplaintext ({len(data)} bytes):\n{wrapped(data)}"


def header_block(frames: list[Any], message: Any) -> str:
    block = (
        f"header (diagnostic): {diagnostic(fields(message))}\nheader ({len(frames[0])} bytes):\n{wrapped(frames[0])}"
    )
    if len(frames) == 2:
        block += f"\nbody ({len(frames[1])} bytes), sealed:\n{wrapped(frames[1])}"
    return block


def sealed_block(plaintext: bytes, sealed: bytes) -> str:
    n = len(plaintext)
    return f"sealed body = nonce || crypto_box ciphertext ({len(sealed)} bytes = 24 + 16 + {n}):\n{wrapped(sealed)}"


# -- the messages, as the session cores make them --


def spec(job_id: bytes, timeout: float = 30.0) -> JobSpec:
    return JobSpec(id=job_id, kind="echo", payload=PAYLOAD, timeout=timeout, origin="client:1")


def boxes(events: list[Any]) -> list[Any]:
    return [event.box for event in events if isinstance(event, Transmit)]


def conversation() -> dict[str, Any]:
    """A's first job to B: the hello exchange, the job, its result, A's ack; then a
    second job, refused by B, and a third, cancelled by A's client. Every box as the
    cores made it, carried through ``encode_inner``/``decode_inner`` as a node does."""
    a = SessionCore(budget=1 << 20, new_sid=lambda: SID_A)
    b = SessionCore(budget=1 << 20, new_sid=lambda: SID_B)
    a.on_path("relay", True, 0.0)
    b.on_path("relay", True, 0.0)

    def carry(to: SessionCore, sender: Identity, events: list[Any], now: float) -> list[Any]:
        out: list[Any] = []
        for box in boxes(events):
            out += to.on_box(sender.peer_id, decode_inner(encode_inner(box), NODE_TO_NODE, max_size=MAX_SIZE), now)
        return out

    seen: dict[str, Any] = {}
    [seen["hello_a"]] = boxes(a.submit(spec(JOB_ID), B.peer_id, 0.0))
    answer = carry(b, A, [Transmit(B.peer_id, "relay", seen["hello_a"])], 0.01)
    [seen["hello_b"]] = boxes(answer)
    sent = carry(a, B, answer, 0.02)
    [seen["job"]] = boxes(sent)
    assert [e.job.id for e in carry(b, A, sent, 0.03) if isinstance(e, Execute)] == [JOB_ID]
    result = b.job_finished(A.peer_id, JOB_ID, Outcome("succeeded", result=PAYLOAD), 0.04)
    [seen["job_result"]] = boxes(result)
    done = carry(a, B, result, 0.05)
    assert [(e.outcome.status, e.outcome.result) for e in done if isinstance(e, Settled)] == [("succeeded", PAYLOAD)]
    [seen["peer_ack"]] = boxes(a.on_tick(0.05 + 0.02))
    # A second job, which B refuses (its queue is full), and a third, cancelled at once.
    second, third = bytes(range(16)), bytes(range(16, 32))
    carry(b, A, a.submit(spec(second), B.peer_id, 1.0), 1.0)
    [seen["refusal"]] = boxes(b.job_finished(A.peer_id, second, BUSY, 1.01))
    carry(a, B, [Transmit(A.peer_id, "relay", seen["refusal"])], 1.02)
    a.submit(spec(third), B.peer_id, 2.0)
    [seen["job_cancel"]] = boxes(a.cancel(third, "client:1", 2.0))
    [seen["probe"]] = boxes(a.probe(B.peer_id, 3.0))
    return seen


def expected_boxes() -> dict[str, Any]:
    """The same boxes, written out with fixed values."""
    head_a = {"sid": SID_A, "rsid": SID_B}
    head_b = {"sid": SID_B, "rsid": SID_A}
    return {
        "hello_a": Hello(sid=SID_A, ctr=1),
        "hello_b": Hello(**head_b, ctr=1, ack=0),
        "job": Job(**head_a, ctr=2, ack=0, seq=1, id=JOB_ID, kind="echo", timeout=30.0, payload=PAYLOAD),
        "job_result": JobResult(
            **head_b, ctr=2, ack=1, seq=1, id=JOB_ID, job_seq=1, status="succeeded", result=PAYLOAD
        ),
        "peer_ack": PeerAck(**head_a, ctr=3, ack=1),
        "refusal": JobResult(
            **head_b, ctr=3, ack=2, seq=2, id=bytes(range(16)), job_seq=2, status="refused", error=BUSY.error
        ),
        "job_cancel": JobCancel(**head_a, ctr=6, ack=2, seq=4, id=bytes(range(16, 32)), job_seq=3),
        "probe": PeerAck(**head_a, ctr=7, ack=2, probe=True),
    }


# -- the relay's side --


def relay() -> tuple[RelayCore, bytes, bytes]:
    """A relay core with A registered on connection ``conn_a``; B, on ``conn_b``, not registered."""
    core = RelayCore(heartbeat=1.0, liveness=3, max_body=64 << 20)
    conn_a, conn_b = b"conn-a", b"conn-b"
    core.on_message(conn_a, curve_public_z85(A.peer_id), encode(Register(peer_id=A.peer_id)), 0.0)
    return core, conn_a, conn_b


def seal(sender: Identity, receiver: Identity, plaintext: bytes, nonce: bytes) -> bytes:
    box = nacl.public.Box(
        nacl.public.PrivateKey(sender.curve_secret_key), nacl.public.PublicKey(receiver.curve_public_key)
    )
    sealed = bytes(box.encrypt(plaintext, nonce))
    assert Sealer(receiver).open(sender.peer_id, sealed) == plaintext
    return sealed


def vectors() -> dict[str, str]:
    """Every block the document shows, by name."""
    made = conversation()
    expected = expected_boxes()
    assert made == expected, "the session cores no longer make the boxes the document shows"
    out = {f"plaintext {name}": plaintext_block(box) for name, box in expected.items()}

    # §7.7: the shared key, then the job and its result sealed, sent and delivered by the relay core.
    shared = nacl.public.Box(nacl.public.PrivateKey(A.curve_secret_key), nacl.public.PublicKey(B.curve_public_key))
    out["shared key"] = (
        f"crypto_box_beforenm(B's Curve25519 public, A's Curve25519 secret) = {shared.shared_key().hex()}"
    )
    core, conn_a, conn_b = relay()
    key_b = curve_public_z85(B.peer_id)
    core.on_message(conn_b, key_b, encode(Register(peer_id=B.peer_id)), 0.0)
    for name, sender, receiver, nonce, conns in (
        ("job", A, B, NONCE_JOB, (conn_a, conn_b)),
        ("job_result", B, A, NONCE_RESULT, (conn_b, conn_a)),
    ):
        box = expected[name]
        plaintext = encode_inner(box)
        sealed = seal(sender, receiver, plaintext, nonce)
        out[f"sealed {name}"] = sealed_block(plaintext, sealed)
        send = Send(to=receiver.peer_id, ref=box_ref(box), op="sealed", body=sealed)
        out[f"send {name}"] = header_block(encode(send), send)
        key = curve_public_z85(sender.peer_id)
        [deliver_out] = [o for o in core.on_message(conns[0], key, encode(send), 0.1) if o.conn == conns[1]]
        deliver = decode(deliver_out.frames, RELAY_TO_NODE, max_body=64 << 20)
        assert deliver == Deliver(sender=sender.peer_id, ref=box_ref(box), op="sealed", body=sealed)
        out[f"deliver {name}"] = header_block(deliver_out.frames, deliver)

    # §9.2: A's hello to B, not connected; B's result from a connection the relay does not know.
    core, conn_a, conn_b = relay()
    hello = expected["hello_a"]
    send = Send(to=B.peer_id, ref=box_ref(hello), op="sealed", body=seal(A, B, encode_inner(hello), NONCE_JOB))
    [bounce] = core.on_message(conn_a, curve_public_z85(A.peer_id), encode(send), 0.1)
    out["unroutable peer_not_connected"] = header_block(bounce.frames, decode(bounce.frames, RELAY_TO_NODE, max_body=0))
    result = expected["job_result"]
    send = Send(to=A.peer_id, ref=box_ref(result), op="sealed", body=seal(B, A, encode_inner(result), NONCE_RESULT))
    bounce, error = core.on_message(conn_b, curve_public_z85(B.peer_id), encode(send), 0.1)
    unroutable = decode(bounce.frames, RELAY_TO_NODE, max_body=0)
    assert (
        isinstance(unroutable, Unroutable) and decode(error.frames, RELAY_TO_NODE, max_body=0).code == "not_registered"
    )
    out["unroutable no_relay"] = header_block(bounce.frames, unroutable)

    # §7.2: B's result and its refusal of a second job, in one batch.
    batched = [expected["job_result"], expected["refusal"]]
    data = b"".join(bytes(part) for part in encode_batch_parts(batched))
    sizes = ", ".join(f"bytes({len(encode_inner(box))}) {box.TYPE}" for box in batched)
    out["batch"] = f"batch plaintext ({len(data)} bytes) = array(2), {sizes}:\n{wrapped(data)}"
    assert [decode_inner(item, NODE_TO_NODE, max_size=MAX_SIZE) for item in split_batch(data)] == batched
    return out


def test_every_vector_is_in_the_document_verbatim() -> None:
    document = DOC.read_text(encoding="utf-8")
    missing = [name for name, block in vectors().items() if block not in document]
    assert not missing, f"docs/protocol.md does not show these as the code makes them: {missing}"


def test_every_node_to_node_vector_decodes_back() -> None:
    for name, box in expected_boxes().items():
        assert decode_inner(encode_inner(box), NODE_TO_NODE, max_size=MAX_SIZE) == box, name


if __name__ == "__main__":
    for name, block in vectors().items():
        print(f"== {name}\n{block}\n")
