"""One memory budget for a node process, in bytes, across every connection and queue.

Each part bounded its own buffers (a client's unread answers, the job queue's payloads,
what the sessions hold for peers), but nothing bounded the sum: 100 client connections
that never read, each with 8 echo jobs of 4 MiB, held a node at 2,988 MB, since what
ZeroMQ queues for a connection (8 messages) was counted nowhere and every connection had
a budget of its own. Here the parts on the node's job loop register what they hold (a
callable each, read when asked: nothing is updated per message), and the node asks
:meth:`MemoryBudget.admits` before it takes new work. When it does not fit, the parts
that can give memory back are asked to (the client API cuts its slowest readers, oldest
unread answer first); what still does not fit is refused ``busy``, with the reason.

Sans-IO, and owned by the job loop: every part it reads lives there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: ``node.memory_budget_bytes`` by default: room for the job queue's payloads (256 MiB),
#: the sessions' buffers (twice 128 MiB) and a few clients' unread answers.
DEFAULT_MEMORY_BUDGET = 1024 * 1024 * 1024
#: A client whose oldest unread answer is younger than this is reading, as far as anyone
#: can tell, and is never cut: an answer handed to ZeroMQ a moment ago is in no one's way.
READ_GRACE = 1.0


@dataclass(frozen=True)
class Reader:
    """A client with answers it has not read: since when the oldest has waited, and the
    bytes of them all."""

    conn: bytes
    since: float
    unread: int


def readers_to_cut(
    readers: Iterable[Reader], used: int, limit: int, size: int, now: float, grace: float = READ_GRACE
) -> list[bytes]:
    """The clients to cut, slowest first, so that new work of ``size`` bytes fits in
    ``limit`` with ``used`` held; none when cutting all that may be cut would not make it
    fit (what fills the budget is not their answers: cutting them would help no one)."""
    slow = sorted((r for r in readers if now - r.since >= grace), key=lambda r: r.since)
    if used + size > limit and used - sum(r.unread for r in slow) + size > limit:
        return []
    cut: list[bytes] = []
    for reader in slow:
        if used + size <= limit:
            break
        cut.append(reader.conn)
        used -= reader.unread
    return cut


class MemoryBudget:
    def __init__(self, limit: int = DEFAULT_MEMORY_BUDGET):
        self.limit = limit
        self._parts: dict[str, Callable[[], int]] = {}
        #: The parts' callables, for ``used`` (asked for every job: no generator, no dict).
        self._held: tuple[Callable[[], int], ...] = ()
        self._relievers: list[Callable[[int], None]] = []
        #: New work refused for want of memory, and clients cut.
        self.refused = 0
        self.cut = 0

    def add_part(self, name: str, held: Callable[[], int]) -> None:
        """``held()`` tells how many bytes part ``name`` holds now."""
        self._parts[name] = held
        self._held = tuple(self._parts.values())

    def add_reliever(self, relieve: Callable[[int], None]) -> None:
        """``relieve(size)`` tries to give back enough for new work of ``size`` bytes."""
        self._relievers.append(relieve)

    def fits(self, size: int) -> bool:
        used = self.used()
        return used + size <= self.limit or used == 0

    def used(self) -> int:
        total = 0
        for held in self._held:
            total += held()
        return total

    def admits(self, size: int) -> bool:
        """Whether new work of ``size`` bytes fits (a job alone larger than the budget
        fits an empty node: else it could never run), once the parts that can have given
        memory back. Counts a refusal when not."""
        if self.fits(size):
            return True
        for relieve in self._relievers:
            relieve(size)
            if self.fits(size):
                return True
        self.refused += 1
        return False

    def over(self) -> bool:
        return self.used() > self.limit

    def describe(self) -> dict[str, int]:
        """Bytes by part, and in all, for ``meshnet status``."""
        parts = {name: held() for name, held in self._parts.items()}
        return {**parts, "total": sum(parts.values()), "limit": self.limit, "refused": self.refused, "cut": self.cut}

    def why(self, size: int) -> str:
        """The refusal's message for new work of ``size`` bytes."""
        parts = ", ".join(f"{name} {held()}" for name, held in self._parts.items())
        return (
            f"the node holds {self.used()} bytes ({parts}) and this job brings {size} more "
            f"(node.memory_budget_bytes is {self.limit}); try again when its answers are read"
        )
