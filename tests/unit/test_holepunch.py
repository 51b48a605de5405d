"""The hole-punch coordinator (meshnet.holepunch) between two nodes, driven by hand: its
punch messages carried through the node-to-node codec, the clock set by the test."""

from __future__ import annotations

from meshnet.holepunch import (
    ANSWER_TIMEOUT,
    DIAL_BURST,
    DIAL_RATE,
    MAX_ATTEMPTS,
    PUNCH_TIMEOUT,
    RESTART_DELAY,
    RETRY_BACKOFF,
    RETRY_LATER,
    REUPGRADE_AFTER,
    Abandon,
    AskRelay,
    Candidates,
    Dial,
    Expect,
    PathChange,
    PunchCoordinator,
    PunchEvent,
    PunchNotice,
    RenewPort,
    SendPunch,
)
from meshnet.protocol import NODE_TO_NODE, decode_inner, encode_inner
from meshnet.protocol.messages import Punch

A, B = "z6MkA", "z6MkB"  # A < B: A is the CurveZMQ server, and wins a crossing
A_AT, B_AT = "198.51.100.11:40001", "198.51.100.12:40002"


def pair(nat_a: str | None = "port_restricted", nat_b: str | None = "port_restricted", b_at: str = B_AT):
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a.set_candidates(Candidates(A_AT, nat_a), 0.0)
    b.set_candidates(Candidates(b_at, nat_b), 0.0)
    return {A: a, B: b}


def carry(
    nodes: dict, sender: str, events: list[PunchEvent], now: float, seen: dict[str, str] | None = None
) -> dict[str, list[PunchEvent]]:
    """Punch messages among ``events`` delivered (through the codec), the relay's answers
    to what the nodes ask it, and all that follows."""
    log: dict[str, list[PunchEvent]] = {A: [], B: []}
    log[sender] += events
    queue = [(sender, e) for e in events]
    while queue:
        source, event = queue.pop(0)
        if isinstance(event, AskRelay):
            # The relay's answer: where it sees the peer (``seen``; else where the peer says).
            where = (seen or {}).get(event.peer, nodes[event.peer].mine.observed)
            out = nodes[source].on_vouched(event.peer, where, now)
            log[source] += out
            queue += [(source, e) for e in out]
        elif isinstance(event, SendPunch):
            target = event.peer
            wire = decode_inner(encode_inner(event.message), NODE_TO_NODE, max_size=4096)
            assert isinstance(wire, Punch)
            out = nodes[target].on_punch(source, wire, now)
            log[target] += out
            queue += [(target, e) for e in out]
    return log


def of(events: list[PunchEvent], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def test_a_punch_dials_both_sides_at_each_others_observed_address_with_one_curve_server() -> None:
    nodes = pair()
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)  # the relayed round trip: 40 ms
    [b_dial] = of(log[B], Dial)  # B dials as the sync arrives
    assert (b_dial.remote, b_dial.curve_server) == (A_AT, False)
    assert of(log[A], Dial) == []  # A waits half the round trip
    assert nodes[A].next_deadline() == 0.04 + 0.02
    [a_dial] = of(nodes[A].on_tick(0.06), Dial)
    assert (a_dial.remote, a_dial.curve_server, a_dial.attempt) == (B_AT, True, b_dial.attempt)
    up = nodes[A].on_link_up(B, a_dial.attempt, 0.065)
    assert of(up, PathChange) == [PathChange(B, True, "hole punched")]
    [notice] = of(up, PunchNotice)
    assert notice.event == "direct_link_up" and notice.fields["ms_since_decided"] == 65.0
    assert nodes[A].is_direct(B) and nodes[A].link(B) == "direct" and not nodes[B].is_direct(A)
    assert of(nodes[B].on_link_up(A, b_dial.attempt, 0.066), PathChange) == [PathChange(A, True, "hole punched")]


def test_pairs_that_cannot_be_punched_are_not_tried_and_both_sides_say_why() -> None:
    for nat_a, nat_b in (
        ("symmetric", "symmetric"),
        ("symmetric", "port_restricted"),
        ("port_restricted", "symmetric"),
    ):
        nodes = pair(nat_a, nat_b)
        log = carry(nodes, A, nodes[A].want(B, 0.0), 0.01)
        assert of(log[A] + log[B], Dial) == []
        skipped = [n for n in of(log[A] + log[B], PunchNotice) if n.event == "punch_skipped"]
        assert len(skipped) == 2 and "cannot be punched" in skipped[0].fields["reason"]
        assert nodes[A].want(B, 5.0) == [] and nodes[A].next_deadline() is None


