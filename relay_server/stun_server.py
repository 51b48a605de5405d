"""The relay's STUN responder on UDP: the sockets of :class:`meshnet.stun.StunResponder`,
one per address it answers on, on a loop thread of their own (``stun``). A flood of
datagrams is read there, not on the relay's loop, and costs what the responder's buckets
let it: each datagram is counted against its source and the total before it is parsed,
and most of a flood is dropped at that. The relay's loop tells this one which IPs hold a
registered connection (:meth:`StunServer.set_members`); nothing else passes between them.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import structlog

from meshnet.config import StunSection
from meshnet.endpoints import bind_failure, tcp_address
from meshnet.errors import StartupError
from meshnet.socket_loop import SocketLoop, TimerHandle
from meshnet.stun import MAX_REQUEST_BYTES, Address, StunResponder

log = structlog.get_logger("meshnet.stun")

#: Datagrams read per wake-up before the loop's timers get a turn.
RECV_BATCH = 64
#: Seconds between lines that sum up the requests refused (rate-limited, malformed, or
#: asking for a change a stranger may not): one line at most this often, however many.
SUMMARY_INTERVAL = 10.0
#: What the summary counts (the responder's counts of requests not answered).
REFUSED = ("rate_limited", "dropped", "change_refused", "change_unavailable")


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
    def __init__(self, settings: StunSection, relay_bind: str, config_path: Path | str | None):
        ips = stun_addresses(settings, relay_bind)
        self.config_path = config_path
        self.responder: StunResponder | None = None
        if settings.enabled and ips:
            self.responder = StunResponder((ips[0], settings.port), ips[1] if len(ips) > 1 else None, settings.alt_port)
        #: Made when it starts: a responder that is off holds no thread and no pipe.
        self.loop: SocketLoop | None = None
        self._sockets: dict[Address, socket.socket] = {}
        self._summary: TimerHandle | None = None
        self._logged: Counter[str] = Counter()

    @property
    def addresses(self) -> list[Address]:
        return list(self._sockets)

    def start(self) -> None:
        """Bind every socket and start answering; a StartupError names the one that could
        not be bound (and nothing is left running)."""
        if self.responder is None:
            return
        self.loop = SocketLoop("stun").start()
        try:
            self.loop.run_sync(self._open)
        except StartupError:
            self.loop.stop()
            raise

    def stop(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.run_sync(self._close)
            self.loop.stop()

    def set_members(self, ips: Iterable[str]) -> None:
        """Any thread: the IPs of the nodes registered now (their CHANGE-REQUESTs are
        answered). A snapshot, handed to the loop: nothing is shared."""
        if self.responder is not None and self.loop is not None and self.loop.running:
            self.loop.call_soon(self.responder.set_members, frozenset(ips))

    # -- loop thread --

    def _open(self) -> None:
        assert self.responder is not None and self.loop is not None
        for address in self.responder.addresses:
            family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                sock.bind(address)
            except OSError as exc:
                sock.close()
                self._close()
                number = exc.errno or errno.EINVAL
                key = "stun.port" if address[1] == self.responder.primary[1] else "stun.alt_port"
                where = f"udp://{address[0]}:{address[1]}"
                raise bind_failure(key, where, number, os.strerror(number), self.config_path) from None
            sock.setblocking(False)
            self._sockets[address] = sock
            self.loop.add_reader(sock, functools.partial(self._on_readable, address))
        self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._log_summary)

    def _close(self) -> None:
        assert self.loop is not None
        if self._summary is not None:
            self._summary.cancel()
            self._summary = None
        for sock in self._sockets.values():
            self.loop.close_socket(sock)
        self._sockets.clear()

    def _log_summary(self) -> None:
        """One line for what was refused since the last (none if nothing was)."""
        assert self.responder is not None and self.loop is not None
        counts = self.responder.counts
        since = {what: counts[what] - self._logged[what] for what in REFUSED if counts[what] > self._logged[what]}
        if since:
            log.warning("stun_requests_refused", seconds=SUMMARY_INTERVAL, answered=counts["answered"], **since)
            self._logged.update(since)
        self._summary = self.loop.call_later(SUMMARY_INTERVAL, self._log_summary)

    def _on_readable(self, local: Address) -> None:
        sock = self._sockets.get(local)
        responder = self.responder
        if sock is None or responder is None:
            return
        now = time.monotonic()
        for _ in range(RECV_BATCH):
            try:
                data, remote = sock.recvfrom(MAX_REQUEST_BYTES + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # an ICMP error from an earlier answer's destination: nothing to do
            reply = responder.on_datagram(data, local, (remote[0], remote[1]), now)
            if reply is None:
                continue
            out = self._sockets.get(reply.source)
            if out is None:
                continue
            try:
                out.sendto(reply.data, reply.to)
            except OSError:
                pass  # the client's address is unreachable now; it asks again if it cares
