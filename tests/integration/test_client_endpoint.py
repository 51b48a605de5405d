"""The client API's listening socket (actors/client_endpoint.py) on a real loop and real
ZeroMQ sockets, in-process: only allowed CurveZMQ keys get in, a refused key is logged on
the loop, a port in use is one clear error, an exposed endpoint needs allowed clients."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from actors.client_endpoint import REFUSED_KEYS, ClientEndpoint, _AllowClients
from meshnet.errors import ConfigError, StartupError
from meshnet.identity import Identity, curve_public_z85
from meshnet.log_budget import LogBudget
from meshnet.outbox import API_SEND_HWM
from meshnet.protocol import frame_limit
from meshnet.socket_loop import SocketLoop

MAX_PAYLOAD = 4096
WAIT_S = 10.0


class Captured:
    """A structlog stand-in: every line, and an event set when ZAP's refusal is logged."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []
        self.refused = threading.Event()

    def _log(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))
        if event == "client_refused":
            self.refused.set()

    info = warning = error = exception = debug = _log


@pytest.fixture
def context() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture
def loop() -> Iterator[SocketLoop]:
    running = SocketLoop("test-client-endpoint").start()
    yield running
    running.stop()


def _dealer(ctx: zmq.Context, client: Identity, server: Identity, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_publickey, sock.curve_secretkey = client.zmq_curve_keys()
    sock.curve_serverkey = curve_public_z85(server.peer_id)
    sock.connect(address)
    return sock


def test_the_zap_thread_reads_an_immutable_snapshot_of_the_keys() -> None:
    keys = [b"a", b"b"]
    provider = _AllowClients(keys, lambda key: None)
    keys.append(b"c")  # the caller's list changing later changes nothing the ZAP thread reads
    assert provider.keys == frozenset({b"a", b"b"}) and isinstance(provider.keys, frozenset)


def test_only_allowed_keys_get_in_and_a_refused_key_is_logged_on_the_loop(
    context: zmq.Context, loop: SocketLoop
) -> None:
    server, allowed, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    log = Captured()
    rejections = LogBudget(loop, log, "client_messages_rejected", "client")
    endpoint = ClientEndpoint(context, server, "tcp://127.0.0.1:0", [allowed.peer_id], MAX_PAYLOAD)
    assert endpoint.curve
    endpoint.start_auth(loop, rejections, log)
    try:
        router, guard = loop.run_sync(endpoint.open, loop, log)
        assert (router, guard) == (endpoint.router, endpoint.guard)
        options = loop.run_sync(
            lambda: [router.getsockopt(option) for option in (zmq.LINGER, zmq.SNDHWM, zmq.MAXMSGSIZE)]
        )
        assert options == [1000, API_SEND_HWM, frame_limit(MAX_PAYLOAD)]
        address = loop.run_sync(lambda: endpoint.address)
        assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
        outsider = _dealer(context, stranger, server, address)
        outsider.send(b"from a stranger")
        assert log.refused.wait(WAIT_S)
        client = _dealer(context, allowed, server, address)
        client.send(b"from a client")

        def read_all() -> list[bytes]:
            assert router.poll(int(WAIT_S * 1000))
            first = router.recv_multipart()
            # Nothing else came in: the stranger's frame never got past its handshake.
            assert not router.poll(0)
            return first

        frames = loop.run_sync(read_all, timeout=WAIT_S + 5)
        assert frames[1:] == [b"from a client"]
        refusals = [fields for event, fields in log.lines if event == "client_refused"]
        assert refusals == [
            {
                "client": REFUSED_KEYS,
                "error": "key not in api.allowed_clients",
                "curve_key": curve_public_z85(stranger.peer_id).decode(),
            }
        ]
        outsider.close()
        client.close()
    finally:
        loop.run_sync(endpoint.close)
        endpoint.stop_auth()
    assert endpoint.router is None and endpoint.guard is None and endpoint.address == ""
    endpoint.stop_auth()  # (twice is harmless: the actor's stop may follow a failed bind)


def test_a_local_endpoint_without_allowed_clients_is_plain_zeromq(context: zmq.Context, loop: SocketLoop) -> None:
    endpoint = ClientEndpoint(context, Identity.generate(), "tcp://127.0.0.1:0", [], MAX_PAYLOAD)
    endpoint.start_auth(loop, LogBudget(loop, Captured(), "rejected"), Captured())  # no ZAP thread to start
    assert not endpoint.curve and endpoint._auth is None
    router, _ = loop.run_sync(endpoint.open, loop, Captured())
    try:
        assert not loop.run_sync(lambda: router.curve_server)
    finally:
        loop.run_sync(endpoint.close)


def test_an_endpoint_in_use_is_one_error_naming_the_key_and_the_fix(
    context: zmq.Context, loop: SocketLoop, tmp_path: Path
) -> None:
    config = tmp_path / "node.toml"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        endpoint = ClientEndpoint(context, Identity.generate(), f"tcp://127.0.0.1:{port}", [], MAX_PAYLOAD, config)
        with pytest.raises(StartupError) as failed:
            loop.run_sync(endpoint.open, loop, Captured())
    assert str(failed.value) == (
        f"api.endpoint = tcp://127.0.0.1:{port} cannot be bound (Address already in use): "
        f"another process listens there; stop it or set api.endpoint in {config}"
    )
    assert endpoint.router is None and endpoint.guard is None
    loop.run_sync(endpoint.close)  # nothing to close: no error either


def test_an_endpoint_other_machines_reach_needs_allowed_clients(context: zmq.Context) -> None:
    with pytest.raises(ConfigError) as refused:
        ClientEndpoint(context, Identity.generate(), "tcp://0.0.0.0:5555", [], MAX_PAYLOAD)
    assert str(refused.value) == (
        "api.endpoint = 'tcp://0.0.0.0:5555' is reachable from other machines: set api.allowed_clients to the "
        "peer ids of the clients that may submit jobs (they connect with CurveZMQ)"
    )
    ClientEndpoint(context, Identity.generate(), "tcp://0.0.0.0:5555", [Identity.generate().peer_id], MAX_PAYLOAD)
