"""The socket loop: callbacks from any thread, timers, and bounded message reception."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from meshnet.keyed_timers import KeyedTimers
from meshnet.socket_loop import SocketLoop, recv_message


def test_callbacks_from_many_threads_all_run_in_order_per_thread() -> None:
    loop = SocketLoop("test").start()
    seen: list[tuple[int, int]] = []
    done = threading.Event()
    try:

        def producer(n: int) -> None:
            for i in range(500):
                loop.call_soon(seen.append, (n, i))

        threads = [threading.Thread(target=producer, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        loop.call_soon(done.set)
        assert done.wait(5)
        assert len(seen) == 2000
        for n in range(4):
            assert [i for m, i in seen if m == n] == list(range(500))
    finally:
        loop.stop()


def test_timers_fire_in_order_and_cancelled_ones_do_not() -> None:
    loop = SocketLoop("test").start()
    fired: list[str] = []
    done = threading.Event()
    try:
        loop.call_later(0.05, fired.append, "second")
        loop.call_later(0.01, fired.append, "first")
        cancelled = loop.call_later(0.02, fired.append, "cancelled")
        cancelled.cancel()
        loop.call_later(0.08, done.set)
        assert done.wait(5)
        assert fired == ["first", "second"]
    finally:
        loop.stop()


def test_many_cancelled_timers_are_dropped_from_the_heap() -> None:
    loop = SocketLoop("test").start()
    try:
        handles = [loop.call_later(3600, print) for _ in range(1000)]
        for handle in handles:
            handle.cancel()
        compacted = threading.Event()
        # Cancels from another thread reach the loop as calls, and the compaction they
        # ask for comes after them: looked at one call later.
        loop.call_soon(loop.call_soon, lambda: compacted.set() if len(loop._timers) < 100 else None)
        assert compacted.wait(5)
    finally:
        loop.stop()


def test_far_timers_do_not_overflow_the_poll_timeout() -> None:
    loop = SocketLoop("test").start()
    try:
        loop.call_later(10**9, print)
        first, second = threading.Event(), threading.Event()
        loop.call_soon(first.set)
        assert first.wait(5)
        # The loop has since polled with the far timer pending; it must still answer.
        loop.call_soon(second.set)
        assert second.wait(5)
        assert loop.running
    finally:
        loop.stop()


def test_recv_message_drops_a_message_of_too_many_frames_and_keeps_the_next() -> None:
    context = zmq.Context()
    a, b = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    try:
        a.bind("inproc://frames")
        b.connect("inproc://frames")
        a.send_multipart([b"x"] * 500)
        a.send_multipart([b"header", b"body"])
        assert b.poll(1000)
        assert recv_message(b, 2) is None
        assert [f.bytes for f in recv_message(b, 2)] == [b"header", b"body"]
    finally:
        a.close(0)
        b.close(0)
        context.term()


def test_free_memory_goes_back_to_the_system() -> None:
    import sys

    from meshnet.memory import release_free_memory

    assert release_free_memory() is sys.platform.startswith("linux")


def test_a_cancelled_timer_lets_go_of_its_arguments_at_once() -> None:
    """A job's timeout timer holds the job (and its payload): once the job ends, the
    payload must not stay alive until the timeout would have fired."""
    import gc
    import weakref

    class Payload:
        pass

    loop = SocketLoop("test").start()
    try:
        payload = Payload()
        alive = weakref.ref(payload)
        handle = loop.call_later(3600, lambda p: None, payload)
        del payload
        handle.cancel()
        gc.collect()
        assert alive() is None
    finally:
        loop.stop()


def test_a_loop_gives_memory_back_after_traffic(monkeypatch) -> None:
    import meshnet.socket_loop as socket_loop

    trimmed = threading.Event()
    monkeypatch.setattr(socket_loop, "release_free_memory", trimmed.set)
    context = zmq.Context()
    loop = SocketLoop("test", trim_after=0.05).start()
    received: list[bytes] = []
    try:
        inbox = context.socket(zmq.PAIR)
        inbox.bind("inproc://trim")
        outbox = context.socket(zmq.PAIR)
        outbox.connect("inproc://trim")
        loop.call_soon(loop.add_reader, inbox, lambda: received.append(inbox.recv()))
        outbox.send(b"8 MiB, say")
        assert trimmed.wait(5)
        assert received == [b"8 MiB, say"]
    finally:
        loop.call_soon(loop.close_socket, inbox)
        loop.stop()
        outbox.close(0)
        context.term()


def test_traffic_that_never_pauses_still_gets_a_trim(monkeypatch) -> None:
    """A relay with many nodes' heartbeats may never be quiet for a whole window; it
    must still give memory back now and then."""
    import time

    import meshnet.socket_loop as socket_loop

    trimmed = threading.Event()
    monkeypatch.setattr(socket_loop, "release_free_memory", trimmed.set)
    context = zmq.Context()
    loop = SocketLoop("test", trim_after=0.02).start()
    inbox = context.socket(zmq.PAIR)
    inbox.bind("inproc://steady")
    loop.call_soon(loop.add_reader, inbox, lambda: inbox.recv())

    def steady_traffic() -> None:  # a message every 5 ms: never a 20 ms pause
        outbox = context.socket(zmq.PAIR)
        outbox.connect("inproc://steady")
        while not trimmed.is_set():
            outbox.send(b"ping")
            time.sleep(0.005)  # the pace of the traffic, not a wait for the loop
        outbox.close(0)

    producer = threading.Thread(target=steady_traffic)
    producer.start()
    try:
        assert trimmed.wait(10)
    finally:
        trimmed.set()
        producer.join()
        loop.call_soon(loop.close_socket, inbox)
        loop.stop()
        context.term()


def test_run_sync_returns_the_result_or_raises_the_error_from_the_loop_thread() -> None:
    loop = SocketLoop("test").start()
    try:
        assert loop.run_sync(lambda a, b: (a + b, loop.in_loop()), 2, 3) == (5, True)
        with pytest.raises(ValueError, match="on the loop"):
            loop.run_sync(lambda: (_ for _ in ()).throw(ValueError("on the loop")))
        assert loop.run_sync(lambda: loop.run_sync(lambda: "nested")) == "nested"  # no deadlock on the loop
    finally:
        loop.stop()


def test_a_loop_writes_a_profile_of_its_thread_when_asked(tmp_path, monkeypatch) -> None:
    import os
    import pstats

    monkeypatch.setenv("MESHNET_PROFILE_DIR", str(tmp_path))
    loop = SocketLoop("profiled").start()

    def marker_of_this_test() -> int:
        return 42

    try:
        assert loop.run_sync(marker_of_this_test) == 42
    finally:
        loop.stop()
    [written] = tmp_path.iterdir()
    assert written.name == f"profiled-{os.getpid()}.prof"
    functions = {name for _, _, name in pstats.Stats(str(written)).stats}
    assert "marker_of_this_test" in functions


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_a_loop_profile_counts_cpu_time_when_asked(tmp_path, monkeypatch, clock: str) -> None:
    import pstats

    monkeypatch.setenv("MESHNET_PROFILE_DIR", str(tmp_path))
    if clock == "cpu":
        monkeypatch.setenv("MESHNET_PROFILE_CLOCK", "cpu")
    loop = SocketLoop("profiled").start()

    def waits_without_cpu() -> None:
        time.sleep(0.3)  # the work profiled: off the CPU, not a synchronisation

    try:
        loop.run_sync(waits_without_cpu)
    finally:
        loop.stop()
    [written] = tmp_path.iterdir()
    [seconds] = [
        row[3] for (_, _, name), row in pstats.Stats(str(written)).stats.items() if name == "waits_without_cpu"
    ]
    if clock == "cpu":
        assert seconds < 0.1
    else:
        assert seconds >= 0.3


def test_turn_end_work_runs_after_everything_the_turn_read_and_before_the_loop_sleeps() -> None:
    """Two messages readable at once: both readers run, then the turn's end once; one
    asked from a timer runs without waiting for another event."""
    loop = SocketLoop("test").start()
    context = zmq.Context()
    order: list[str] = []
    done = threading.Event()
    try:
        # inproc: a send returns with the message in the receiver's queue, so both are
        # there before the loop first reads.
        pull = context.socket(zmq.PULL)
        pull.bind("inproc://turn-end")
        push = context.socket(zmq.PUSH)
        push.connect("inproc://turn-end")
        asked = [False]

        def readable() -> None:
            while True:
                try:
                    order.append(pull.recv(zmq.NOBLOCK).decode())
                except zmq.Again:
                    break
                if not asked[0]:
                    asked[0] = True
                    loop.at_turn_end(lambda: (order.append("end"), asked.__setitem__(0, False)))

        def from_timer() -> None:
            loop.at_turn_end(lambda: (order.append("timer end"), done.set()))

        push.send(b"a")
        push.send(b"b")
        loop.run_sync(loop.add_reader, pull, readable)
        loop.call_soon(lambda: loop.call_later(0.01, from_timer))
        assert done.wait(5), order
        assert order == ["a", "b", "end", "timer end"]
    finally:
        loop.run_sync(loop.remove_reader, pull)
        loop.stop()
        pull.close(0)
        push.close(0)
        context.term()


def test_keyed_timers_replace_a_key_and_fire_each_key_once() -> None:
    loop = SocketLoop("test").start()
    fired: list[str] = []
    done = threading.Event()
    try:

        def on_fire(key: object) -> None:
            fired.append(str(key))
            if key == "last":
                done.set()

        timers = KeyedTimers(loop, on_fire)

        def arm() -> None:
            now = time.monotonic()
            timers.set("a", now + 0.02)
            timers.set("a", now + 0.04)  # replaces the first: "a" fires once
            timers.set("gone", now + 0.01)
            timers.cancel("gone")
            timers.set("b", now + 0.03)
            timers.set("last", now + 0.06)

        loop.run_sync(arm)
        assert done.wait(5)
        assert fired == ["b", "a", "last"]
        done.clear()

        def cancel_then_probe() -> None:
            timers.set("cancelled", time.monotonic() + 0.01)
            timers.cancel_all()
            timers.set("last", time.monotonic() + 0.03)  # fires after "cancelled" would have

        loop.run_sync(cancel_then_probe)
        assert done.wait(5)
        assert fired == ["b", "a", "last", "last"]
    finally:
        loop.stop()
