"""Placement without sockets: here while an executor is free, else the least loaded device
that meets the requirements; retries elsewhere for refusals that say the job never ran;
``no_device`` naming what nothing meets (meshnet.placement)."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from meshnet.jobs.model import Outcome
from meshnet.placement import (
    CANDIDATES_TTL,
    HERE,
    LeastLoaded,
    Local,
    Placement,
    PlacementPolicy,
    Refuse,
    There,
    Wait,
)

ECHO = {"kinds": ["echo"]}
FREE_HERE = Local(None, 2, 0)
BUSY_HERE = Local(None, 2, 2)


def peer(name: str, *, executors: int = 2, busy: int = 0, queued: int = 0, rtt: float = 0.01, path: str = "relayed"):
    return {
        "peer_id": name,
        "caps": {"executors": executors, "kinds": ["echo"]},
        "load": {"busy": busy, "free": max(0, executors - busy), "queued": queued},
        "rtt": rtt,
        "path": path,
    }


def listed(placement: Placement, peers, here=BUSY_HERE, requires=ECHO, now=0.0, job=b"first"):
    """Have ``placement`` wait for a list for ``requires``, then give it ``peers``."""
    decision = placement.place(job, requires, here, now)
    assert isinstance(decision, Wait) and decision.ask == requires
    return placement.on_candidates(requires, peers, None, here, now, self_id="me")


def test_a_free_executor_here_takes_the_job_without_asking_anyone() -> None:
    assert Placement().place(b"j", ECHO, FREE_HERE, 0.0) is HERE


def test_jobs_wait_for_one_list_per_set_of_requirements_and_it_is_kept_a_while() -> None:
    placement = Placement()
    assert placement.place(b"a", ECHO, BUSY_HERE, 0.0) == Wait(ECHO)
    assert placement.place(b"b", ECHO, BUSY_HERE, 0.0) == Wait(None)  # asked already
    gpu = {"kinds": ["echo"], "gpus": 1}
    assert placement.place(b"c", gpu, BUSY_HERE, 0.0) == Wait(gpu)  # another list
    decided = placement.on_candidates(ECHO, [peer("p1", executors=8)], None, BUSY_HERE, 0.1)
    assert [job for job, _ in decided] == [b"a", b"b"]
    assert all(isinstance(d, There) for _, d in decided)
    assert isinstance(placement.place(b"d", ECHO, BUSY_HERE, 0.1 + CANDIDATES_TTL / 2), There)  # the list serves
    assert placement.place(b"e", ECHO, BUSY_HERE, 0.2 + CANDIDATES_TTL) == Wait(ECHO)  # stale: asked again


def test_the_least_loaded_device_wins_and_this_nodes_own_jobs_there_count() -> None:
    placement = Placement()
    decided = listed(placement, [peer("p1", busy=2, queued=2), peer("p2", busy=1), peer("p3", executors=8, busy=4)])
    assert decided == [(b"first", There("p2"))]  # 1 of 2 busy = p3's 4 of 8: the peer id decides
    picks = Counter()
    for n in range(6):
        decision = placement.place(bytes([n]), ECHO, BUSY_HERE, 0.1)
        picks[decision.peer if isinstance(decision, There) else "here"] += 1
    # p3 has the most room (8 executors) and takes jobs until it is as loaded as the
    # rest (1 job per executor), then this node does (it wins ties); p1, over full, none.
    assert picks == Counter({"p3": 4, "here": 2})


def test_a_direct_path_then_a_shorter_round_trip_break_ties() -> None:
    placement = Placement()
    peers = [peer("pa", rtt=0.001), peer("pb", rtt=0.05, path="direct"), peer("pc", rtt=0.0005)]
    assert listed(placement, peers) == [(b"first", There("pb"))]
    placement = Placement()
    assert listed(placement, [peer("pa", rtt=0.001), peer("pc", rtt=0.0005)]) == [(b"first", There("pc"))]


def test_this_node_queues_the_job_when_it_is_no_more_loaded_than_any_other() -> None:
    placement = Placement()
    assert listed(placement, [peer("p1", busy=2, queued=1)], here=Local(None, 2, 2)) == [(b"first", HERE)]
    assert listed(Placement(), [peer("p1", busy=2, queued=3)], here=Local(None, 2, 3)) == [(b"first", HERE)]


def test_a_device_that_does_not_meet_the_requirements_here_sends_it_away_or_refuses_no_device() -> None:
    lacking = Local("gpus >= 1", 2, 0)
    placement = Placement()
    gpu = {"kinds": ["echo"], "gpus": 1}
    assert placement.place(b"j", gpu, lacking, 0.0) == Wait(gpu)
    [(_, decision)] = placement.on_candidates(gpu, [], "no device has gpus >= 1", lacking, 0.0)
    assert decision == Refuse("no_device", "no device meets kinds include echo, gpus >= 1: no device has gpus >= 1")
    assert decision.outcome().status == "refused" and decision.outcome().reason == "no_device"
    [(_, decision)] = Placement().on_candidates(gpu, [peer("gpu-box")], None, lacking, 0.0) or [(b"", None)]
    assert decision is None  # nothing waited: nothing decided
    placement = Placement()
    placement.place(b"j", gpu, lacking, 0.0)
    assert placement.on_candidates(gpu, [peer("gpu-box", busy=2, queued=9)], None, lacking, 0.0) == [
        (b"j", There("gpu-box"))
    ]


def test_a_relay_that_cannot_be_asked_leaves_the_job_here_when_this_node_can_run_it() -> None:
    placement = Placement()
    placement.place(b"j", ECHO, BUSY_HERE, 0.0)
    assert placement.on_candidates(ECHO, None, None, BUSY_HERE, 0.0) == [(b"j", HERE)]
    placement = Placement()
    lacking = Local("gpus >= 1", 2, 0)
    placement.place(b"j", {"gpus": 1}, lacking, 0.0)
    [(_, refused)] = placement.on_candidates({"gpus": 1}, None, "not connected to the relay", lacking, 0.0)
    assert (
        isinstance(refused, Refuse) and refused.reason == "no_device" and "not connected to the relay" in refused.text
    )


def test_a_job_refused_without_running_goes_elsewhere_a_bounded_number_of_times() -> None:
    placement = Placement(max_attempts=3)
    peers = [peer(f"p{n}") for n in range(5)]
    [(job, first)] = listed(placement, peers)
    assert isinstance(first, There)
    busy = Outcome.refused("busy", "all executors are busy")
    tried = [first.peer]
    for _ in range(2):
        retry = placement.ended(job, tried[-1], busy, BUSY_HERE, 0.1)
        assert isinstance(retry, There) and retry.peer not in tried
        tried.append(retry.peer)
    assert placement.ended(job, tried[-1], busy, BUSY_HERE, 0.1) is None  # three devices tried: its answer
    assert placement.placed == {} and placement.outstanding == {}


def test_an_end_that_may_have_run_or_that_ran_is_the_answer() -> None:
    for outcome in (
        Outcome("succeeded", result=b"\xf6"),
        Outcome("failed", error_type="ValueError", message="bad"),
        Outcome("peer_lost", error_type="PeerLost", message="gone"),
        Outcome.refused("too_large", "too big there"),
    ):
        placement = Placement()
        [(job, first)] = listed(placement, [peer("p1"), peer("p2")])
        assert isinstance(first, There)
        assert placement.ended(job, first.peer, outcome, BUSY_HERE, 0.1) is None


def test_a_retry_may_come_back_here() -> None:
    placement = Placement()
    [(job, first)] = listed(placement, [peer("p1")], here=Local(None, 2, 3))
    assert first == There("p1")
    assert placement.ended(job, "p1", Outcome.refused("busy", "full"), FREE_HERE, 0.1) is HERE


class Always(PlacementPolicy):
    def choose(self, here, devices):
        return There(max(d.peer_id for d in devices)) if devices else None


def test_a_policy_can_be_swapped_in() -> None:
    placement = Placement(Always())
    assert listed(placement, [peer("a"), peer("z", busy=2, queued=50)]) == [(b"first", There("z"))]
    assert isinstance(LeastLoaded(), PlacementPolicy)


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 8), st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=6),
    st.lists(st.sampled_from(["succeeded", "busy", "unknown_kind", "peer_lost", "failed"]), max_size=40),
)
def test_every_placed_job_ends_once_on_devices_it_was_never_refused_by(devices, ends) -> None:
    peers = [peer(f"p{n}", executors=e, busy=min(b, e), queued=q) for n, (e, b, q) in enumerate(devices)]
    placement = Placement(max_attempts=3)
    decisions = dict(listed(placement, peers))
    for n in range(len(ends)):
        decisions[bytes([n, 1])] = placement.place(bytes([n, 1]), ECHO, BUSY_HERE, 0.1)
    answered: Counter[bytes] = Counter()
    refused_by: dict[bytes, set[str]] = {}
    queue = [(job, d) for job, d in decisions.items()]
    ends = list(ends)
    while queue:
        job, decision = queue.pop()
        if not isinstance(decision, There):
            answered[job] += 1  # here, or refused: this node answers it
            continue
        assert decision.peer not in refused_by.get(job, set())
        status = ends.pop() if ends else "succeeded"
        outcome = Outcome.refused(status, "no") if status in ("busy", "unknown_kind") else Outcome(status)
        retry = placement.ended(job, decision.peer, outcome, BUSY_HERE, 0.2)
        if retry is None:
            answered[job] += 1
        else:
            refused_by.setdefault(job, set()).add(decision.peer)
            assert len(refused_by[job]) < 3
            queue.append((job, retry))
    assert set(answered) == set(decisions) and set(answered.values()) == {1}
    assert placement.placed == {} and placement.outstanding == {}
