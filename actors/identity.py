"""IdentityActor: holds the node's key pair for the node's life, off the job loop.

The supervisor loads the identity and makes the thread-safe :class:`Sealer` from it; the
parts that need them get them when they are made (the socket owners their CurveZMQ key
pair, the relay client the sealer). What the node says of its identity (``meshnet
status``) this actor answers (:class:`Describe`). It is supervised
(actors.supervision): one that fails is restarted with the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from actors.supervision import SupervisedActor, Supervisor
from meshnet.identity import Identity, curve_public_z85


@dataclass(frozen=True)
class Describe:
    """Asked: the node's identity as ``status`` shows it."""


class IdentityActor(SupervisedActor):
    name = "identity"

    def __init__(self, supervisor: Supervisor, identity: Identity):
        super().__init__(supervisor)
        self._identity = identity

    def handle(self, message: Any) -> Any:
        if isinstance(message, Describe):
            peer_id = self._identity.peer_id
            return {"peer_id": peer_id, "curve_public_key": curve_public_z85(peer_id).decode("ascii")}
        return super().handle(message)
