"""The client API's listening socket: its set-up and tear-down, apart from what it reads.

Part of :class:`actors.client_api.ClientApiActor`. With ``api.allowed_clients`` the
ROUTER is a CurveZMQ server and a ZAP thread (ThreadAuthenticator) admits only those
clients' keys, from an immutable snapshot taken at start: the ZAP thread reads no state
the job loop changes under it. A key it refuses is handed to the loop, which logs it
within the API's rejection budget (the one its clients' rejected messages count against:
a stranger making up a key per handshake costs the log a line and a count an interval).

Threads: :meth:`ClientEndpoint.start_auth` and :meth:`ClientEndpoint.stop_auth` on the
actor's thread (they start and join the ZAP thread); :meth:`ClientEndpoint.open` and
:meth:`ClientEndpoint.close` on the job loop, which owns the ROUTER.
"""

from __future__ import annotations

import errno
import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from meshnet.endpoints import bind_failure, is_local_endpoint
from meshnet.errors import ConfigError
from meshnet.identity import Identity, curve_public_z85
from meshnet.listener_guard import ListenerGuard, guard_listener
from meshnet.log_budget import LogBudget
from meshnet.outbox import API_SEND_HWM
from meshnet.protocol import frame_limit
from meshnet.socket_loop import SocketLoop

#: What the log calls the handshakes ZAP refused: one source, however many keys (a
#: stranger makes up a key per handshake).
REFUSED_KEYS = "handshakes with keys not allowed"
#: Milliseconds the ROUTER may take to send what it holds when it closes: the last
#: results still go out.
CLOSE_LINGER_MS = 1000


class _AllowClients:
    """ZAP credentials provider (the ZAP thread); a refused key goes to ``refused``."""

    def __init__(self, keys: Iterable[bytes], refused: Callable[[bytes], None]):
        self.keys = frozenset(keys)
        self.refused = refused

    def callback(self, domain: str, key: bytes) -> bool:
        if key not in self.keys:
            self.refused(key)
            return False
        return True


def _key_refused(rejections: LogBudget, logger: Any, key: bytes) -> None:
    """ZAP refused a CurveZMQ handshake with ``key`` (loop thread, handed from ZAP's)."""
    error = "key not in api.allowed_clients"
    if rejections.allow(REFUSED_KEYS, error):
        logger.warning("client_refused", client=REFUSED_KEYS, error=error, curve_key=key.decode("ascii", "replace"))


class ClientEndpoint:
    """The API's ROUTER and ZAP thread, from the config to their close."""

    def __init__(
        self,
        context: zmq.Context,
        identity: Identity,
        endpoint: str,
        allowed_clients: list[str],
        max_payload: int,
        config_path: Path | None = None,
    ):
        # Before anything is made: a node refuses a config that would let anyone who
        # can reach the port run jobs.
        if not is_local_endpoint(endpoint) and not allowed_clients:
            raise ConfigError(
                f"api.endpoint = {endpoint!r} is reachable from other machines: set api.allowed_clients "
                "to the peer ids of the clients that may submit jobs (they connect with CurveZMQ)"
            )
        self.context = context
        self.identity = identity
        self.requested = endpoint
        self.allowed_clients = allowed_clients
        self.max_payload = max_payload
        self.config_path = config_path
        self._auth: ThreadAuthenticator | None = None
        self._loop: SocketLoop | None = None
        #: The ROUTER and its guard, once open (None: not, or closed); loop thread.
        self.router: zmq.Socket | None = None
        self.guard: ListenerGuard | None = None

    @property
    def curve(self) -> bool:
        """Whether clients connect with CurveZMQ (and only allowed keys get in)."""
        return bool(self.allowed_clients)

    def start_auth(self, loop: SocketLoop, rejections: LogBudget, logger: Any) -> None:
        """Start the ZAP thread (with ``api.allowed_clients`` only), before :meth:`open`;
        the keys it refuses are logged on ``loop``, within ``rejections``."""
        if not self.allowed_clients or self._auth is not None:
            return
        keys = [curve_public_z85(peer) for peer in self.allowed_clients]
        refused = functools.partial(loop.call_soon, _key_refused, rejections, logger)
        self._auth = ThreadAuthenticator(self.context)
        self._auth.start()
        self._auth.configure_curve_callback(domain="*", credentials_provider=_AllowClients(keys, refused))

    def stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def open(self, loop: SocketLoop, logger: Any) -> tuple[zmq.Socket, ListenerGuard]:
        """Make and bind the ROUTER, and guard it (loop thread); ``StartupError`` (naming
        the config key) if it cannot be bound."""
        try:
            router = self.context.socket(zmq.ROUTER)
            if self.allowed_clients:
                public, secret = self.identity.zmq_curve_keys()
                router.curve_server = True
                router.curve_publickey = public
                router.curve_secretkey = secret
            router.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
            # A client that reconnects (same routing id) takes its old identity over, so
            # the results of jobs it submitted before still reach it.
            router.setsockopt(zmq.ROUTER_HANDOVER, 1)
            # A full queue for a client is an error (EAGAIN), not a silent drop: the answer
            # waits in the API's outboxes, counted in bytes, and ZeroMQ's own queue per
            # client stays a few messages long (see meshnet.outbox).
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            router.setsockopt(zmq.SNDHWM, API_SEND_HWM)
            router.setsockopt(zmq.MAXMSGSIZE, frame_limit(self.max_payload))
            guard_listener(router)
            router.bind(self.requested)
        except zmq.ZMQError as exc:
            number = exc.errno or errno.EINVAL
            cause = zmq.strerror(number)
            raise bind_failure("api.endpoint", self.requested, number, cause, self.config_path) from None
        self._loop, self.router = loop, router
        # Connections that sent nothing yet are closed past a cap: idle ones cannot hold
        # the node's descriptors (meshnet.conn_guard).
        self.guard = ListenerGuard(loop, router, name="api", logger=logger)
        return router, self.guard

    @property
    def address(self) -> str:
        """The endpoint bound (its port chosen, if it asked for any); "" when not open."""
        return self.router.getsockopt_string(zmq.LAST_ENDPOINT) if self.router is not None else ""

    def close(self) -> None:
        """Close the guard and the ROUTER (loop thread), which sends what it holds for
        up to CLOSE_LINGER_MS."""
        if self.guard is not None:
            self.guard.close()
            self.guard = None
        try:
            if self._loop is not None:
                self._loop.close_socket(self.router, linger=CLOSE_LINGER_MS)
        finally:
            self.router = None
