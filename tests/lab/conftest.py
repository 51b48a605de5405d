"""The NAT lab's fixtures: a lab per test module, torn down after it (also on failure),
and the namespaces of earlier test processes that died swept first."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.netlab import namespaces, sweep, why_not_available


@pytest.fixture(scope="session", autouse=True)
def lab_available() -> Iterator[None]:
    reason = why_not_available()
    if reason is not None:
        if os.environ.get("CI") == "true":  # CI is root and installs the tools: never a silent skip there
            pytest.fail(f"NAT lab unavailable in CI: {reason}")
        print(f"\nNAT lab tests skipped: {reason}")
        pytest.skip(reason)
    sweep()
    before = set(namespaces())
    yield
    left = [ns for ns in set(namespaces()) - before if ns.startswith("mnl")]
    assert not left, f"lab namespaces left behind: {left}"