def test_symmetric_with_a_peer_that_has_no_reachable_listener_is_not_tried() -> None:
    # A symmetric NAT maps the punch to an unpredicted port: only dialling a listener
    # helps (test_a_symmetric_nat_dials_the_listener_of_a_public_or_full_cone_peer).
    for other in ("full_cone", "open", "restricted", None):  # None: B has not classified its NAT
        nodes = pair("symmetric", other)
        log = carry(nodes, A, nodes[A].want(B, 0.0), 0.01)
        assert of(log[A] + log[B], Dial) == [], other
        assert [n.event for n in of(log[A] + log[B], PunchNotice)] == ["punch_skipped", "punch_skipped"]


def test_a_peer_address_that_is_not_ip_port_is_never_dialled() -> None:
    nodes = pair(b_at="relay.example:40002")
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.01)
    assert of(log[A] + log[B], Dial) == []
    [skipped] = [n for n in of(log[A], PunchNotice) if n.event == "punch_skipped"]
    assert "'relay.example:40002' is not IP:PORT" in skipped.fields["reason"]


def test_both_sides_keep_the_plan_made_from_the_candidates_they_exchanged() -> None:
    nodes = pair("port_restricted", None)  # B answers before it knows its NAT type
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.02)
    b_ip = B_AT.rsplit(":", 1)[0]
    nodes[B].set_candidates(Candidates(B_AT, "full_cone", f"{b_ip}:7002"), 0.021)  # learned since
    dials = of(log[B], Dial) + of(nodes[A].on_tick(0.05), Dial)
    assert sorted((d.remote, d.curve_server) for d in dials) == [(A_AT, False), (B_AT, True)]  # both punch


def test_two_nodes_behind_one_nat_are_not_punched() -> None:
    nodes = pair(b_at="198.51.100.11:40002")  # the same public IP as A
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.01)
    assert of(log[A] + log[B], Dial) == []
    reasons = [n.fields["reason"] for n in of(log[A] + log[B], PunchNotice)]
    assert reasons and all("one NAT" in r for r in reasons)


def test_crossed_offers_make_one_attempt_led_by_the_smaller_peer_id() -> None:
    nodes = pair()
    from_a, from_b = nodes[A].want(B, 0.0), nodes[B].want(A, 0.0)
    log_b = carry(nodes, A, from_a, 0.02)  # A's offer reaches B, which gives way and answers
    log_a = carry(nodes, B, from_b, 0.02)  # B's offer reaches A, which ignores it
    dials = of(log_a[A] + log_a[B] + log_b[A] + log_b[B] + nodes[A].on_tick(0.05), Dial)
    assert sorted((d.remote, d.attempt) for d in dials) == [(A_AT, 1), (B_AT, 1)]


def test_a_dial_not_up_in_time_is_abandoned_and_retried_with_backoff_then_later() -> None:
    nodes = pair()
    now = 0.0
    waits = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        log = carry(nodes, A, nodes[A].want(B, now) if attempt == 1 else nodes[A].on_tick(now), now)
        dials = of(log[B], Dial) + of(nodes[A].on_tick(now + 0.01), Dial)
        assert [d.attempt for d in dials] == [dials[0].attempt] * 2 and len(dials) == 2
        failed = nodes[A].on_tick(now + 0.01 + PUNCH_TIMEOUT)
        nodes[B].on_tick(now + 0.01 + PUNCH_TIMEOUT)
        assert of(failed, Abandon)[0].attempt == dials[0].attempt
        assert len(of(failed, RenewPort)) == 1, "the retry starts from a fresh port"
        [notice] = of(failed, PunchNotice)
        assert "not connected within" in notice.fields["reason"]
        waits.append(notice.fields["retry_in_s"])
        now = nodes[A].next_deadline()
    assert waits == [*RETRY_BACKOFF, RETRY_LATER]


def test_an_offer_whose_answer_is_lost_fails_after_the_answer_timeout() -> None:
    nodes = pair()
    nodes[A].want(B, 0.0)  # never delivered
    failed = nodes[A].on_tick(ANSWER_TIMEOUT)
    assert of(failed, PunchNotice)[0].fields["reason"] == "no answer through the relay"
    assert of(failed, Abandon) == [] and of(failed, RenewPort) == []  # nothing was dialled


