"""The one hierarchy of MeshNet's errors.

Errors say whose fault they are (the h11 way): ``LocalProtocolError`` means our caller
misused an API, ``RemoteProtocolError`` means a peer sent something invalid. A peer's
garbage never escapes as anything but a ``RemoteProtocolError``.
"""

from __future__ import annotations


class MeshError(Exception):
    """Base of every error MeshNet raises on purpose."""


class ConfigError(MeshError):
    """A config file or value is unusable; the message names file, key and expectation."""


class StartupError(MeshError):
    """A node or relay cannot start because of this machine, not its config file (an
    endpoint another process holds); the message names the cause and the fix."""


class IdentityError(MeshError):
    """A key or peer id is malformed."""


class ProtocolError(MeshError):
    """A message broke the wire protocol."""

    #: Machine-readable code carried in ``error`` replies.
    code = "invalid"


class RemoteProtocolError(ProtocolError):
    """A peer sent a frame that is not a valid message.

    ``ref`` is the job id an invalid ``submit`` named, when one could be read from it,
    so that the refusal reaches the job's submitter as its terminal status. ``header``
    is the message as its valid header describes it (without its body) when only the
    body was wrong (missing, forbidden, too large): a relay names the ``send`` it
    refuses. ``unexpected`` marks an error a decoder did not foresee (a bug, turned into
    this error so that it still cannot escape as anything else).
    """

    ref: bytes | None = None
    header: object | None = None
    unexpected: bool = False


class MessageTooLarge(RemoteProtocolError):
    """A frame exceeded the configured size limit."""

    code = "too_large"


class LocalProtocolError(ProtocolError):
    """Our own code tried to build an invalid message."""


class SealError(MeshError):
    """A sealed payload failed authentication: altered in transit or not for us."""


class NodeUnreachable(MeshError):
    """The client could not reach its node in time."""


class PingFailed(MeshError):
    """A ping to a peer got no answer: ``code`` says why (``timed_out``,
    ``peer_not_connected``, ``no_relay``, ``invalid``, ``unavailable``)."""

    def __init__(self, message: str, code: str):
        super().__init__(message)
        self.code = code


class JobError(MeshError):
    """A job ended in a terminal status other than ``succeeded``.

    ``status`` is the terminal status, ``reason`` a short machine-readable code and
    the message says what happened and, where it can, what to do.
    """

    status = "failed"

    def __init__(self, message: str, *, job_id: str = "", reason: str = "", error_type: str = ""):
        super().__init__(message)
        self.job_id = job_id
        self.reason = reason
        self.error_type = error_type


class JobFailed(JobError):
    status = "failed"


class JobTimedOut(JobError):
    status = "timed_out"


class JobRefused(JobError):
    status = "refused"


class JobCancelled(JobError):
    status = "cancelled"


class PeerLost(JobError):
    status = "peer_lost"


JOB_ERRORS_BY_STATUS: dict[str, type[JobError]] = {
    cls.status: cls for cls in (JobFailed, JobTimedOut, JobRefused, JobCancelled, PeerLost)
}
