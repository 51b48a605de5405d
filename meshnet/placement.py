"""Where a job runs when its submitter did not name a device (sans-IO).

A node places each untargeted job: here when this device meets the job's requirements
and has an executor free; otherwise on the device that meets them and is least loaded
for its size (the relay's registry lists the candidates: relay_server/registry.py), a
direct path and a shorter round trip breaking ties. A job a device refused without
running it (``busy``, ``unknown_kind``, ``draining``, or never delivered because the
peer was gone) is placed again elsewhere, a bounded number of times. Nothing meets the
requirements: ``no_device``, naming the requirement nothing meets.

:class:`Placement` keeps the books: the candidates the relay gave for each set of
requirements (for ``CANDIDATES_TTL``: each heartbeat refreshes what devices report, so
a list is asked again at most once a second whatever the rate of jobs), the jobs waiting
for a list, what this node sent to each device and has not had back (its own share of
their load, which a list a heartbeat old may not show yet), and each job's attempts. *Which* device wins
is a :class:`PlacementPolicy`'s to say: a small object, so that a better policy can be
swapped in without touching the books.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meshnet.jobs.model import Outcome
from meshnet.requirements import describe

#: How long a candidate list is used before the relay is asked again.
CANDIDATES_TTL = 1.0
#: Devices asked of the relay per list (the best ones).
CANDIDATES_ASKED = 64
#: Devices a job is placed on at most (the first and the retries).
MAX_ATTEMPTS = 3
#: Jobs that wait at most for candidate lists, all requirement sets together.
MAX_WAITING = 4096
#: Refusals that say the job never ran there: it may run elsewhere.
RETRIED = frozenset({"busy", "unknown_kind", "draining", "peer_not_connected"})


@dataclass(frozen=True, slots=True)
class Here:
    """Run the job on this node."""


@dataclass(frozen=True, slots=True)
class There:
    """Send the job to ``peer``."""

    peer: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer the job ``refused`` with ``reason`` and ``text`` (``no_device``, ``busy``)."""

    reason: str
    text: str

    def outcome(self) -> Outcome:
        return Outcome.refused(self.reason, self.text)


@dataclass(frozen=True, slots=True)
class Wait:
    """The job waits for a candidate list; ``ask`` is the requirements to ask the relay
    for (None: asked already, the answer will place it)."""

    ask: dict[str, Any] | None


HERE = Here()
Decision = Here | There | Refuse | Wait


@dataclass(frozen=True, slots=True)
class Device:
    """A candidate as placement weighs it: executors, and work running, queued and sent
    there (this node's own share since the list came, the rest as the device reported)."""

    peer_id: str
    executors: int
    work: int
    direct: bool = False
    rtt: float = math.inf

    @property
    def load(self) -> float:
        return self.work / max(1, self.executors)


@dataclass(frozen=True, slots=True)
class Local:
    """This node as placement sees it: whether it meets the job's requirements (None:
    yes; else the requirement it misses), its executors and its work (running and queued)."""

    unmet: str | None
    executors: int
    work: int

    @property
    def free(self) -> bool:
        return self.unmet is None and self.work < self.executors


class PlacementPolicy:
    """Chooses among devices that all meet a job's requirements."""

    def choose(self, here: Local, devices: list[Device]) -> Here | There | None:
        """The device to run the job on (None: none; ``devices`` may be empty)."""
        raise NotImplementedError


class LeastLoaded(PlacementPolicy):
    """This node while it has an executor free; else the device with the least work per
    executor (this node winning a tie, then a direct path, then the shorter round trip,
    then the peer id, so that the order is total)."""

    def choose(self, here: Local, devices: list[Device]) -> Here | There | None:
        if here.free:
            return HERE
        best: Device | None = None
        best_key: tuple[float, int, float, str] | None = None
        for device in devices:
            key = (device.load, 0 if device.direct else 1, device.rtt, device.peer_id)
            if best_key is None or key < best_key:
                best, best_key = device, key
        if here.unmet is None and (best is None or here.work / max(1, here.executors) <= best.load):
            return HERE
        return There(best.peer_id) if best is not None else None


@dataclass
class _Listed:
    """A candidate list from the relay, as of ``at``, and why it is empty if it is."""

    at: float
    devices: dict[str, Device]
    unmet: str | None


@dataclass
class _Placed:
    """A job placed elsewhere: where it went, the devices it went to, its requirements."""

    requires: dict[str, Any]
    key: str
    tried: set[str] = field(default_factory=set)


def requirements_key(requires: Mapping[str, Any]) -> str:
    """One text per set of requirements (their order aside), to file lists under."""
    return repr(sorted((k, repr(v)) for k, v in requires.items()))


