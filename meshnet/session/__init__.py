"""Node-to-node sessions: the protocol between two nodes, over any path (sans-IO)."""

from meshnet.session.core import (
    BOX_REF_BYTES,
    DEADLINE_GRACE,
    PEER_DOWN_CHECK,
    PEER_SILENCE,
    Control,
    Event,
    Execute,
    Notice,
    Ponged,
    SessionCore,
    Settled,
    StopRun,
    Transmit,
    box_ref,
    split_box_ref,
)
from meshnet.session.paths import PathTable
from meshnet.session.peer import PeerSession
from meshnet.session.state import Move, State

__all__ = [
    "BOX_REF_BYTES",
    "box_ref",
    "split_box_ref",
    "DEADLINE_GRACE",
    "PEER_DOWN_CHECK",
    "PEER_SILENCE",
    "Control",
    "Event",
    "Execute",
    "Move",
    "Notice",
    "PathTable",
    "PeerSession",
    "Ponged",
    "SessionCore",
    "Settled",
    "State",
    "StopRun",
    "Transmit",
]
