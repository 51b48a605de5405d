"""Run one input through one decoder and judge what came out.

A decoder may return (its result is then checked against the decoder's contract) or
raise one of the error types it promises; anything else is a failure. The timing taken
here is the decoder call alone, in CPU time of the calling thread, so that another
process on the same cores does not make an input look slow.
"""

from __future__ import annotations

import re
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tests.fuzz.generators import Corpus

#: Failure categories, in the order the report lists them.
UNTYPED = "untyped error"
UNEXPECTED = "unexpected-marked error"
CONTRACT = "contract broken"
MEMORY = "memory"
WORKER_DIED = "worker died"
HANG = "hang"
SLOW = "slow"
#: An input generator raised: a bug of the fuzzer's own, reported so that it is fixed.
FUZZER_ERROR = "fuzzer error"
CATEGORIES = (UNTYPED, UNEXPECTED, CONTRACT, MEMORY, WORKER_DIED, HANG, SLOW, FUZZER_ERROR)

#: Bytes of an input shown in a report.
SHOWN_BYTES = 128


def no_problem(_: Any) -> str | None:
    return None


@dataclass(frozen=True)
class Target:
    """One decoder under test: how to call it, what it may raise, how to feed it."""

    name: str
    #: What the decoder call is, for the report.
    call: str
    decode: Callable[[Any], Any]
    #: The only exception types the decoder may raise.
    allowed: tuple[type[BaseException], ...]
    generate: Callable[[Any, Corpus], Any]
    #: A broken promise in a result or in an allowed error, or None.
    check_result: Callable[[Any], str | None] = no_problem
    check_error: Callable[[BaseException], str | None] = no_problem


@dataclass(frozen=True)
class Outcome:
    """What one input did: ``verdict`` is ``accepted``, ``refused`` (an allowed error,
    ``kind`` names it) or ``failure`` (``category`` and ``kind`` say which)."""

    verdict: str
    kind: str = ""
    category: str = ""
    where: str = ""
    cpu_ns: int = 0
    wall_ns: int = 0


@dataclass
class Failure:
    """A failure and the input that caused it, reproducible from (seed, target, index)."""

    target: str
    index: int
    category: str
    detail: str
    size: int
    input_hex: str
    where: str = ""


def check_input(target: Target, data: Any) -> Outcome:
    """Decode ``data`` with ``target`` and judge the outcome."""
    wall_start, cpu_start = time.perf_counter_ns(), time.thread_time_ns()
    try:
        result = target.decode(data)
    except target.allowed as exc:
        cpu_ns, wall_ns = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
        problem = target.check_error(exc)
        if problem:
            return Outcome("failure", problem, UNEXPECTED, cpu_ns=cpu_ns, wall_ns=wall_ns)
        return Outcome("refused", error_kind(exc), cpu_ns=cpu_ns, wall_ns=wall_ns)
    except MemoryError as exc:
        # Memory is gone at this point: time and describe the failure only once it is freed.
        cpu_ns, wall_ns = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
        return Outcome("failure", error_kind(exc), MEMORY, raised_at(exc), cpu_ns, wall_ns)
    except Exception as exc:
        cpu_ns, wall_ns = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
        return Outcome("failure", error_kind(exc), UNTYPED, raised_at(exc), cpu_ns, wall_ns)
    cpu_ns, wall_ns = time.thread_time_ns() - cpu_start, time.perf_counter_ns() - wall_start
    problem = target.check_result(result)
    if problem:
        return Outcome("failure", problem, CONTRACT, cpu_ns=cpu_ns, wall_ns=wall_ns)
    return Outcome("accepted", cpu_ns=cpu_ns, wall_ns=wall_ns)


_PATH = re.compile(r"(?:/[\w.+\-]+){2,}")
_QUOTED = re.compile(r"(?<!\w)'[^']*'(?!\w)|\"[^\"]*\"")
_PEER_ID = re.compile(r"(?<!\w)z[1-9A-HJ-NP-Za-km-z]{8,}")
_NUMBER = re.compile(r"\d+")
REASON_CHARS = 100


def normalise(reason: str) -> str:
    """A reason with what varies from input to input taken out (paths, quoted values,
    peer ids, numbers), so that errors of one kind count together."""
    reason = _PATH.sub("<file>", reason)
    reason = _QUOTED.sub("'…'", reason)
    reason = _PEER_ID.sub("z…", reason)
    reason = _NUMBER.sub("N", reason)
    return reason[:REASON_CHARS]


def error_kind(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {normalise(str(exc))}"


def raised_at(exc: BaseException) -> str:
    """Where a bug is to be looked for: the innermost frame of ``exc``'s traceback and,
    when that is in a library, the innermost frame of MeshNet's own that led there."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    ours = [f for f in frames if "/meshnet/" in f.filename]
    where = _frame(frames[-1])
    if ours and ours[-1] is not frames[-1]:
        where += f" (from {_frame(ours[-1])})"
    return where


def _frame(frame: traceback.FrameSummary) -> str:
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


def input_bytes(data: Any) -> list[bytes]:
    """An input's bytes, one item per frame (the text of a key, UTF-8 encoded)."""
    if isinstance(data, str):
        return [data.encode("utf-8", "surrogatepass")]
    if isinstance(data, tuple):  # (peer id, sealed bytes)
        return [*input_bytes(data[0]), bytes(data[1])]
    if isinstance(data, list):
        return [bytes(memoryview(frame)) for frame in data]
    return [bytes(memoryview(data))]


def input_size(data: Any) -> int:
    if isinstance(data, str):
        return len(data)  # characters: the key decoders' limits count characters
    if isinstance(data, tuple):
        return len(memoryview(data[1]))
    if isinstance(data, list):
        return sum(len(memoryview(frame)) for frame in data)
    return len(memoryview(data))


def input_hex(data: Any, limit: int = SHOWN_BYTES, tail: bool = True) -> str:
    """The input in hex, frames separated by ``|``, each clipped to ``limit`` bytes: its
    start and (``tail``) its end, where a shape appended to a valid sample is."""
    parts = []
    for raw in input_bytes(data):
        if len(raw) <= limit:
            parts.append(raw.hex())
        elif tail:
            half = limit // 2
            parts.append(f"{raw[:half].hex()}...{raw[-half:].hex()} ({len(raw)} bytes)")
        else:
            parts.append(f"{raw[:limit].hex()}... ({len(raw)} bytes)")
    return " | ".join(parts) if parts else "(no frames)"
