"""The relay's STUN responder on UDP: the sockets of :class:`meshnet.stun.StunResponder`,
one per address it answers on, read on the relay's loop (they are plain sockets; the
loop polls them beside the ROUTER)."""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
from pathlib import Path

from meshnet.config import StunSection
from meshnet.endpoints import bind_failure, tcp_address
from meshnet.socket_loop import SocketLoop
from meshnet.stun import MAX_REQUEST_BYTES, Address, StunResponder

#: Datagrams read per wake-up before the loop's other work gets a turn.
RECV_BATCH = 64


def stun_addresses(settings: StunSection, relay_bind: str) -> list[str]:
    """The IPs to answer on: the configured ones, else the relay's bind address if that is
    an IP (all addresses if it is a wildcard or a name); none for a relay not on TCP."""
    if settings.addresses:
        return list(settings.addresses)
    address = tcp_address(relay_bind)
    if address is None:
        return []
    host = address[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return ["0.0.0.0"]  # '*' or a name: every IPv4 address
    return [str(ip)]


class StunServer:
    def __init__(self, loop: SocketLoop, settings: StunSection, relay_bind: str, config_path: Path | str | None):
        ips = stun_addresses(settings, relay_bind)
        self.loop = loop
        self.config_path = config_path
        self.responder: StunResponder | None = None
        if settings.enabled and ips:
            self.responder = StunResponder((ips[0], settings.port), ips[1] if len(ips) > 1 else None, settings.alt_port)
        self._sockets: dict[Address, socket.socket] = {}

    @property
    def addresses(self) -> list[Address]:
        return list(self._sockets)

    def open(self) -> None:
        """Bind every socket (on the loop thread); a StartupError names the one that
        could not be bound."""
        if self.responder is None:
            return
        for address in self.responder.addresses:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind(address)
            except OSError as exc:
                sock.close()
                self.close()
                number = exc.errno or errno.EINVAL
                key = "stun.port" if address[1] == self.responder.primary[1] else "stun.alt_port"
                where = f"udp://{address[0]}:{address[1]}"
                raise bind_failure(key, where, number, os.strerror(number), self.config_path) from None
            sock.setblocking(False)
            self._sockets[address] = sock
            self.loop.add_reader(sock, functools.partial(self._on_readable, address))

    def close(self) -> None:
        for sock in self._sockets.values():
            self.loop.close_socket(sock)
        self._sockets.clear()

    def _on_readable(self, local: Address) -> None:
        sock = self._sockets.get(local)
        responder = self.responder
        if sock is None or responder is None:
            return
        for _ in range(RECV_BATCH):
            try:
                data, remote = sock.recvfrom(MAX_REQUEST_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error from an earlier answer's destination: nothing to do
            reply = responder.on_datagram(data, local, (remote[0], remote[1]))
            if reply is None:
                continue
            out = self._sockets.get(reply.source)
            if out is None:
                continue
            try:
                out.sendto(reply.data, reply.to)
            except OSError:
                pass  # the client's address is unreachable now; it asks again if it cares
