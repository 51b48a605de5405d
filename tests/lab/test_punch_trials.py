"""Repeated punches between two port-restricted NATs, one trial in four with B up to 2 s
late (tests/lab/punch_trials.py; `make lab-punch` runs 100 and prints the figures)."""

from __future__ import annotations

from pathlib import Path

from tests.lab.punch_trials import run, run_late, summary

TRIALS = 8


def test_repeated_punches_between_port_restricted_nats_end_direct_also_with_a_late_side(tmp_path: Path) -> None:
    trials = run(tmp_path, TRIALS)
    print("\n" + summary(trials))
    assert len(trials) == TRIALS and any(t.late_s for t in trials)
    assert all(t.direct for t in trials), summary(trials)
    assert all(t.up_ms is not None and t.first_job_ms is not None for t in trials)


def test_a_punch_that_fails_twice_is_retried_from_fresh_ports_and_ends_direct(tmp_path: Path) -> None:
    # B's SYNs are held for 12 s: the first two attempts (5 s each, 1 s apart) fail. The
    # failed attempts leave NAT entries that spoil their ports' mappings (a third attempt
    # from the same ports failed in the lab); each retry starts from a fresh port on the
    # side that started the failed attempt, so no pair of ports is used twice.
    [trial] = run_late(tmp_path, [12.0])
    assert trial.direct, trial.reason
    assert len(trial.dial_ports) >= 3 and len(set(trial.dial_ports)) == len(trial.dial_ports), trial.dial_ports
