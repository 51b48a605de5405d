"""Timers a sans-IO core names by key, on a :class:`SocketLoop`.

A core asks for a timer (``SetTimer(key, at)``) and for its end (``CancelTimer(key)``)
and learns that it fired as an input (``on_timer(key, now)``); the shell that owns the
loop keeps one handle per key here. Setting a key again replaces its timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

from meshnet.socket_loop import SocketLoop, TimerHandle


class KeyedTimers:
    """Loop thread only. ``fired(key)`` is called on the loop when ``key``'s time comes."""

    def __init__(self, loop: SocketLoop, fired: Callable[[Hashable], None]):
        self.loop = loop
        self.fired = fired
        self._timers: dict[Hashable, TimerHandle] = {}

    def set(self, key: Hashable, at: float) -> None:
        """Fire ``key`` at ``at`` (``time.monotonic``'s clock), replacing its timer."""
        self.cancel(key)
        self._timers[key] = self.loop.call_later(max(0.0, at - time.monotonic()), self._fire, key)

    def cancel(self, key: Hashable) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()

    def cancel_all(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    def _fire(self, key: Hashable) -> None:
        self._timers.pop(key, None)
        self.fired(key)