def test_a_direct_link_that_dies_moves_the_path_back_and_is_tried_again_later() -> None:
    nodes = pair()
    carry(nodes, A, nodes[A].want(B, 0.0), 0.0)
    [dial] = of(nodes[A].on_tick(0.0), Dial)
    nodes[A].on_link_up(B, dial.attempt, 0.01)
    down = nodes[A].on_link_down(B, dial.attempt, "heartbeats unanswered", 10.0)
    assert of(down, PathChange) == [PathChange(B, False, "heartbeats unanswered")]
    assert not nodes[A].is_direct(B) and nodes[A].next_deadline() == 10.0 + REUPGRADE_AFTER
    again = nodes[A].on_tick(10.0 + REUPGRADE_AFTER)
    assert [e.message.stage for e in of(again, SendPunch)] == ["connect"]


def test_want_while_an_attempt_is_under_way_or_up_changes_no_deadline() -> None:
    # The relay client calls want() for every job, and skips rescheduling the punch
    # timer when it returns nothing: that must mean nothing changed.
    nodes = pair()

    def want_changes_nothing(now: float) -> None:
        for side, other in ((A, B), (B, A)):
            before = nodes[side].next_deadline()
            assert nodes[side].want(other, now) == []
            assert nodes[side].next_deadline() == before

    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)
    want_changes_nothing(0.05)  # A syncing, B dialling
    [a_dial] = of(nodes[A].on_tick(0.06), Dial)
    want_changes_nothing(0.07)  # both dialling
    [b_dial] = of(log[B], Dial)
    nodes[A].on_link_up(B, a_dial.attempt, 0.08)
    nodes[B].on_link_up(A, b_dial.attempt, 0.08)
    want_changes_nothing(1.0)  # direct


def test_a_late_link_up_of_an_abandoned_attempt_is_closed() -> None:
    nodes = pair()
    carry(nodes, A, nodes[A].want(B, 0.0), 0.0)
    [dial] = of(nodes[A].on_tick(0.0), Dial)
    nodes[A].on_tick(PUNCH_TIMEOUT + 0.01)
    assert nodes[A].on_link_up(B, dial.attempt, PUNCH_TIMEOUT + 0.02) == [Abandon(B, dial.attempt, "superseded")]


def test_a_node_learning_its_nat_type_judges_a_skipped_peer_again() -> None:
    nodes = pair("symmetric", "symmetric")
    carry(nodes, A, nodes[A].want(B, 0.0), 0.0)
    assert nodes[A].want(B, 1.0) == []
    again = nodes[A].set_candidates(Candidates(A_AT, "full_cone"), 2.0)
    assert [e.message.stage for e in of(again, SendPunch)] == ["connect"]


def test_a_node_offers_nothing_before_its_nat_type_is_known_then_offers_to_the_peers_wanted() -> None:
    a = PunchCoordinator(A)
    assert a.set_candidates(Candidates(A_AT, None), 0.0, final=False) == []
    assert a.want(B, 0.1) == []  # jobs go to B, but A is still classifying its NAT
    offers = of(a.set_candidates(Candidates(A_AT, "port_restricted"), 3.0), SendPunch)
    assert [(e.peer, e.message.stage, e.message.nat) for e in offers] == [(B, "connect", "port_restricted")]


def plan_of(nat_a: str, nat_b: str, *, a_at: str = A_AT, b_at: str = B_AT) -> dict[str, list]:
    """Both sides' Dial / Expect events for a punch between A and B, each with a listener
    (public at its observed IP, and on its LAN)."""
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a_ip, b_ip = a_at.rsplit(":", 1)[0], b_at.rsplit(":", 1)[0]
    a.set_candidates(Candidates(a_at, nat_a, f"{a_ip}:7001", "10.0.1.10:7001"), 0.0)
    b.set_candidates(Candidates(b_at, nat_b, f"{b_ip}:7002", "10.0.1.11:7002"), 0.0)
    nodes = {A: a, B: b}
    log = carry(nodes, A, a.want(B, 0.0), 0.01)
    log[A] += a.on_tick(1.0)
    return {name: [e for e in events if isinstance(e, (Dial, Expect))] for name, events in log.items()}


