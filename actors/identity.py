"""IdentityActor: holds the node's key pair; hands out what others need of it.

The secret key never leaves this actor except inside the thread-safe :class:`Sealer`
and the CurveZMQ key pair that the socket-owning actors need to open their sockets.
"""

from __future__ import annotations

from actors.base import NodeActor
from meshnet.identity import Identity, Sealer


class IdentityActor(NodeActor):
    def __init__(self, identity: Identity):
        super().__init__()
        self._identity = identity
        self._sealer = Sealer(identity)

    def peer_id(self) -> str:
        return self._identity.peer_id

    def identity(self) -> Identity:
        return self._identity

    def sealer(self) -> Sealer:
        return self._sealer

    def sign(self, data: bytes) -> bytes:
        return self._identity.sign(data)
