"""Answers waiting for clients that do not read them, bounded in bytes per client.

ZeroMQ queues up to its high-water mark of *messages* per connection, and a result may
be 64 MiB: a client that submitted 2 MiB echo jobs and never read the results grew its
node to 1.5 GB in 8 s. The client API therefore keeps ZeroMQ's queue per connection
short (``API_SEND_HWM`` messages) and holds what does not fit here, counted in bytes:

* the answers wait and are sent, in order, as the client reads;
* past half the budget the client is *pushed back*: its new jobs are refused ``busy``
  (those refusals are answers too, and wait like the rest), while the answers of the
  jobs it already has keep coming;
* the client is *dropped* when it stops reading: past the budget with nothing sent to
  it for ``STALL_OVER_BUDGET_S``, past ``HARD_LIMIT`` budgets at once, or with anything
  waiting and nothing sent for ``STALL_S``. What waited is thrown away, with a logged
  reason, and until the client reads again its jobs are refused and answers to it that
  do not fit ZeroMQ's queue are thrown away at once.

A client that reads, if more slowly than its answers come (a burst of large results
to a slow link), is pushed back and not dropped: what waits for it is then at most the
budget's half and the answers of the jobs it had in flight, and at most ``HARD_LIMIT``
budgets in any case.

Sans-IO: the client API tries a send; when ZeroMQ's queue for the connection is full it
hands the message to :meth:`Outboxes.hold`, and retries held messages on a timer (a
ROUTER socket cannot say *which* connection has room again).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

#: Messages ZeroMQ queues per client connection beyond what the kernel takes. More than a
#: client's usual window of jobs in flight: a reading client's answers go out at once.
#: (At 8, answers to a client with 48 in flight met a full queue again and again and
#: waited for the retry timer: the local path ran at 0.4-0.6x its former jobs/s.) What
#: they may cost is bounded in bytes, not by this: the client API follows every answer
#: of TRACK_BYTES or more, and holds back what would put more than
#: ZMQ_BYTES_PER_CLIENT of them in ZeroMQ's queue for one connection.
API_SEND_HWM = 64
#: Bytes of answers a client connection may have waiting by default (``api.max_unread_bytes``):
#: room for one largest result.
DEFAULT_MAX_UNREAD_BYTES = 64 * 1024 * 1024
#: Budgets of answers past which a client is dropped whether or not it reads.
HARD_LIMIT = 4
#: Seconds without an answer going out after which a client over its budget is dropped,
#: and one with anything waiting at all.
STALL_OVER_BUDGET_S = 5.0
STALL_S = 60.0
#: Dropped connections remembered (to refuse their jobs); past it the oldest are forgotten.
MAX_DROPPED = 1024
#: Retry delays for held answers: from the first to the longest, doubling while nothing
#: goes out (a client that reads gets its answers within milliseconds; one that does not
#: costs a wake-up a second until it is dropped).
FIRST_RETRY_S = 0.001
LONGEST_RETRY_S = 1.0


@dataclass
class Backlog:
    """Answers held for one connection, oldest first."""

    messages: deque[tuple[list[Any], int]] = field(default_factory=deque)
    size: int = 0
    #: When an answer last went out to the client (or the backlog began).
    progress_at: float = 0.0
    pushed_back: bool = False


class Outboxes:
    def __init__(self, budget: int = DEFAULT_MAX_UNREAD_BYTES):
        self.budget = budget
        self.backlogs: dict[bytes, Backlog] = {}
        #: Connections dropped for not reading, with when.
        self.dropped: OrderedDict[bytes, float] = OrderedDict()
        #: Answers thrown away because their client did not read (dropped, or gone).
        self.discarded = 0
        #: Bytes held for all connections together (the node's memory budget reads it).
        self.total = 0
        self.retry_delay = FIRST_RETRY_S

    def holds(self, conn: bytes) -> bool:
        """Whether answers wait for ``conn`` (a new one must wait behind them)."""
        return conn in self.backlogs

    def hold(self, conn: bytes, frames: list[Any], size: int, now: float, queued: int = 0) -> str:
        """Keep an answer that ZeroMQ's queue for ``conn`` did not take (``queued``: the
        bytes of answers that queue holds for it, unread too). Returns ``"held"``;
        ``"pushed_back"`` when what is unread crossed half the budget (refuse the
        client's new jobs from now on); ``"dropped"`` when the client counts as not
        reading any more (see the module's rules): what was held is discarded;
        ``"discarded"`` when ``conn`` was dropped already (the answer is thrown away)."""
        if conn in self.dropped:
            self.discarded += 1
            return "discarded"
        backlog = self.backlogs.get(conn)
        if backlog is None:
            backlog = self.backlogs[conn] = Backlog(progress_at=now)
        backlog.messages.append((frames, size))
        backlog.size += size
        self.total += size
        if self._stalled(backlog, now):
            self._drop(conn, now)
            return "dropped"
        if not backlog.pushed_back and backlog.size + queued > self.budget // 2:
            backlog.pushed_back = True
            return "pushed_back"
        return "held"

    def _stalled(self, backlog: Backlog, now: float) -> bool:
        if backlog.size > HARD_LIMIT * self.budget:
            return True
        quiet = now - backlog.progress_at
        return quiet >= STALL_S or (backlog.size > self.budget and quiet >= STALL_OVER_BUDGET_S)

    def _drop(self, conn: bytes, now: float) -> None:
        backlog = self.backlogs.pop(conn)
        self.total -= backlog.size
        self.discarded += len(backlog.messages)
        self.dropped[conn] = now
        while len(self.dropped) > MAX_DROPPED:
            self.dropped.popitem(last=False)

    def cut(self, conn: bytes, now: float) -> int:
        """Drop ``conn`` now (the node is over its memory budget and it reads slowest):
        what waited for it is discarded; returns its bytes."""
        size = self.unread(conn)
        if conn in self.backlogs:
            self._drop(conn, now)
        else:
            self.dropped[conn] = now
            while len(self.dropped) > MAX_DROPPED:
                self.dropped.popitem(last=False)
        return size

    def drop_stalled(self, now: float) -> list[tuple[bytes, int]]:
        """Drop the clients that stopped reading (the module's rules); returns each with
        the bytes that waited for it. The retry timer calls it, so that a client whose
        answers stopped coming is dropped too."""
        stalled = [(conn, backlog.size) for conn, backlog in self.backlogs.items() if self._stalled(backlog, now)]
        for conn, _ in stalled:
            self._drop(conn, now)
        return stalled

    def refuses(self, conn: bytes) -> bool:
        """Whether ``conn``'s new jobs are refused: pushed back, or dropped."""
        if conn in self.dropped:
            return True
        backlog = self.backlogs.get(conn)
        return backlog is not None and backlog.pushed_back

    def unread(self, conn: bytes) -> int:
        backlog = self.backlogs.get(conn)
        return backlog.size if backlog is not None else 0

    def head(self, conn: bytes) -> list[Any] | None:
        backlog = self.backlogs.get(conn)
        return backlog.messages[0][0] if backlog is not None else None

    def sent_head(self, conn: bytes, now: float) -> None:
        """The oldest held answer for ``conn`` went out."""
        backlog = self.backlogs[conn]
        _, size = backlog.messages.popleft()
        backlog.size -= size
        self.total -= size
        backlog.progress_at = now
        if not backlog.messages:
            del self.backlogs[conn]
        self.retry_delay = FIRST_RETRY_S

    def gone(self, conn: bytes) -> int:
        """``conn`` disconnected: its held answers are discarded; returns how many."""
        backlog = self.backlogs.pop(conn, None)
        count = len(backlog.messages) if backlog is not None else 0
        self.total -= backlog.size if backlog is not None else 0
        self.discarded += count
        return count

    def reading_again(self, conn: bytes) -> bool:
        """A send to ``conn`` went through: True if it had been dropped (and is not now)."""
        return self.dropped.pop(conn, None) is not None

    def next_retry(self) -> float | None:
        """Seconds until held answers should be tried again (None: nothing held); each
        call without progress doubles the delay, up to ``LONGEST_RETRY_S``."""
        if not self.backlogs:
            self.retry_delay = FIRST_RETRY_S
            return None
        delay = self.retry_delay
        self.retry_delay = min(LONGEST_RETRY_S, delay * 2)
        return delay
