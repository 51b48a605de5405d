"""Config files: generate, load, validate (meshnet.config)."""

from __future__ import annotations

import os
import stat

import pytest

from meshnet.config import (
    ApiSection,
    JobsSection,
    LogSection,
    RelayLinkSection,
    RelayServerSection,
    init_config,
    key_file_is_private,
    load_node_config,
    load_relay_config,
    new_node_document,
    write_config,
)
from meshnet.errors import ConfigError
from meshnet.identity import Identity

IDENTITY = Identity.generate()
IDENTITY_TOML = f'[identity]\nprivate_key = "{IDENTITY.private_key_text}"\npeer_id = "{IDENTITY.peer_id}"\n'


def write(tmp_path, text, name="node.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(loader, path):
    with pytest.raises(ConfigError) as info:
        loader(path)
    message = str(info.value)
    assert str(path) in message
    return message


# -- init --


def test_init_config_writes_an_owner_only_file_with_a_loadable_identity(tmp_path):
    path = tmp_path / "sub" / "node.toml"
    identity = init_config(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key_file_is_private(path)
    config = load_node_config(path)
    assert config.load_identity().peer_id == identity.peer_id
    assert config.identity.peer_id == identity.peer_id
    assert config.path == path


def test_init_relay_config_loads_as_relay_config(tmp_path):
    path = tmp_path / "relay.toml"
    identity = init_config(path, relay=True)
    config = load_relay_config(path)
    assert config.load_identity().peer_id == identity.peer_id
    assert config.relay.access == "allow-list"
    assert config.relay.allowed_peers == []


def test_init_config_refuses_to_overwrite_and_keeps_the_old_identity(tmp_path):
    path = tmp_path / "node.toml"
    first = init_config(path)
    with pytest.raises(ConfigError) as info:
        init_config(path)
    assert str(path) in str(info.value)
    assert load_node_config(path).load_identity().peer_id == first.peer_id


def test_init_config_with_overwrite_replaces_the_identity(tmp_path):
    path = tmp_path / "node.toml"
    first = init_config(path)
    second = init_config(path, overwrite=True)
    assert first.peer_id != second.peer_id
    assert load_node_config(path).load_identity().peer_id == second.peer_id
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_write_config_over_an_existing_file_without_overwrite_raises(tmp_path):
    path = write(tmp_path, "# someone's file\n")
    with pytest.raises(ConfigError, match="already exists"):
        write_config(path, new_node_document(IDENTITY))
    assert path.read_text() == "# someone's file\n"


def test_write_config_with_overwrite_makes_a_readable_file_private(tmp_path):
    path = write(tmp_path, "old")
    path.chmod(0o644)
    assert not key_file_is_private(path)
    write_config(path, new_node_document(IDENTITY), overwrite=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_node_config(path).identity.private_key == IDENTITY.private_key_text


# -- defaults --


def test_file_with_only_identity_gives_all_defaults(tmp_path):
    config = load_node_config(write(tmp_path, IDENTITY_TOML))
    assert config.api == ApiSection()
    assert config.relay == RelayLinkSection()
    assert config.jobs == JobsSection()
    assert config.log == LogSection()
    assert config.api.endpoint == "tcp://127.0.0.1:7710"
    assert config.jobs.enabled == ["echo", "sha256", "sleep"]
    assert config.relay.endpoint == ""


def test_relay_file_with_only_identity_gives_all_defaults(tmp_path):
    config = load_relay_config(write(tmp_path, IDENTITY_TOML))
    assert config.relay == RelayServerSection()
    assert config.log == LogSection()


def test_executor_count_auto_is_positive_and_explicit_is_kept(tmp_path):
    auto = load_node_config(write(tmp_path, IDENTITY_TOML))
    assert auto.executor_count >= 1
    explicit = load_node_config(write(tmp_path, IDENTITY_TOML + "[jobs]\nexecutors = 3\n", "b.toml"))
    assert explicit.executor_count == 3


def test_the_running_cap_is_off_by_default_and_auto_leaves_one_executor(tmp_path):
    assert load_node_config(write(tmp_path, IDENTITY_TOML + "[jobs]\nexecutors = 4\n")).running_cap is None
    auto = IDENTITY_TOML + '[jobs]\nexecutors = 4\nmax_running_per_submitter = "auto"\n'
    assert load_node_config(write(tmp_path, auto, "b.toml")).running_cap == 3
    one = IDENTITY_TOML + '[jobs]\nexecutors = 1\nmax_running_per_submitter = "auto"\n'
    assert load_node_config(write(tmp_path, one, "c.toml")).running_cap == 1


def test_a_memory_budget_smaller_than_its_parts_is_refused_naming_them(tmp_path):
    text = IDENTITY_TOML + "[jobs]\nmax_queued_bytes = 1000\n[node]\nmemory_budget_bytes = 999\n"
    with pytest.raises(ConfigError) as info:
        load_node_config(write(tmp_path, text))
    assert "node.memory_budget_bytes" in str(info.value) and "jobs.max_queued_bytes = 1000" in str(info.value)


def test_good_values_are_loaded(tmp_path):
    other = Identity.generate().peer_id
    text = IDENTITY_TOML + (
        f'[api]\nendpoint = "tcp://0.0.0.0:7710"\nallowed_clients = ["{other}"]\n'
        f'[relay]\nendpoint = "tcp://relay:7700"\npeer_id = "{other}"\nheartbeat_interval = 2\n'
        '[jobs]\nenabled = ["echo"]\nqueue_size = 8\ndefault_timeout = 1.5\n[jobs.capabilities]\ngpus = 1\n'
        '[log]\nformat = "json"\nlevel = "debug"\n'
    )
    config = load_node_config(write(tmp_path, text))
    assert config.api.allowed_clients == [other]
    assert config.relay.heartbeat_interval == 2.0 and isinstance(config.relay.heartbeat_interval, float)
    assert config.jobs.queue_size == 8
    assert config.jobs.capabilities == {"gpus": 1}
    assert config.log.format == "json"


# -- bad values --


@pytest.mark.parametrize(
    "section,line,key",
    [
        ("jobs", "queue_size = -1", "jobs.queue_size"),
        ("jobs", "queue_size = 0", "jobs.queue_size"),
        ("jobs", "queue_size = 2.5", "jobs.queue_size"),
        ("jobs", "queue_size = true", "jobs.queue_size"),
        ("jobs", 'executors = "many"', "jobs.executors"),
        ("jobs", "executors = 0", "jobs.executors"),
        ("jobs", "max_running_per_submitter = -1", "jobs.max_running_per_submitter"),
        ("jobs", 'max_running_per_submitter = "half"', "jobs.max_running_per_submitter"),
        ("jobs", 'enabled = "echo"', "jobs.enabled"),
        ("jobs", "default_timeout = 0", "jobs.default_timeout"),
        ("jobs", "capabilities = 3", "jobs.capabilities"),
        ("jobs", "capabilities = { memory_gb = 16 }", "jobs.capabilities"),
        ("jobs", 'capabilities = { tier = "mainframe" }', "jobs.capabilities"),
        ("jobs", "capabilities = { gpus = -1 }", "jobs.capabilities"),
        ("relay", 'endpoint = "http://x"', "relay.endpoint"),
        ("relay", 'peer_id = "z6MkNotReally"', "relay.peer_id"),
        ("relay", "liveness = 0", "relay.liveness"),
        ("relay", "reconnect_max = -5", "relay.reconnect_max"),
        ("relay", "listen = [1, 2]", "relay.listen"),
        ("relay", "local_port = 65536", "relay.local_port"),
        ("relay", "local_port = -1", "relay.local_port"),
        ("relay", 'local_port = "7711"', "relay.local_port"),
        ("log", 'format = "xml"', "log.format"),
        ("log", 'level = "verbose"', "log.level"),
        ("api", 'allowed_clients = ["nope"]', "api.allowed_clients"),
        ("api", 'allowed_clients = "nope"', "api.allowed_clients"),
        ("api", 'endpoint = ""', "api.endpoint"),
    ],
)
def test_bad_value_names_file_key_and_expectation(tmp_path, section, line, key):
    path = write(tmp_path, f"{IDENTITY_TOML}[{section}]\n{line}\n")
    message = config_error(load_node_config, path)
    assert key in message
    assert "expected" in message


@pytest.mark.parametrize(
    "line,key",
    [
        ('bind = "udp://x"', "relay.bind"),
        ('access = "closed"', "relay.access"),
        ('allowed_peers = ["nope"]', "relay.allowed_peers"),
        ("high_water_mark = 0", "relay.high_water_mark"),
        ("listen_backlog = 0", "relay.listen_backlog"),
    ],
)
def test_bad_relay_server_value_names_file_key_and_expectation(tmp_path, line, key):
    path = write(tmp_path, f"{IDENTITY_TOML}[relay]\n{line}\n")
    message = config_error(load_relay_config, path)
    assert key in message and "expected" in message


def test_relay_listen_backlog_defaults_past_libzmqs_100_and_refuses_what_listen_cannot_take(tmp_path):
    assert load_relay_config(write(tmp_path, IDENTITY_TOML)).relay.listen_backlog == 4096
    kept = load_relay_config(write(tmp_path, f"{IDENTITY_TOML}[relay]\nlisten_backlog = 100\n", "kept.toml"))
    assert kept.relay.listen_backlog == 100
    for value in ("-1", "2.5", "true", '"4096"', str(2**31)):
        path = write(tmp_path, f"{IDENTITY_TOML}[relay]\nlisten_backlog = {value}\n", "bad.toml")
        message = config_error(load_relay_config, path)
        assert "relay.listen_backlog = " in message
        assert "expected an integer from 1 to 2147483647" in message, message


@pytest.mark.parametrize(
    "line,key",
    [
        ("[jobs]\ndefault_timeout = nan", "jobs.default_timeout"),
        ("[relay]\nheartbeat_interval = nan", "relay.heartbeat_interval"),
    ],
    ids=["jobs.default_timeout", "relay.heartbeat_interval"],
)
def test_nan_is_not_a_number_greater_than_zero(tmp_path, line, key):
    path = write(tmp_path, f"{IDENTITY_TOML}{line}\n")
    message = config_error(load_node_config, path)
    assert key in message and "expected" in message


def test_unknown_key_in_a_section_is_refused(tmp_path):
    path = write(tmp_path, f"{IDENTITY_TOML}[jobs]\nqueue_sise = 3\n")
    message = config_error(load_node_config, path)
    assert "unknown key" in message
    assert "jobs." in message and "queue_sise" in message
    assert "queue_size" in message  # the known keys are listed


def test_unknown_section_is_refused(tmp_path):
    path = write(tmp_path, f"{IDENTITY_TOML}[jbos]\nqueue_size = 3\n")
    message = config_error(load_node_config, path)
    assert "unknown key" in message and "jbos" in message


def test_relay_section_of_node_keys_is_refused_in_a_relay_config(tmp_path):
    path = write(tmp_path, f'{IDENTITY_TOML}[relay]\nendpoint = "tcp://x:1"\n')
    message = config_error(load_relay_config, path)
    assert "unknown key" in message and "endpoint" in message


def test_section_that_is_not_a_table_is_refused(tmp_path):
    path = write(tmp_path, f'log = "json"\n{IDENTITY_TOML}')
    message = config_error(load_node_config, path)
    assert "[log] must be a table" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("x = " + "[" * 500 + "]" * 500, "nested too deep"),  # tomllib recurses
        ("x = 1" + "0" * 4300, "not valid TOML for MeshNet"),  # int() refuses > 4300 digits
        ("[relay]\nheartbeat_interval = 0x" + "f" * 400, "fits a 64-bit float"),  # float() overflows
        ("# " + "x" * (1024 * 1024), "larger than"),
        (".".join(["a"] * 8000) + " = 1", "dotted parts"),  # tomllib is quadratic in them
        ("[" + ".".join(["a"] * 8000) + "]", "dotted parts"),
    ],
    ids=["deep", "long-integer", "huge-number", "huge-file", "long-dotted-key", "long-dotted-table"],
)
def test_toml_that_breaks_the_parser_or_the_numbers_is_one_config_error(tmp_path, text, expected):
    """Found by make fuzz: these escaped as RecursionError, ValueError, OverflowError, or
    took a second of CPU for 16 KB."""
    path = write(tmp_path, f"{IDENTITY_TOML}{text}\n")
    for loader in (load_node_config, load_relay_config):
        message = config_error(loader, path)
        assert expected in message


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[identity\nprivate_key = \n")
    message = config_error(load_node_config, path)
    assert "not valid TOML" in message


def test_missing_file_names_the_file(tmp_path):
    path = tmp_path / "absent.toml"
    message = config_error(load_node_config, path)
    assert "no such file" in message


def test_directory_instead_of_file_is_a_config_error(tmp_path):
    config_error(load_node_config, tmp_path)


def test_missing_private_key_is_refused(tmp_path):
    path = write(tmp_path, "[identity]\n")
    message = config_error(load_node_config, path)
    assert "identity.private_key" in message


def test_bad_private_key_is_refused(tmp_path):
    path = write(tmp_path, '[identity]\nprivate_key = "zNotAKey"\n')
    message = config_error(load_node_config, path)
    assert "identity.private_key" in message and "expected" in message


def test_mismatched_identity_peer_id_is_refused(tmp_path):
    other = Identity.generate().peer_id
    path = write(tmp_path, f'[identity]\nprivate_key = "{IDENTITY.private_key_text}"\npeer_id = "{other}"\n')
    message = config_error(load_node_config, path)
    assert "identity.peer_id" in message
    assert other in message and IDENTITY.peer_id in message


def test_unreadable_file_is_a_config_error(tmp_path):
    path = write(tmp_path, IDENTITY_TOML)
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as a user that can read any file")
        message = config_error(load_node_config, path)
        assert "not readable" in message
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    "line,expected",
    [
        ('addresses = ["198.51.100.1", "198.51.100.2", "198.51.100.3"]', "at most two IP addresses"),
        ('addresses = ["relay.example"]', "is not one"),
        ('addresses = ["198.51.100.1", "198.51.100.1"]', "two different IP addresses"),
        ("port = 0", "a port from 1 to 65535"),
        ("alt_port = 70000", "a port from 1 to 65535"),
        ('enabled = "yes"', "true or false"),
        ("port = 3478\nalt_port = 3478", "a port other than stun.port"),
    ],
)
def test_bad_stun_value_names_file_key_and_expectation(tmp_path, line, expected):
    path = write(tmp_path, f"{IDENTITY_TOML}[stun]\n{line}\n")
    message = config_error(load_relay_config, path)
    assert "stun." in message and expected in message, message


def test_the_stun_responder_is_on_by_default_on_the_standard_ports(tmp_path):
    stun = load_relay_config(write(tmp_path, IDENTITY_TOML)).stun
    assert (stun.enabled, stun.addresses, stun.port, stun.alt_port) == (True, [], 3478, 3479)


def test_an_unknown_capability_is_refused_pointing_at_labels(tmp_path):
    path = write(tmp_path, f"{IDENTITY_TOML}[jobs]\ncapabilities = {{ memory_gb = 16 }}\n")
    message = config_error(load_node_config, path)
    assert "jobs.capabilities" in message and "not 'memory_gb'" in message and "labels" in message
