"""Built-in job kinds, the worker's job runner and the kind registry."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import signal
import sys

import cbor2
import pytest

from meshnet.errors import ConfigError
from meshnet.jobs import builtin, worker
from meshnet.jobs.registry import BUILTIN_KINDS, available_kinds, check_enabled, load_handlers

PR_SET_PDEATHSIG = 1
PR_GET_PDEATHSIG = 2


def _pdeathsig() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_int(0)
    libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(value))
    return value.value


def _set_pdeathsig(sig: int) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


@contextlib.contextmanager
def process_state_restored():
    """init_worker changes process-wide state (SIGINT ignored, and on Linux a parent-death
    signal); put both back afterwards so the test process is left as it was."""
    linux = sys.platform.startswith("linux")
    old_deathsig = _pdeathsig() if linux else 0
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if linux:
            _set_pdeathsig(old_deathsig)


@pytest.fixture
def initialised_worker():
    with process_state_restored():
        worker.init_worker(["echo", "sha256", "fail"])
        yield worker


# -- echo --


@pytest.mark.parametrize("payload", [None, 0, "text", b"\x00bytes", [1, [2]], {"a": {"b": 1.5}}])
def test_echo_returns_the_payload(payload):
    assert builtin.echo(payload) == payload


# -- sha256 --


def test_sha256_of_bytes_matches_hashlib():
    assert builtin.sha256(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_sha256_of_text_hashes_its_utf8():
    assert builtin.sha256("héllo") == hashlib.sha256("héllo".encode()).hexdigest()


def test_sha256_of_a_map_without_rounds_hashes_the_data_once():
    assert builtin.sha256({"data": b"abc"}) == hashlib.sha256(b"abc").hexdigest()


@pytest.mark.parametrize("rounds", [1, 2, 7, 100])
def test_sha256_rounds_feed_the_data_repeatedly(rounds):
    expected = hashlib.sha256(b"chunk-" * rounds).hexdigest()
    assert builtin.sha256({"data": b"chunk-", "rounds": rounds}) == expected
    assert builtin.sha256({"data": "chunk-", "rounds": rounds}) == expected


@pytest.mark.parametrize("rounds", [0, -1, 1_000_001, True, 2.0, "3", None])
def test_sha256_bad_rounds_raise_value_error(rounds):
    with pytest.raises(ValueError, match="rounds"):
        builtin.sha256({"data": b"abc", "rounds": rounds})


@pytest.mark.parametrize("payload", [42, None, [b"abc"], {"data": 5}])
def test_sha256_of_other_types_raises_value_error(payload):
    with pytest.raises(ValueError, match="bytes or a string"):
        builtin.sha256(payload)


# -- sleep --


@pytest.mark.parametrize("payload", [0, 0.0, {"seconds": 0}])
def test_sleep_of_zero_returns_zero(payload):
    assert builtin.sleep(payload) == 0


@pytest.mark.parametrize(
    "payload",
    [
        -1,
        -0.001,
        builtin.MAX_SLEEP_SECONDS + 1,
        float("inf"),
        float("nan"),
        "1",
        None,
        True,
        [1],
        {"secs": 1},
        {"seconds": -1},
    ],
)
def test_sleep_rejects_negative_huge_and_non_numbers(payload):
    with pytest.raises(ValueError, match="sleep takes a number of seconds"):
        builtin.sleep(payload)


# -- fail --


def test_fail_raises_runtime_error_with_the_payload_as_message():
    with pytest.raises(RuntimeError, match="^boom$"):
        builtin.fail("boom")
    with pytest.raises(RuntimeError, match="on purpose"):
        builtin.fail(None)


# -- worker.run_job --


def test_init_worker_ignores_sigint(initialised_worker):
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_init_worker_makes_the_worker_die_with_its_parent(initialised_worker):
    assert _pdeathsig() == signal.SIGKILL


def test_run_job_echo_succeeds_with_the_cbor_result(initialised_worker):
    payload = {"x": [1, 2, b"\x00"]}
    assert worker.run_job("echo", cbor2.dumps(payload)) == ("succeeded", cbor2.dumps(payload), "", "")


def test_run_job_sha256_succeeds(initialised_worker):
    status, result, _, _ = worker.run_job("sha256", cbor2.dumps(b"abc"))
    assert status == "succeeded"
    assert cbor2.loads(result) == hashlib.sha256(b"abc").hexdigest()


def test_run_job_fail_reports_the_exception_type_and_message(initialised_worker):
    assert worker.run_job("fail", cbor2.dumps("it broke")) == ("failed", None, "RuntimeError", "it broke")


def test_run_job_handler_value_error_is_a_failure(initialised_worker):
    status, result, error_type, message = worker.run_job("sha256", cbor2.dumps({"data": b"", "rounds": 0}))
    assert (status, result, error_type) == ("failed", None, "ValueError")
    assert "rounds" in message


@pytest.mark.parametrize("payload", [b"", b"\xa1\x61", b"\x1c", b"\xff"])
def test_run_job_with_payload_that_is_not_cbor_is_an_invalid_payload_failure(initialised_worker, payload):
    status, result, error_type, message = worker.run_job("echo", payload)
    assert (status, result, error_type) == ("failed", None, "InvalidPayload")
    assert "not valid CBOR" in message


def test_run_job_of_a_kind_not_enabled_is_an_unknown_kind_failure(initialised_worker):
    status, result, error_type, message = worker.run_job("sleep", cbor2.dumps(0))
    assert (status, result, error_type) == ("failed", None, "UnknownKind")
    assert "'sleep'" in message


def test_init_worker_with_an_unknown_kind_raises_config_error():
    with process_state_restored(), pytest.raises(ConfigError, match="'nope'"):
        worker.init_worker(["echo", "nope"])


# -- registry --


def test_check_enabled_accepts_known_kinds():
    check_enabled(["echo", "sha256", "sleep", "fail", "crash"], where="node.toml")


@pytest.mark.parametrize("bad", ["nope", "Echo", "", "echo\n"])
def test_check_enabled_raises_config_error_naming_the_unknown_kind(bad):
    with pytest.raises(ConfigError) as info:
        check_enabled(["echo", bad], where="node.toml")
    message = str(info.value)
    assert "node.toml" in message and repr(bad) in message
    assert "jobs.enabled" in message
    assert "echo" in message  # known kinds are listed


def test_available_kinds_include_builtins_and_mark_test_kinds():
    kinds = available_kinds()
    for name in ("echo", "sha256", "sleep"):
        assert kinds[name] == "builtin"
    assert kinds["fail"] == "test"
    assert kinds["crash"] == "test"


def test_load_handlers_returns_the_builtin_functions():
    handlers = load_handlers(["echo", "sha256", "fail"])
    assert handlers == {"echo": builtin.echo, "sha256": builtin.sha256, "fail": builtin.fail}
    assert set(BUILTIN_KINDS) == {"echo", "sha256", "sleep"}


def test_load_handlers_with_an_unknown_kind_raises_config_error():
    with pytest.raises(ConfigError, match="'nope'"):
        load_handlers(["nope"])
