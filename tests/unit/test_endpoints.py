"""The one-line error for an endpoint that cannot be bound: the key, the cause, the fix."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from meshnet.endpoints import bind_failure, connect_from, free_tcp_port, host_port, tcp_address
from meshnet.errors import MeshError, StartupError


def test_an_endpoint_in_use_names_the_key_the_cause_and_the_fix() -> None:
    error = bind_failure(
        "relay.bind", "tcp://127.0.0.1:7700", errno.EADDRINUSE, os.strerror(errno.EADDRINUSE), Path("/etc/relay.toml")
    )
    assert isinstance(error, StartupError) and isinstance(error, MeshError)
    assert str(error) == (
        "relay.bind = tcp://127.0.0.1:7700 cannot be bound (Address already in use): "
        "another process listens there; stop it or set relay.bind in /etc/relay.toml"
    )


def test_other_causes_get_their_own_fix() -> None:
    missing = bind_failure("api.endpoint", "tcp://10.9.9.9:7710", errno.EADDRNOTAVAIL, os.strerror(errno.EADDRNOTAVAIL))
    assert "(Cannot assign requested address): this machine has no such address" in str(missing)
    assert "set api.endpoint in the config file" in str(missing)
    denied = bind_failure("api.endpoint", "tcp://0.0.0.0:80", errno.EACCES, "Permission denied", "node.toml")
    assert "ports below 1024" in str(denied) and "node.toml" in str(denied)
    other = bind_failure("api.endpoint", "ipc:///no/such/dir/api", errno.ENOENT, "No such file or directory")
    assert str(other).endswith("set api.endpoint in the config file to an address this machine can listen on")


def test_a_tcp_endpoint_is_connected_from_a_local_port_in_libzmqs_source_form() -> None:
    assert connect_from("tcp://198.51.100.7:7700", 40001) == "tcp://0.0.0.0:40001;198.51.100.7:7700"
    assert connect_from("tcp://relay.example:7700", 40001) == "tcp://0.0.0.0:40001;relay.example:7700"
    assert connect_from("tcp://[2001:db8::1]:7700", 40001) == "tcp://[::]:40001;[2001:db8::1]:7700"
    assert connect_from("ipc:///tmp/relay", 40001) == "ipc:///tmp/relay"


def test_tcp_address_reads_host_and_port_and_nothing_else() -> None:
    assert tcp_address("tcp://198.51.100.7:7700") == ("198.51.100.7", 7700)
    assert tcp_address("tcp://[2001:db8::1]:7700") == ("2001:db8::1", 7700)
    for endpoint in ("ipc:///tmp/x", "tcp://host", "tcp://host:port", "tcp://0.0.0.0:1;h:2"):
        assert tcp_address(endpoint) is None, endpoint


def test_a_free_tcp_port_can_be_bound() -> None:
    port = free_tcp_port()
    with socket.socket() as sock:
        sock.bind(("0.0.0.0", port))


def test_host_port_reads_host_and_port_and_refuses_what_cannot_be_dialled() -> None:
    assert host_port("198.51.100.1:3478") == ("198.51.100.1", 3478)
    assert host_port("stun.example:3478") == ("stun.example", 3478)
    assert host_port("[2001:db8::1]:3478") == ("2001:db8::1", 3478)
    for text in ("", "3478", ":3478", "host:", "host:0", "host:65536", "host:port"):
        assert host_port(text) is None, text
