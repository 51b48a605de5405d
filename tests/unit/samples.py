"""Valid sample messages for every message type, shared by the codec tests."""

from __future__ import annotations

import cbor2

from meshnet.identity import Identity
from meshnet.protocol import (
    CLIENT_TO_NODE,
    NODE_TO_CLIENT,
    NODE_TO_NODE,
    NODE_TO_RELAY,
    RELAY_TO_NODE,
    Ack,
    Cancel,
    Deliver,
    Error,
    Hello,
    Job,
    JobCancel,
    JobResult,
    PeerAck,
    PeerDown,
    PeersReply,
    PeersRequest,
    Ping,
    PingPeer,
    PingReply,
    Pong,
    Punch,
    Register,
    Registered,
    Result,
    Results,
    Send,
    StatusReply,
    StatusRequest,
    Submit,
    Unroutable,
)

PEER = Identity.generate().peer_id
OTHER_PEER = Identity.generate().peer_id
JOB_ID = bytes(range(16))
PAYLOAD = cbor2.dumps({"data": b"abc", "rounds": 2})
PEER_INFO = {"peer_id": PEER, "caps": {"cores": 4}, "listen": ["tcp://10.0.0.1:7711"], "observed": "1.2.3.4:5"}
FULL_ERROR = {"type": "RuntimeError", "message": "boom", "reason": ""}

#: direction table -> valid messages of every type that direction accepts
SAMPLES = {
    "CLIENT_TO_NODE": [
        Submit(id=JOB_ID, kind="echo", body=PAYLOAD),
        Submit(id=JOB_ID, kind="sha256", body=PAYLOAD, to=PEER, timeout=2.5, batch=True),
        Cancel(id=JOB_ID),
        StatusRequest(),
        PeersRequest(),
        PingPeer(peer=PEER, seq=3),
        PingPeer(peer=PEER, timeout=2.0),
    ],
    "NODE_TO_CLIENT": [
        Result(id=JOB_ID, status="succeeded", body=PAYLOAD, peer=PEER),
        Result(id=JOB_ID, status="failed", error=FULL_ERROR),
        Results(
            results=(
                Result(id=JOB_ID, status="succeeded", body=PAYLOAD, peer=PEER),
                Result(id=bytes(16), status="failed", error=FULL_ERROR),
            )
        ),
        StatusReply(info={"queued": 1, "running": 2, "jobs": {"succeeded": 3}}),
        PeersReply(peers=[PEER_INFO]),
        PingReply(peer=PEER, rtt=0.0012, path="direct", sent="relay", address="1.2.3.4:5", seq=3),
        PingReply(peer=PEER, rtt=0.02, path="relay", sent="relay"),
        Error(code="invalid", message="bad message"),
    ],
    "NODE_TO_RELAY": [
        Register(peer_id=PEER, caps={"cores": 8, "gpus": 1}, listen=["tcp://10.0.0.1:7711"]),
        Register(peer_id=PEER),
        Register(peer_id=PEER, max_body=1 << 20),
        Ping(seq=7),
        Ack(received=123456),
        Send(to=OTHER_PEER, ref=JOB_ID, op="sealed", body=b"\x00sealed\xff"),
        PeersRequest(),
    ],
    "RELAY_TO_NODE": [
        Registered(peer_id=PEER, observed="1.2.3.4:5", heartbeat=1.5),
        Registered(peer_id=PEER, observed="", heartbeat=1.0, max_body=1 << 26, window=1 << 26),
        Pong(seq=7),
        Ack(received=0),
        Deliver(sender=OTHER_PEER, ref=JOB_ID, op="sealed", body=b"\x00sealed\xff"),
        Unroutable(to=OTHER_PEER, ref=JOB_ID, op="sealed", reason="peer_not_connected", message="gone"),
        PeerDown(peer_id=OTHER_PEER),
        PeersReply(peers=[PEER_INFO, {**PEER_INFO, "peer_id": OTHER_PEER}]),
        Error(code="not_registered", message="register first"),
    ],
    "NODE_TO_NODE": [
        Hello(sid=1_700_000_000_000_000_000, ctr=1),
        Hello(sid=1_700_000_000_000_000_001, rsid=1_700_000_000_000_000_000, ctr=1, ack=0),
        PeerAck(sid=2, rsid=1, ctr=9, ack=4, sack=[6, 7]),
        PeerAck(sid=2, rsid=1, ctr=10, ack=7, probe=True),
        PeerAck(sid=2, rsid=1, ctr=11, ack=7, ping=3),
        PeerAck(sid=1, rsid=2, ctr=12, pong=3),
        Job(id=JOB_ID, kind="echo", timeout=30.0, payload=PAYLOAD, sid=1, rsid=2, ctr=2, ack=0, seq=1),
        JobResult(id=JOB_ID, job_seq=1, status="succeeded", result=PAYLOAD, sid=2, rsid=1, ctr=3, ack=1, seq=1),
        JobResult(
            id=JOB_ID,
            job_seq=1,
            status="refused",
            error={"type": "Refused", "message": "busy", "reason": "busy"},
            sid=2,
            rsid=1,
            ctr=4,
            ack=1,
            seq=2,
        ),
        JobCancel(id=JOB_ID, job_seq=1, sid=1, rsid=2, ctr=5, ack=2, seq=2),
        Punch(
            stage="connect",
            attempt=1,
            observed="198.51.100.11:40001",
            nat="port_restricted",
            sid=1,
            rsid=2,
            ctr=6,
            seq=3,
        ),
        Punch(
            stage="refuse",
            attempt=1,
            reason="NAT types symmetric and symmetric cannot be punched through",
            sid=2,
            rsid=1,
            ctr=7,
            seq=3,
        ),
    ],
}

TABLES = {
    "CLIENT_TO_NODE": CLIENT_TO_NODE,
    "NODE_TO_CLIENT": NODE_TO_CLIENT,
    "NODE_TO_RELAY": NODE_TO_RELAY,
    "RELAY_TO_NODE": RELAY_TO_NODE,
    "NODE_TO_NODE": NODE_TO_NODE,
}

#: the four directions that travel as frames (node-to-node travels sealed, via encode_inner)
FRAME_DIRECTIONS = ["CLIENT_TO_NODE", "NODE_TO_CLIENT", "NODE_TO_RELAY", "RELAY_TO_NODE"]

MAX_BODY = 1 << 16
