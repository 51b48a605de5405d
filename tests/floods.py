"""A flood of STUN binding requests from many sources, for tests and benchmarks: on
loopback any 127/8 address is this host's, so each source socket binds one of its own
(as spoofed sources would look to the relay), and the answers they draw are counted."""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass

from meshnet import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess

REQUESTS = 50_000
SOURCES = 500
#: Requests a second: 50,000 in 2.5 s, about the pace of the flood the issue measured.
FLOOD_RATE = 20_000


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binding_request(change: int = 0) -> bytes:
    """An RFC 3489 binding request (CHANGE-REQUEST with ``change`` flags if any)."""
    body = b"\x00\x03\x00\x04" + change.to_bytes(4, "big") if change else b""
    return b"\x00\x01" + len(body).to_bytes(2, "big") + os.urandom(16) + body


class Flood:
    """``REQUESTS`` binding requests from ``SOURCES`` sockets, each on an address of its
    own in 127/8, sent as fast as one thread can; the answers they draw are counted."""

    def __init__(self, port: int):
        self.port = port
        self.socks = []
        for n in range(SOURCES):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((f"127.{100 + n // 250}.{n % 250}.1", 0))
            sock.setblocking(False)
            self.socks.append(sock)
        self.answers: dict[str, int] = {}
        self.sent = 0
        self.took = 0.0
        self._done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        selector = selectors.DefaultSelector()
        for sock in self.socks:
            selector.register(sock, selectors.EVENT_READ)
        quiet_since = None
        while True:
            events = selector.select(timeout=0.2)
            for key, _ in events:
                try:
                    while True:
                        key.fileobj.recvfrom(2048)
                        source = key.fileobj.getsockname()[0]
                        self.answers[source] = self.answers.get(source, 0) + 1
                except BlockingIOError:
                    pass
            if events:
                quiet_since = None
            elif self._done.is_set():
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 1.0:  # every answer in flight has come
                    break
        selector.close()

    def run(self) -> None:
        """At FLOOD_RATE, steadily (the rate the issue measured a flood at), so that
        relayed jobs can be measured while it lasts."""
        self._reader.start()
        started = time.monotonic()
        target = ("127.0.0.1", self.port)
        request = binding_request()
        while self.sent < REQUESTS:
            for sock in self.socks:
                try:
                    sock.sendto(request, target)
                except BlockingIOError:
                    continue
                self.sent += 1
            ahead = started + self.sent / FLOOD_RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # the flood's pace, not a wait for anything
        self.took = time.monotonic() - started
        self._done.set()
        self._reader.join(30)

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@dataclass
class FloodRun:
    """What one flood drew: its counts, and relayed echo latencies before and during it."""

    flood: Flood
    before: list[float]
    during: list[float]
    relay: MeshProcess


def echo_latencies(client: MeshClient, peer: str, count: int) -> list[float]:
    latencies = []
    for n in range(count):
        started = time.perf_counter()
        assert client.run("echo", n, to=peer) == n
        latencies.append(time.perf_counter() - started)
    return latencies


def flood_a_relay(mesh: Mesh, echoes: int = 300) -> FloodRun:
    """A relay answering STUN on loopback and two nodes on it; ``echoes`` relayed echo
    jobs one after another, then a flood of the relay's STUN port with echoes going on
    until it ends."""
    a_id, b_id = Identity.generate(), Identity.generate()
    stun = {"addresses": ["127.0.0.1"], "port": free_udp_port(), "alt_port": free_udp_port()}
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[a_id.peer_id, b_id.peer_id], stun=stun)
    relay = mesh.start_relay(relay_path)
    link = (relay_endpoint, relay_id.peer_id)
    a_path, _, a_api = mesh.node_config("a", a_id, relay=link)
    b_path, _, _ = mesh.node_config("b", b_id, relay=link)
    mesh.start_node("a", a_path, registered=True)
    mesh.start_node("b", b_path, registered=True)
    flood = Flood(stun["port"])
    try:
        with MeshClient(a_api) as client:
            echo_latencies(client, b_id.peer_id, 50)  # warm: the session open, the path up
            before = echo_latencies(client, b_id.peer_id, echoes)
            flooding = threading.Thread(target=flood.run, daemon=True)
            flooding.start()
            during: list[float] = []
            while flooding.is_alive():
                during += echo_latencies(client, b_id.peer_id, 10)
            flooding.join()
    finally:
        flood.close()
    return FloodRun(flood, before, during, relay)
