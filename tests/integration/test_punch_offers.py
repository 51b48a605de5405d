"""A peer cannot aim a node's connection attempts: hostile punch offers against a real
node, through a real relay, with real TCP listeners counting what reaches them.

Hostile identities register at the relay from raw sockets and speak the node-to-node
protocol through the real session core (tests.harness.SessionPeer): they offer punches
(``connect`` then ``sync`` at once) naming addresses the node should not dial, and the
test's own listeners on those addresses count the connections that arrive.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from meshnet.holepunch import DIAL_BURST, DIAL_RATE, MIN_OFFER_GAP
from meshnet.identity import Identity
from meshnet.protocol.messages import Punch
from tests.harness import Mesh, MeshProcess, SessionPeer, raw_dealer

PORTS = 40
HOSTILE = 5


class Listeners:
    """TCP listeners on ``count`` ports, each bound on every IP of ``ips``, that accept
    and hold every connection (no ZMTP greeting: a dial stays open until the node gives
    it up), counting them."""

    def __init__(self, ips: tuple[str, ...], count: int):
        self.accepted: list[tuple[str, int]] = []
        self._socks: list[socket.socket] = []
        self.ports: list[int] = []
        while len(self.ports) < count:
            bound = self._bind_all(ips)
            if bound:
                self._socks += bound
                self.ports.append(bound[0].getsockname()[1])
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @staticmethod
    def _bind_all(ips: tuple[str, ...]) -> list[socket.socket]:
        """One free port, listened on at each of ``ips`` ([] if another took it on one)."""
        socks: list[socket.socket] = []
        port = 0
        try:
            for ip in ips:
                sock = socket.socket()
                socks.append(sock)
                sock.bind((ip, port))
                sock.listen(64)
                port = sock.getsockname()[1]
        except OSError:
            for sock in socks:
                sock.close()
            return []
        return socks

    def _accept(self) -> None:
        import selectors

        selector = selectors.DefaultSelector()
        for sock in self._socks:
            selector.register(sock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in selector.select(timeout=0.1):
                conn, _ = key.fileobj.accept()
                self._held.append(conn)
                self.accepted.append(key.fileobj.getsockname())
        selector.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self._socks + self._held:
            sock.close()


@contextmanager
def listening(ips: tuple[str, ...], count: int) -> Iterator[Listeners]:
    listeners = Listeners(ips, count)
    try:
        yield listeners
    finally:
        listeners.close()


def start_victim(mesh: Mesh, hostile: list[Identity]) -> tuple[MeshProcess, Identity, str, str]:
    victim_id = Identity.generate()
    while any(h.peer_id > victim_id.peer_id for h in hostile):  # the victim dials a LAN peer
        victim_id = Identity.generate()
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[victim_id.peer_id, *(h.peer_id for h in hostile)])
    mesh.start_relay(relay_path)
    link = (relay_endpoint, relay_id.peer_id)
    path, _, _ = mesh.node_config("victim", victim_id, relay=link, relay_settings={"direct_links": True, "stun": "off"})
    victim = mesh.start_node("victim", path, registered=True)
    return victim, victim_id, relay_endpoint, relay_id.peer_id


def port_on(ip: str) -> int:
    with socket.socket() as sock:
        sock.bind((ip, 0))
        return sock.getsockname()[1]


def hostile_peers(stack: ExitStack, hostile: list[Identity], relay: str, relay_peer: str, ip: str) -> list[tuple]:
    """Each hostile identity registered at the relay from ``ip`` (a port of its own, so
    that the test knows where the relay sees it): (SessionPeer, its observed address)."""
    peers = []
    for identity in hostile:
        port = port_on(ip)
        sock = stack.enter_context(raw_dealer(relay.replace("tcp://", f"tcp://{ip}:{port};"), identity, relay_peer))
        peers.append((SessionPeer(sock, identity), f"{ip}:{port}"))
    return peers


def smaller_ids(n: int) -> list[Identity]:
    """``n`` identities, sorted, all below a fresh one's chance (so a victim above them is found quickly)."""
    ids = sorted((Identity.generate() for _ in range(4 * n)), key=lambda i: i.peer_id)
    return ids[:n]


def offer(peer: SessionPeer, victim: str, attempt: int, **candidates: str | None) -> None:
    """A ``connect`` naming ``candidates``, and its ``sync`` at once (the node dials on it)."""
    now = time.monotonic()
    connect = Punch(stage="connect", attempt=attempt, **candidates)
    peer._apply(peer.core.send_control(victim, connect, now))
    peer._apply(peer.core.send_control(victim, Punch(stage="sync", attempt=attempt), now))


