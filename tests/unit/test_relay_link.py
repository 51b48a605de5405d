"""A node's link to its relay: register, heartbeat, loss, back-off (meshnet.relay_link)."""

from __future__ import annotations

import random

import pytest

from meshnet.relay_link import REGISTERING_PATIENCE, LinkState, RelayLink

SEED = 1234


def link(**overrides) -> RelayLink:
    options = {"heartbeat": 1.0, "liveness": 3, "backoff_min": 0.1, "backoff_max": 5.0, "rng": random.Random(SEED)}
    return RelayLink(**{**options, **overrides})


def test_disconnected_link_never_acts():
    relay = link()
    assert relay.state is LinkState.DISCONNECTED
    assert relay.on_tick(0.0) is None
    assert relay.on_tick(1000.0) is None


def test_connecting_link_waits_for_registration_without_pinging():
    relay = link()
    relay.connecting(100.0)
    assert relay.state is LinkState.REGISTERING and not relay.registered
    assert relay.on_tick(100.5) is None
    # Registering, a node waits REGISTERING_PATIENCE liveness windows: a relay that has
    # just restarted is busy with every node's handshake, and starting over adds to it.
    assert relay.on_tick(103.5) is None
    assert relay.on_tick(100.0 + 3.0 * REGISTERING_PATIENCE) is None  # exactly: not yet lost


def test_connecting_link_is_lost_when_registration_never_comes():
    relay = link()
    relay.connecting(100.0)
    assert relay.on_tick(100.01 + 3.0 * REGISTERING_PATIENCE) == "lost"


def test_registered_link_pings_on_each_tick():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("1.2.3.4:5", 1.0, now=0.2)
    assert relay.registered
    assert relay.observed == "1.2.3.4:5"
    assert relay.on_tick(1.2) == "ping"
    assert relay.on_tick(3.2) == "ping"


def test_registered_link_is_lost_after_liveness_beats_of_silence():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("a", 1.0, now=0.0)
    assert relay.on_tick(3.0) == "ping"
    assert relay.on_tick(3.001) == "lost"


def test_hearing_from_the_relay_keeps_the_link_alive():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("a", 1.0, now=0.0)
    for t in (2.5, 5.0, 7.5, 10.0):
        relay.on_heard(t)
        assert relay.on_tick(t + 2.9) == "ping"
    assert relay.on_tick(13.1) == "lost"


def test_registration_adopts_the_relays_heartbeat():
    relay = link(heartbeat=1.0, liveness=3)
    relay.connecting(0.0)
    relay.on_registered("a", 4.0, now=0.0)
    assert relay.heartbeat == 4.0
    assert relay.on_tick(11.9) == "ping"
    assert relay.on_tick(12.1) == "lost"


def test_on_lost_disconnects():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("a", 1.0, now=0.0)
    relay.on_lost()
    assert relay.state is LinkState.DISCONNECTED and not relay.registered
    assert relay.on_tick(100.0) is None


def test_backoff_grows_exponentially_with_jitter_and_is_capped():
    relay = link(backoff_min=0.1, backoff_max=5.0, rng=random.Random(SEED))
    expected_rng = random.Random(SEED)
    for failures in range(12):
        nominal = min(5.0, 0.1 * 2**failures)
        delay = relay.on_lost()
        assert 0.5 * nominal <= delay <= nominal
        assert delay == pytest.approx(nominal * expected_rng.uniform(0.5, 1.0))
    assert relay.failures == 12


def test_backoff_nominal_doubles_until_the_cap():
    # an rng whose uniform() always returns its upper bound exposes the nominal delay
    class Top(random.Random):
        def uniform(self, a, b):
            return b

    relay = link(backoff_min=0.25, backoff_max=3.0, rng=Top())
    assert [relay.on_lost() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 3.0, 3.0]


def test_same_seed_gives_the_same_delays_and_other_seeds_differ():
    def delays(seed):
        relay = link(rng=random.Random(seed))
        return [relay.on_lost() for _ in range(5)]

    assert delays(7) == delays(7)
    assert delays(7) != delays(8)


def test_failures_reset_after_registration():
    relay = link(backoff_min=0.1, backoff_max=5.0)
    for _ in range(6):
        relay.connecting(0.0)
        relay.on_lost()
    assert relay.failures == 6
    relay.connecting(0.0)
    relay.on_registered("a", 1.0, now=0.0)
    assert relay.failures == 0
    assert relay.on_lost() <= 0.1


def test_connecting_counts_connection_attempts():
    relay = link()
    relay.connecting(0.0)
    relay.on_lost()
    relay.connecting(1.0)
    assert relay.connects == 2


def test_backoff_stays_capped_after_very_many_failures():
    relay = link(backoff_min=0.1, backoff_max=5.0)
    for _ in range(1100):
        assert relay.on_lost() <= 5.0


def test_relay_forgetting_us_draws_one_register_for_many_answers():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("1.2.3.4:5", 1.0, 0.0)
    # The relay restarted: each queued message is answered "not_registered".
    answers = [relay.on_not_registered(10.0 + i * 0.0002) for i in range(36)]
    assert answers == [True] + [False] * 35
    assert relay.state is LinkState.REGISTERING and not relay.registered
    relay.on_registered("1.2.3.4:5", 1.0, 10.1)
    assert relay.on_not_registered(20.0)  # a later episode registers again


def test_an_unanswered_register_after_not_registered_ends_in_a_loss():
    relay = link()
    relay.connecting(0.0)
    relay.on_registered("", 1.0, 0.0)
    assert relay.on_not_registered(10.0)
    assert relay.on_tick(12.0) is None  # registering: no pings
    assert relay.on_tick(10.0 + 3.0 * REGISTERING_PATIENCE + 0.5) == "lost"  # never answered: afresh
