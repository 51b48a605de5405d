"""``make demo``: a relay and two nodes from ``configs/``, and jobs relayed between them.

Starts the three processes, waits until both nodes have registered with the relay,
runs a few jobs from node A on node B (and one that B refuses), prints what happened,
and stops everything, whatever happens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from meshnet.client import MeshClient
from meshnet.config import load_node_config
from meshnet.errors import JobError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


class Daemon:
    def __init__(self, name: str, args: list[str]):
        self.name = name
        env = {**os.environ, "MESHNET_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "meshnet.cli", *args], stderr=subprocess.PIPE, text=True, env=env
        )
        self.ready = threading.Event()
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.append(line.rstrip())
            try:
                event = json.loads(line).get("event")
            except (json.JSONDecodeError, AttributeError):
                continue
            if event in ("relay_started", "relay_registered"):
                self.ready.set()
        self.ready.set()  # exited: let the waiter see it

    def wait_ready(self, timeout: float = 20) -> None:
        if not self.ready.wait(timeout) or self.popen.poll() is not None:
            tail = "\n  ".join(self.lines[-10:])
            raise SystemExit(f"error: {self.name} did not start; its last lines:\n  {tail}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()


def main() -> int:
    a = load_node_config(CONFIGS / "node-a.toml")
    b = load_node_config(CONFIGS / "node-b.toml")
    b_peer = b.load_identity().peer_id
    daemons = [Daemon("relay", ["relay", "--config", str(CONFIGS / "relay.toml")])]
    try:
        daemons[0].wait_ready()
        for name in ("a", "b"):
            daemons.append(Daemon(f"node-{name}", ["node", "--config", str(CONFIGS / f"node-{name}.toml")]))
        for daemon in daemons[1:]:
            daemon.wait_ready()
        print(f"relay and two nodes up; node A runs jobs on node B ({b_peer})")
        with MeshClient(a.api.endpoint) as client:
            print("echo          ->", client.run("echo", {"hello": "mesh"}, to=b_peer))
            print("sha256 x 1000 ->", client.run("sha256", {"data": "abc", "rounds": 1000}, to=b_peer))
            results = list(client.map("echo", range(100), to=b_peer))
            print(f"100 echo jobs -> {len(results)} results, in order: {results == list(range(100))}")
            try:
                client.run("crash", None, to=b_peer)
            except JobError as exc:
                print(f"crash         -> {exc.status} ({exc.reason}): {exc}")
            print("ping B: the first ping asks for a direct link, which two nodes on one host make")
            print("over loopback, as two behind one NAT do over their LAN:")
            for _ in range(40):
                pong = client.ping(b_peer)
                where = pong["path"] + (f" {pong['address']}" if pong["address"] else "")
                print(f"  pong via {where} in {pong['rtt'] * 1000:.2f} ms")
                if pong["path"] != "relay":
                    break
                time.sleep(0.25)  # pacing between pings, as `meshnet ping --interval` does
            print("peers known to the relay:")
            for peer in client.peers():
                path, rtt = peer.get("path", "relayed"), peer.get("rtt_ms")
                rtt_text = f", rtt {rtt} ms" if rtt is not None else ""
                print(f"  {peer['peer_id']}  observed at {peer['observed']}, path from A: {path}{rtt_text}")
    finally:
        for daemon in reversed(daemons):
            daemon.stop()
    print("stopped relay and nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
