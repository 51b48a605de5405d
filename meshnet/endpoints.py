"""What kind of ZeroMQ endpoint an address is."""

from __future__ import annotations

import ipaddress


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
