"""What a draining node's supervisor waits on, mirrored from the node core.

The core lives on the job loop; the supervisor waits on its own thread. So the loop
copies two facts into :class:`threading.Event` objects once per loop turn (``in_flight``
and ``holding`` look at every session: once per input would cost the job path), and the
supervisor waits on the events, reading nothing the loop changes.
"""

from __future__ import annotations

import threading

from meshnet.node.core import NodeCore
from meshnet.socket_loop import SocketLoop


class DrainSignals:
    """``ledger_idle``: no job sent to a peer awaits its answer. ``delivered``: every
    message to a peer has been acknowledged (the answers of jobs this node ran reached
    their submitters). :meth:`changed` is called on the loop after each input."""

    def __init__(self, loop: SocketLoop, core: NodeCore):
        self.loop = loop
        self.core = core
        self.ledger_idle = threading.Event()
        self.ledger_idle.set()
        self.delivered = threading.Event()
        self.delivered.set()
        self._due = False

    def changed(self) -> None:
        # The loop runs its calls in order, so a Drain answered on the loop (run_sync)
        # is answered after this.
        if not self._due:
            self._due = True
            self.loop.call_soon(self._mirror)

    def _mirror(self) -> None:
        self._due = False
        _show(self.ledger_idle, not self.core.in_flight)
        _show(self.delivered, not self.core.holding)


def _show(event: threading.Event, value: bool) -> None:
    """Make ``event`` show ``value``, touching it only when it changes (an Event's set
    or clear takes its lock, is_set does not)."""
    if value != event.is_set():
        event.set() if value else event.clear()
