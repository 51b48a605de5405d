"""RelayClientActor: the node's link to its relay and its peers, as a shell around one core.

:class:`meshnet.node.core.NodeCore` decides everything the node says to its relay and its
peers (registration, sessions, flow control, punches, pings, peer queries); this module
does its I/O. It owns, on one :class:`SocketLoop` (the node's job loop, shared with the
client API and the worker pool), the DEALER socket to the relay and its monitor, the
direct links (actors/direct_links.py) and the core's timers; it hands each of them what
the core asks, and hands the core what they saw, with ``now``. The core's effects run
in order from one queue: what an effect tells the core adds to the end of it.

Other threads hand it messages with :meth:`post`; on the loop they are handled at once.
So a relayed job crosses no thread on either node: a client's submission is sealed and
sent, and a peer's job reaches a worker, in the wake-up that read it.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import structlog
import zmq

from actors.answers import Answers
from actors.base import NodeActor, log_job_end
from actors.direct_links import DirectLinks
from actors.drain_signals import DrainSignals
from actors.job_queue import JobBook
from actors.messages import Abort, CancelJob, Drain, PingThere, PlaceJobs, QueryPeers, RunThere
from actors.network_check import CheckNetwork
from actors.relay_connection import RelayConnection
from actors.supervision import Child
from meshnet.holepunch import Abandon, Dial, Expect
from meshnet.identity import Identity
from meshnet.jobs.model import JobSpec, Outcome, ToPeer
from meshnet.keyed_timers import KeyedTimers
from meshnet.memory_budget import MemoryBudget
from meshnet.natcheck import stun_server
from meshnet.node.core import NetworkChecked, NodeCore
from meshnet.node.effects import (
    AnswerJob,
    AskNetworkCheck,
    CancelTimer,
    CloseRelay,
    Disconnected,
    Effect,
    FlushSoon,
    HandshakeFailed,
    Listen,
    Log,
    OpenRelay,
    PeersAnswered,
    PingAnswered,
    Reconnected,
    RunJob,
    SendDirect,
    SendRelay,
    SetTimer,
    StopJob,
)
from meshnet.protocol import MAX_FRAMES, frame_limit
from meshnet.protocol.direct import Carried
from meshnet.socket_loop import SocketLoop

log = structlog.get_logger("meshnet.relay_client")


class RelayClient:
    """The relay link, the direct links and the sessions, on the job loop (``loop``).
    Made by the supervisor, which hands :meth:`post` to the client API; supervised by
    :class:`RelayClientActor`."""

    def __init__(
        self,
        *,
        core: NodeCore,
        identity: Identity,
        book: JobBook,
        context: zmq.Context,
        loop: SocketLoop | None = None,
        memory: MemoryBudget | None = None,
        stun: str = "",
        network_check: Child | None = None,
        answers: Answers | None = None,
    ):
        #: The node's protocol (sans-IO); this shell carries out what it decides.
        self.core = core
        self.identity = identity
        self.endpoint = core.endpoint
        self.book = book
        self.context = context
        #: The actor that finds out this node's LAN address and NAT type (off the loop);
        #: None: direct links are off (the core asks nothing).
        self.network_check = network_check
        self.stun = stun
        #: What the sessions hold for peers counts against the node's one memory budget.
        (memory or MemoryBudget()).add_part("sessions", lambda: self.core.held_bytes)
        self._owns_loop = loop is None
        self.loop = loop or SocketLoop("relay-client")
        #: Where jobs' ends go, by their way back: this client answers the peers' (ToPeer).
        self.answers = answers if answers is not None else Answers(self.loop)
        self.answers.serve_peers(self._answer_peer)
        #: What the supervisor waits on to drain (the core's books, once per loop turn).
        self.drain_signals = DrainSignals(self.loop, core)
        self.ledger_idle, self.delivered = self.drain_signals.ledger_idle, self.drain_signals.delivered
        self.log = log.bind(peer_id=identity.peer_id, relay=core.endpoint)
        self.relay = RelayConnection(
            identity=identity,
            endpoint=core.endpoint,
            relay_peer_id=core.relay_peer_id,
            max_message=frame_limit(self.core.max_deliver_body),
            context=context,
            loop=self.loop,
            on_frames=self._on_relay_frames,
            on_event=self._handle,
            on_unsent=lambda counted: self._drive(self.core.on_relay_unsent(counted)),
            after_read=self.drain_signals.changed,
            logger=self.log,
        )
        self.direct = DirectLinks(
            identity=identity,
            loop=self.loop,
            max_message=frame_limit(self.core.max_deliver_body),
            on_up=self._on_direct_up,
            on_down=self._on_direct_down,
            on_messages=self._on_direct_messages,
        )
        #: The core's effects not yet carried out, and whether they are being.
        self._effects: deque[Effect] = deque()
        self._driving = False
        #: The core's timers, by the keys it names them with.
        self.timers = KeyedTimers(self.loop, self._on_timer)
        self._stopped = False

    # -- life cycle --

    def start(self) -> None:
        if self._owns_loop:
            self.loop.start()
        self.loop.run_sync(lambda: self._drive(self.core.start(time.monotonic())))

    def stop(self) -> None:
        if self.loop.running:
            self.loop.run_sync(self._shut_down)
        if self._owns_loop:
            self.loop.stop()

    def _shut_down(self) -> None:
        try:
            self._drive(self.core.stop(time.monotonic()))
        finally:
            self.relay.close()
            self.direct.close_all()
            self._stopped = True
            self.timers.cancel_all()

    def post(self, message: Any) -> None:
        """Hand this relay client a message (thread-safe); on its loop, handled now."""
        if self.loop.in_loop():
            self._handle(message)
        else:
            self.loop.call_soon(self._handle, message)

    def status(self) -> dict[str, Any]:
        return self.loop.run_sync(self.core.status, timeout=5)

    # -- messages --

    def handle(self, message: Any) -> Any:
        """A message from another thread (the supervisor's): handled on the loop; a
        ``Drain`` is answered once it is (new jobs are refused from then on)."""
        if isinstance(message, Drain):
            return self.loop.run_sync(self._handle, message)
        self.post(message)

    def _handle(self, message: Any) -> Any:
        """Loop thread."""
        core, now = self.core, time.monotonic()
        if isinstance(message, RunThere):
            self._drive(core.submit(message.jobs, now))
        elif isinstance(message, PlaceJobs):
            self._drive(core.place(message.jobs, now))
        elif isinstance(message, CancelJob):
            self._drive(core.cancel(message.job_id, message.requester, now))
        elif isinstance(message, QueryPeers):
            self._drive(
                core.query_peers(
                    message.request, now, requires=message.requires, after=message.after, limit=message.limit
                )
            )
        elif isinstance(message, PingThere):
            self._drive(core.ping(message.peer, message.timeout, message.request, now))
        elif isinstance(message, NetworkChecked):
            self._drive(core.on_network_checked(message, now))
        elif isinstance(message, (HandshakeFailed, Reconnected, Disconnected)):
            self._drive(core.on_relay_event(message, now))
        elif isinstance(message, Drain):
            self._drive(core.drain())
        elif isinstance(message, Abort):
            self._drive(core.abort(message.reason, now))
        self.drain_signals.changed()
        return True

    def _answer_peer(self, job: JobSpec, back: ToPeer, outcome: Outcome) -> None:
        """Loop thread: job ``job``, which peer ``back.peer`` sent, ended with ``outcome``:
        answered in the peer's session (not once this client has stopped)."""
        if not self._stopped:
            self._drive(self.core.job_finished(back.peer, job.id, outcome, time.monotonic()))

    # -- the core's effects --

    def _drive(self, effects: list[Effect]) -> None:
        """Carry out ``effects``, and what they lead to, in order (not within an effect
        being carried out: they join the queue that is being run)."""
        if not effects:
            return
        self._effects.extend(effects)
        if self._driving:
            return
        self._driving = True
        try:
            queue = self._effects
            while queue:
                self._do(queue.popleft())
        finally:
            self._driving = False
            self.drain_signals.changed()

    def _do(self, effect: Effect) -> None:
        core = self.core
        if isinstance(effect, SendRelay):
            self.relay.send(effect.generation, effect.frames, effect.counted)
        elif isinstance(effect, SendDirect):
            if self.direct.send_box(effect.peer, effect.box):
                core.on_direct_sent(effect.path)
        elif isinstance(effect, RunJob):
            self.book.submit([effect.job])  # at once: a free worker starts it while the batch is read on
        elif isinstance(effect, AnswerJob):
            if effect.peer:
                log_job_end(self.log, effect.job.id, effect.job.kind, effect.outcome, to=effect.peer)
            self.answers.answer(effect.job, effect.outcome)
        elif isinstance(effect, FlushSoon):
            self.loop.at_turn_end(self._flush)  # after the rest of what this turn reads
        elif isinstance(effect, SetTimer):
            self.timers.set(effect.key, effect.at)
        elif isinstance(effect, CancelTimer):
            self.timers.cancel(effect.key)
        elif isinstance(effect, StopJob):
            self.book.cancel(effect.job_id, effect.peer)
        elif isinstance(effect, (PingAnswered, PeersAnswered)):
            self.answers.reply(effect)
        elif isinstance(effect, Log):
            getattr(self.log, effect.level)(effect.event, **effect.fields)
        elif isinstance(effect, Dial):
            self.direct.dial(effect.peer, effect.attempt, effect.remote, core.local_port, effect.curve_server)
        elif isinstance(effect, Expect):
            self.direct.expect(effect.peer, effect.attempt)
        elif isinstance(effect, Abandon):
            self.direct.close(effect.peer, effect.attempt)
        elif isinstance(effect, Listen):
            try:
                port = self.direct.listen(effect.port)
            except zmq.ZMQError as exc:
                self._drive(core.on_listening(None, str(exc), time.monotonic()))
            else:
                self._drive(core.on_listening(port, "", time.monotonic()))
        elif isinstance(effect, AskNetworkCheck):
            assert self.network_check is not None  # the core asks only when there is one
            server = stun_server(self.stun, self.endpoint)
            self.network_check.tell(CheckNetwork(reply_to=self.post, relay_endpoint=self.endpoint, stun=server))
        elif isinstance(effect, OpenRelay):
            self.relay.open(effect.generation, effect.local_port)
        elif isinstance(effect, CloseRelay):
            self.relay.close()

    def _flush(self) -> None:
        if not self._stopped:
            self._drive(self.core.flush(time.monotonic()))

    def _on_timer(self, key: Any) -> None:
        if not self._stopped:
            self._drive(self.core.on_timer(key, time.monotonic()))

    # -- what the links saw --

    def _on_relay_frames(self, generation: int, frames: list[Any] | None) -> None:
        if frames is None:
            error = f"a message of more than {MAX_FRAMES} frames"
            self._drive(self.core.rejected_from_relay(error, time.monotonic()))
        else:
            self._drive(self.core.on_relay_frames(generation, frames, time.monotonic()))

    def _on_direct_up(self, peer: str, attempt: int) -> None:
        self._drive(self.core.on_link_up(peer, attempt, time.monotonic()))

    def _on_direct_down(self, peer: str, attempt: int, reason: str) -> None:
        self._drive(self.core.on_link_down(peer, attempt, reason, time.monotonic()))

    def _on_direct_messages(self, peer: str, items: tuple[Carried, ...]) -> None:
        self._drive(self.core.on_link_messages(peer, items, time.monotonic()))


class RelayClientActor(NodeActor):
    """Supervises the node's :class:`RelayClient`: starts its link with the node and
    stops it (ending what it held) before the client API stops."""

    def __init__(self, client: RelayClient):
        super().__init__()
        self.client = client

    def on_start(self) -> None:
        self.client.start()

    def on_stop(self) -> None:
        self.client.stop()

    def handle(self, message: Any) -> Any:
        return self.client.handle(message)
