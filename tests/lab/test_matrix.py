"""Every pair of {public, full cone, port-restricted, symmetric, same NAT}: the path ends
direct wherever a direct link is possible and relayed where it is not, and jobs complete
on every pair (tests/lab/matrix.py; `make lab-matrix` prints the table)."""

from __future__ import annotations

from pathlib import Path

from tests.lab.matrix import JOBS_PER_PAIR, KINDS, run, table


def test_the_lab_matrix_ends_direct_wherever_possible_and_jobs_complete_on_every_pair(tmp_path: Path) -> None:
    rows = run(tmp_path)
    print("\n" + table(rows))
    assert len(rows) == len(KINDS) * (len(KINDS) + 1) // 2
    assert all(row.jobs_ok == JOBS_PER_PAIR for row in rows), table(rows)
    assert [(r.a, r.b, r.path) for r in rows] == [(r.a, r.b, r.expected) for r in rows], table(rows)
