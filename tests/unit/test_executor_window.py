"""The executor's window and back-off without a node (meshnet.executor.BusyWindow,
busy_backoff): what a burst of busy refusals does to the window, and how it grows back."""

from __future__ import annotations

import random

import pytest

from meshnet.executor import BACKOFF_BASE, BACKOFF_CAP, BusyWindow, busy_backoff


def test_a_burst_of_refusals_cuts_the_window_once() -> None:
    window = BusyWindow(200)
    assert window.admits(199) and not window.admits(200)
    epoch = window.cuts  # 200 jobs sent in this epoch; the node had room for 66
    assert window.on_busy(epoch, in_flight=200) is True
    assert window.size == 100
    # The other 133 refusals of the same burst say nothing new.
    assert not any(window.on_busy(epoch, in_flight=199 - n) for n in range(133))
    assert window.size == 100 and window.cuts == 1
    # A job sent after the cut and refused too: the node is still full, cut again.
    assert window.on_busy(window.cuts, in_flight=80) is True
    assert window.size == 40


def test_a_cut_halves_what_was_at_the_node_not_an_unused_window() -> None:
    window = BusyWindow(200)
    assert window.on_busy(0, in_flight=10) is True  # others filled the node; we had 10 there
    assert window.size == 5


def test_the_window_never_closes() -> None:
    window = BusyWindow(4)
    for _ in range(10):
        window.on_busy(window.cuts, in_flight=1)
    assert window.size == 1 and window.admits(0) and not window.admits(1)


def test_answers_grow_the_window_by_one_per_window_up_to_its_limit() -> None:
    window = BusyWindow(64)
    window.on_busy(0, in_flight=64)
    assert window.size == 32
    for _ in range(32):
        window.on_taken()
    assert 32.9 < window.size < 33.1  # one more job after a window's worth of answers
    for _ in range(10_000):
        window.on_taken()
    assert window.size == 64


def test_max_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        BusyWindow(0)


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    rng = random.Random(1)
    for retry in range(40):
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2**retry)
        delays = [busy_backoff(retry, rng) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), retry
        assert len(set(delays)) == len(delays)  # jittered: a burst comes back spread out
    assert busy_backoff(10**6, rng) <= BACKOFF_CAP
