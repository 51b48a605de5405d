"""Supervision of the node's actors off the job loop: one that fails is restarted, a
bounded number of times, then the node stops with one clear error.

pykka stops an actor whose ``on_receive`` raises on a message nobody waits for, and only
logs it: the node would go on without one of its parts. Here such an actor is a
:class:`SupervisedActor`: its failure reaches its :class:`Supervisor`, which starts a new
one from the same factory in its place (Erlang's one-for-one), unless the child failed
more than ``RestartBudget.max_restarts`` times within ``period`` seconds: then the
supervisor gives up and calls ``on_give_up`` once, and the node stops.

Senders hold a :class:`Child`, not an ``ActorRef``: it always names the running
instance. What the failing instance had in its mailbox is lost with it (pykka answers
the askers ``ActorDeadError``); a sender that needs an answer asks again.

Which actor runs where: ``README.md``, *Which thread owns what*.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors.messages import Alive

log = structlog.get_logger("meshnet.supervision")


@dataclass
class RestartBudget:
    """At most ``max_restarts`` restarts of one child within ``period`` seconds."""

    max_restarts: int = 3
    period: float = 60.0
    _at: deque[float] = field(default_factory=deque)

    def allow(self, now: float) -> bool:
        """Whether a restart now keeps within the budget (and counts it if so)."""
        while self._at and now - self._at[0] > self.period:
            self._at.popleft()
        if len(self._at) >= self.max_restarts:
            return False
        self._at.append(now)
        return True

    @property
    def recent(self) -> int:
        """Restarts counted within the period, as of the last :meth:`allow`."""
        return len(self._at)


class InjectedFault(RuntimeError):
    """Raised by an actor that ``MESHNET_FAULTS`` names (tests of supervision)."""


def _faults_from_env() -> dict[str, int]:
    """``MESHNET_FAULTS="network_check:1,identity:4"``: the named actors raise on that many
    of their next messages (a test's way to make a real node's actor fail)."""
    faults = {}
    for item in os.environ.get("MESHNET_FAULTS", "").split(","):
        name, _, count = item.strip().partition(":")
        if name:
            faults[name] = int(count or 1)
    return faults


@dataclass(frozen=True)
class Request:
    """A message that wants an answer by message: ``reply_to`` takes it (the sender's
    mailbox, e.g. the relay client's ``post``). When the actor fails on it, the sender
    still gets one: :meth:`failure`'s."""

    reply_to: Callable[[Any], None]

    def failure(self, error: str) -> Any:
        raise NotImplementedError


class SupervisedActor(pykka.ThreadingActor):
    """An actor whose failure its supervisor hears of. Subclasses set ``name`` and
    implement :meth:`handle`.

    A message it raises on, told or asked, ends this instance: the supervisor starts
    another in its place (or gives up), a :class:`Request` is answered with its failure,
    and an asker gets the exception."""

    name = "actor"
    _faults: dict[str, int] = _faults_from_env()
    _faults_lock = threading.Lock()

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self._supervisor = supervisor

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Alive):  # the node checking start-up
            return True
        try:
            self._maybe_fail()
            return self.handle(message)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
            self.actor_ref.stop(block=False)  # this instance takes nothing more
            self._supervisor.failed(self.name, self.actor_ref, why)
            if isinstance(message, Request):  # after the restart: a sender that asks again reaches the new one
                message.reply_to(message.failure(why))
            raise

    def handle(self, message: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} takes no {type(message).__name__}")

    def _maybe_fail(self) -> None:
        with SupervisedActor._faults_lock:
            left = self._faults.get(self.name, 0)
            if left <= 0:
                return
            self._faults[self.name] = left - 1
        raise InjectedFault(f"a fault injected by MESHNET_FAULTS into {self.name}")


class Child:
    """A supervised actor as its senders see it: the running instance."""

    def __init__(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        self.name = name
        #: Replaced whole when the actor restarts (a reference, read without a lock).
        self.ref = ref

    def tell(self, message: Any) -> None:
        try:
            self.ref.tell(message)
        except pykka.ActorDeadError:
            log.warning("message_to_stopped_actor", actor=self.name, message=type(message).__name__)

    def ask(self, message: Any, timeout: float) -> Any:
        return self.ref.ask(message, timeout=timeout)


class Supervisor:
    """Starts children, restarts the one that fails within its budget, and past that
    calls ``on_give_up(error_text)`` once (from the failing actor's thread)."""

    def __init__(self, on_give_up: Callable[[str], None], *, logger: Any = log) -> None:
        self.on_give_up = on_give_up
        self.log = logger
        self._children: dict[str, tuple[Child, Callable[[Supervisor], pykka.ActorRef[Any]], RestartBudget]] = {}
        self._given_up = threading.Event()
        self._stopping = threading.Event()

    def start(
        self, name: str, start: Callable[[Supervisor], pykka.ActorRef[Any]], budget: RestartBudget | None = None
    ) -> Child:
        """Start child ``name`` (``start(self)`` makes it) and supervise it."""
        child = Child(name, start(self))
        self._children[name] = (child, start, budget or RestartBudget())
        return child

    def failed(self, name: str, ref: pykka.ActorRef[Any], why: str) -> None:
        """Child ``name`` (instance ``ref``) raised (``why``) and stops: restart it, or
        give up. The failing instance's own thread calls this."""
        entry = self._children.get(name)
        if entry is None or entry[0].ref is not ref or self._stopping.is_set():
            return
        child, start, budget = entry
        if budget.allow(time.monotonic()):
            child.ref = replacement = start(self)
            if self._stopping.is_set():  # stop() began meanwhile, and may have missed it
                replacement.stop(block=False)
                return
            self.log.error("actor_restarted", actor=name, error=why, restarts=budget.recent)
            return
        if not self._given_up.is_set():
            self._given_up.set()
            self.on_give_up(
                f"the node's {name} actor failed more than {budget.max_restarts} times within "
                f"{budget.period:g} s (last: {why})"
            )

    def stop(self) -> None:
        """Stop every child (in reverse start order); no restarts from now on."""
        self._stopping.set()
        for child, _, _ in reversed(list(self._children.values())):
            try:
                child.ref.stop(timeout=10)
            except pykka.ActorDeadError:
                pass
