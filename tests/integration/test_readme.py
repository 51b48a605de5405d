"""The README's snippets, read from README.md and run as shown against a real node alone
(the one `make run-node` starts), on a free port instead of 7710."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meshnet import MeshClient, MeshError
from meshnet.config import DEFAULT_API_ENDPOINT
from meshnet.identity import Identity
from tests.harness import REPO, Mesh, cli, free_port

README = REPO / "README.md"
EXIT_JOB_FAILED = 2  # "2 when the job ended in a status other than `succeeded`"


def section(title: str) -> str:
    """The text of the README section whose heading starts with ``title``."""
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no section {title!r}"
    return match.group(1)


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.MULTILINE | re.DOTALL)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A node without a relay, as `make run-node` runs it: (its endpoint, its peer id)."""
    mesh = Mesh(tmp_path_factory.mktemp("readme"))
    try:
        path, identity, endpoint = mesh.node_config("readme")
        mesh.start_node("readme", path).wait_for("running_alone")
        yield endpoint, identity.peer_id
    finally:
        mesh.close()


def test_python_snippet_runs_as_shown(standalone: tuple[str, str]) -> None:
    endpoint, peer_id = standalone
    [snippet] = code_blocks(section("From Python"), "python")
    assert DEFAULT_API_ENDPOINT in snippet
    code = snippet.replace(DEFAULT_API_ENDPOINT, endpoint)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    echoed, digest, mapped, timed_out, status_and_peers = done.stdout.splitlines()
    assert echoed == repr({"prompt": "hello"})
    assert digest == hashlib.sha256(b"bytes").hexdigest()
    assert mapped == repr(list(range(1000)))  # "in order"
    assert timed_out.startswith("timed_out ")  # "# timed_out ..."
    assert status_and_peers.startswith("{'peer_id': " + repr(peer_id))
    assert status_and_peers.endswith("} []")  # a node alone has no peers


def test_setup_commands_run_as_shown(standalone: tuple[str, str]) -> None:
    endpoint, peer_id = standalone
    blocks = code_blocks(section("Set-up"), "sh")
    lines = [line for block in blocks for line in block.splitlines() if ".venv/bin/meshnet" in line]
    assert len(lines) == 4, lines
    for line in lines:
        program, *args = shlex.split(line, comments=True)
        assert program == ".venv/bin/meshnet", line
        documented = line.split(" #", 1)[1].strip() if " #" in line else ""
        done = cli(*args, env={"MESHNET_NODE": endpoint})  # the default node of the commands as shown
        if documented.startswith("error:"):
            # "first prints `job ID` on stderr ... on any failure it prints one line starting
            # with `error:` and exits non-zero (2 when the job ended in a status other than
            # `succeeded`)"
            assert done.returncode == EXIT_JOB_FAILED, (line, done.stderr)
            job, *failure = done.stderr.splitlines()
            assert job.startswith("job ") and len(failure) == 1, (line, done.stderr)
            assert failure[0].startswith(documented.removesuffix("...").rstrip()), (line, done.stderr)
            continue
        assert done.returncode == 0, (line, done.stderr)
        if args[0] == "submit":  # "`submit` prints the result as JSON and exits 0"
            result = json.loads(done.stdout)
            if documented.startswith("prints "):
                assert result == json.loads(documented.removeprefix("prints ")), line
            elif args[1] == "sha256":
                assert re.fullmatch("[0-9a-f]{64}", result), line
        elif args[0] == "status":
            assert peer_id in done.stdout and "running alone" in done.stdout


def test_peers_of_a_node_alone_is_an_empty_answer(standalone: tuple[str, str]) -> None:
    endpoint, _ = standalone
    with MeshClient(endpoint) as client:
        assert client.peers() == []
    done = cli("peers", "--node", endpoint)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no peers: this node runs alone (no relay configured)"


def test_peers_of_a_node_whose_relay_is_down_is_an_error(mesh: Mesh) -> None:
    relay = (f"tcp://127.0.0.1:{free_port()}", Identity.generate().peer_id)  # no relay runs there
    path, _, endpoint = mesh.node_config("orphan", relay=relay)
    mesh.start_node("orphan", path)
    with MeshClient(endpoint) as client, pytest.raises(MeshError, match="not connected to the relay"):
        client.peers()
