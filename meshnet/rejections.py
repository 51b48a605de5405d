"""Which rejected messages get a log line: the first from each source, then counts.

A peer or client that sends garbage gets one clear error per message, but must not
also get a log line per message: 100,000 bad frames from one unauthenticated loopback
client once wrote 27 MB of warnings. Sans-IO: the daemon or actor asks
:meth:`RejectionLog.on_rejected` whether to log a rejection in full, and on its timer
logs what :meth:`RejectionLog.flush` returns, one summary line per source.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

#: Seconds between summaries of the rejections of one source that were not logged.
SUMMARY_INTERVAL = 10.0
#: Sources tracked at once; past it the least recently seen are folded into one count,
#: so that a flood of new connections cannot grow this table.
MAX_SOURCES = 1024
#: The source under which evicted sources' counts are summed, and those of new sources
#: past MAX_NEW_SOURCES.
OTHER_SOURCES = "other"
#: Sources whose first rejection is logged in full per interval: past them, a new
#: source's rejections are counted under OTHER_SOURCES. A stranger can be a new source at
#: will (a new connection, a new key); this keeps what it costs the log to a few lines
#: and a count every interval.
MAX_NEW_SOURCES = 20


@dataclass
class Suppressed:
    """Rejections from one source that were counted, not logged, since ``since``."""

    source: str
    count: int
    since: float
    #: The error of the last of them, for the summary line.
    last_error: str


class RejectionLog:
    def __init__(
        self, *, interval: float = SUMMARY_INTERVAL, max_sources: int = MAX_SOURCES, max_new: int = MAX_NEW_SOURCES
    ):
        self.interval = interval
        self.max_sources = max_sources
        self.max_new = max_new
        #: New sources logged in full since ``_new_since``.
        self._new_logged = 0
        self._new_since = float("-inf")
        #: source -> when its current window opened (its first rejection was logged then)
        self._windows: OrderedDict[str, float] = OrderedDict()
        self._suppressed: dict[str, Suppressed] = {}
        self.total = 0

    def on_rejected(self, source: str, error: str, now: float) -> bool:
        """A message from ``source`` was rejected with ``error``: True when it should be
        logged in full (the first from that source in this window), False when it was
        counted for the next summary instead."""
        self.total += 1
        opened = self._windows.get(source)
        if opened is None:
            if now - self._new_since >= self.interval:
                self._new_since, self._new_logged = now, 0
            if self._new_logged >= self.max_new:
                self._count(OTHER_SOURCES, error, now)
                return False
            self._new_logged += 1
        if opened is None or now - opened >= self.interval and source not in self._suppressed:
            self._windows[source] = now
            self._windows.move_to_end(source)
            self._evict()
            return True
        self._windows.move_to_end(source)
        self._count(source, error, now)
        return False

    def _count(self, source: str, error: str, now: float) -> None:
        entry = self._suppressed.get(source)
        if entry is None:
            self._suppressed[source] = Suppressed(source, 1, now, error)
        else:
            entry.count += 1
            entry.last_error = error

    def next_flush(self) -> float | None:
        """When :meth:`flush` has something to return (``now`` units), if ever."""
        if not self._suppressed:
            return None
        return min(entry.since for entry in self._suppressed.values()) + self.interval

    def flush(self, now: float) -> list[Suppressed]:
        """The counts whose summary is due (their first suppression at least an interval
        ago); each source's window restarts with its summary."""
        due = [entry for entry in self._suppressed.values() if now - entry.since >= self.interval]
        for entry in due:
            del self._suppressed[entry.source]
            if entry.source in self._windows:
                self._windows[entry.source] = now
        return due

    def _evict(self) -> None:
        while len(self._windows) > self.max_sources:
            source, _ = self._windows.popitem(last=False)
            entry = self._suppressed.pop(source, None)
            if entry is None or source == OTHER_SOURCES:
                continue
            other = self._suppressed.get(OTHER_SOURCES)
            if other is None:
                self._suppressed[OTHER_SOURCES] = Suppressed(OTHER_SOURCES, entry.count, entry.since, entry.last_error)
            else:
                other.count += entry.count
                other.since = min(other.since, entry.since)
                other.last_error = entry.last_error


def summary_fields(summary: Suppressed, now: float, source: str = "source") -> dict[str, Any]:
    """A summary's log fields: how many rejections of a source were counted, over how
    long, and the last one's error (``source`` names the field the source goes in)."""
    return {
        source: summary.source,
        "count": summary.count,
        "over_s": round(now - summary.since, 1),
        "last_error": summary.last_error,
    }


def log_summaries(logger: Any, event: str, summaries: Iterable[Suppressed], now: float, source: str = "source") -> None:
    """Log one warning per summary (:func:`summary_fields`)."""
    for summary in summaries:
        logger.warning(event, **summary_fields(summary, now, source))
