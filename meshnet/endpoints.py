"""What kind of ZeroMQ endpoint an address is."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

from meshnet.errors import StartupError


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this machine can reach: loopback TCP, ipc, inproc."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or '*': anything may reach it


def bind_failure(
    key: str, endpoint: str, error_number: int, cause: str, config_path: Path | str | None = None
) -> StartupError:
    """The error for config key ``key`` naming an ``endpoint`` this process cannot bind
    (``error_number`` and ``cause`` as the bind reported them): one line, with the fix."""
    where = str(config_path) if config_path else "the config file"
    if error_number == errno.EADDRINUSE:
        fix = f"another process listens there; stop it or set {key} in {where}"
    elif error_number in (errno.EADDRNOTAVAIL, errno.ENODEV):
        fix = f"this machine has no such address or interface; set {key} in {where}"
    elif error_number == errno.EACCES:
        fix = f"this user may not listen there (ports below 1024 need privileges); set {key} in {where}"
    else:
        fix = f"set {key} in {where} to an address this machine can listen on"
    return StartupError(f"{key} = {endpoint} cannot be bound ({cause}): {fix}")
