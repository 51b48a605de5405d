"""A slice of ``make fuzz`` in ``make test``: the same campaign, its worker pool and its
rules, on fewer inputs per decoder; and decoders broken on purpose, to show that each
kind of failure the campaign looks for is caught and names its input."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from meshnet.errors import RemoteProtocolError
from meshnet.protocol.codec import _guarded
from tests.fuzz.campaign import (
    DEFAULT_SEED,
    CampaignResult,
    RunChunk,
    Session,
    Settings,
    input_rng,
    run_campaign,
)
from tests.fuzz.checker import (
    CONTRACT,
    HANG,
    MEMORY,
    SLOW,
    UNEXPECTED,
    UNTYPED,
    WORKER_DIED,
    Target,
    input_bytes,
)
from tests.fuzz.generators import Corpus
from tests.fuzz.report import as_json, render
from tests.fuzz.targets import build_targets

#: Inputs per decoder: the whole slice takes a few seconds on two cores.
SLICE_INPUTS = 1000

DECODERS = list(build_targets(DEFAULT_SEED, Path("/nonexistent"))[0])


@pytest.fixture(scope="module")
def slice_result() -> CampaignResult:
    workers = min(2, len(os.sched_getaffinity(0)))
    return run_campaign(Settings(seed=DEFAULT_SEED, inputs=SLICE_INPUTS, workers=workers))


@pytest.mark.parametrize("decoder", DECODERS)
def test_slice_of_the_campaign_finds_no_failure(slice_result: CampaignResult, decoder: str) -> None:
    target = slice_result.targets[decoder]
    assert target.ran == SLICE_INPUTS
    assert target.accepted + sum(target.refusals.values()) + len(target.failures) == SLICE_INPUTS
    assert not target.failures, render(slice_result)


def test_slice_reaches_the_decoders_past_their_first_checks(slice_result: CampaignResult) -> None:
    """Inputs that only ever fail the first check would test little: every decoder
    accepts some, and the protocol decoders refuse for many reasons."""
    for target in slice_result.targets.values():
        assert target.accepted > 0, target.name
        assert target.slowest is not None and target.median_ns_per_byte > 0, target.name
    for name in ("client_to_node", "relay_to_node", "node_to_node", "direct_link", "value"):
        assert len(slice_result.targets[name].refusals) >= 10, name
    report = as_json(slice_result)
    assert report["seed"] == DEFAULT_SEED and set(report["decoders"]) == set(DECODERS)


def test_an_input_is_the_same_in_every_process() -> None:
    """Workers and the parent regenerate inputs by (seed, decoder, index) alone."""
    first = Session(DEFAULT_SEED, build_targets, Path("/nonexistent"))
    second = Session(DEFAULT_SEED, build_targets, Path("/nonexistent"))
    for name in ("client_to_node", "sealed", "value", "node_config", "private_key"):
        for index in (0, 1, 999):
            assert input_bytes(first.make_input(name, index)) == input_bytes(second.make_input(name, index))


# -- decoders broken on purpose --


def is_bad(data: bytes) -> bool:
    """About one input in twenty sets a broken decoder off."""
    return data[0] % 20 == 0


def raises_key_error(data: bytes) -> Any:
    if is_bad(data):
        return {}[data]
    raise RemoteProtocolError("refused")


def marks_unexpected(data: bytes) -> Any:
    """A bug inside the codec's guard: it comes out typed, but marked unexpected."""
    return _guarded(lambda: {}[data] if is_bad(data) else b"ok")


def returns_garbage(data: bytes) -> Any:
    return object() if is_bad(data) else b"ok"


def kills_its_process(data: bytes) -> Any:
    if is_bad(data):
        os.kill(os.getpid(), signal.SIGKILL)
    return b"ok"


def exhausts_memory(data: bytes) -> Any:
    if is_bad(data):
        return bytearray(2 << 30)  # past the workers' RLIMIT_AS
    return b"ok"


def hangs(data: bytes) -> Any:
    if is_bad(data):
        time.sleep(3600)
    return b"ok"


def is_slow(data: bytes) -> Any:
    if is_bad(data):
        deadline = time.thread_time() + 0.03  # CPU time: what the slow rule measures
        while time.thread_time() < deadline:
            pass
    return b"ok"


def eight_bytes(rng: random.Random, corpus: Corpus) -> bytes:
    return rng.randbytes(8)


def ok_bytes(result: Any) -> str | None:
    return None if result == b"ok" else f"returned a {type(result).__name__}"


BROKEN = {
    "raises_key_error": (raises_key_error, UNTYPED),
    "marks_unexpected": (marks_unexpected, UNEXPECTED),
    "returns_garbage": (returns_garbage, CONTRACT),
    "kills_its_process": (kills_its_process, WORKER_DIED),
    "exhausts_memory": (exhausts_memory, MEMORY),
    "hangs": (hangs, HANG),
    "is_slow": (is_slow, SLOW),
}


def broken_targets(seed: int, workdir: Path) -> tuple[dict[str, Target], Corpus]:
    """The campaign's factory, for decoders broken on purpose (module level: the workers
    import it)."""

    def unexpected_marked(exc: BaseException) -> str | None:
        return f"unexpected=True: {exc}" if getattr(exc, "unexpected", False) else None

    targets = {
        name: Target(name, name, decode, (RemoteProtocolError,), eight_bytes, ok_bytes, unexpected_marked)
        for name, (decode, _) in BROKEN.items()
    }
    return targets, Corpus.build(seed)


def bad_indices(name: str, inputs: int) -> list[int]:
    """The inputs of ``name`` that set its broken decoder off, found as a worker finds them."""
    return [i for i in range(inputs) if is_bad(eight_bytes(input_rng(DEFAULT_SEED, name, i), None))]  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["raises_key_error", "marks_unexpected", "returns_garbage"])
def test_the_checker_reports_a_broken_decoder_with_its_input(name: str, tmp_path: Path) -> None:
    session = Session(DEFAULT_SEED, broken_targets, tmp_path)
    report = session.run_chunk(RunChunk(name, 0, 200), [0, 0])
    expected = bad_indices(name, 200)
    assert expected, "no input sets the decoder off: pick another is_bad"
    assert [f.index for f in report.failures] == expected
    assert {f.category for f in report.failures} == {BROKEN[name][1]}
    for failure in report.failures:
        assert failure.input_hex == session.make_input(name, failure.index).hex()
    assert report.accepted + sum(report.refusals.values()) == 200 - len(expected)


def test_the_pool_reports_dead_hung_memory_hungry_and_slow_inputs() -> None:
    names = ("kills_its_process", "exhausts_memory", "hangs", "is_slow")
    inputs = 60
    settings = Settings(
        seed=DEFAULT_SEED,
        inputs=inputs,
        targets=names,
        workers=2,
        memory_limit=512 << 20,
        chunk=20,
        hang_s=1.0,
        factory=broken_targets,
    )
    result = run_campaign(settings)
    for name in names:
        target = result.targets[name]
        expected = bad_indices(name, inputs)
        assert expected, f"no input of {name} sets its decoder off: pick another is_bad"
        assert target.ran == inputs
        assert [(f.index, f.category) for f in target.failures] == [(i, BROKEN[name][1]) for i in expected]
        assert all(f.input_hex and f.size == 8 for f in target.failures)
    assert "killed by SIGKILL" in result.targets["kills_its_process"].failures[0].detail
