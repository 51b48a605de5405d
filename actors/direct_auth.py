"""The direct links' ZeroMQ context, its ZAP thread, and the sockets a punch dials.

Part of :class:`actors.direct_links.DirectLinks` (the node's job loop makes and closes
every socket here). The direct links have a context of their own, apart from the client
API's: its ZAP thread serves only them. Each link this node is the CurveZMQ server of
gets a ZAP domain of its own that admits exactly its peer's key; the listener's domain
admits the keys an attempt expects now (actors/direct_listener.py). A provider holds an
immutable key; a closed link's provider is replaced by one that admits nothing, so the
ZAP thread reads no state the loop changes under it.
"""

from __future__ import annotations

from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator

from meshnet.identity import Identity, curve_public_z85

#: libzmq heartbeats on a direct link: a ping this often, and a link silent this long is
#: disconnected (reported down; the session moves the peer back to the relay at once).
HEARTBEAT_IVL_MS = 1000
HEARTBEAT_TIMEOUT_MS = 3000
#: Messages queued per link before a send is dropped (the session sends it again).
LINK_HWM = 10_000


class _ExactKey:
    """ZAP credentials for one direct link: exactly the expected peer's key."""

    def __init__(self, key: bytes):
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


class DirectAuth:
    """The context and ZAP thread, made on first use. Loop thread only."""

    def __init__(self, identity: Identity, max_message: int):
        self.identity = identity
        self.max_message = max_message
        self._context: zmq.Context | None = None
        self._auth: ThreadAuthenticator | None = None

    def context(self) -> zmq.Context:
        if self._context is None:
            self._context = zmq.Context()
            self._auth = ThreadAuthenticator(self._context)
            self._auth.start()
        return self._context

    def serve_domain(self, domain: str, provider: Any) -> None:
        """ZAP answers handshakes in ``domain`` with ``provider``'s ``callback``."""
        self.context()
        assert self._auth is not None
        self._auth.configure_curve_callback(domain=domain, credentials_provider=provider)

    def dialled_socket(self, peer: str, curve_server: bool) -> zmq.Socket:
        """A DEALER for a link to ``peer``, not connected yet: the CurveZMQ server
        admitting only ``peer``'s key, or its client naming that key as the server's."""
        sock = self.context().socket(zmq.DEALER)
        public, secret = self.identity.zmq_curve_keys()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        peer_key = curve_public_z85(peer)
        if curve_server:
            domain = f"direct:{peer}"
            self.serve_domain(domain, _ExactKey(peer_key))
            sock.curve_server = True
            sock.zap_domain = domain.encode()
        else:
            sock.curve_serverkey = peer_key
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        sock.setsockopt(zmq.SNDHWM, LINK_HWM)
        sock.setsockopt(zmq.RCVHWM, LINK_HWM)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TIMEOUT_MS)
        return sock

    def forget(self, peer: str) -> None:
        """``peer``'s dialled link is closed: its domain admits no key from now on."""
        if self._auth is not None and f"direct:{peer}" in self._auth.credentials_providers:
            self.serve_domain(f"direct:{peer}", _ExactKey(b""))

    def close(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._context is not None:
            self._context.destroy(linger=0)
            self._context = None
