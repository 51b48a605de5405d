"""The relay forwards job payloads and results but can neither read, alter nor replay them.

The relay here is the real daemon, run in the test process with a routing core that
records (and in some tests alters, duplicates, re-orders or replays) every body it
forwards, as a curious or malicious relay operator could.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import cbor2
import pytest

from meshnet import JobTimedOut, MeshClient
from meshnet.config import load_relay_config
from meshnet.errors import RemoteProtocolError
from meshnet.identity import Identity
from meshnet.protocol import NODE_TO_NODE, decode_inner
from relay_server.daemon import RelayServer
from relay_server.routing import RelayCore
from tests.harness import Mesh


class RecordingCore(RelayCore):
    """Keeps a copy of every body it forwards; flips a bit in them when ``tamper``."""

    def __init__(self, *args, tamper: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tamper = tamper
        self.seen: list[bytes] = []

    def _forward(self, sender, message, now):
        body = bytes(message.body)
        self.seen.append(body)
        if self.tamper:
            flipped = bytearray(body)
            flipped[len(flipped) // 2] ^= 0x01
            message = replace(message, body=bytes(flipped))
        return super()._forward(sender, message, now)


class ReplayingCore(RelayCore):
    """Forwards every body, and besides: holds one back until after the next (re-order),
    sends one twice (duplicate), and sends again one it forwarded before (replay)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.past: list = []
        self.held_back: tuple | None = None
        self.tampered = Counter()

    def _forward(self, sender, message, now):
        roll = self.rng.random()
        if roll < 0.15 and self.held_back is None:
            self.held_back = (sender, message)
            self.tampered["reordered"] += 1
            return []
        out = super()._forward(sender, message, now)
        if roll < 0.35:
            out += super()._forward(sender, message, now)
            self.tampered["duplicated"] += 1
        if roll < 0.55 and self.past:
            old_sender, old = self.rng.choice(self.past)
            out += super()._forward(old_sender, old, now)
            self.tampered["replayed"] += 1
        if self.held_back is not None:
            out += super()._forward(*self.held_back, now)
            self.held_back = None
        self.past = [*self.past[-299:], (sender, message)]
        return out


def run_pair(mesh: Mesh, core: RelayCore) -> Iterator[tuple[str, str]]:
    a_id, b_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[a_id.peer_id, b_id.peer_id])
    server = RelayServer(load_relay_config(relay_path), core=core).start()
    try:
        link = (relay_endpoint, relay_id.peer_id)
        a_path, _, a_api = mesh.node_config("a", a_id, relay=link)
        b_path, _, _ = mesh.node_config("b", b_id, relay=link, log_level="debug")
        mesh.start_node("a", a_path, registered=True)
        mesh.start_node("b", b_path, registered=True)
        yield a_api, b_id.peer_id
    finally:
        mesh.close()
        server.stop()


def new_core(tamper: bool = False) -> RecordingCore:
    return RecordingCore(heartbeat=0.5, liveness=3, max_body=1 << 27, tamper=tamper)


def test_relay_sees_neither_payload_nor_result(mesh: Mesh) -> None:
    core = new_core()
    for a_api, b in run_pair(mesh, core):
        secret = os.urandom(32).hex()
        with MeshClient(a_api) as client:
            assert client.run("echo", {"prompt": secret}, to=b) == {"prompt": secret}
            digest = client.run("sha256", secret, to=b)
    assert len(core.seen) >= 4  # two jobs there, two results back, hellos and acks
    for body in core.seen:
        assert secret.encode() not in body
        assert cbor2.dumps({"prompt": secret}) not in body
        assert digest.encode() not in body
        with pytest.raises(RemoteProtocolError):
            decode_inner(body, NODE_TO_NODE, max_size=1 << 27)  # not a readable job or result


def test_a_message_altered_in_transit_is_dropped_and_its_job_never_runs(mesh: Mesh) -> None:
    core = new_core(tamper=True)
    for a_api, b in run_pair(mesh, core):
        node_b = mesh.processes[-1]
        with MeshClient(a_api) as client, pytest.raises(JobTimedOut):
            # Every copy is altered: the session never opens, the job waits for it and
            # ends with the one true status, timed out; it is never refused falsely.
            client.run("echo", "do not touch", to=b, timeout=1.0)
        rejected = node_b.wait_for("sealed_message_rejected")
        assert "did not authenticate" in rejected["error"]
        assert not node_b.find("job_succeeded")


@pytest.mark.parametrize("seed", [1, 2])
def test_a_relay_that_replays_reorders_and_duplicates_runs_no_job_twice_and_ends_none_falsely(
    mesh: Mesh, seed: int
) -> None:
    core = ReplayingCore(heartbeat=0.5, liveness=3, max_body=1 << 27, seed=seed)
    jobs = 300
    for a_api, b in run_pair(mesh, core):
        node_a, node_b = mesh.processes[-2], mesh.processes[-1]
        results = []
        with MeshClient(a_api) as client:
            for wave in range(0, jobs, 32):  # 32 in flight: within B's queue
                futures = [
                    client.submit("echo", i, to=b) if i % 3 else client.submit("sleep", 0.02, to=b)
                    for i in range(wave, min(jobs, wave + 32))
                ]
                results += [future.result(timeout=60) for future in futures]
        assert results == [i if i % 3 else 0.02 for i in range(jobs)]
        node_b.wait_for("job_succeeded", count=jobs, timeout=10)  # B's log, read on the harness's thread
        ran = Counter(line["job_id"] for line in node_b.find("job_succeeded"))
        assert len(ran) == jobs and set(ran.values()) == {1}, "a job ran twice on B"
        assert not node_a.find("job_peer_lost") and not node_a.find("job_refused")
    assert min(core.tampered.values()) > 10, core.tampered
