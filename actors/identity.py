"""IdentityActor: holds the node's key pair for the node's life.

The supervisor loads the identity and makes the thread-safe :class:`Sealer` from it; the
parts that need them get them when they are made (the socket owners their CurveZMQ key
pair, the relay client the sealer), never by asking this actor.
"""

from __future__ import annotations

from actors.base import NodeActor
from meshnet.identity import Identity, Sealer


class IdentityActor(NodeActor):
    def __init__(self, identity: Identity, sealer: Sealer):
        super().__init__()
        self._identity = identity
        self._sealer = sealer

    def peer_id(self) -> str:
        return self._identity.peer_id

    def sign(self, data: bytes) -> bytes:
        return self._identity.sign(data)
