"""Placement in ``make bench``: untargeted jobs handed to one node spread over the mesh.

Three nodes with 2 executors each on one relay; 300 ``sleep`` jobs of 0.1 s handed to
one of them by a ``MeshClient`` with 48 in flight, no job naming a device. Six executors
could run them in 5 s: the figure is the wall time as a ratio to that ideal (goal at
most 1.15x), with how many jobs each node ran. ``python -m bench.placement`` runs it
alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from meshnet.client import MeshClient
from meshnet.identity import Identity
from tests.harness import Mesh

NODES = ("a", "b", "c")
EXECUTORS = 2
JOBS = 300
SECONDS = 0.1
WINDOW = 48
IDEAL_S = JOBS * SECONDS / (len(NODES) * EXECUTORS)


def measure(rounds: int = 3, progress: Any = None) -> dict[str, Any]:
    """Median wall time of ``rounds`` rounds, its ratio to the ideal, and each node's
    share of the jobs (summed over the rounds)."""
    walls: list[float] = []
    ran: Counter[str] = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        try:
            ids = {name: Identity.generate() for name in NODES}
            relay_path, relay_id, endpoint = mesh.relay_config(allowed=[i.peer_id for i in ids.values()])
            mesh.start_relay(relay_path)
            apis = {}
            for name in NODES:
                path, _, api = mesh.node_config(
                    name, ids[name], relay=(endpoint, relay_id.peer_id), jobs={"executors": EXECUTORS}
                )
                mesh.start_node(name, path, registered=True)
                apis[name] = api
            names = {ids[name].peer_id: name for name in NODES}
            with MeshClient(apis["a"]) as client:
                list(client.map("sleep", [0.01] * 12, window=6))  # warm: each node heartbeats its load
                for r in range(rounds):
                    if progress is not None:
                        progress(f"placement: round {r + 1}/{rounds}")
                    started = time.perf_counter()
                    futures = []
                    window: list[Any] = []
                    for _ in range(JOBS):
                        if len(window) >= WINDOW:
                            window.pop(0).result()
                        future = client.submit("sleep", SECONDS)
                        futures.append(future)
                        window.append(future)
                    for future in futures:
                        future.result()
                    walls.append(time.perf_counter() - started)
                    ran.update(names.get(future.device, "?") for future in futures)
        finally:
            mesh.close()
    walls.sort()
    wall = walls[len(walls) // 2]
    return {"wall_s": wall, "ideal_s": IDEAL_S, "ratio": wall / IDEAL_S, "ran": dict(ran), "rounds": rounds}


def line(figures: dict[str, Any]) -> str:
    share = ", ".join(f"{name} {count}" for name, count in sorted(figures["ran"].items()))
    return (
        f"placement: {JOBS} untargeted {SECONDS:g} s sleeps over {len(NODES)} nodes x {EXECUTORS} executors: "
        f"{figures['wall_s']:.2f} s, {figures['ratio']:.2f}x the ideal {figures['ideal_s']:g} s "
        f"(median of {figures['rounds']}; jobs run by node: {share})"
    )


if __name__ == "__main__":
    print(line(measure(progress=lambda text: print(f"[bench] {text}", file=sys.stderr))))
