"""What the node core asks its shell to do, and the socket events the shell tells it.

The core (:mod:`meshnet.node.core`) never touches a socket, a timer or a thread: each
input returns a list of these effects, which the shell carries out in order. What the
shell learns while it does (a send that failed, the port a listener took) goes back in
as another input, whose effects join the end of the same queue: nothing re-enters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshnet.holepunch import Abandon, Dial, Expect
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import Sealed

# -- the relay connection --


@dataclass(slots=True)
class OpenRelay:
    """Replace the relay connection with a new one, generation ``generation``, made from
    local port ``local_port`` (None: any; the relay is not on tcp://)."""

    generation: int
    local_port: int | None


@dataclass(slots=True)
class CloseRelay:
    """Close the relay connection (the node lost it, was displaced, or stops)."""


@dataclass(slots=True)
class SendRelay:
    """Send ``frames`` on the relay connection of ``generation`` (none other). ``counted``
    is what they count for in the link's window: if they cannot be sent, the shell gives
    it back with :meth:`NodeCore.on_relay_unsent`."""

    generation: int
    frames: list[Any]
    counted: int


@dataclass(slots=True)
class FlushSoon:
    """Call :meth:`NodeCore.flush` once this loop turn has read what it has: the boxes for
    each peer gathered meanwhile leave as one sealed batch (an idle path adds no delay)."""


# -- direct links --


@dataclass(slots=True)
class Listen:
    """Open the direct-link listener on ``port`` (0: any free one), once; the shell says
    which port it took with :meth:`NodeCore.on_listening`."""

    port: int


@dataclass(slots=True)
class SendDirect:
    """Send ``box`` to ``peer`` on its direct link (``path``: "direct" or "lan"), in the
    clear: the link is CurveZMQ to exactly that peer. A box the link cannot take now is
    dropped (its session sends it again); one it took is told with
    :meth:`NodeCore.on_direct_sent`."""

    peer: str
    path: str
    box: Sealed


# -- jobs --


@dataclass(slots=True)
class RunJob:
    """Run ``job`` here (a peer's); its end comes back with :meth:`NodeCore.job_finished`."""

    job: JobSpec


@dataclass(slots=True)
class StopJob:
    """Stop the run of ``job_id`` for ``peer`` (cancelled, or its session ended)."""

    job_id: bytes
    peer: str


@dataclass(slots=True)
class AnswerJob:
    """``job``, which this node sent to ``peer`` (or could not), ended with ``outcome``:
    answer its submitter by its way back."""

    job: JobSpec
    outcome: Outcome
    peer: str = ""


# -- the rest --


@dataclass(slots=True)
class AskNetworkCheck:
    """Find out this node's LAN address and NAT type (off the loop); the answer comes back
    with :meth:`NodeCore.on_network_checked`."""


@dataclass(slots=True)
class PingAnswered:
    """The answer to a ping asked with ``request``: the round trip's fields (``rtt``,
    ``path``, ``sent``, ``address``), or None with an error ``code`` and ``why``."""

    request: Any
    answer: dict[str, Any] | None
    code: str = ""
    why: str = ""


@dataclass(slots=True)
class PeersAnswered:
    """The answer to a peers query asked with ``request``: the relay's list (with this
    node's path to each), or None and ``error``."""

    request: Any
    peers: list[dict[str, Any]] | None
    error: str = ""
    #: The relay's ``more``, ``next`` and ``unmet`` (docs/protocol.md §4.2).
    more: int | None = None
    next: str | None = None
    unmet: str | None = None


@dataclass(slots=True)
class SetTimer:
    """Call :meth:`NodeCore.on_timer` with ``key`` at ``at`` (monotonic seconds); a timer
    already set under ``key`` is replaced."""

    key: Any
    at: float


@dataclass(slots=True)
class CancelTimer:
    key: Any


@dataclass(slots=True)
class Log:
    """One log line: ``event`` at ``level`` ("info", "warning", "error") with ``fields``."""

    level: str
    event: str
    fields: dict[str, Any] = field(default_factory=dict)


Effect = (
    OpenRelay
    | CloseRelay
    | SendRelay
    | FlushSoon
    | Listen
    | SendDirect
    | Dial
    | Expect
    | Abandon
    | RunJob
    | StopJob
    | AnswerJob
    | AskNetworkCheck
    | PingAnswered
    | PeersAnswered
    | SetTimer
    | CancelTimer
    | Log
)

# -- what the shell sees on the relay connection's monitor --


@dataclass(slots=True)
class HandshakeFailed:
    """The relay refused the handshake: ``auth`` its ZAP handler refused our key."""

    generation: int
    auth: bool
    status: int


@dataclass(slots=True)
class Disconnected:
    """The socket's connection to the relay broke (libzmq reconnects it by itself)."""

    generation: int


@dataclass(slots=True)
class Reconnected:
    """libzmq re-established the socket's connection by itself (the relay came back
    before this node noticed it was gone): the relay may not know this node."""

    generation: int


RelayEvent = HandshakeFailed | Disconnected | Reconnected