def test_a_symmetric_nat_dials_the_listener_of_a_public_or_full_cone_peer() -> None:
    for reachable in ("open", "full_cone"):
        plan = plan_of("symmetric", reachable)
        assert [(d.remote, d.curve_server) for d in plan[A]] == [("198.51.100.12:7002", False)]
        assert [type(e) for e in plan[B]] == [Expect]
        plan = plan_of(reachable, "symmetric")
        assert [type(e) for e in plan[A]] == [Expect]
        assert [d.remote for d in plan[B]] == ["198.51.100.11:7001"]


def test_two_reachable_peers_make_one_link_the_larger_id_dialling() -> None:
    plan = plan_of("open", "full_cone")
    assert [type(e) for e in plan[A]] == [Expect]
    assert [d.remote for d in plan[B]] == ["198.51.100.11:7001"]


def test_two_nodes_behind_one_nat_connect_over_the_lan_the_smaller_id_listening() -> None:
    plan = plan_of("port_restricted", "port_restricted", b_at="198.51.100.11:40002")
    assert [type(e) for e in plan[A]] == [Expect]
    assert [(d.remote, d.curve_server) for d in plan[B]] == [("10.0.1.10:7001", False)]


def test_port_restricted_peers_with_listeners_still_punch() -> None:
    plan = plan_of("port_restricted", "restricted")
    assert [(d.remote, d.curve_server) for d in plan[A]] == [(B_AT, True)]
    assert [(d.remote, d.curve_server) for d in plan[B]] == [(A_AT, False)]


def test_a_link_between_two_nodes_behind_one_nat_is_the_lan_path_and_names_each_end() -> None:
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a.set_candidates(Candidates("198.51.100.11:40001", "port_restricted", "198.51.100.11:7001", "10.0.1.10:7001"), 0.0)
    b.set_candidates(Candidates("198.51.100.11:40002", "port_restricted", "198.51.100.11:7002", "10.0.1.11:7002"), 0.0)
    nodes = {A: a, B: b}
    log = carry(nodes, A, a.want(B, 0.0), 0.01)
    log[A] += a.on_tick(1.0)
    [dial] = of(log[B], Dial)
    up_b, up_a = b.on_link_up(A, dial.attempt, 1.0), a.on_link_up(B, dial.attempt, 1.0)
    assert of(up_b, PathChange) == [PathChange(A, True, "dialled", "lan")]
    assert of(up_a, PathChange) == [PathChange(B, True, "dialled", "lan")]
    assert a.is_direct(B) and b.is_direct(A) and (a.link(B), b.link(A)) == ("lan", "lan")
    # B dialled A's LAN listener; A names the LAN address B said it has.
    assert (b.remote(A), a.remote(B)) == ("10.0.1.10:7001", "10.0.1.11:7002")
    down = a.on_link_down(B, dial.attempt, "heartbeats stopped", 2.0)
    assert of(down, PathChange) == [PathChange(B, False, "heartbeats stopped", "lan")]
    assert not a.is_direct(B) and a.remote(B) is None


def test_a_punched_link_is_the_direct_path_and_names_the_address_dialled() -> None:
    nodes = pair()
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)
    [a_dial] = of(nodes[A].on_tick(0.06), Dial)
    nodes[A].on_link_up(B, a_dial.attempt, 0.07)
    assert nodes[A].is_direct(B) and (nodes[A].link(B), nodes[A].remote(B)) == ("direct", B_AT)
    assert of(log[B], Dial)[0].remote == A_AT


def test_offers_faster_than_a_peer_can_legitimately_make_them_are_ignored_not_dialled() -> None:
    nodes = pair()
    a, b = nodes[A], nodes[B]
    first = carry(nodes, A, a.want(B, 0.0), 0.0)
    assert of(first[B], Dial), "the first offer is answered and dialled"
    flood = [b.on_punch(A, Punch(stage="connect", attempt=100 + i, observed=A_AT, nat="port_restricted"), 0.1)
             for i in range(8)]  # fmt: skip
    assert not [e for events in flood for e in events if isinstance(e, (Dial, SendPunch, Abandon))]
    notices = [e.fields["ignored"] for events in flood for e in of(events, PunchNotice)]
    assert notices == [1, 2, 4, 8], "logged, but not once per offer"
    later = b.on_punch(A, Punch(stage="connect", attempt=200, observed=A_AT, nat="port_restricted"), 0.1 + 1.0)
    assert [e.message.stage for e in of(later, SendPunch)] == ["answer"], "a retry a second later is taken"


