"""The lab itself: what it builds is gone afterwards, also when the test fails inside it,
and the namespaces of a test process that died are swept."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.lab.netlab import PREFIX, Lab, namespaces, sh, sweep


def test_a_failing_test_inside_a_lab_leaves_no_namespace_or_process() -> None:
    with pytest.raises(RuntimeError, match="the test failed"), Lab("f") as lab:
        host = lab.host_behind(lab.router("r", "port_restricted"), "h")
        sleeper = subprocess.Popen(lab.command(host.ns, [sys.executable, "-c", "import time; time.sleep(600)"]))
        made = list(lab.created)
        assert set(made) <= set(namespaces())
        raise RuntimeError("the test failed")
    assert sleeper.wait(10) is not None  # killed with its namespace
    assert not set(made) & set(namespaces())


def test_the_namespaces_of_a_dead_test_process_are_swept() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid}-x"
    sh("ip", "netns", "add", stale)
    assert stale in sweep()
    assert stale not in namespaces()