class Placement:
    """Loop thread only (the node core's)."""

    def __init__(self, policy: PlacementPolicy | None = None, *, max_attempts: int = MAX_ATTEMPTS):
        self.policy = policy or LeastLoaded()
        self.max_attempts = max_attempts
        self._lists: dict[str, _Listed] = {}
        #: Job ids waiting for a list, by the list's key (each with its requirements).
        self._waiting: dict[str, dict[bytes, dict[str, Any]]] = {}
        self._waiting_count = 0
        #: Jobs sent elsewhere and not ended yet.
        self.placed: dict[bytes, _Placed] = {}
        #: Jobs this node sent to each device and not ended yet (its share of their load).
        self.outstanding: dict[str, int] = {}
        #: Jobs sent to each device less those ended since its list came: what its
        #: listed load (a heartbeat old at most) does not show yet.
        self._since_listed: dict[str, int] = {}

    def place(self, job_id: bytes, requires: dict[str, Any], here: Local, now: float) -> Decision:
        """Where job ``job_id`` (requiring ``requires``, its kind among them) runs first."""
        if here.free:
            return HERE
        key = requirements_key(requires)
        listed = self._lists.get(key)
        if listed is None or now - listed.at > CANDIDATES_TTL:
            if self._waiting_count >= MAX_WAITING:
                return Refuse("busy", f"{MAX_WAITING} jobs wait for devices to be found already; try again")
            waiting = self._waiting.setdefault(key, {})
            first = not waiting
            waiting[job_id] = requires
            self._waiting_count += 1
            return Wait(dict(requires) if first else None)
        return self._choose(job_id, requires, key, here, listed, None)

    def on_candidates(
        self,
        requires: Mapping[str, Any],
        peers: list[dict[str, Any]] | None,
        unmet: str | None,
        here: Local,
        now: float,
        *,
        self_id: str = "",
    ) -> list[tuple[bytes, Decision]]:
        """The relay's list for ``requires`` (None: it could not be asked): the decision
        for each job that waited for it."""
        key = requirements_key(requires)
        waiting = self._waiting.pop(key, {})
        self._waiting_count -= len(waiting)
        if peers is None:
            listed = _Listed(now, {}, unmet or "the relay could not be asked for devices")
        else:
            devices = {}
            for peer in peers:
                device = _device(peer)
                if device is not None and device.peer_id != self_id:
                    devices[device.peer_id] = device
            listed = _Listed(now, devices, unmet)
            self._lists[key] = listed
            for peer_id in devices:
                self._since_listed.pop(peer_id, None)
        return [(job_id, self._choose(job_id, wants, key, here, listed, None)) for job_id, wants in waiting.items()]

    def ended(self, job_id: bytes, peer: str, outcome: Outcome, here: Local, now: float) -> Decision | None:
        """Job ``job_id``, placed on ``peer``, ended with ``outcome``: where it goes next
        when it never ran there and attempts remain; None: ``outcome`` is its answer."""
        placed = self.placed.pop(job_id, None)
        left = self.outstanding.get(peer, 0) - 1
        if left > 0:
            self.outstanding[peer] = left
        else:
            self.outstanding.pop(peer, None)
        self._since_listed[peer] = self._since_listed.get(peer, 0) - 1
        if placed is None or outcome.status != "refused" or outcome.reason not in RETRIED:
            return None
        if len(placed.tried) >= self.max_attempts:
            return None
        listed = self._lists.get(placed.key) or _Listed(now, {}, None)
        decision = self._choose(job_id, placed.requires, placed.key, here, listed, placed)
        return None if isinstance(decision, Refuse) else decision

    def forget(self, job_id: bytes) -> None:
        """Job ``job_id`` ended without :meth:`ended` (cancelled while it waited, say)."""
        for waiting in self._waiting.values():
            if waiting.pop(job_id, None) is not None:
                self._waiting_count -= 1
        self.placed.pop(job_id, None)

    def _choose(
        self, job_id: bytes, requires: dict[str, Any], key: str, here: Local, listed: _Listed, placed: _Placed | None
    ) -> Decision:
        """Where the job goes among ``listed`` and here; ``placed``: its books so far (a
        retry: the devices it went to are out)."""
        tried = placed.tried if placed is not None else set()
        devices = [
            _with_outstanding(device, self._since_listed.get(peer_id, 0), self.outstanding.get(peer_id, 0))
            for peer_id, device in listed.devices.items()
            if peer_id not in tried
        ]
        choice = self.policy.choose(here, devices)
        if choice is None:
            if listed.unmet is not None and here.unmet is not None:
                return Refuse("no_device", f"no device meets {describe(requires)}: {listed.unmet}")
            lacks = f"this one lacks {here.unmet}" if here.unmet is not None else "this one is busy"
            return Refuse("no_device", f"no device meets {describe(requires)}: {lacks}, and {_others(listed, tried)}")
        if isinstance(choice, There):
            placed = placed or _Placed(requires, key)
            placed.tried.add(choice.peer)
            self.placed[job_id] = placed
            self.outstanding[choice.peer] = self.outstanding.get(choice.peer, 0) + 1
            self._since_listed[choice.peer] = self._since_listed.get(choice.peer, 0) + 1
        return choice


def _others(listed: _Listed, tried: set[str]) -> str:
    if tried:
        return f"the {len(tried)} that do refused it"
    return listed.unmet or "no other device does"


def _with_outstanding(device: Device, since_listed: int, outstanding: int) -> Device:
    """``device`` with this node's jobs counted: its listed work, plus what this node
    sent there less what ended since the list came, and never less than this node's
    own jobs there that have not ended."""
    work = max(device.work + since_listed, outstanding, 0)
    if work == device.work:
        return device
    return Device(device.peer_id, device.executors, work, device.direct, device.rtt)


def _device(peer: Mapping[str, Any]) -> Device | None:
    """A relay's peers-reply entry as a candidate (None: not one to place on)."""
    peer_id = peer.get("peer_id")
    caps = peer.get("caps")
    if not isinstance(peer_id, str) or not isinstance(caps, Mapping):
        return None
    executors = caps.get("executors")
    executors = executors if type(executors) is int and executors > 0 else 1
    load = peer.get("load")
    try:
        work = int(load["busy"]) + int(load["queued"]) if isinstance(load, Mapping) else 0
    except (KeyError, TypeError, ValueError):
        work = 0
    rtt = peer.get("rtt")
    path = peer.get("path")  # the node adds its path to each before placement reads it
    return Device(
        peer_id,
        executors,
        max(0, work),
        direct=path in ("direct", "lan"),
        rtt=float(rtt) if isinstance(rtt, (int, float)) and not isinstance(rtt, bool) else math.inf,
    )
