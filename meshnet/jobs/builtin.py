"""Built-in job kinds. Each takes the decoded CBOR payload and returns a CBOR-encodable result.

``fail`` and ``crash`` exist to test failure handling; a node runs them only when its
config lists them in ``jobs.enabled``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from typing import Any

MAX_SLEEP_SECONDS = 24 * 3600.0


def echo(payload: Any) -> Any:
    """Return the payload unchanged."""
    return payload


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8")
    raise ValueError("sha256 data must be bytes or a string")


def sha256(payload: Any) -> str:
    """Hex SHA-256 of the payload (bytes or text), or of ``{"data": ..., "rounds": n}``:
    the data fed ``rounds`` times through one hash, to make CPU-bound work of any size."""
    rounds = 1
    if isinstance(payload, dict):
        rounds = payload.get("rounds", 1)
        if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 1_000_000:
            raise ValueError("sha256 rounds must be an integer from 1 to 1000000")
        payload = payload.get("data", b"")
    data = _as_bytes(payload)
    digest = hashlib.sha256()
    for _ in range(rounds):
        digest.update(data)
    return digest.hexdigest()


def sleep(payload: Any) -> float:
    """Sleep for ``payload`` seconds (a number, or ``{"seconds": n}``) and return it."""
    seconds = payload.get("seconds") if isinstance(payload, dict) else payload
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ValueError(f"sleep takes a number of seconds from 0 to {MAX_SLEEP_SECONDS:.0f}")
    time.sleep(seconds)
    return seconds


def fail(payload: Any) -> Any:
    """Raise ``RuntimeError`` with the payload as message (test kind)."""
    raise RuntimeError(str(payload) if payload is not None else "job failed on purpose")


def crash(payload: Any) -> Any:
    """Kill the worker process running it (test kind): the pool must heal."""
    os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError("unreachable")