def answers(peer: SessionPeer) -> int:
    return sum(isinstance(box, Punch) and box.stage in ("answer", "refuse") for box in peer.other)


def test_punch_offers_naming_addresses_the_relay_does_not_vouch_for_are_never_dialled(mesh: Mesh) -> None:
    """Peers the relay sees at 127.0.0.2 name the node's own loopback ports, another
    host's, and loopback ports of their own, 40 ports in all, as their observed,
    listener and LAN addresses: the node answers each offer and dials none of them."""
    hostile = smaller_ids(HOSTILE)
    victim, victim_id, relay_endpoint, relay_peer = start_victim(mesh, hostile)
    with listening(("127.0.0.1", "127.0.0.2", "127.0.0.3"), PORTS) as listeners, ExitStack() as stack:
        ports = listeners.ports
        peers = hostile_peers(stack, hostile, relay_endpoint, relay_peer, "127.0.0.2")
        rounds = PORTS // HOSTILE
        for round_ in range(rounds):
            for n, (peer, seen_at) in enumerate(peers):
                port = ports[round_ * HOSTILE + n]
                shapes = [
                    # "We share your public IP; dial my LAN address" (the node's own port).
                    {"observed": f"127.0.0.1:{port}", "nat": "port_restricted", "lan": f"127.0.0.1:{port}"},
                    # "I am another host, with a listener" (a third party's port).
                    {"observed": f"127.0.0.3:{port}", "nat": "full_cone", "listen": f"127.0.0.3:{port}"},
                    # "Punch to me at another host".
                    {"observed": f"127.0.0.3:{port}", "nat": "port_restricted"},
                    # The truth, and a listener on its own loopback address: not this host's.
                    {"observed": seen_at, "nat": "full_cone", "listen": f"127.0.0.2:{port}"},
                ]
                offer(peer, victim_id.peer_id, round_ + 1, **shapes[(round_ + n) % len(shapes)])
            for peer, _ in peers:
                peer.pump(lambda peer=peer, want=round_ + 1: answers(peer) >= want, timeout=20)
            # The pace of an honest peer's retries (faster offers are ignored, not dialled).
            time.sleep(MIN_OFFER_GAP)
        for peer, _ in peers:  # every last attempt has ended: nothing can dial later
            victim.wait_for("punch_skipped", peer=peer.identity.peer_id, count=rounds, timeout=20)
        assert not listeners.accepted, listeners.accepted
    assert not victim.find("direct_dialling")


def test_peers_together_make_a_node_dial_at_most_the_global_rate(mesh: Mesh) -> None:
    """Five identities on the node's own host (so that their LAN addresses on loopback
    are dialled) each offer a new port every MIN_OFFER_GAP: the node dials at most
    DIAL_BURST at once and DIAL_RATE a second after, counted at the listeners."""
    hostile = smaller_ids(HOSTILE)
    victim, victim_id, relay_endpoint, relay_peer = start_victim(mesh, hostile)
    rounds = 8
    with listening(("127.0.0.1",), rounds * HOSTILE) as listeners, ExitStack() as stack:
        ports = listeners.ports
        peers = hostile_peers(stack, hostile, relay_endpoint, relay_peer, "127.0.0.1")
        started = time.monotonic()
        for round_ in range(rounds):
            for n, (peer, seen_at) in enumerate(peers):
                port = ports[round_ * HOSTILE + n]
                candidates = {"observed": seen_at, "nat": "port_restricted", "lan": f"127.0.0.1:{port}"}
                offer(peer, victim_id.peer_id, round_ + 1, **candidates)
            for peer, _ in peers:
                peer.pump(lambda peer=peer, want=round_ + 1: answers(peer) >= want, timeout=20)
            time.sleep(MIN_OFFER_GAP)  # an honest peer's pace, as above

        def ended(peer: SessionPeer) -> bool:
            # Its last attempt failed, or its session ended (the relay expired the silent
            # test peer): either way nothing of it can dial later.
            who = peer.identity.peer_id
            return bool(victim.find("punch_failed", peer=who, attempt=rounds) or victim.find("session_ended", peer=who))

        victim.wait_until(lambda: all(ended(peer) for peer, _ in peers), timeout=20)
        elapsed = time.monotonic() - started
        dialled = len(listeners.accepted)
    offers = len(ports)
    assert dialled >= DIAL_BURST, f"only {dialled} dials: the test did not make the node dial"
    assert dialled <= DIAL_BURST + DIAL_RATE * elapsed + 1, f"{dialled} dials in {elapsed:.1f} s"
    assert dialled < offers, f"{dialled} dials for {offers} offers"
    assert len(victim.find("direct_dialling")) == dialled
