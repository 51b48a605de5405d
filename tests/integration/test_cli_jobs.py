"""Jobs from the shell: ``meshnet submit`` says its job's id, where it ran, and on Ctrl-C
cancels its job rather than leave it running with nobody to read it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from meshnet import MeshClient
from tests.harness import REPO, Mesh, cli


@pytest.fixture
def node(mesh: Mesh) -> Iterator[str]:
    path, _, api = mesh.node_config("cli", jobs={"executors": 2, "enabled": ["echo", "sleep"]})
    mesh.start_node("cli", path)
    yield api


def test_submit_prints_the_job_id_and_its_result(node: str) -> None:
    done = cli("submit", "echo", "--payload", '{"x": 1}', "--node", node)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == '{"x": 1}'
    first = done.stderr.splitlines()[0]
    assert first.startswith("job ") and len(first.split()[1]) == 32


def test_ctrl_c_of_submit_cancels_its_job(node: str) -> None:
    submit = subprocess.Popen(
        [sys.executable, "-m", "meshnet.cli", "submit", "sleep", "--payload", "30", "--node", node],
        cwd=REPO,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert submit.stderr is not None
        line = submit.stderr.readline()  # printed once the job is handed over
        assert line.startswith("job "), line
        with MeshClient(node) as client:
            deadline = time.monotonic() + 10
            while client.status()["running"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)  # nothing logs that a job started at info level
            assert client.status()["running"] == 1
            submit.send_signal(signal.SIGINT)
            assert submit.wait(timeout=15) == 130
            status = client.status()
            assert status["running"] == 0
            assert status["jobs"].get("cancelled") == 1
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
        for stream in (submit.stdout, submit.stderr):
            if stream is not None:
                stream.close()
