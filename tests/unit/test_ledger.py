"""Forwarded jobs until each has one terminal status (meshnet.jobs.ledger.ForwardLedger)."""

from __future__ import annotations

import pytest

from meshnet.jobs.ledger import ForwardedJob, ForwardLedger

PEER_A = "peer-a"
PEER_B = "peer-b"


def fjob(n: int, peer: str = PEER_A, deadline: float = 10.0) -> ForwardedJob:
    return ForwardedJob(id=n.to_bytes(16, "big"), peer=peer, deadline=deadline, kind="echo")


@pytest.fixture
def ledger():
    ledger = ForwardLedger()
    assert ledger.add(fjob(1, PEER_A, 10.0))
    assert ledger.add(fjob(2, PEER_B, 5.0))
    assert ledger.add(fjob(3, PEER_A, 20.0))
    return ledger


def test_add_refuses_an_id_already_in_flight(ledger):
    assert not ledger.add(fjob(1, PEER_B, 99.0))
    assert ledger.jobs[fjob(1).id].peer == PEER_A


def test_settle_returns_the_job_once(ledger):
    assert ledger.settle(fjob(1).id, "succeeded") == fjob(1, PEER_A, 10.0)
    assert ledger.settle(fjob(1).id, "failed") is None
    assert ledger.counts == {"succeeded": 1}


def test_settle_with_the_right_peer_settles(ledger):
    assert ledger.settle(fjob(2).id, "refused", peer=PEER_B) is not None
    assert fjob(2).id not in ledger.jobs


def test_settle_with_the_wrong_peer_is_ignored(ledger):
    assert ledger.settle(fjob(1).id, "succeeded", peer=PEER_B) is None
    assert fjob(1).id in ledger.jobs
    assert sum(ledger.counts.values()) == 0


def test_settle_of_an_unknown_job_is_ignored(ledger):
    assert ledger.settle(fjob(7).id, "succeeded") is None
    assert len(ledger.jobs) == 3


def test_expired_returns_overdue_jobs_in_deadline_order_and_counts_timed_out(ledger):
    assert ledger.expired(4.9) == []
    assert [j.id for j in ledger.expired(10.0)] == [fjob(2).id, fjob(1).id]
    assert ledger.counts["timed_out"] == 2
    assert list(ledger.jobs) == [fjob(3).id]


def test_expired_job_cannot_be_settled_again(ledger):
    ledger.expired(5.0)
    assert ledger.settle(fjob(2).id, "succeeded", peer=PEER_B) is None
    assert ledger.counts == {"timed_out": 1}


def test_expired_skips_jobs_already_settled(ledger):
    ledger.settle(fjob(2).id, "succeeded")
    assert [j.id for j in ledger.expired(10.0)] == [fjob(1).id]
    assert ledger.counts == {"succeeded": 1, "timed_out": 1}


def test_jobs_on_a_peer(ledger):
    assert {j.id for j in ledger.jobs_on(PEER_A)} == {fjob(1).id, fjob(3).id}
    assert [j.id for j in ledger.jobs_on(PEER_B)] == [fjob(2).id]
    assert ledger.jobs_on("peer-c") == []


def test_jobs_on_a_peer_drops_settled_jobs(ledger):
    ledger.settle(fjob(1).id, "peer_lost")
    assert [j.id for j in ledger.jobs_on(PEER_A)] == [fjob(3).id]


def test_next_deadline_is_the_earliest_unsettled(ledger):
    assert ledger.next_deadline() == 5.0
    ledger.settle(fjob(2).id, "succeeded")
    assert ledger.next_deadline() == 10.0
    ledger.settle(fjob(1).id, "succeeded")
    assert ledger.next_deadline() == 20.0
    ledger.settle(fjob(3).id, "succeeded")
    assert ledger.next_deadline() is None


def test_next_deadline_of_an_empty_ledger_is_none():
    assert ForwardLedger().next_deadline() is None


def test_stale_deadline_of_a_settled_job_does_not_expire_a_new_job_with_the_same_id():
    ledger = ForwardLedger()
    ledger.add(fjob(1, PEER_A, 10.0))
    ledger.settle(fjob(1).id, "refused")
    ledger.add(fjob(1, PEER_B, 100.0))
    assert ledger.next_deadline() == 100.0
    assert ledger.expired(50.0) == []
