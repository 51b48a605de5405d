"""A client that reads batches gets the jobs' ends of one node turn in one ``results``; one
that does not gets a ``result`` each. Either way, every job exactly one terminal status."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator

import cbor2
import pytest

from meshnet.protocol import NODE_TO_CLIENT, Result, Results, Submit, encode
from tests.harness import Mesh, raw_dealer, receive

JOBS = 60  # within the queue (64) and the executors: none refused busy
BIG = 20_000  # a result of 16 KiB or more goes alone


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    mesh = Mesh(tmp_path_factory.mktemp("batches"))
    try:
        path, _, endpoint = mesh.node_config("batches", jobs={"enabled": ["echo"], "executors": 2})
        mesh.start_node("batches", path)
        yield endpoint
    finally:
        mesh.close()


def _submit_all(endpoint: str, batch: bool | None) -> tuple[Counter[str], Counter[bytes], dict[bytes, bytes]]:
    """Submit JOBS echoes at once (every tenth a big one); read until each has ended.
    Returns the kinds of message read, the ends per job id, and the results."""
    kinds: Counter[str] = Counter()
    ends: Counter[bytes] = Counter()
    bodies: dict[bytes, bytes] = {}
    payloads = {}
    with raw_dealer(endpoint) as sock:
        for n in range(JOBS):
            job_id = os.urandom(16)
            payloads[job_id] = cbor2.dumps(os.urandom(BIG) if n % 10 == 0 else n)
            sock.send_multipart(encode(Submit(id=job_id, kind="echo", body=payloads[job_id], batch=batch)))
        while sum(ends.values()) < JOBS:
            message = receive(sock, NODE_TO_CLIENT)
            kinds[message.TYPE] += 1
            results = message.results if isinstance(message, Results) else (message,)
            for result in results:
                assert isinstance(result, Result) and result.status == "succeeded", result
                ends[result.id] += 1
                bodies[result.id] = bytes(result.body)
        assert not sock.poll(300), "a message after every job had ended"
    assert set(ends) == set(payloads) and set(ends.values()) == {1}
    assert bodies == payloads
    return kinds, ends, bodies


def test_a_client_that_reads_batches_gets_many_ends_per_message(node: str) -> None:
    kinds, _, _ = _submit_all(node, batch=True)
    assert kinds["results"] >= 1
    assert kinds["results"] + kinds["result"] < JOBS  # fewer messages than jobs


def test_a_client_that_does_not_gets_one_result_per_job(node: str) -> None:
    kinds, _, _ = _submit_all(node, batch=None)
    assert kinds == {"result": JOBS}
