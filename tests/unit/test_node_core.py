"""The node core without sockets: three node cores and a relay core (tests/node_sim.py).

What users rely on: every job a node accepts ends in exactly one true status at its
submitter, and none runs twice, whatever the relay drops, duplicates, re-orders or
forgets, whether punches work, and when direct links break.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshnet.identity import Sealer
from meshnet.jobs.model import JobSpec
from meshnet.natcheck import NatReport
from meshnet.node.core import DISPLACED, PEERS_QUERY_TIMEOUT, NetworkChecked, NodeCore
from meshnet.node.effects import (
    AnswerJob,
    CloseRelay,
    FlushSoon,
    Log,
    OpenRelay,
    PeersAnswered,
    PingAnswered,
    SendRelay,
    SetTimer,
)
from meshnet.protocol import NODE_TO_RELAY, Error, Ping, Pong, Registered, Send, Unroutable, decode, encode
from meshnet.protocol.batch import is_batch, split_batch
from tests.node_sim import Chaos, NodeSimulation

NAMES = ("A", "B", "C")
PAIRS = [(a, b) for a in NAMES for b in NAMES if a != b]


def _ids() -> itertools.count[int]:
    return itertools.count(1)


def assert_true_ends(sim: NodeSimulation) -> None:
    """Each job settled once; none ran twice; a success ran at its target and carries
    its result; a job that never ran did not succeed; a refused one never ran."""
    for job_id, (_, to) in sim.submitted.items():
        outcomes = sim.settled.get(job_id, [])
        assert len(outcomes) == 1, (job_id, outcomes)
        runs = sim.executed[to, job_id]
        assert runs <= 1, (job_id, runs)
        if outcomes[0].status == "succeeded":
            assert runs == 1 and outcomes[0].result == b"done:" + job_id, (job_id, outcomes[0])
        elif outcomes[0].status == "refused":  # refused: it never started
            assert runs == 0, (job_id, outcomes[0])
    for (node, job_id), runs in sim.executed.items():
        assert sim.submitted[job_id][1] == node and runs == 1, (node, job_id, runs)
    assert not sim.bad_dials, sim.bad_dials


def submit_all_pairs(sim: NodeSimulation, count: int, start: float, spread: float) -> None:
    ids = _ids()
    for n in range(count):
        at, to = PAIRS[n % len(PAIRS)]
        job_id = b"job-%012d" % next(ids)
        sim.at(start + spread * n / count, sim.submit, at, to, job_id)


def test_on_a_quiet_network_every_job_succeeds_and_pairs_go_direct() -> None:
    sim = NodeSimulation(random.Random(1))
    submit_all_pairs(sim, 60, start=3.0, spread=20.0)
    sim.run(120.0)
    assert_true_ends(sim)
    assert Counter(o[0].status for o in sim.settled.values()) == {"succeeded": 60}
    assert len(sim.links) == 3  # every pair ended on a direct link
    direct = sum(node.core.boxes_sent["direct"] for node in sim.nodes.values())
    assert direct > 0
    assert not [log for log in sim.logs if log[2].level == "error"]


def test_failed_punches_renew_the_relay_port_and_jobs_still_succeed_relayed() -> None:
    sim = NodeSimulation(random.Random(2), direct_works=lambda a, b: False)
    submit_all_pairs(sim, 30, start=3.0, spread=30.0)
    sim.run(150.0)
    assert_true_ends(sim)
    assert Counter(o[0].status for o in sim.settled.values()) == {"succeeded": 30}
    assert sim.port_renewals >= 1 and not sim.links
    # A renewed port is the one the relay then observes.
    for node in sim.nodes.values():
        assert node.core.link.observed == node.observed()


def test_a_relay_restart_delays_jobs_and_ends_each_once() -> None:
    sim = NodeSimulation(random.Random(3), direct_works=lambda a, b: False)
    submit_all_pairs(sim, 60, start=3.0, spread=10.0)
    sim.at(6.0, sim.kill_relay, 2.0)
    sim.at(11.0, sim.kill_relay, 0.5)
    sim.run(200.0)
    assert_true_ends(sim)
    assert Counter(o[0].status for o in sim.settled.values()) == {"succeeded": 60}


def test_a_cut_direct_link_falls_back_to_the_relay_without_losing_jobs() -> None:
    sim = NodeSimulation(random.Random(4))
    submit_all_pairs(sim, 90, start=3.0, spread=30.0)
    for t in (12.0, 18.0, 25.0):
        sim.at(t, sim.cut_link, "A", "B")
        sim.at(t + 0.5, sim.cut_link, "B", "C")
    sim.run(200.0)
    assert_true_ends(sim)
    assert Counter(o[0].status for o in sim.settled.values()) == {"succeeded": 90}
    assert sim.links_up > 3  # links came up again after the cuts


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    drop=st.sampled_from([0.0, 0.05, 0.3]),
    duplicate=st.sampled_from([0.0, 0.1, 0.3]),
    reorder=st.sampled_from([0.0, 0.05, 1.0]),
    direct=st.sets(st.sampled_from([frozenset(p) for p in PAIRS])),
    restarts=st.lists(st.tuples(st.floats(3.0, 60.0), st.floats(0.05, 8.0)), max_size=3),
    cuts=st.lists(st.tuples(st.floats(3.0, 60.0), st.sampled_from(PAIRS)), max_size=4),
    jobs=st.lists(st.tuples(st.sampled_from(PAIRS), st.floats(0.5, 60.0)), min_size=1, max_size=40),
)
def test_every_job_ends_once_and_truly_whatever_the_relay_and_links_do(
    seed: int,
    drop: float,
    duplicate: float,
    reorder: float,
    direct: set[frozenset[str]],
    restarts: list[tuple[float, float]],
    cuts: list[tuple[float, tuple[str, str]]],
    jobs: list[tuple[tuple[str, str], float]],
) -> None:
    chaos = Chaos(drop=drop, duplicate=duplicate, reorder=reorder)
    sim = NodeSimulation(random.Random(seed), chaos=chaos, direct_works=lambda a, b: frozenset((a, b)) in direct)
    for when, down_for in restarts:
        sim.at(when, sim.kill_relay, down_for)
    for when, (a, b) in cuts:
        sim.at(when, sim.cut_link, a, b)
    for n, ((at, to), when) in enumerate(jobs):
        sim.at(when, sim.submit, at, to, b"job-%012d" % n, 60.0)
    sim.run(400.0)  # past every job's timeout and its grace
    assert_true_ends(sim)
    if drop == 0.0 and not restarts:
        assert {o[0].status for o in sim.settled.values()} == {"succeeded"}


# -- one node core, driven by hand --


def _core(**overrides: object) -> NodeCore:
    sim = NodeSimulation(random.Random(9), names=("A",))
    node = sim.nodes["A"]
    return NodeCore(
        peer_id=node.identity.peer_id,
        relay_peer_id=sim.relay_identity.peer_id,
        endpoint="tcp://198.51.100.1:9000",
        sealer=node.core.sealer,
        heartbeat=1.0,
        liveness=3,
        backoff_min=0.2,
        backoff_max=2.0,
        max_payload=1 << 16,
        capabilities={},
        listen=[],
        free_port=iter(range(50000, 60000)).__next__,
        **overrides,  # type: ignore[arg-type]
    )


def _registered(core: NodeCore, now: float, observed: str = "203.0.113.9:50000") -> list[object]:
    frames = encode(Registered(peer_id=core.peer_id, observed=observed, heartbeat=1.0, max_body=1 << 20))
    return core.on_relay_frames(core.generation, [bytes(f) for f in frames], now)


def test_start_opens_one_connection_from_a_fresh_port_and_registers() -> None:
    core = _core(direct_links=False)
    effects = core.start(0.0)
    opens = [e for e in effects if isinstance(e, OpenRelay)]
    assert opens == [OpenRelay(1, 50000)]
    assert [e for e in effects if isinstance(e, SendRelay)][0].frames[0][:20]  # the register
    assert any(isinstance(e, SetTimer) and e.key == "tick" for e in effects)


def test_many_not_registered_answers_draw_one_register() -> None:
    core = _core(direct_links=False)
    core.start(0.0)
    _registered(core, 0.1)
    sent = []
    for n in range(20):
        frames = encode(Error(code="not_registered", message="register first"))
        sent += [
            e for e in core.on_relay_frames(1, [bytes(f) for f in frames], 1.0 + n / 1000) if isinstance(e, SendRelay)
        ]
    assert len(sent) == 1  # one register answers them all


def test_a_twin_identity_displaces_the_node_which_ends_its_jobs_and_stays_off() -> None:
    sim = NodeSimulation(random.Random(5), direct_works=lambda a, b: False, work_time=(5.0, 5.0))
    sim.at(3.0, sim.submit, "A", "B", b"job-000000000001")
    sim.run(3.5)
    node = sim.nodes["A"]
    frames = encode(Error(code="replaced", message="another connection registered as you"))
    effects = node.core.on_relay_frames(node.core.generation, [bytes(f) for f in frames], sim.now)
    answered = [e for e in effects if isinstance(e, AnswerJob)]
    assert [(a.outcome.status, a.outcome.message) for a in answered] == [("cancelled", DISPLACED)]
    assert [e for e in effects if isinstance(e, Log) and e.event == "identity_in_use"]
    later = node.core.submit([(answered[0].job, sim.nodes["B"].identity.peer_id)], sim.now + 1)
    assert [e.outcome.reason for e in later if isinstance(e, AnswerJob)] == ["no_relay"]


def test_a_peers_query_the_relay_never_answers_is_answered_after_its_timeout() -> None:
    core = _core(direct_links=False)
    core.start(0.0)
    _registered(core, 0.1)
    asked = object()
    core.query_peers(asked, 0.2)
    replies = []
    for second in range(1, int(PEERS_QUERY_TIMEOUT) + 2):  # the relay answers heartbeats, not the query
        pong = encode(Pong(seq=core.link._ping_seq))
        core.on_relay_frames(1, [bytes(f) for f in pong], second - 0.5)
        replies += [e for e in core.on_timer("tick", float(second)) if isinstance(e, PeersAnswered)]
    assert len(replies) == 1 and replies[0].request is asked and replies[0].peers is None
    assert "did not answer" in replies[0].error


def test_a_ping_with_no_answer_times_out_with_one_reply() -> None:
    sim = NodeSimulation(random.Random(6), direct_works=lambda a, b: False)
    sim.run(3.0)
    node, other = sim.nodes["A"], sim.nodes["B"]
    sim.kill_relay(100.0)
    asked = object()
    sim._drive(node, node.core.ping(other.identity.peer_id, 2.0, asked, sim.now))
    sim.run(10.0)
    answers = [a for a in sim.replies if isinstance(a, PingAnswered) and a.request is asked]
    assert len(answers) == 1 and answers[0].code in ("timed_out", "unavailable")


def test_a_network_change_is_checked_again_before_anything_is_offered() -> None:
    core = _core()
    core.start(0.0)
    _registered(core, 0.1, "203.0.113.9:50000")
    report = NatReport("port_restricted", "203.0.113.9:3478", "", "stun", True, 0.1)
    core.on_listening(7000, "", 0.2)
    core.on_network_checked(NetworkChecked("10.0.0.2", report), 0.3)
    assert core.punch.final and core.punch.mine.listen == "203.0.113.9:7000"
    frames = encode(Error(code="not_registered", message="x"))
    core.on_relay_frames(1, [bytes(f) for f in frames], 1.0)
    effects = _registered(core, 1.1, "198.51.100.77:50000")
    assert [e for e in effects if isinstance(e, Log) and e.event == "network_changed"]
    assert not core.punch.final  # nothing is offered on what the old network said


# -- batches --


def _open_session(sim: NodeSimulation) -> None:
    """A and B exchange hellos (through one job), and the relay path carries them."""
    sim.at(3.0, sim.submit, "A", "B", b"job-000000000000")
    sim.run(5.0)
    assert sim.settled[b"job-000000000000"][0].status == "succeeded"


def _twenty_jobs(sim: NodeSimulation) -> list[tuple[JobSpec, str]]:
    peer = sim.nodes["B"].identity.peer_id
    jobs = []
    for n in range(1, 21):
        job_id = b"job-%012d" % n
        sim.submitted[job_id] = ("A", "B")
        jobs.append((JobSpec(id=job_id, kind="echo", payload=b"x", timeout=30.0, origin="client:sim"), peer))
    return jobs


def test_a_turns_jobs_for_one_peer_leave_as_one_sealed_batch() -> None:
    sim = NodeSimulation(random.Random(7), direct_works=lambda a, b: False)
    _open_session(sim)
    node = sim.nodes["A"]
    effects = node.core.submit(_twenty_jobs(sim), sim.now)
    assert not [e for e in effects if isinstance(e, SendRelay)]  # gathered until the turn ends
    assert [e for e in effects if isinstance(e, FlushSoon)] == [FlushSoon()]
    flushed = node.core.flush(sim.now)
    [send] = [e for e in flushed if isinstance(e, SendRelay)]
    message = decode(send.frames, NODE_TO_RELAY, max_body=1 << 20)
    assert isinstance(message, Send)
    plaintext = Sealer(sim.nodes["B"].identity).open(node.identity.peer_id, message.body)
    assert is_batch(plaintext) and len(split_batch(plaintext)) == 20
    sim._drive(node, effects + flushed)
    sim.run(30.0)
    assert_true_ends(sim)
    assert {o[0].status for o in sim.settled.values()} == {"succeeded"}


def test_a_peer_that_reads_no_batches_gets_one_message_per_box() -> None:
    sim = NodeSimulation(random.Random(8), direct_works=lambda a, b: False)
    sim.nodes["B"].core.sessions.batch = None  # an older node: its hellos carry no batch
    _open_session(sim)
    node = sim.nodes["A"]
    effects = node.core.submit(_twenty_jobs(sim), sim.now)
    assert len([e for e in effects if isinstance(e, SendRelay)]) == 20
    assert not [e for e in effects if isinstance(e, FlushSoon)]
    sim._drive(node, effects)
    sim.run(30.0)
    assert_true_ends(sim)
    assert {o[0].status for o in sim.settled.values()} == {"succeeded"}


def test_a_bounced_batch_is_a_bounce_of_each_of_its_messages() -> None:
    sim = NodeSimulation(random.Random(9), direct_works=lambda a, b: False)
    _open_session(sim)
    node = sim.nodes["A"]
    node.core.submit(_twenty_jobs(sim), sim.now)
    [send] = [e for e in node.core.flush(sim.now) if isinstance(e, SendRelay)]
    message = decode(send.frames, NODE_TO_RELAY, max_body=1 << 20)
    assert isinstance(message, Send)
    bounce = Unroutable(to=message.to, ref=message.ref, op="sealed", reason="relay_busy", message="full")
    node.core.on_relay_frames(node.core.generation, [bytes(f) for f in encode(bounce)], sim.now)
    bounced = [job for job in node.core.sessions.sent.values() if job.bounced == "relay_busy"]
    assert len(bounced) == 20


def test_a_stopping_node_sends_what_its_last_turn_gathered_before_it_closes_the_link() -> None:
    sim = NodeSimulation(random.Random(10), direct_works=lambda a, b: False)
    _open_session(sim)
    node = sim.nodes["A"]
    node.core.submit(_twenty_jobs(sim), sim.now)  # gathered; the turn has not ended
    effects = node.core.stop(sim.now)
    kinds = [type(e).__name__ for e in effects if isinstance(e, (SendRelay, CloseRelay))]
    assert kinds[-1] == "CloseRelay" and "SendRelay" in kinds[:-1]
    assert len([e for e in effects if isinstance(e, AnswerJob)]) == 20  # each job still ends once


def test_each_heartbeat_tells_the_relay_the_load_now_and_the_last_round_trip() -> None:
    loads = iter([{"busy": 0, "free": 2, "queued": 0}, {"busy": 2, "free": 0, "queued": 7}])
    core = _core(direct_links=False, load=lambda: next(loads))
    core.start(0.0)
    _registered(core, 0.1)

    def heartbeat(now: float) -> Ping:
        sent = [e for e in core.on_timer("tick", now) if isinstance(e, SendRelay)]
        pings = [m for m in (decode(e.frames, NODE_TO_RELAY, max_body=1 << 20) for e in sent) if isinstance(m, Ping)]
        assert len(pings) == 1
        return pings[0]

    first = heartbeat(1.2)
    assert first.load == {"busy": 0, "free": 2, "queued": 0}
    assert first.rtt is None  # none answered yet
    core.on_relay_frames(core.generation, [bytes(f) for f in encode(Pong(seq=first.seq))], 1.25)
    second = heartbeat(2.4)
    assert second.load == {"busy": 2, "free": 0, "queued": 7}
    assert second.rtt == pytest.approx(0.05)
