"""The one-line error for an endpoint that cannot be bound: the key, the cause, the fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from meshnet.endpoints import bind_failure
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
