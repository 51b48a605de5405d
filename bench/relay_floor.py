"""The floor of the relayed path: raw pyzmq processes along MeshNet's relayed route.

client → entry node → relay → exit node (and its worker processes) → relay → entry node
→ client: the same hops as MeshNet's relayed scenario, with CurveZMQ on both relay links
as MeshNet has, the exit node running jobs in the same worker processes as baseline (a)
(:class:`bench.baseline.RawPool`), and nothing else: no end-to-end sealing, no
validation, no actors, no ledger, no logging. What MeshNet's relayed figures cost beyond
this row is MeshNet's; this row's own distance from baseline (a) is the route's.

The same file gives the floor of the direct route (``--role direct-exit|direct-entry``):
client → entry node → exit node (CurveZMQ on that one link, the exit node its server, as
a MeshNet direct link between two nodes) and back, no relay.

Speaks baseline (a)'s protocol to clients. Roles, one process each:
``--role relay|exit|entry|direct-exit|direct-entry``; keys are Z85 CurveZMQ keys from
the parent.
"""

from __future__ import annotations

import argparse
from typing import Any

import cbor2
import zmq

from bench.baseline import RawPool, _stop_event


def _relay(endpoint: str, public: str, secret: str) -> None:
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = public.encode(), secret.encode()
    router.bind(endpoint)
    stop = _stop_event()
    print("ready", flush=True)
    while not stop.is_set():
        if not router.poll(500):
            continue
        while True:
            try:
                source, dest, *rest = router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            if not dest.bytes:  # a node saying it is connected
                print(f"hello {source.bytes.decode()}", flush=True)
                continue
            router.send_multipart([dest, source, *rest], copy=False)
    context.destroy(linger=0)


def _link(context: zmq.Context, name: bytes, relay: str, relay_public: str) -> zmq.Socket:
    dealer = context.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    dealer.curve_publickey, dealer.curve_secretkey = public, secret
    dealer.curve_serverkey = relay_public.encode()
    dealer.routing_id = name
    dealer.connect(relay)
    dealer.send_multipart([b"", b"hello"])
    return dealer


def _serve_pool(sock: zmq.Socket, workers: int) -> None:
    """The exit node's work, on ``sock`` (a relay link or a direct ROUTER): each request
    ``source, conn, header, body`` runs in the pool, and its answer goes back as
    ``source, conn, job id, status, result`` until SIGTERM."""
    pool = RawPool(workers)

    def request(frames: list[zmq.Frame]) -> None:
        source, conn, header, body = frames
        fields = cbor2.loads(header.bytes)
        pool.submit((source.bytes, conn.bytes, fields["id"]), fields["kind"], body)

    def reply(tag: tuple[bytes, bytes, bytes], ok: bool, result: Any) -> None:
        sock.send_multipart([*tag, b"ok" if ok else b"failed", result], copy=False)

    pool.serve(sock, request, reply)
    pool.close()


def _exit(relay: str, relay_public: str, workers: int) -> None:
    context = zmq.Context()
    _serve_pool(_link(context, b"exit", relay, relay_public), workers)
    context.destroy(linger=0)


def _direct_exit(endpoint: str, public: str, secret: str, workers: int) -> None:
    """The exit node of the direct route: a CurveZMQ ROUTER the entry node connects to."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.curve_server = True
    router.curve_publickey, router.curve_secretkey = public.encode(), secret.encode()
    router.bind(endpoint)
    _serve_pool(router, workers)
    context.destroy(linger=0)


def _direct_entry(endpoint: str, exit_endpoint: str, exit_public: str) -> None:
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    public, secret = zmq.curve_keypair()
    dealer.curve_publickey, dealer.curve_secretkey = public, secret
    dealer.curve_serverkey = exit_public.encode()
    dealer.connect(exit_endpoint)
    # conn, header, body to the exit node; conn, job id, status, result back
    _shuttle(context, endpoint, dealer, [])


def _entry(endpoint: str, relay: str, relay_public: str) -> None:
    context = zmq.Context()
    dealer = _link(context, b"entry", relay, relay_public)
    # to the exit node through the relay: [b"exit", conn, header, body]; from it:
    # source, conn, job id, status, result
    _shuttle(context, endpoint, dealer, [b"exit"])


def _shuttle(context: zmq.Context, endpoint: str, dealer: zmq.Socket, prefix: list[bytes]) -> None:
    """An entry node: bind a ROUTER for clients on ``endpoint`` and pass messages between
    it and ``dealer`` (towards the exit node) until stopped: ``prefix`` frames go before
    each message out, and as many frames come off each message back. Destroys ``context``."""
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    stop = _stop_event()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(dealer, zmq.POLLIN)
    print("ready", flush=True)
    while not stop.is_set():
        for item, _ in poller.poll(500):
            while True:
                try:
                    frames = item.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                if item is router:
                    dealer.send_multipart([*prefix, *frames], copy=False)
                else:
                    router.send_multipart(frames[len(prefix) :], copy=False)
    context.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--role", choices=["relay", "exit", "entry", "direct-exit", "direct-entry"], required=True)
    parser.add_argument("--endpoint", help="relay: where it binds; entry: where clients connect")
    parser.add_argument("--relay", help="exit, entry: the relay's endpoint; direct-entry: the exit node's")
    parser.add_argument("--relay-public", required=True)
    parser.add_argument("--relay-secret", help="relay only")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    if args.role == "relay":
        _relay(args.endpoint, args.relay_public, args.relay_secret)
    elif args.role == "direct-exit":
        _direct_exit(args.endpoint, args.relay_public, args.relay_secret, args.workers)
    elif args.role == "direct-entry":
        _direct_entry(args.endpoint, args.relay, args.relay_public)
    elif args.role == "exit":
        _exit(args.relay, args.relay_public, args.workers)
    else:
        _entry(args.endpoint, args.relay, args.relay_public)


if __name__ == "__main__":
    main()
