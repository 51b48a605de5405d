"""A job as a node holds it, and the terminal outcome it ends with."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meshnet.protocol.messages import clip


@dataclass(frozen=True, slots=True)
class ToClient:
    """A job's way back: a client of this node's API, on connection ``conn``; ``peer``
    is the device the job went to (the client's target, or where it was placed; this
    node's own peer id when it ran here), which its result names;
    ``batch``: the client reads several results in one ``results`` message."""

    conn: bytes
    peer: str | None = None
    batch: bool = False


@dataclass(frozen=True, slots=True)
class ToPeer:
    """A job's way back: the session of peer ``peer``, which sent it to run here."""

    peer: str


#: Where a job's one terminal status goes (None: nobody waits for it: tests, benches).
WayBack = ToClient | ToPeer | None


@dataclass
class JobSpec:
    """A job admitted or about to be admitted by a node.

    ``payload`` stays CBOR-encoded (any buffer); only the worker decodes it. ``back`` says
    where its answer goes, as data: the node's ``Answers`` hands it there
    (actors/answers.py).
    """

    id: bytes
    kind: str
    payload: Any
    timeout: float
    back: WayBack = None
    #: Who submitted it: ``client:CONNECTION`` or the peer id of the node that forwarded
    #: it; only they may cancel it.
    origin: str = "client"
    #: When this node received it (``time.monotonic``). The timeout counts from here, so
    #: that time spent waiting in the queue is part of it, as it is for the submitter.
    received_at: float = field(default_factory=time.monotonic, compare=False)
    #: The payload's size, as the node that admits it counts it.
    payload_bytes: int = field(default=0, compare=False)

    def remaining(self, now: float) -> float:
        """Seconds left of the job's timeout at ``now``."""
        return self.timeout - (now - self.received_at)


@dataclass(frozen=True)
class Outcome:
    """The one terminal status of a job."""

    status: str
    result: Any = None
    error_type: str = ""
    message: str = ""
    reason: str = ""

    @property
    def error(self) -> dict[str, str] | None:
        if self.status == "succeeded":
            return None
        # A handler's exception text has no bound; the wire's text fields do.
        return {"type": clip(self.error_type, 256), "message": clip(self.message), "reason": clip(self.reason, 64)}

    @classmethod
    def succeeded(cls, result: Any) -> Outcome:
        """A job's success with ``result``, made as ``__init__`` would make it but
        without a frozen dataclass's ``object.__setattr__`` per field: once per job."""
        outcome: Outcome = object.__new__(cls)
        outcome.__dict__.update(status="succeeded", result=result, error_type="", message="", reason="")
        return outcome

    @classmethod
    def refused(cls, reason: str, message: str) -> Outcome:
        return cls("refused", reason=reason, message=message, error_type="Refused")

    @classmethod
    def cancelled(cls, message: str = "") -> Outcome:
        return cls("cancelled", error_type="Cancelled", message=message)


#: Why a job cancelled by whoever submitted it ended.
CANCELLED_BY_SUBMITTER = "cancelled by its submitter"
#: The end of a job that reaches a node while it drains (it is shutting down).
REFUSED_DRAINING = Outcome.refused("draining", "the node is shutting down and takes no new jobs")


def job_id_text(job_id: bytes) -> str:
    """How job ids are printed in logs and errors."""
    return job_id.hex()
