"""The supervisor of the node's off-loop actors (actors.supervision), with real pykka
actors: a failing child is replaced, its sender's request still answered; past the
budget the supervisor gives up once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pykka
import pytest

from actors.supervision import Child, Request, RestartBudget, SupervisedActor, Supervisor


def test_a_budget_allows_so_many_restarts_within_its_period_then_none() -> None:
    budget = RestartBudget(max_restarts=3, period=60.0)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, True, False]
    assert budget.allow(60.5) and not budget.allow(60.6)  # the first fell out of the window
    assert budget.allow(200.0)


@dataclass(frozen=True)
class Work(Request):
    value: int = 0

    def failure(self, error: str) -> Any:
        return ("failed", error)


class Worker(SupervisedActor):
    name = "worker"

    def handle(self, message: Any) -> Any:
        if isinstance(message, Work):
            if message.value < 0:
                raise ValueError(f"cannot work on {message.value}")
            message.reply_to(("done", message.value * 2))
            return None
        if message == "who":
            return id(self)
        return super().handle(message)


class Replies:
    def __init__(self) -> None:
        self.items: list[Any] = []
        self.changed = threading.Condition()

    def __call__(self, item: Any) -> None:
        with self.changed:
            self.items.append(item)
            self.changed.notify_all()

    def wait(self, count: int) -> list[Any]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.items) >= count, 10)
            return list(self.items)


@pytest.fixture
def supervised() -> Iterator[Callable[[RestartBudget], tuple[Supervisor, Child, list[str]]]]:
    supervisors: list[Supervisor] = []

    def make(budget: RestartBudget) -> tuple[Supervisor, Child, list[str]]:
        given_up: list[str] = []
        supervisor = Supervisor(given_up.append)
        supervisors.append(supervisor)
        return supervisor, supervisor.start("worker", Worker.start, budget), given_up

    yield make
    for supervisor in supervisors:
        supervisor.stop()
    pykka.ActorRegistry.stop_all()


def test_a_child_that_raises_is_replaced_and_its_sender_answered(supervised) -> None:
    _, child, given_up = supervised(RestartBudget(max_restarts=3))
    replies = Replies()
    first = child.ask("who", timeout=5)
    child.tell(Work(replies, -1))
    assert replies.wait(1) == [("failed", "ValueError: cannot work on -1")]
    # Answered once its replacement runs: what the sender sends now, the new one takes.
    child.tell(Work(replies, 21))
    assert replies.wait(2)[1] == ("done", 42)
    assert child.ask("who", timeout=5) != first and given_up == []


def test_an_ask_it_raises_on_reaches_the_asker_and_the_child_is_replaced(supervised) -> None:
    _, child, _ = supervised(RestartBudget(max_restarts=3))
    first = child.ask("who", timeout=5)
    with pytest.raises(NotImplementedError):
        child.ask("unknown", timeout=5)
    assert child.ask("who", timeout=5) != first


def test_past_the_budget_the_supervisor_gives_up_once_and_restarts_no_more(supervised) -> None:
    _, child, given_up = supervised(RestartBudget(max_restarts=2, period=60.0))
    for _ in range(3):
        with pytest.raises(NotImplementedError):
            child.ask("unknown", timeout=5)
    with pytest.raises(pykka.ActorDeadError):  # the third failure was one too many: none in its place
        child.ask("who", timeout=5)
    assert len(given_up) == 1
    assert "worker actor failed more than 2 times within 60 s" in given_up[0]
    assert "NotImplementedError" in given_up[0]
