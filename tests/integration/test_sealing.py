"""The relay forwards job payloads and results but can neither read nor alter them.

The relay here is the real daemon, run in the test process with a routing core that
records (and in one test alters) every body it forwards, as a curious or malicious relay
operator could.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace

import cbor2
import pytest

from meshnet import JobRefused, MeshClient
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


def run_pair(mesh: Mesh, core: RecordingCore) -> Iterator[tuple[str, str]]:
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
    assert len(core.seen) == 4  # two jobs there, two results back
    for body in core.seen:
        assert secret.encode() not in body
        assert cbor2.dumps({"prompt": secret}) not in body
        assert digest.encode() not in body
        with pytest.raises(RemoteProtocolError):
            decode_inner(body, NODE_TO_NODE, max_size=1 << 27)  # not a readable job or result


def test_payload_altered_in_transit_is_rejected_by_the_receiving_node(mesh: Mesh) -> None:
    core = new_core(tamper=True)
    for a_api, b in run_pair(mesh, core):
        node_b = mesh.processes[-1]
        with MeshClient(a_api) as client, pytest.raises(JobRefused) as info:
            client.run("echo", "do not touch", to=b, timeout=10)
        # B could not open the job (so it never ran it), and said so; its sealed answer was
        # itself altered on the way back, so A's refusal comes from A failing to open it.
        rejected = node_b.wait_for("sealed_message_rejected")
        assert "did not authenticate" in rejected["error"]
        assert not node_b.find("job_succeeded")
        assert info.value.reason == "invalid"
