"""What a relay says in the clear cannot end a job falsely, and unequal payload limits
refuse an over-limit job at its sender, on the relayed and the direct path.

The relay here is the real daemon, run in the test process with a routing core that
forwards everything and forges besides, as a hostile relay operator could: ``unroutable``
bounces (``too_large``, ``relay_busy``, ``peer_not_connected``) for boxes it delivered,
and ``peer_down`` for peers that are alive.
"""

from __future__ import annotations

import random
import time
from collections import Counter

from meshnet import MeshClient
from meshnet.config import load_relay_config
from meshnet.errors import JobError, JobRefused
from meshnet.identity import Identity
from meshnet.protocol import PeerDown
from relay_server.daemon import RelayServer
from relay_server.routing import RelayCore
from tests.harness import Mesh, stream_jobs

JOBS = 600
IN_FLIGHT = 32
MiB = 1 << 20


class ForgingCore(RelayCore):
    """Forwards every send; besides, bounces one in five back to its sender with a false
    reason, and tells the sender its peer left every 15 forwards (a forward is often a
    batch of several boxes)."""

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = random.Random(seed)
        self.forged: Counter[str] = Counter()

    def _forward(self, sender, message, now):
        out = super()._forward(sender, message, now)
        if self.rng.random() < 0.2:
            reason = self.rng.choice(["too_large", "relay_busy", "peer_not_connected"])
            out += self._reply_to(sender, self._unroutable(message, reason, f"forged {reason}"))
            self.forged[reason] += 1
        if self.forwarded % 15 == 0:
            out += self._reply_to(sender, PeerDown(peer_id=message.to))
            self.forged["peer_down"] += 1
        return out


def job_of(i: int) -> tuple[str, object]:
    return ("sleep", 0.02) if i % 10 == 0 else ("echo", i)


def test_a_relay_forging_unroutable_and_peer_down_ends_no_job_falsely(mesh: Mesh) -> None:
    a_id, b_id = Identity.generate(), Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[a_id.peer_id, b_id.peer_id])
    core = ForgingCore(heartbeat=0.5, liveness=3, max_body=1 << 27, seed=7)
    server = RelayServer(load_relay_config(relay_path), core=core).start()
    try:
        link = (relay_endpoint, relay_id.peer_id)
        a_path, _, a_api = mesh.node_config("a", a_id, relay=link)
        b_path, _, _ = mesh.node_config("b", b_id, relay=link, log_level="debug")
        node_a = mesh.start_node("a", a_path, registered=True)
        node_b = mesh.start_node("b", b_path, registered=True)
        ends = stream_jobs(a_api, b_id.peer_id, JOBS, job_of, in_flight=IN_FLIGHT)
        node_b.wait_for("job_succeeded", count=1)
        a_log_rejections = node_a.find("relay_claim_ignored") + node_a.find("peer_down_disproved")
    finally:
        mesh.close()
        server.stop()
    assert min(core.forged.values()) >= 10, core.forged
    failures = {i: end for i, end in ends.items() if isinstance(end, JobError)}
    for i, end in failures.items():
        # Only a job that never left A may end on the relay's word, and then its status
        # names the relay.
        assert isinstance(end, JobRefused) and end.reason == "peer_not_connected", (i, end)
        assert "relay" in str(end), end
    assert len(ends) == JOBS
    for i, end in ends.items():
        if i not in failures:
            assert end == (0.02 if i % 10 == 0 else i), (i, end)
    assert not node_a.find("job_peer_lost")
    ran = Counter(line["job_id"] for line in node_b.find("job_succeeded"))
    assert set(ran.values()) == {1}, "a job ran twice on B"
    assert len(ran) == JOBS - len(failures)
    assert not node_b.find("job_cancelled"), "a run on B was stopped on the relay's word"
    assert a_log_rejections, "A logged nothing of the claims it did not believe"


def test_unequal_payload_limits_refuse_the_over_limit_job_at_its_sender_on_both_paths(mesh: Mesh) -> None:
    """B takes 32 MiB, A 64 MiB: a job of 32 MiB + 64 KiB from A's client is refused
    too_large by A, while a job in flight to B goes on and succeeds; relayed, and over a
    direct link (loopback nodes connect as over a LAN)."""
    for direct in (False, True):
        pair = mesh.start_pair(
            a_jobs={"max_payload_bytes": 64 * MiB},
            b_jobs={"max_payload_bytes": 32 * MiB},
            relay_settings={"direct_links": direct},
            b_log="debug",
        )
        with MeshClient(pair.a_api) as client:
            assert client.run("echo", "hi", to=pair.b_id.peer_id) == "hi"
            if direct:
                pair.a.wait_for("path_changed", path="lan")
            sleeping = [client.submit("sleep", 2.0, to=pair.b_id.peer_id, timeout=30)]
            pair.b.wait_for("job_started", count=2)
            started = time.monotonic()
            big = client.submit("echo", b"x" * (32 * MiB + 64 * 1024), to=pair.b_id.peer_id, timeout=30)
            refusal = big.exception(timeout=30)
            took = time.monotonic() - started
            assert isinstance(refusal, JobRefused) and refusal.reason == "too_large", refusal
            assert "at most 33554432" in str(refusal)
            # Refused before the sleeps it overtook could end: nothing waited on a timeout.
            assert not any(future.done() for future in sleeping), f"refused only after {took:.1f} s"
            assert [future.result(timeout=30) for future in sleeping] == [2.0]
            assert client.run("echo", "after", to=pair.b_id.peer_id) == "after"
        assert not pair.a.find("job_peer_lost") and not pair.b.find("direct_link_down")
        mesh.close()