def test_an_offer_that_comes_while_this_node_has_no_address_is_answered_once_it_has_one() -> None:
    nodes = pair()
    a, b = nodes[A], nodes[B]
    b.set_candidates(Candidates(nat="port_restricted"), 0.0, final=False)  # its relay link moves port
    offer = a.want(B, 0.0)
    assert carry(nodes, A, offer, 0.0)[B] == [], "neither refused nor answered with no address"
    new_b = "198.51.100.12:40777"
    answer = b.set_candidates(Candidates(new_b, "port_restricted"), 0.3)
    assert [(e.message.stage, e.message.observed) for e in of(answer, SendPunch)] == [("answer", new_b)]
    log = carry(nodes, B, answer, 0.3)
    [a_dial] = of(a.on_tick(1.0), Dial)
    assert a_dial.remote == new_b and of(log[B], Dial)[0].remote == A_AT


def test_a_listener_that_does_not_answer_is_given_up_for_a_simultaneous_open() -> None:
    # A's NAT is full cone by STUN, but forwards no TCP port A never sent from: B's dial to
    # A's listener fails; the next attempt, whoever starts it, punches.
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a.set_candidates(Candidates(A_AT, "full_cone", "198.51.100.11:7001", "10.0.1.10:7001"), 0.0)
    b.set_candidates(Candidates(B_AT, "port_restricted", "198.51.100.12:7002", "10.0.2.10:7002"), 0.0)
    nodes = {A: a, B: b}
    log = carry(nodes, A, a.want(B, 0.0), 0.01)
    log[A] += a.on_tick(0.02)
    assert [type(e) for e in log[A] if isinstance(e, (Dial, Expect))] == [Expect]
    assert [d.remote for d in of(log[B], Dial)] == ["198.51.100.11:7001"]
    failed_a, failed_b = a.on_tick(10.0), b.on_tick(10.0)
    assert of(failed_a, PunchNotice) and of(failed_b, Abandon)
    # B retries first this time: its offer says a listener failed, and both plan a punch.
    log = carry(nodes, B, b.on_tick(b.next_deadline()), 11.0)
    assert [e.message.punch for e in of(log[B], SendPunch)][0] is True
    dials = of(log[A], Dial) + of(log[B], Dial) + of(a.on_tick(11.5), Dial) + of(b.on_tick(11.5), Dial)
    assert sorted((d.remote, d.curve_server) for d in dials) == [(A_AT, False), (B_AT, True)]


def test_only_a_punch_this_node_started_moves_its_relay_port() -> None:
    # B answers A's offers; a peer that never dials cannot make B move its relay
    # connection, however often it offers: only A (the initiator) renews.
    nodes = pair()
    a, b = nodes[A], nodes[B]
    carry(nodes, A, a.want(B, 0.0), 0.04)
    a.on_tick(0.06)
    failed_a, failed_b = a.on_tick(10.0), b.on_tick(10.0)
    assert len(of(failed_a, RenewPort)) == 1 and of(failed_b, RenewPort) == []
    assert of(failed_b, Abandon), "B's own dial is closed all the same"


def test_a_listener_wait_that_fails_moves_no_port() -> None:
    plan_nodes = {A: PunchCoordinator(A), B: PunchCoordinator(B)}
    plan_nodes[A].set_candidates(Candidates(A_AT, "full_cone", "198.51.100.11:7001", "10.0.1.10:7001"), 0.0)
    plan_nodes[B].set_candidates(Candidates(B_AT, "port_restricted"), 0.0)
    carry(plan_nodes, A, plan_nodes[A].want(B, 0.0), 0.01)
    plan_nodes[A].on_tick(0.02)
    assert of(plan_nodes[A].on_tick(10.0), RenewPort) == [], "A only listened: its relay port played no part"


