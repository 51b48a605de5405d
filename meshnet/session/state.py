"""A peer session's states and every legal move between them, in one table (as h11's
``_state.py`` does for HTTP).

A session joins two sessions ids: this node's ``local_sid``, fresh each time this side
starts the session anew, and the peer's ``remote_sid``, learnt from its ``hello``.
Session ids grow: a node takes each from the clock in nanoseconds (and above the last
one), so a restarted node's id is above its last life's, and a box from an older
session is recognised as stale and dropped.

- ``NEW``: nothing exchanged; the peer's session id is unknown.
- ``HELLO_SENT``: this side sent its ``hello`` (re-sent until answered); messages wait.
- ``OPEN``: the peer's session id is known: messages go out, stamped with both ids.

The moves (``Move``):
- ``SEND``: a message is to go to the peer. From ``NEW`` a hello goes first.
- ``HELLO``: a hello from the peer's current session: its id is learnt (answered with
  ours whenever it did not name our current id).
- ``PEER_RESTARTED``: a hello from a newer session of the peer (it restarted, or started
  over). Everything of the old session ends (see ``meshnet.session.core``), and this
  side starts over too, with a new id of its own, so that no message of the old pair
  can be taken for the new one.
- ``STARTED_OVER``: this side gave the peer up (it said nothing for too long, or its
  relay expired it) and starts over with a new id; the peer's id is kept, as a floor,
  and a hello goes first again (answered by the peer whatever its ``rsid``, since it
  opens a session there).
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    NEW = "new"
    HELLO_SENT = "hello_sent"
    OPEN = "open"


class Move(Enum):
    SEND = "send"
    HELLO = "hello"
    PEER_RESTARTED = "peer_restarted"
    STARTED_OVER = "started_over"


TRANSITIONS: dict[tuple[State, Move], State] = {
    (State.NEW, Move.SEND): State.HELLO_SENT,
    (State.NEW, Move.HELLO): State.OPEN,
    (State.NEW, Move.PEER_RESTARTED): State.OPEN,
    (State.NEW, Move.STARTED_OVER): State.NEW,
    (State.HELLO_SENT, Move.SEND): State.HELLO_SENT,
    (State.HELLO_SENT, Move.HELLO): State.OPEN,
    (State.HELLO_SENT, Move.PEER_RESTARTED): State.OPEN,
    # Nothing is left to send (what waited was settled or goes again, as a new send).
    (State.HELLO_SENT, Move.STARTED_OVER): State.NEW,
    (State.OPEN, Move.SEND): State.OPEN,
    (State.OPEN, Move.HELLO): State.OPEN,
    (State.OPEN, Move.PEER_RESTARTED): State.OPEN,
    # The peer's id is kept, but the peer takes every box of our new id for a stranger's
    # until it has seen our hello: messages wait for its answer (sent before it, they
    # would be dropped, and taken for lost when the answer says the peer restarted).
    (State.OPEN, Move.STARTED_OVER): State.HELLO_SENT,
}


def next_state(state: State, move: Move) -> State:
    """The state after ``move``; every pair is legal (a peer's message never is an
    error of ours), the table only says where each leads."""
    return TRANSITIONS[state, move]
