"""Messages the node's actors ``tell`` each other.

Between actors, ``tell`` only on the job path (an ``ask`` round trip costs two thread
wake-ups). A job's end travels by the way back the job carries (``JobSpec.back``,
actors/answers.py); a ping's and a peer query's answer, by the request it names, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshnet.jobs.model import JobSpec


@dataclass(frozen=True)
class Alive:
    """Asked of each actor at start-up: answered once its ``on_start`` has run."""


@dataclass(frozen=True)
class RunThere:
    """Forward each job to its peer through the relay: ``(job, peer)`` pairs."""

    jobs: list[tuple[JobSpec, str]]


@dataclass(frozen=True)
class PlaceJobs:
    """Run each job where placement says (meshnet.placement): ``(job, requires)`` pairs."""

    jobs: list[tuple[JobSpec, dict[str, Any]]]


@dataclass(frozen=True)
class CancelJob:
    """Cancel job ``job_id`` if ``requester`` (``"client"`` or a peer id) submitted it."""

    job_id: bytes
    requester: str = "client"


@dataclass(frozen=True)
class Tick:
    pass


@dataclass(frozen=True)
class ClientRequest:
    """Who asked, as data: client connection ``conn``, its request's ``seq``, and the peer
    it named (for a ping). The answer goes back through ``Answers`` to the client API."""

    conn: bytes
    seq: int | None
    peer: str = ""


@dataclass(frozen=True)
class StatusFor:
    """To the client API itself: gather the node's status (asking other actors, off the
    job loop) and send it to client ``conn``."""

    conn: bytes
    seq: int | None = None


@dataclass(frozen=True)
class QueryPeers:
    """Ask the relay for its peers; answered with a ``PeersAnswered`` naming ``request``.
    ``requires``: only those that meet these, best first; ``after``, ``limit``: a page of
    the listing (docs/protocol.md §4.3)."""

    request: ClientRequest
    requires: dict[str, Any] | None = None
    after: str | None = None
    limit: int | None = None


@dataclass(frozen=True)
class PingThere:
    """Measure a round trip to ``peer`` (``meshnet ping``) within ``timeout`` seconds;
    answered with a ``PingAnswered`` naming ``request``."""

    peer: str
    timeout: float
    request: ClientRequest


@dataclass(frozen=True)
class Drain:
    """Refuse new jobs; end waiting ones as cancelled."""


@dataclass(frozen=True)
class Abort:
    """The drain grace is over: end every job still running."""

    reason: str


@dataclass(frozen=True)
class Reconnect:
    pass
