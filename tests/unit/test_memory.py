"""The allocator settings of MeshNet's processes: large buffers freed under load are
reused, not faulted in afresh from the system each time, and go back to the system
when the process is quiet."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from meshnet.memory import _libc

#: In a fresh interpreter, on a thread of its own (as ZeroMQ's I/O thread makes every
#: message buffer): four 8 MiB buffers alive at once (as a CurveZMQ message of that size
#: has several), freed, eleven times over. Prints the share of their pages faulted in
#: per round after the first, and the process's resident memory (MB) above what it was
#: before the rounds: once they are done, and after ``release_free_memory``.
ROUNDS = """
import json, resource, sys, threading
from meshnet.memory import keep_freed_buffers, release_free_memory
if sys.argv[1] == "keep":
    assert keep_freed_buffers()
SIZE = 8 << 20
def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 1e6
def rounds(faults):
    held = [bytearray(SIZE) for _ in range(4)]
    del held
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        held = [bytearray(SIZE) for _ in range(4)]
        del held
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
start = resident()
faults = []
worker = threading.Thread(target=rounds, args=(faults,))
worker.start()
worker.join()
kept = resident() - start
release_free_memory()
print(json.dumps({
    "faulted": faults[0] / 10 / (4 * SIZE // resource.getpagesize()),
    "kept_mb": kept,
    "released_mb": resident() - start,
}))
"""


def _rounds(mode: str) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.fixture
def glibc() -> None:
    if _libc() is None:
        pytest.skip("the C library is not glibc: MeshNet leaves the allocator as it is")


@pytest.mark.usefixtures("glibc")
def test_a_process_that_keeps_freed_buffers_reuses_them() -> None:
    # glibc's default gives the freed buffers back and faults fresh pages in for the
    # next round; that is what the setting is for, so the test shows both.
    assert _rounds("default")["faulted"] > 0.5
    assert _rounds("keep")["faulted"] < 0.05


@pytest.mark.usefixtures("glibc")
def test_kept_buffers_go_back_to_the_system_when_released() -> None:
    figures = _rounds("keep")
    assert figures["kept_mb"] > 16  # kept while the process works ...
    assert figures["released_mb"] < 4  # ... and given back, though a thread freed them
