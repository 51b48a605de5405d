"""What each device can do and how busy it is, as a peers listing shows it: capabilities
detected and configured at registration, load from every heartbeat (a real relay and
two real nodes)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from meshnet import JobCancelled, MeshClient
from meshnet.capabilities import TIERS
from meshnet.protocol import PeersReply, PeersRequest
from tests.harness import Mesh, cli

GPU_BOX = {"gpus": 1, "gpu_models": ["Test GPU 24GB"], "tier": "server", "labels": {"site": "lab"}}


def poll(read: Callable[[], Any], until: Callable[[Any], bool], timeout: float = 15.0) -> Any:
    """``read()`` until ``until`` holds of it (the relay learns load on heartbeats, every
    0.5 s here, and nothing logs it): the last value read."""
    deadline = time.monotonic() + timeout
    value = read()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_peers_list_each_devices_capabilities_and_its_load_from_heartbeats(mesh: Mesh) -> None:
    pair = mesh.start_pair(a_jobs={"executors": 2, "capabilities": GPU_BOX})
    a, b = pair.a_id.peer_id, pair.b_id.peer_id
    with MeshClient(pair.a_api) as a_client, MeshClient(pair.b_api) as b_client:

        def listed() -> dict[str, dict[str, Any]]:
            return {p["peer_id"]: p for p in b_client.peers()}

        futures = [a_client.submit("sleep", 30.0, to=a) for _ in range(3)]  # two run, one waits
        busy = {"busy": 2, "free": 0, "queued": 1, "ran": 0}
        # The first heartbeat after registering has no round trip to tell yet.
        peers = poll(listed, lambda seen: seen[a].get("load") == busy and "rtt" in seen[a])
        assert peers[a]["load"] == busy
        caps = peers[a]["caps"]
        assert {k: caps[k] for k in GPU_BOX} == GPU_BOX  # the config's, over what was detected
        assert caps["executors"] == 2 and caps["kinds"] == ["echo", "sha256", "sleep"]
        assert caps["cores"] >= 1 and caps["memory_bytes"] > 0 and caps["os"] == "linux" and caps["arch"]
        assert 0 < peers[a]["rtt"] < 5  # a heartbeat's round trip, told by the next one
        own = peers[b]["caps"]
        assert own["gpus"] == 0 and own["tier"] in TIERS  # detected: no nvidia-smi here

        shown = cli("peers", "--node", pair.b_api)
        assert shown.returncode == 0, shown.stderr
        [line] = [line for line in shown.stdout.splitlines() if line.startswith(a)]
        assert "tier=server  gpus=1  busy=2/2  queued=1" in line

        table = cli("status", "--mesh", "--node", pair.b_api)
        assert table.returncode == 0, table.stderr
        header, *rows = table.stdout.splitlines()
        assert header.split() == ["device", "tier", "cores", "gpus", "busy", "queued", "ran", "path", "rtt"]
        [a_row] = [row for row in rows if row.startswith(a[:12])]
        assert a_row.split()[1:8] == ["server", str(caps["cores"]), "1", "2/2", "1", "0", "relayed"]
        assert any(row.startswith(b[:12]) and "(this node)" in row for row in rows)

        # A query by requirements: the devices that meet them, or why none does.
        found, unmet = b_client.devices({"gpus": 1, "labels": {"site": "lab"}})
        assert [p["peer_id"] for p in found] == [a] and unmet is None
        assert b_client.devices({"gpus": 2}) == ([], "no device has gpus >= 2")
        shown = cli("peers", "--node", pair.b_api, "--requires", '{"tier": "server"}')
        assert [line.split()[0] for line in shown.stdout.splitlines()] == [a]
        shown = cli("peers", "--node", pair.b_api, "--requires", '{"gpus": 2}')
        assert shown.stdout.strip() == "no device meets gpus >= 2: no device has gpus >= 2"
        shown = cli("peers", "--node", pair.b_api, "--requires", '{"gpu": 2}')
        assert shown.returncode == 2 and "a known requirement" in shown.stderr

        # The listing pages, through the node: a page of one, then the rest.
        first = b_client._request(PeersRequest(seq=1000, limit=1), PeersReply, 10)
        assert len(first.peers) == 1 and first.more == 1 and first.next == first.peers[0]["peer_id"]
        rest = b_client._request(PeersRequest(seq=1001, after=first.next, limit=1), PeersReply, 10)
        assert rest.next is None and rest.more is None
        assert [p["peer_id"] for p in first.peers + rest.peers] == sorted([a, b])
        assert [p["peer_id"] for p in b_client.peers()] == sorted([a, b])

        for future in futures:
            a_client.cancel(future)
        ends = Counter(type(f.exception(timeout=30)).__name__ for f in futures)
        assert ends == Counter({JobCancelled.__name__: 3})
        idle = {"busy": 0, "free": 2, "queued": 0, "ran": 0}  # cancelled: not run to an end
        assert poll(listed, lambda seen: seen[a].get("load") == idle)[a]["load"] == idle
