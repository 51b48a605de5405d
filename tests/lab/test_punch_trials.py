"""Repeated punches between two port-restricted NATs, one trial in four with B up to 2 s
late (tests/lab/punch_trials.py; `make lab-punch` runs 100 and prints the figures)."""

from __future__ import annotations

from pathlib import Path

from tests.lab.punch_trials import run, summary

TRIALS = 8


def test_repeated_punches_between_port_restricted_nats_end_direct_also_with_a_late_side(tmp_path: Path) -> None:
    trials = run(tmp_path, TRIALS)
    print("\n" + summary(trials))
    assert len(trials) == TRIALS and any(t.late_s for t in trials)
    assert all(t.direct for t in trials), summary(trials)
    assert all(t.up_ms is not None and t.first_job_ms is not None for t in trials)
