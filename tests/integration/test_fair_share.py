"""One submitter cannot starve the others of a node's executors: a real node, two real
clients, long jobs (jobs.max_running_per_submitter; docs/protocol.md §5.4)."""

from __future__ import annotations

import pytest

from meshnet import JobCancelled, MeshClient
from tests.harness import Mesh


@pytest.mark.parametrize("cap", [1, "auto"])
def test_a_client_holding_the_executors_with_long_jobs_does_not_stop_anothers(mesh: Mesh, cap: object) -> None:
    """2 executors, one submitter's cap 1 (set, or "auto": one fewer than the node has)."""
    path, _, api = mesh.node_config("n", jobs={"max_running_per_submitter": cap})
    mesh.start_node("n", path)
    with MeshClient(api) as hog, MeshClient(api) as other:
        long = [hog.submit("sleep", 60, timeout=120) for _ in range(2)]
        assert hog.status()["running"] == 1, "one submitter holds both executors"
        assert hog.status()["queued"] == 1
        # The other client's jobs run while both long jobs are still in the node.
        assert [other.run("echo", n, timeout=10) for n in range(5)] == list(range(5))
        assert not any(future.done() for future in long)
        assert other.status()["max_running_per_submitter"] == 1
        for future in long:
            hog.cancel(future)
        for future in long:
            with pytest.raises(JobCancelled):
                future.result(timeout=30)
