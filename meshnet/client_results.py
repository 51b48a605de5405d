"""What a client's future ends with, for each answer its node sends (sans-IO).

A job's ``result`` becomes its decoded value or the :class:`~meshnet.errors.JobError`
subclass for its terminal status; a request's reply becomes the reply, or the error
the node gave for it.
"""

from __future__ import annotations

from typing import Any

from meshnet.errors import JOB_ERRORS_BY_STATUS, JobFailed, MeshError, PingFailed, ProtocolError
from meshnet.protocol import Error, PingReply, Result, strict_cbor


def job_outcome(message: Result) -> tuple[Any, BaseException | None]:
    """``(value, None)`` for a job that succeeded, ``(None, error)`` otherwise."""
    if message.status == "succeeded":
        if message.body is None:
            return None, None
        try:
            return strict_cbor.loads_value(message.body, "the job's result"), None
        except ProtocolError as exc:
            return None, JobFailed(f"{exc} (results are plain CBOR data)", job_id=message.id.hex())
    error = message.error or {}
    cls = JOB_ERRORS_BY_STATUS.get(message.status, JobFailed)
    text = error.get("message") or message.status
    if error.get("type") and message.status == "failed":
        text = f"{error['type']}: {text}"
    return None, cls(text, job_id=message.id.hex(), reason=error.get("reason", ""), error_type=error.get("type", ""))


def reply_outcome(expected: type, message: Any) -> tuple[Any, BaseException | None]:
    """``(reply, None)`` when ``message`` is the ``expected`` reply; ``(None, error)``
    when the node answered the request with an error (or with something else)."""
    if isinstance(message, expected):
        return message, None
    if isinstance(message, Error) and expected is PingReply:
        return None, PingFailed(message.message, message.code)
    return None, MeshError(message.message if isinstance(message, Error) else "unexpected reply")
