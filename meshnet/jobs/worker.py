"""What runs inside an executor's worker process.

The node never decodes payloads: the worker decodes the CBOR payload, runs the
handler and encodes the result, so that this work is spread over the pool and a
handler's exception becomes a plain tuple (plugin exception types need not pickle).
"""

from __future__ import annotations

import ctypes
import signal
import sys

import cbor2

from meshnet.jobs.registry import Handler, load_handlers
from meshnet.memory import return_large_buffers_to_the_system

PR_SET_PDEATHSIG = 1
_handlers: dict[str, Handler] = {}

#: (outcome, result_cbor_or_None, error_type, error_message)
Outcome = tuple[str, bytes | None, str, str]


def init_worker(enabled: list[str]) -> None:
    global _handlers
    # Ctrl-C in a terminal reaches the whole process group; the node decides when
    # workers stop, so they ignore SIGINT.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    return_large_buffers_to_the_system()
    _handlers = load_handlers(enabled)


def _die_with_parent() -> None:
    """Have Linux kill this worker when its parent (the forkserver, which exits with
    the node) dies, so that a node killed with SIGKILL leaves no worker running."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def run_job(kind: str, payload: bytes) -> Outcome:
    handler = _handlers.get(kind)
    if handler is None:  # the node checks first; this guards a config changed under a running pool
        return ("failed", None, "UnknownKind", f"job kind {kind!r} is not enabled on this node")
    try:
        value = cbor2.loads(payload)
    except Exception as exc:
        return ("failed", None, "InvalidPayload", f"payload is not valid CBOR: {exc}")
    try:
        result = handler(value)
    except Exception as exc:
        return ("failed", None, type(exc).__name__, str(exc))
    try:
        return ("succeeded", cbor2.dumps(result), "", "")
    except Exception as exc:
        return ("failed", None, "InvalidResult", f"result cannot be encoded as CBOR: {exc}")
