"""What every node actor shares."""

from __future__ import annotations

from typing import Any

import pykka
import structlog

from actors.messages import Alive
from meshnet.jobs.model import Outcome, job_id_text
from meshnet.logs import debug_enabled

log = structlog.get_logger("meshnet.actor")


def log_job_end(logger: Any, job_id: bytes, kind: str, outcome: Outcome, **where: str) -> None:
    """Log a job's terminal status: once per job, on the node that decided it.

    Successes are debug events and everything else info: a line per successful job
    (rendered, time-stamped and written) cost about a third of a node's time per no-op
    job when measured, more than the rest of its bookkeeping. ``log.level = "debug"``
    shows them all."""
    if outcome.status == "succeeded":
        if debug_enabled():
            logger.debug("job_succeeded", job_id=job_id_text(job_id), kind=kind, **where)
        return
    logger.info(
        "job_" + outcome.status,
        job_id=job_id_text(job_id),
        kind=kind,
        error=outcome.message,
        reason=outcome.reason,
        **where,
    )


class NodeActor(pykka.ThreadingActor):
    """An actor that survives a failing message.

    pykka stops an actor whose ``on_receive`` raises; for a node that would mean one
    unexpected message taking a whole part of it down while the process lives on. A
    failure is logged with its traceback and the actor handles the next message.
    Subclasses implement :meth:`handle`.
    """

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Alive):  # the supervisor checking start-up
            return True
        try:
            return self.handle(message)
        except Exception:
            log.exception("actor_message_failed", actor=type(self).__name__, message=type(message).__name__)
            return None

    def handle(self, message: Any) -> Any:
        log.warning("unexpected_message", actor=type(self).__name__, message=type(message).__name__)