def test_a_new_relay_port_restarts_the_attempts_that_told_the_old_one() -> None:
    nodes = pair()
    a = nodes[A]
    log = carry(nodes, A, a.want(B, 0.0), 0.04)
    assert of(log[B], Dial), "B dials at once; A waits half the round trip"
    moved = a.set_candidates(Candidates(nat="port_restricted"), 0.05, final=False)  # A re-registers
    assert of(moved, Dial) == [] and a.peers[B].stage.value == "backoff", "nothing dials from the old port"
    assert of(a.on_tick(0.06), Dial) == [], "the scheduled dial is gone"
    new_a = "198.51.100.11:40999"
    assert of(a.set_candidates(Candidates(new_a, "port_restricted"), 0.5), SendPunch) == [], "no burst at once"
    again = a.on_tick(0.05 + RESTART_DELAY)
    assert [(e.message.stage, e.message.observed) for e in of(again, SendPunch)] == [("connect", new_a)]
    log = carry(nodes, A, again, 1.1)
    assert [d.remote for d in of(log[B], Dial)] == [new_a], "B's new attempt replaces its old one"
    assert a.peers[B].failures == 0, "a restart is not a failure"


def test_an_offer_deferred_past_its_answer_timeout_is_dropped() -> None:
    nodes = pair()
    a, b = nodes[A], nodes[B]
    b.set_candidates(Candidates(nat="port_restricted"), 0.0, final=False)
    carry(nodes, A, a.want(B, 0.0), 0.0)
    late = b.set_candidates(Candidates("198.51.100.12:40777", "port_restricted"), ANSWER_TIMEOUT + 1)
    assert [e.message.stage for e in of(late, SendPunch)] != ["answer"], "its initiator gave it up already"


def test_a_failed_listener_is_dialled_again_where_a_punch_cannot_work() -> None:
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a.set_candidates(Candidates(A_AT, "full_cone", "198.51.100.11:7001", "10.0.1.10:7001"), 0.0)
    b.set_candidates(Candidates(B_AT, "symmetric"), 0.0)
    nodes = {A: a, B: b}
    carry(nodes, A, a.want(B, 0.0), 0.01)
    a.on_tick(0.02), b.on_tick(0.02)
    a.on_tick(10.0), b.on_tick(10.0)  # B's dial to A's listener timed out
    assert b.peers[A].listener_failed
    log = carry(nodes, B, b.on_tick(b.next_deadline()), 11.0)
    dials = of(log[B], Dial) + of(b.on_tick(12.0), Dial)
    assert [d.remote for d in dials] == ["198.51.100.11:7001"], "not given up: the listener again"


# -- only what the relay vouches for is dialled --


def skipped(events: list[PunchEvent]) -> list[str]:
    return [e.fields["reason"] for e in of(events, PunchNotice) if e.event == "punch_skipped"]


def test_a_punch_to_an_address_the_relay_does_not_see_the_peer_at_is_never_dialled() -> None:
    """B says it is at a third host's address (a victim's): A asks the relay, which sees
    B elsewhere, and dials nothing."""
    nodes = pair()
    nodes[B].set_candidates(Candidates("203.0.113.9:22", "port_restricted"), 0.0)  # the lie
    log = carry(nodes, B, nodes[B].want(A, 0.0), 0.04, seen={B: B_AT})
    later = nodes[A].on_tick(1.0)
    assert of(log[A] + later, Dial) == []
    assert any("not where the relay sees it (198.51.100.12:40002)" in why for why in skipped(log[A] + later))


def test_a_listener_is_dialled_only_on_the_peers_own_public_ip() -> None:
    nodes = pair(nat_b="full_cone")
    nodes[B].set_candidates(Candidates(B_AT, "full_cone", listen="203.0.113.9:7000"), 0.0)
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)
    assert of(log[A] + nodes[A].on_tick(1.0), Dial) == []
    # On its own public IP (any port: the peer's own address), it is.
    nodes = pair(nat_b="full_cone")
    nodes[B].set_candidates(Candidates(B_AT, "full_cone", listen="198.51.100.12:7000"), 0.0)
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)
    assert [d.remote for d in of(log[A] + nodes[A].on_tick(1.0), Dial)] == ["198.51.100.12:7000"]


def behind_one_ip(lan_a: str, lan_b: str, a_at: str = "198.51.100.11:40001", b_at: str = "198.51.100.11:40002"):
    """A and B that say they share a public IP (so the plan is A listening on its LAN
    address and B, the larger id, dialling it)."""
    a, b = PunchCoordinator(A), PunchCoordinator(B)
    a.set_candidates(Candidates(a_at, "port_restricted", lan=lan_a), 0.0)
    b.set_candidates(Candidates(b_at, "port_restricted", lan=lan_b), 0.0)
    return {A: a, B: b}


