"""Who is online at a relay, with what, and how busy: the mesh's registry (sans-IO).

Beside :mod:`relay_server.routing`, which it serves: the routing core tells it who
registered (with the capabilities a node sent), who left, and what each heartbeat said
(load and round trip); it answers two questions.

- **A listing that pages.** Devices in peer-id order; a page starts after a cursor (the
  last peer id of the page before), so that a mesh of any size is listed in replies that
  each fit a header, and a device that joins or leaves between pages moves no other.
- **Candidates for a job.** The devices that meet a job's requirements
  (:mod:`meshnet.requirements`), best first: the most free executors, then the fewest
  jobs queued, then the shortest round trip to the relay (the path's quality as the relay
  sees it), then the peer id, so that the order is total and the same on every relay.

Capabilities are read by the schema (:func:`meshnet.capabilities.read_capabilities`)
once, at registration: a value of the wrong type from another implementation's node
meets no requirement, and costs nothing per query. A query scans every device: linear in
the mesh's size, like a listing, and bounded as the relay bounds its peers requests.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from meshnet.capabilities import read_capabilities
from meshnet.requirements import describe, unmet


@dataclass
class Device:
    """One registered device, as placement sees it."""

    peer_id: str
    #: Its capabilities, read by the schema.
    caps: dict[str, Any]
    #: Its last heartbeat's load (``busy``, ``free``, ``queued``); None until one said.
    load: dict[str, int] | None = None
    #: Its last heartbeat's round trip to the relay (seconds); None until one said.
    rtt: float | None = None

    def rank(self) -> tuple[int, int, float, str]:
        """Sort key, best first: most free executors (a device that has not told its load
        counts its executors as free, after those that told), fewest queued, shortest
        round trip, peer id."""
        if self.load is not None:
            free, queued = self.load["free"], self.load["queued"]
        else:
            executors = self.caps.get("executors")
            free, queued = (executors if isinstance(executors, int) else 0), 0
        return (-free, queued, self.rtt if self.rtt is not None else math.inf, self.peer_id)


class Registry:
    def __init__(self) -> None:
        self.devices: dict[str, Device] = {}
        #: Peer ids in order, for paging.
        self._order: list[str] = []

    def __len__(self) -> int:
        return len(self.devices)

    def join(self, peer_id: str, caps: Mapping[str, Any]) -> None:
        """``peer_id`` registered (again: its capabilities may have changed; its load
        and round trip are kept until its next heartbeat says otherwise)."""
        device = self.devices.get(peer_id)
        if device is None:
            self.devices[peer_id] = Device(peer_id, read_capabilities(caps))
            bisect.insort(self._order, peer_id)
        else:
            device.caps = read_capabilities(caps)

    def leave(self, peer_id: str) -> None:
        if self.devices.pop(peer_id, None) is not None:
            del self._order[bisect.bisect_left(self._order, peer_id)]

    def heard(self, peer_id: str, load: dict[str, int] | None, rtt: float | None) -> None:
        """A heartbeat from ``peer_id``: what it told (None: not told, kept as it was)."""
        device = self.devices.get(peer_id)
        if device is None:
            return
        if load is not None:
            device.load = load
        if rtt is not None:
            device.rtt = rtt

    def page(self, after: str | None = None) -> Iterator[str]:
        """Peer ids in order, from the first after ``after`` (None: from the first)."""
        order = self._order
        start = 0 if after is None else bisect.bisect_right(order, after)
        for index in range(start, len(order)):
            yield order[index]

    def count_after(self, after: str | None) -> int:
        """How many peer ids come after ``after`` (all, for None)."""
        return len(self._order) - (0 if after is None else bisect.bisect_right(self._order, after))

    def candidates(self, requires: Mapping[str, Any], *, exclude: frozenset[str] = frozenset()) -> list[Device]:
        """The devices that meet ``requires`` (checked), best first; none in ``exclude``."""
        fit = [
            device
            for peer_id, device in self.devices.items()
            if peer_id not in exclude and unmet(device.caps, requires) is None
        ]
        fit.sort(key=Device.rank)
        return fit

    def unmet_by_all(self, requires: Mapping[str, Any]) -> str | None:
        """Why no device meets ``requires``, for a ``no_device`` answer: the first
        requirement that no device meets on its own, else that none meets them all
        together (None when some device meets them)."""
        devices = self.devices.values()
        if not devices:
            return "no device is online"
        if any(unmet(device.caps, requires) is None for device in devices):
            return None
        for key, want in requires.items():
            alone = {key: want}
            if all(unmet(device.caps, alone) is not None for device in devices):
                return f"no device has {unmet({}, alone)}"
        return f"no device meets all of {describe(requires)} at once"
