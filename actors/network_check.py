"""NetworkCheckActor: what this node's network is, found out off the job loop.

The LAN address the node reaches its relay from (a DNS lookup and a UDP socket's route)
and its NAT type by STUN (pystun3: blocking, seconds) take time the job loop must not
wait. The relay client asks with :class:`CheckNetwork`; the answer, a
:class:`NetworkChecked`, comes back to its mailbox. A STUN server that does not answer,
or answers oddly, is an answer (``report`` None, ``error`` saying why); an actor that
fails is restarted by its supervisor, and the relay client is answered ``crashed``.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

import structlog

from actors.supervision import Request, SupervisedActor, Supervisor
from meshnet.endpoints import tcp_address
from meshnet.natcheck import NatReport, classify, local_ip_toward
from meshnet.node.core import NetworkChecked

log = structlog.get_logger("meshnet.natcheck")


@dataclass(frozen=True)
class CheckNetwork(Request):
    """Find out the LAN address toward ``relay_endpoint`` and the NAT type by STUN
    against ``stun`` (None: not asked)."""

    relay_endpoint: str = ""
    stun: tuple[str, int] | None = None

    def failure(self, error: str) -> NetworkChecked:
        return NetworkChecked(None, None, error, crashed=True)


class NetworkCheckActor(SupervisedActor):
    name = "network_check"

    def __init__(self, supervisor: Supervisor, peer_id: str) -> None:
        super().__init__(supervisor)
        self.log = log.bind(peer_id=peer_id)

    def handle(self, message: Any) -> Any:
        if not isinstance(message, CheckNetwork):
            return super().handle(message)
        message.reply_to(self._check(message))
        return None

    def _check(self, message: CheckNetwork) -> NetworkChecked:
        lan_ip: str | None = None
        report: NatReport | None = None
        started = time.monotonic()
        try:
            relay = tcp_address(message.relay_endpoint)
            if relay is not None:
                lan_ip = local_ip_toward((socket.gethostbyname(relay[0]), relay[1]))
            if message.stun is not None:
                report = classify(message.stun)
        except Exception as exc:  # pystun3 raises more than OSError on odd answers
            where = f"{message.stun[0]}:{message.stun[1]}" if message.stun is not None else "-"
            error = f"{type(exc).__name__}: {exc}"
            self.log.warning("nat_check_failed", stun=where, error=error, seconds=round(time.monotonic() - started, 2))
            return NetworkChecked(lan_ip, report, error)
        return NetworkChecked(lan_ip, report)
