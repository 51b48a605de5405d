"""A listener dialled at once: a peer written from docs/protocol.md §7.8 alone may dial a
node's listener the moment the node's ``sync`` reaches it, while the node itself still
waits half a round trip before it would act; or dial before its own ``sync`` reaches
the node. The node takes the link every time.

The peer is the test's own: an identity registered at a real relay from a raw socket,
speaking the node-to-node protocol through the real session core (tests.harness.SessionPeer),
and dialling the node's real listener with its own CurveZMQ DEALER.
"""

from __future__ import annotations

import time
from contextlib import ExitStack, closing

import zmq

from meshnet.identity import Identity, curve_public_z85
from meshnet.protocol.direct import BYE, OUR_HI, Hi, decode_link
from meshnet.protocol.messages import Punch
from tests.harness import Mesh, SessionPeer, raw_dealer
from tests.integration.test_punch_offers import port_on

TRIALS = 50
#: How late the peer answers the node's offer: the node's relayed round trip, half of
#: which it waits after its sync before it would itself act.
ANSWER_DELAY = 0.2


def test_a_listener_dialled_at_once_after_its_sync_connects_every_time(mesh: Mesh) -> None:
    """The node offers (a job went between them) and listens; the peer answers slowly, so
    that the node still waits out half that round trip when the peer, reading the sync,
    dials at once."""
    connected = run_trials(mesh, TRIALS, node_offers)
    assert connected == TRIALS


def test_a_listener_dialled_before_the_sync_reaches_it_connects_every_time(mesh: Mesh) -> None:
    """The peer offers and dials the node's listener before its sync is even sent: the
    node, still waiting for the sync, takes the link."""
    assert run_trials(mesh, 10, peer_offers) == 10


def run_trials(mesh: Mesh, trials: int, attempt) -> int:
    # The node has the smallest id: on one host (one public IP) it listens on its LAN
    # address and each peer, a larger id, dials it.
    ids = sorted((Identity.generate() for _ in range(trials + 1)), key=lambda i: i.peer_id)
    node_id, peers = ids[0], ids[1:]
    relay_path, relay_id, relay_endpoint = mesh.relay_config(allowed=[i.peer_id for i in ids])
    mesh.start_relay(relay_path)
    settings = {"direct_links": True, "stun": "off"}
    path, _, _ = mesh.node_config("n", node_id, relay=(relay_endpoint, relay_id.peer_id), relay_settings=settings)
    node = mesh.start_node("n", path, registered=True)
    context = zmq.Context()
    connected = 0
    try:
        for identity in peers:
            with ExitStack() as stack:
                port = port_on("127.0.0.1")
                endpoint = relay_endpoint.replace("tcp://", f"tcp://127.0.0.1:{port};")
                peer = SessionPeer(stack.enter_context(raw_dealer(endpoint, identity, relay_id.peer_id)), identity)
                dialler = stack.enter_context(closing(context.socket(zmq.DEALER)))
                dialler.curve_publickey, dialler.curve_secretkey = identity.zmq_curve_keys()
                dialler.curve_serverkey = curve_public_z85(node_id.peer_id)
                dialler.linger = 0
                connected += attempt(peer, dialler, node_id.peer_id, f"127.0.0.1:{port}", node)
    finally:
        context.destroy(linger=0)
    return connected


def punches(peer: SessionPeer, stage: str) -> list[Punch]:
    return [box for box in peer.other if isinstance(box, Punch) and box.stage == stage]


def node_offers(peer: SessionPeer, dialler: zmq.Socket, node: str, observed: str, process) -> int:
    peer.submit(node, "echo", b"a job: the node wants a direct link")
    peer.pump(lambda: bool(punches(peer, "connect")))
    [offer] = punches(peer, "connect")
    assert offer.lan, offer
    answer_at = time.monotonic() + ANSWER_DELAY
    peer.pump(lambda: time.monotonic() >= answer_at, wake_at=answer_at)  # a slow peer
    answer = Punch(stage="answer", attempt=offer.attempt, observed=observed, nat="port_restricted", lan=observed)
    peer._apply(peer.core.send_control(node, answer, time.monotonic()))
    peer.pump(lambda: bool(punches(peer, "sync")))
    dialler.connect(f"tcp://{offer.lan}")  # at once
    dialler.send_multipart(OUR_HI.frames())
    return took_the_link(peer, dialler, process)


def peer_offers(peer: SessionPeer, dialler: zmq.Socket, node: str, observed: str, process) -> int:
    offer = Punch(stage="connect", attempt=1, observed=observed, nat="port_restricted", lan=observed)
    peer._apply(peer.core.send_control(node, offer, time.monotonic()))
    peer.pump(lambda: bool(punches(peer, "answer") or punches(peer, "refuse")))
    [answer] = punches(peer, "answer")
    assert answer.lan, answer
    dialler.connect(f"tcp://{answer.lan}")
    dialler.send_multipart(OUR_HI.frames())
    assert dialler.poll(5000), "the listener did not say hi"  # it took the connection
    peer._apply(peer.core.send_control(node, Punch(stage="sync", attempt=1), time.monotonic()))
    return took_the_link(peer, dialler, process, said_hi=decode_link(dialler.recv_multipart()))


def took_the_link(peer: SessionPeer, dialler: zmq.Socket, process, said_hi=None) -> int:
    """1 when the node took the link: it says the path is ``lan``, and said hi, not bye."""
    process.wait_for("path_changed", peer=peer.identity.peer_id, path="lan", timeout=10)
    if said_hi is None:
        assert dialler.poll(5000), "the listener did not say hi"
        said_hi = decode_link(dialler.recv_multipart())
    assert isinstance(said_hi, Hi), f"the listener said {said_hi} first"
    while dialler.poll(0):  # nothing after it may be a bye
        assert dialler.recv_multipart() != [BYE], "the listener took the link, then closed it"
    return 1
