"""The relay daemon: a CurveZMQ ROUTER driving :class:`RelayCore`.

Admission happens in ZAP (pyzmq's ``ThreadAuthenticator``): in ``allow-list`` mode
only keys derived from the configured peer ids complete the CurveZMQ handshake. Each
message is received with its metadata so that the core can bind it to the key that
authenticated its connection (``User-Id``, the Z85 key) and, at registration, read the
TCP address the relay observes (``SRCFD`` → ``getpeername``).
"""

from __future__ import annotations

import errno
import functools
import os
import socket
import threading
import time
from collections.abc import Callable

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from meshnet.config import RelayConfig
from meshnet.endpoints import bind_failure
from meshnet.errors import StartupError
from meshnet.identity import Identity, curve_public_z85
from meshnet.listener_guard import ListenerGuard, guard_listener, open_files_report, raise_open_files_limit
from meshnet.protocol import MAX_FRAMES, frame_limit
from meshnet.socket_loop import SocketLoop, recv_message, send_message
from relay_server.routing import Outgoing, RelayCore
from relay_server.stun_server import StunServer

log = structlog.get_logger("meshnet.relay")

#: Messages taken from the socket per wake-up before timers get a turn.
RECV_BATCH = 256


class AllowList:
    """ZAP credentials provider (the ZAP thread): admits exactly the keys derived from
    ``peer_ids``; a refused key goes to ``refused`` (which hands it to the relay's loop,
    where the first lately is logged and the rest counted)."""

    def __init__(self, peer_ids: list[str], refused: Callable[[bytes], None]):
        self.keys = {curve_public_z85(p) for p in peer_ids}
        self.refused = refused

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = key in self.keys
        if not allowed:
            self.refused(key)
        return allowed


def observed_address(fd: int) -> str:
    """``ip:port`` of the TCP peer on socket ``fd``, as the relay sees it."""
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                return ""  # ipc:// has no address a peer could reach
            host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _observe(frame: zmq.Frame) -> str:
    return observed_address(frame.get(zmq.SRCFD))


