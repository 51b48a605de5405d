"""No-op echo jobs through a checkout's own ``MeshClient``, for ``bench.ab --client meshclient``.

Run as a script with the checkout's code first on ``sys.path`` (it imports nothing from
``bench``, which an older checkout may not have): ``python meshclient_load.py ENDPOINT
JOBS WINDOW [PEER]``. It warms up, prints ``ready``, waits for a line on stdin (the bench
samples the node's CPU then), runs JOBS jobs with WINDOW in flight and prints jobs/s.
"""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import Future
from typing import Any

from meshnet import MeshClient


def run(client: Any, jobs: int, window: int, to: str | None) -> float:
    slots = threading.Semaphore(window)
    done = threading.Event()
    left = [jobs]
    lock = threading.Lock()
    failures: list[BaseException] = []

    def ended(future: Future[Any]) -> None:
        if future.exception() is not None:
            failures.append(future.exception())  # type: ignore[arg-type]
        slots.release()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    started = time.perf_counter()
    for _ in range(jobs):
        slots.acquire()
        client.submit("echo", None, to=to).add_done_callback(ended)
    done.wait()
    if failures:
        raise RuntimeError(f"{len(failures)} jobs failed, the first: {failures[0]!r}")
    return jobs / (time.perf_counter() - started)


def main() -> int:
    endpoint, jobs, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    to = sys.argv[4] if len(sys.argv) > 4 else None
    with MeshClient(endpoint) as client:
        run(client, 300, window, to)
        print("ready", flush=True)
        sys.stdin.readline()
        print(f"{run(client, jobs, window, to):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
