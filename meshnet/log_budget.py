"""What a part on a socket loop logs of repeated events: the first from a source lately
in full, the rest counted and summed up (meshnet.rejections), on a timer of the loop's
that is armed only while counts wait."""

from __future__ import annotations

import time
from typing import Any

from meshnet.rejections import RejectionLog, log_summaries
from meshnet.socket_loop import SocketLoop, TimerHandle


class LogBudget:
    """``allow(source, error)`` says whether to log an event in full; the rest go into one
    ``event`` line per source (the source under ``source_field``) when their interval is up."""

    def __init__(self, loop: SocketLoop, logger: Any, event: str, source_field: str = "source"):
        self.loop, self.logger, self.event, self.source_field = loop, logger, event, source_field
        self.rejections = RejectionLog()
        self._timer: TimerHandle | None = None
        self._closed = False

    def allow(self, source: str, error: str) -> bool:
        """Loop thread: whether to log this event from ``source`` in full."""
        now = time.monotonic()
        if self.rejections.on_rejected(source, error, now):
            return True
        if self._timer is None and not self._closed:
            due = self.rejections.next_flush()
            if due is not None:
                self._timer = self.loop.call_later(max(0.0, due - now), self._summarise)
        return False

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _summarise(self) -> None:
        self._timer = None
        now = time.monotonic()
        log_summaries(self.logger, self.event, self.rejections.flush(now), now, source=self.source_field)
        due = self.rejections.next_flush()
        if due is not None and not self._closed:
            self._timer = self.loop.call_later(max(0.0, due - now), self._summarise)
