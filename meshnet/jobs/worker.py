"""What runs inside an executor's worker process.

The node never decodes payloads: the worker decodes the CBOR payload, runs the
handler and encodes the result, so that this work is spread over the pool and a
handler's exception becomes a plain tuple (plugin exception types need not pickle).
"""

from __future__ import annotations

import ctypes
import select
import signal
import socket
import sys

import cbor2

from meshnet.errors import ProtocolError
from meshnet.jobs.framing import FrameReader, frame_buffers, unsent
from meshnet.jobs.registry import Handler, load_handlers
from meshnet.memory import keep_freed_buffers, release_free_memory
from meshnet.protocol import strict_cbor
from meshnet.protocol.messages import clip

PR_SET_PDEATHSIG = 1
#: A job moving this much data makes the worker release free memory once it is idle
#: for IDLE_TRIM_S seconds.
LARGE_JOB_BYTES = 1024 * 1024
IDLE_TRIM_S = 1.0
_handlers: dict[str, Handler] = {}

#: (outcome, result_cbor_or_None, error_type, error_message)
Outcome = tuple[str, bytes | None, str, str]


def init_worker(enabled: list[str]) -> None:
    global _handlers
    # Ctrl-C in a terminal, or SIGTERM from systemd or docker, reaches the whole process
    # group; the node decides when workers stop, so they ignore both (as their forkserver
    # does: meshnet.jobs.forkserver).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    keep_freed_buffers()
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


def run_job(kind: str, payload: bytes | bytearray) -> Outcome:
    handler = _handlers.get(kind)
    if handler is None:  # the node checks first; this guards a config changed under a running pool
        return ("failed", None, "UnknownKind", f"job kind {kind!r} is not enabled on this node")
    try:
        value = strict_cbor.loads_value(payload, "payload")
    except ProtocolError as exc:
        return ("failed", None, "InvalidPayload", f"{exc} (payloads are plain CBOR data: no tags)")
    try:
        result = handler(value)
    except Exception as exc:
        return ("failed", None, type(exc).__name__, str(exc))
    try:
        return ("succeeded", cbor2.dumps(result), "", "")
    except Exception as exc:
        return ("failed", None, "InvalidResult", f"result cannot be encoded as CBOR: {exc}")


def serve(sock: socket.socket, enabled: list[str], max_payload: int) -> None:
    """A worker process's life: run the jobs the node sends over ``sock``, one at a
    time, until the node closes its end.

    In: two frames, the kind (UTF-8) and the CBOR payload. Out: two frames, the status
    line ``status NUL error_type NUL message`` (UTF-8) and the CBOR result (empty
    unless succeeded). A result over ``max_payload`` is never sent: the job fails with
    ``ResultTooLarge`` instead, so that the node never holds more than it may send.
    """
    init_worker(enabled)
    try:
        _serve_jobs(sock, max_payload)
    except (BrokenPipeError, ConnectionResetError):
        # The node closed its end while we sent or received: it killed or cancelled this
        # job, or it is stopping. Nobody is left to answer; a traceback would only land
        # in the node's log.
        return


def _serve_jobs(sock: socket.socket, max_payload: int) -> None:
    reader = FrameReader(max_frame=max_payload + 64 * 1024)  # a payload (the node checks it), or a kind
    frames: list[bytes | bytearray] = []
    trim_when_idle = False
    while True:
        if trim_when_idle and not select.select([sock], [], [], IDLE_TRIM_S)[0]:
            # A large job's buffers are free now but stay with the process: give them
            # back once no job has come for a while.
            release_free_memory()
            trim_when_idle = False
        n = sock.recv_into(reader.buffer())
        if n == 0:
            return  # the node closed our socket: it is stopping the pool
        frames += reader.received(n)
        while len(frames) >= 2:
            kind, payload = frames[0], frames[1]
            del frames[:2]
            status, result, error_type, message = run_job(kind.decode("utf-8", "replace"), payload)
            if result is not None and len(result) > max_payload:
                message = f"result is {len(result)} bytes; this node sends at most {max_payload}"
                status, result, error_type = "failed", None, "ResultTooLarge"
            line = "\0".join((status, clip(error_type, 256), clip(message))).encode("utf-8", "replace")
            buffers = frame_buffers([line, result or b""])
            while buffers:
                buffers = unsent(buffers, sock.sendmsg(buffers))
            trim_when_idle = trim_when_idle or len(payload) + len(result or b"") >= LARGE_JOB_BYTES