class RelayServer:
    def __init__(self, config: RelayConfig, *, core: RelayCore | None = None):
        self.config = config
        self.identity: Identity = config.load_identity()
        settings = config.relay
        self.core = core or RelayCore(
            heartbeat=settings.heartbeat_interval,
            liveness=settings.liveness,
            max_body=settings.max_message_bytes,
            allowed_peers=frozenset(settings.allowed_peers) if settings.access == "allow-list" else None,
            window=settings.max_unread_bytes,
        )
        # A context of its own: ZAP is per context, and a process may hold a relay and nodes.
        # Its MAX_SOCKETS counts sockets, not connections: one ROUTER serves every node,
        # each connection a file descriptor (raise_open_files_limit).
        self.context = zmq.Context()
        self.loop = SocketLoop("relay", trim_after=0.5)
        self.endpoint = ""
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._auth: ThreadAuthenticator | None = None
        self._router: zmq.Socket | None = None
        self._guard: ListenerGuard | None = None
        self.stun = StunServer(config.stun, settings.bind, config.path)
        self.log = log.bind(relay_id=self.identity.peer_id)

    def start(self) -> RelayServer:
        settings = self.config.relay
        raise_open_files_limit(self.log)
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        if settings.access == "open":
            self._auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
        else:
            allow = AllowList(settings.allowed_peers, refused=self._key_refused)
            self._auth.configure_curve_callback(domain="*", credentials_provider=allow)
        self.loop.start()
        self.loop.call_soon(self._open)
        self._ready.wait(10)
        if self._error is None:
            try:
                self.stun.start()  # on a loop of its own: a flood there does not slow this one
            except StartupError as exc:
                self._error = exc
        if self._error is not None:
            # It never served: undo what started, quietly (no relay_stopped line under the
            # one line the error makes), and let the error name the cause.
            self.loop.stop()
            self._auth.stop()
            self._auth = None
            self.context.destroy(linger=0)
            raise self._error
        self.log.info(
            "relay_started",
            endpoint=self.endpoint,
            access=settings.access,
            allowed=len(settings.allowed_peers),
            stun=[f"{ip}:{port}" for ip, port in self.stun.addresses] or None,
            **open_files_report(),
        )
        return self

    def stop(self) -> None:
        self.stun.stop()
        self.loop.call_soon(self._close)
        self.loop.stop()
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.context.destroy(linger=0)
        self.log.info("relay_stopped", forwarded=self.core.forwarded, rejected=self.core.rejected)

    # -- loop thread --

    def _open(self) -> None:
        settings = self.config.relay
        try:
            router = self.context.socket(zmq.ROUTER)
            public, secret = self.identity.zmq_curve_keys()
            router.curve_server = True
            router.curve_publickey = public
            router.curve_secretkey = secret
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            # The core answers a message over the limit with a clear error; past this hard
            # cap libzmq drops the connection before buffering any more of it.
            router.setsockopt(zmq.MAXMSGSIZE, frame_limit(settings.max_message_bytes))
            router.setsockopt(zmq.SNDHWM, settings.high_water_mark)
            router.setsockopt(zmq.RCVHWM, settings.high_water_mark)
            router.setsockopt(zmq.LINGER, 0)
            # Nodes reconnect together when the relay restarts: past the backlog the kernel
            # drops their connections' SYNs, and each waits 1 s, then 3 s, to try again.
            router.setsockopt(zmq.BACKLOG, settings.listen_backlog)
            guard_listener(router)
            router.bind(settings.bind)
            self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            number = exc.errno or errno.EINVAL
            self._error = bind_failure("relay.bind", settings.bind, number, zmq.strerror(number), self.config.path)
            self._ready.set()
            return
        self._router = router
        # Connections that sent nothing yet are closed past a cap (per source, in all, and
        # near the limit of open files): idle ones cannot hold the relay's descriptors.
        self._guard = ListenerGuard(self.loop, router, name="relay", logger=self.log)
        self.loop.add_reader(router, self._on_readable)
        self.loop.call_later(settings.heartbeat_interval, self._tick)
        self._ready.set()

    def _close(self) -> None:
        if self._guard is not None:
            self._guard.close()
            self._guard = None
        self.loop.close_socket(self._router)
        self._router = None

    def _on_readable(self) -> None:
        try:
            self._read_batch()
        finally:
            self._tell_stun_members()

    def _tell_stun_members(self) -> None:
        """Which IPs hold a registered connection: the STUN responder answers their
        CHANGE-REQUESTs. A snapshot per batch of messages (or tick) that changed it."""
        if self.core.members_changed:
            self.core.members_changed = False
            self.stun.set_members(self.core.member_ips)

    def _read_batch(self) -> None:
        router = self._router
        assert router is not None
        for _ in range(RECV_BATCH):
            try:
                frames = recv_message(router, MAX_FRAMES + 1)
            except zmq.Again:
                return
            if frames is None:
                # The routing id is the first frame, which recv_message does not keep here.
                self.core.on_rejected(b"", f"a message of more than {MAX_FRAMES} frames", time.monotonic())
                continue
            conn, data = frames[0].bytes, frames[1:]
            last = data[-1] if data else frames[0]
            if self._guard is not None:
                self._guard.seen(conn, last)
            key = (last.get("User-Id") or "").encode()
            # The header is small and decoded at once; a body frame is passed on as it
            # is, so that a forwarded payload is never copied.
            message = [f.bytes if i == 0 else f for i, f in enumerate(data)]
            self._send(self.core.on_message(conn, key, message, time.monotonic(), functools.partial(_observe, last)))

    def _send(self, outgoing: list[Outgoing]) -> None:
        router = self._router
        if router is None:
            return
        for out in outgoing:
            try:
                send_message(router, [out.conn, *out.frames])
            except zmq.ZMQError as exc:
                if exc.errno not in (errno.EHOSTUNREACH, errno.EAGAIN):
                    raise
                self._send(self.core.on_undeliverable(out, queue_full=exc.errno == errno.EAGAIN))

    def _key_refused(self, key: bytes) -> None:
        """ZAP thread: handed to the loop, which owns the core."""
        self.loop.call_soon(self.core.on_refused_key, key, time.monotonic())

    def _tick(self) -> None:
        self._send(self.core.on_tick(time.monotonic()))
        self._tell_stun_members()
        self.loop.call_later(self.config.relay.heartbeat_interval, self._tick)
