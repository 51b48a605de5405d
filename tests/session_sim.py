"""Two (or more) session cores joined by a simulated network, on a simulated clock.

The network drops, duplicates, re-orders and delays boxes, and its paths go up and down;
every box crosses it as the bytes a node would seal (encoded and decoded with the
node-to-node table), so the header each side writes is one the other accepts. Workers
run each job after a delay. Nothing here sleeps: time is a number.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import NODE_TO_NODE, decode_inner, encode_inner
from meshnet.session import Execute, Notice, SessionCore, Settled, StopRun, Transmit
from meshnet.session.core import PEER_SILENCE


@dataclass
class Network:
    rng: random.Random
    drop: float = 0.0
    duplicate: float = 0.0
    min_delay: float = 0.001
    max_delay: float = 0.05
    #: Chance that a box is also replayed, seconds to a minute later (a hostile relay).
    replay: float = 0.0
    #: Called with (sender, box): True drops that box (a test's own loss).
    dropper: Any = None
    #: Paths that carry boxes now (a box in flight on a path that goes down is lost).
    up: set[str] = field(default_factory=lambda: {"relay"})


class Simulation:
    def __init__(
        self, rng: random.Random, names: tuple[str, ...] = ("A", "B"), silence: float = PEER_SILENCE, **network: Any
    ):
        self.rng = rng
        #: The cores' PEER_SILENCE.
        self.silence = silence
        self.net = Network(rng, **network)
        self.now = 0.0
        self._sids = itertools.count(1)
        self.cores = {name: self._new_core() for name in names}
        self._queue: list[tuple[float, int, str, tuple[Any, ...]]] = []
        self._order = itertools.count()
        #: (node, job id) -> times executed there.
        self.executed: Counter[tuple[str, bytes]] = Counter()
        #: job id -> outcomes settled at its submitter.
        self.settled: dict[bytes, list[Outcome]] = defaultdict(list)
        self.submitted: dict[bytes, tuple[str, str]] = {}
        self.running: dict[tuple[str, str, bytes], int] = {}
        self.in_flight: dict[str, list[int]] = defaultdict(list)
        self.boxes = 0
        self.notices: list[Notice] = []
        self.work_time = (0.0, 0.1)
        self._generation = itertools.count(1)
        for name in names:
            self._apply(name, self.cores[name].on_path("relay", True, 0.0))

    def _new_core(self) -> SessionCore:
        return SessionCore(budget=1 << 30, new_sid=lambda: next(self._sids), silence=self.silence)

    # -- what a test does --

    def restart(self, name: str) -> None:
        """Node ``name`` dies and starts again: its jobs, runs and sessions are gone."""
        self.cores[name] = self._new_core()
        for key in [k for k in self.running if k[0] == name]:
            del self.running[key]
        for job_id, (at, _) in self.submitted.items():
            if at == name and not self.settled.get(job_id):
                self.settled[job_id].append(Outcome("lost_with_its_node"))
        for path in self.net.up:
            self._apply(name, self.cores[name].on_path(path, True, self.now))

    def submit(self, at: str, to: str, job_id: bytes, timeout: float = 30.0) -> None:
        spec = JobSpec(id=job_id, kind="echo", payload=job_id * 4, timeout=timeout, origin="client:x")
        self.submitted[job_id] = (at, to)
        self._apply(at, self.cores[at].submit(spec, to, self.now))

    def at(self, when: float, action: str, *args: Any) -> None:
        heapq.heappush(self._queue, (when, next(self._order), action, args))

    def set_path(self, path: str, up: bool) -> None:
        if up:
            self.net.up.add(path)
        else:
            self.net.up.discard(path)
            self.in_flight.pop(path, None)  # its boxes in flight are lost with it
        for name, core in self.cores.items():
            self._apply(name, core.on_path(path, up, self.now))

    def run(self, until: float) -> None:
        while True:
            times = [core.next_deadline() for core in self.cores.values()]
            due = min((t for t in times if t is not None), default=None)
            if self._queue and (due is None or self._queue[0][0] <= due):
                when, _, action, args = heapq.heappop(self._queue)
                if when > until:
                    heapq.heappush(self._queue, (when, 0, action, args))
                    break
                self.now = max(self.now, when)
                self._do(action, args)
            elif due is not None and due <= until:
                self.now = max(self.now, due)
                for name, core in self.cores.items():
                    deadline = core.next_deadline()
                    if deadline is not None and deadline <= self.now:
                        self._apply(name, core.on_tick(self.now))
            else:
                break
        self.now = max(self.now, until)

    # -- internals --

    def _do(self, action: str, args: tuple[Any, ...]) -> None:
        if action == "deliver":
            to, sender, path, generation, data = args
            if path not in self.net.up or generation not in self.in_flight.get(path, ()):
                return
            box = decode_inner(data, NODE_TO_NODE, max_size=1 << 20)
            self._apply(to, self.cores[to].on_box(sender, box, self.now))
        elif action == "replay":  # whatever paths are up now: a relay replays as it likes
            to, sender, data = args
            box = decode_inner(data, NODE_TO_NODE, max_size=1 << 20)
            self._apply(to, self.cores[to].on_box(sender, box, self.now))
        elif action == "finish":
            node, peer, job_id, run = args
            if self.running.get((node, peer, job_id)) != run:
                return
            del self.running[node, peer, job_id]
            outcome = Outcome("succeeded", result=b"done:" + job_id)
            self._apply(node, self.cores[node].job_finished(peer, job_id, outcome, self.now))
        elif action == "path":
            self.set_path(*args)
        elif action == "submit":
            self.submit(*args)
        elif action == "restart":
            self.restart(*args)
        elif action == "call":
            args[0]()

    def _apply(self, node: str, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Transmit):
                self._transmit(node, event)
            elif isinstance(event, Execute):
                self.executed[node, event.job.id] += 1
                run = next(self._generation)
                self.running[node, event.peer, event.job.id] = run
                delay = self.rng.uniform(*self.work_time)
                self.at(self.now + delay, "finish", node, event.peer, event.job.id, run)
            elif isinstance(event, StopRun):
                if self.running.pop((node, event.peer, event.job_id), None) is not None:
                    cancelled = Outcome.cancelled(event.reason)
                    self._apply(node, self.cores[node].job_finished(event.peer, event.job_id, cancelled, self.now))
            elif isinstance(event, Settled):
                self.settled[event.job.id].append(event.outcome)
            elif isinstance(event, Notice):
                self.notices.append(event)

    def _transmit(self, sender: str, event: Transmit) -> None:
        self.boxes += 1
        if event.path not in self.net.up:
            return
        data = bytes(encode_inner(event.box))
        copies = 0 if self.rng.random() < self.net.drop else 1
        if self.net.dropper is not None and self.net.dropper(sender, event.box):
            copies = 0
        if self.rng.random() < self.net.duplicate:
            copies += 1
        generation = next(self._generation)
        self.in_flight[event.path].append(generation)
        for _ in range(copies):
            delay = self.rng.uniform(self.net.min_delay, self.net.max_delay)
            self.at(self.now + delay, "deliver", event.peer, sender, event.path, generation, data)
        if self.rng.random() < self.net.replay:
            self.at(self.now + self.rng.uniform(1.0, 60.0), "replay", event.peer, sender, data)
