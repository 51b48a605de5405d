"""What kind of ZeroMQ endpoint an address is."""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Callable
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


def tcp_address(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of a ``tcp://HOST:PORT`` endpoint (an IPv6 host without its
    brackets); None for any other endpoint, or a port that is not a number."""
    if not endpoint.startswith("tcp://") or ";" in endpoint:
        return None
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def host_port(text: str) -> tuple[str, int] | None:
    """(host, port) of ``HOST:PORT`` (an IPv6 host in brackets, returned without them);
    None unless the port is a number from 1 to 65535 and the host is not empty."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def connect_from(endpoint: str, local_port: int) -> str:
    """``endpoint`` connected from local port ``local_port``, in libzmq's
    ``tcp://SRC:PORT;HOST:PORT`` form: the address a NAT maps that port to, which the
    relay sees, is then the one a peer sees when this node punches from the same port.
    Endpoints other than ``tcp://`` are returned as they are."""
    address = tcp_address(endpoint)
    if address is None:
        return endpoint
    source = "[::]" if ":" in address[0] else "0.0.0.0"
    return f"tcp://{source}:{local_port};{endpoint[len('tcp://') :]}"


def free_tcp_port(ipv6: bool = False) -> int:
    """A local TCP port no socket holds now (the kernel's choice). Another process can
    take it before it is used; a connect from it then fails, and is retried from a new one."""
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind(("::" if ipv6 else "0.0.0.0", 0))
        return int(sock.getsockname()[1])


def port_picker(endpoint: str) -> Callable[[], int] | None:
    """What picks the local port of each new connection to ``endpoint`` (None: it is not
    on tcp://, and its connections have no port of their own)."""
    address = tcp_address(endpoint)
    if address is None:
        return None
    ipv6 = ":" in address[0]
    return lambda: free_tcp_port(ipv6=ipv6)
