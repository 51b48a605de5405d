"""Which accepted connections a listener closes (meshnet.conn_guard), without sockets."""

from __future__ import annotations

from meshnet.conn_guard import ConnectionGuard, reserve_for

LOCAL = ("0.0.0.0", 7720)


def accept(guard: ConnectionGuard, fd: int, ip: str = "203.0.113.5", now: float = 0.0) -> list[int]:
    return [conn.fd for conn in guard.on_accepted(fd, LOCAL, (ip, 40000 + fd), now)]


def test_pending_connections_past_the_cap_are_closed_oldest_first() -> None:
    guard = ConnectionGuard(limit=100_000, max_pending=3, max_per_source=100)
    assert [accept(guard, fd, f"198.51.100.{fd}") for fd in (10, 11, 12)] == [[], [], []]
    assert accept(guard, 13, "198.51.100.13") == [10]
    guard.on_identified(11)  # it spoke: it stays, and no longer counts
    assert accept(guard, 14, "198.51.100.14") == []
    assert accept(guard, 15, "198.51.100.15") == [12]
    assert list(guard.pending) == [13, 14, 15]
    assert guard.closed == {"pending": 2}


def test_one_source_holds_at_most_its_share_of_pending_connections() -> None:
    guard = ConnectionGuard(limit=100_000, max_pending=100, max_per_source=2)
    accept(guard, 10, "203.0.113.5")
    accept(guard, 11, "198.51.100.7")
    accept(guard, 12, "203.0.113.5")
    assert accept(guard, 13, "203.0.113.5") == [10]
    assert accept(guard, 14, "198.51.100.7") == []  # another source is not affected
    assert guard.per_source == {"203.0.113.5": 2, "198.51.100.7": 2}


def test_a_descriptor_near_the_limit_closes_the_oldest_pending_and_keeps_the_reserve() -> None:
    guard = ConnectionGuard(limit=1024, max_pending=10_000, max_per_source=10_000)
    reserve = reserve_for(1024)
    assert reserve == 128
    for fd in range(100, 100 + 700):
        assert accept(guard, fd, f"10.0.{fd // 250}.{fd % 250}") == []
    closed = accept(guard, 1024 - reserve, "10.9.9.9")
    assert closed == list(range(100, 100 + reserve // 4)), "the oldest pending went first"
    assert guard.closed == {"descriptors": reserve // 4}


def test_identified_and_closed_connections_are_forgotten_and_a_reused_number_is_new() -> None:
    guard = ConnectionGuard(limit=100_000, max_pending=10, max_per_source=1)
    accept(guard, 10, "203.0.113.5")
    guard.on_gone(10)
    assert guard.pending == {} and guard.per_source == {}
    accept(guard, 10, "203.0.113.5")
    assert accept(guard, 10, "198.51.100.1") == [], "fd 10 again: a new connection, the old one forgotten"
    assert guard.per_source == {"198.51.100.1": 1}


def test_of_the_pending_those_that_sent_nothing_go_first() -> None:
    """A peer's first message may still be on its way when strangers' connections come
    after it: the connection that sent its greeting is kept, the silent ones go. Past a
    source's share only silent ones go (honest clients behind one address greet at once);
    past the cap in all, the oldest goes when all of them talk."""
    guard = ConnectionGuard(limit=100_000, max_pending=4, max_per_source=2)
    talking = {10}
    guard.on_accepted(10, LOCAL, ("127.0.0.1", 1), 0.0, talking.__contains__)  # the peer, greeting sent
    guard.on_accepted(11, LOCAL, ("127.0.0.1", 2), 0.0, talking.__contains__)  # idle strangers
    closed = [c.fd for c in guard.on_accepted(12, LOCAL, ("127.0.0.1", 3), 0.0, talking.__contains__)]
    assert closed == [11]
    talking.update({12, 13})
    closed = [c.fd for c in guard.on_accepted(13, LOCAL, ("127.0.0.1", 4), 0.0, talking.__contains__)]
    assert closed == [], "all of the source's pending ones talk: none goes for its share"
    talking.update({14, 15})
    guard.on_accepted(14, LOCAL, ("198.51.100.1", 5), 0.0, talking.__contains__)
    closed = [c.fd for c in guard.on_accepted(15, LOCAL, ("198.51.100.2", 6), 0.0, talking.__contains__)]
    assert closed == [10], "past the cap in all, with all of them talking, the oldest goes"


def test_one_source_that_greets_and_goes_no_further_is_held_to_four_shares() -> None:
    guard = ConnectionGuard(limit=100_000, max_pending=1000, max_per_source=2)
    greeted = [guard.on_accepted(fd, LOCAL, ("127.0.0.1", fd), 0.0, lambda fd: True) for fd in range(10, 30)]
    closed = [c.fd for closes in greeted for c in closes]
    assert closed == list(range(10, 22)) and guard.per_source == {"127.0.0.1": 8}