def test_a_lan_address_is_dialled_only_when_the_relay_sees_both_behind_one_public_ip() -> None:
    """A claims B's public IP, so that the plan says "one NAT" and B dials A's "LAN"
    address (a host on B's network): the relay sees A elsewhere, and B dials nothing."""
    nodes = behind_one_ip("10.0.0.9:22", "10.0.0.3:7000")
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04, seen={A: "203.0.113.7:40001"})
    assert of(log[B], Dial) == []
    assert any("not where the relay sees it" in why for why in skipped(log[B]))
    # Where the relay sees both at one public IP, the LAN address is dialled.
    nodes = behind_one_ip("10.0.0.2:7000", "10.0.0.3:7000")
    assert [d.remote for d in of(carry(nodes, A, nodes[A].want(B, 0.0), 0.04)[B], Dial)] == ["10.0.0.2:7000"]


def test_loopback_and_link_local_are_dialled_only_between_nodes_on_one_host() -> None:
    cases = [
        ("127.0.0.1:6000", "127.0.0.1:6001", True),  # one host: its own loopback
        ("169.254.1.1:6000", "169.254.1.1:6001", True),
        ("127.0.0.1:6000", "10.0.0.3:6001", False),  # B is not on A's host: B's own loopback
        ("169.254.1.1:6000", "10.0.0.3:6001", False),
        ("0.0.0.0:6000", "0.0.0.0:6001", False),
        ("224.0.0.1:6000", "10.0.0.3:6001", False),
    ]
    for lan_a, lan_b, dialled in cases:
        nodes = behind_one_ip(lan_a, lan_b)
        log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04)
        assert [d.remote for d in of(log[B], Dial)] == ([lan_a] if dialled else []), (lan_a, lan_b)
        if not dialled:
            assert skipped(log[B]), (lan_a, lan_b)


def test_a_dial_waits_for_the_relays_word_and_fails_without_it() -> None:
    nodes = pair()
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.04, seen={A: A_AT, B: B_AT})
    assert of(log[B], Dial), "B had the relay's word"
    # A asked too, but its answer is lost: A's dial waits for it, then the attempt fails.
    nodes = pair()
    a, b = nodes[A], nodes[B]
    offer = a.want(B, 0.0)
    answer = b.on_punch(A, of(offer, SendPunch)[0].message, 0.02)
    after_answer = a.on_punch(B, of(answer, SendPunch)[0].message, 0.04)
    assert of(after_answer, AskRelay) == [AskRelay(B)]
    assert of(a.on_tick(0.06), Dial) == [], "dialled before the relay said where B is"
    late = a.on_vouched(B, B_AT, 1.0)
    assert [d.remote for d in of(late, Dial)] == [B_AT], "the relay's late word lets the dial go"
    nodes = pair()
    a, b = nodes[A], nodes[B]
    answer = b.on_punch(A, of(a.want(B, 0.0), SendPunch)[0].message, 0.02)
    a.on_punch(B, of(answer, SendPunch)[0].message, 0.04)
    failed = a.on_tick(0.06) + a.on_tick(0.06 + PUNCH_TIMEOUT)
    assert of(failed, Dial) == []
    assert any("relay did not say" in e.fields.get("reason", "") for e in of(failed, PunchNotice))


def test_dials_of_all_peers_together_keep_to_the_global_rate() -> None:
    """Many peers (a mesh of identities one attacker holds) each start an attempt: the
    first DIAL_BURST dials go at once, the rest at DIAL_RATE a second; those that would
    wait past PUNCH_TIMEOUT fail instead."""
    victim = PunchCoordinator("z6MkZ")
    victim.set_candidates(Candidates("198.51.100.1:40000", "port_restricted"), 0.0)
    peers = [f"z6Mk{n:02d}" for n in range(40)]
    dial_times: list[float] = []
    failed = 0
    for n, peer in enumerate(peers):
        at = f"198.51.100.{100 + n}:5000"
        offer = Punch(stage="connect", attempt=1, observed=at, nat="port_restricted")
        events = victim.on_punch(peer, offer, 0.0)
        events += victim.on_vouched(peer, at, 0.0)
        events += victim.on_punch(peer, Punch(stage="sync", attempt=1), 0.0)
        dial_times += [0.0] * len(of(events, Dial))
    now = 0.0
    while (due := victim.next_deadline()) is not None and due <= 20.0:
        now = due
        events = victim.on_tick(now)
        dial_times += [now] * len(of(events, Dial))
        failed += sum(1 for e in of(events, PunchNotice) if "too many dials" in e.fields.get("reason", ""))
    assert dial_times[:DIAL_BURST] == [0.0] * DIAL_BURST
    for n, at in enumerate(dial_times):
        assert n + 1 <= DIAL_BURST + at * DIAL_RATE + 1e-9, f"dial {n + 1} at {at:.2f} s"
    assert failed and len(dial_times) + failed >= len(peers)


def test_a_target_whose_dials_fail_waits_longer_each_time() -> None:
    """A peer keeps naming one address that never answers (a closed port it points the
    node at): each dial there fails, and the next waits 1, 2, 4, ... s."""
    victim = PunchCoordinator("z6MkZ")
    victim.set_candidates(Candidates("198.51.100.1:40000", "port_restricted"), 0.0)
    target = "198.51.100.50:5000"
    dial_times: list[float] = []
    now = 0.0
    for attempt in range(1, 8):
        now += 1.0  # past MIN_OFFER_GAP
        events = victim.on_punch("z6MkP", Punch(stage="connect", attempt=attempt, observed=target), now)
        events += victim.on_vouched("z6MkP", target, now)
        events += victim.on_punch("z6MkP", Punch(stage="sync", attempt=attempt), now)
        while True:
            dial_times += [now] * len(of(events, Dial))
            due = victim.next_deadline()
            if of(events, Abandon) or of(events, PunchNotice) or due is None:
                break
            now = due
            events = victim.on_tick(now)
    gaps = [later - earlier for earlier, later in zip(dial_times, dial_times[1:], strict=False)]
    assert len(dial_times) < 7, "every offer drew a dial to the dead target"
    assert all(b > a for a, b in zip(gaps, gaps[1:], strict=False)), gaps


def test_a_listener_takes_a_dial_that_comes_before_its_own_moment_to_act() -> None:
    """A dialler may connect the moment the sync leaves or reaches it (docs §7.8): the
    listening side takes the link whether it still waits out its half round trip or has
    not yet read the sync; it does not close it as superseded."""
    # A offers and listens; B dials as the sync reaches it, before A's half round trip.
    nodes = {A: PunchCoordinator(A), B: PunchCoordinator(B)}
    nodes[A].set_candidates(Candidates(A_AT, "open", "198.51.100.11:7001"), 0.0)
    nodes[B].set_candidates(Candidates(B_AT, "port_restricted"), 0.0)
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.2)
    [dial] = of(log[B], Dial)
    assert of(log[A], Expect) and nodes[A].describe(B)["stage"] == "syncing"
    up = nodes[A].on_link_up(B, dial.attempt, 0.21)
    assert of(up, Abandon) == [] and of(up, PathChange) == [PathChange(B, True, "dialled", "direct")]
    assert of(nodes[A].on_tick(1.0), Dial) == [] and nodes[A].is_direct(B)
    # B offers and A listens: B's dial reaches A before B's sync does.
    nodes = {A: PunchCoordinator(A), B: PunchCoordinator(B)}
    nodes[A].set_candidates(Candidates(A_AT, "open", "198.51.100.11:7001"), 0.0)
    nodes[B].set_candidates(Candidates(B_AT, "port_restricted"), 0.0)
    [connect] = of(nodes[B].want(A, 0.0), SendPunch)
    answered = nodes[A].on_punch(B, connect.message, 0.1)
    assert of(answered, Expect) and nodes[A].describe(B)["stage"] == "answered"
    up = nodes[A].on_link_up(B, connect.message.attempt, 0.15)
    assert of(up, Abandon) == [] and nodes[A].is_direct(B)
    sync = Punch(stage="sync", attempt=connect.message.attempt)
    assert nodes[A].on_punch(B, sync, 0.2) == [] and nodes[A].is_direct(B)  # the late sync changes nothing


def test_a_link_up_on_a_side_that_dials_is_taken_only_once_it_dialled() -> None:
    nodes = pair()
    log = carry(nodes, A, nodes[A].want(B, 0.0), 0.2)
    attempt = of(log[B], Dial)[0].attempt
    assert nodes[A].describe(B)["stage"] == "syncing"  # A punches: it has not dialled yet
    assert of(nodes[A].on_link_up(B, attempt, 0.21), Abandon) == [Abandon(B, attempt, "superseded")]
