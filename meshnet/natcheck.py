"""What kind of NAT this machine is behind, and its public UDP address, by RFC 3489 STUN
tests (pystun3) against a STUN server: the relay's own responder, or any other.

It takes seconds (a test that gets no answer waits out its timeout, several times), so
it runs off the hot path: from ``meshnet netcheck``, or a thread of the node's. The
quirks of pystun3 seen on real NATs (NAT-LAB) are handled here:

- It is told the local address the socket really uses toward the server: with the
  wildcard it calls a host with a public address "Full Cone" instead of "Open Internet".
- The public address is read from the first test's answer: ``get_ip_info`` returns the
  last test's, which behind a port-restricted NAT is the unanswered one (None).
- A server with one address cannot answer CHANGE-REQUEST, and pystun3 would then read a
  public host as a "Symmetric UDP Firewall" and crash on the missing CHANGED-ADDRESS
  behind a NAT: without one, only "open" or "behind a NAT" is reported.
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass
from typing import Any

import stun

from meshnet.endpoints import host_port, tcp_address

#: pystun3's names, and ours (what `meshnet netcheck`, status and the hole-punch rules use).
NAT_TYPES = {
    stun.OpenInternet: "open",
    stun.FullCone: "full_cone",
    stun.RestricNAT: "restricted",
    stun.RestricPortNAT: "port_restricted",
    stun.SymmetricNAT: "symmetric",
    stun.SymmetricUDPFirewall: "symmetric_firewall",
    stun.Blocked: "blocked",
    stun.ChangedAddressError: "unknown",
}
#: Where a relay's STUN responder listens unless its config says otherwise (stun.port).
DEFAULT_STUN_PORT = 3478
#: Seconds each STUN test waits for an answer (pystun3 sends each up to 4 times). Past a
#: NAT on a real network an answer takes tens of milliseconds.
TEST_TIMEOUT = 0.5


@dataclass(frozen=True)
class NatReport:
    #: One of NAT_TYPES' values, or "nat" (behind a NAT whose kind the server could not
    #: tell: it has one address).
    nat_type: str
    #: The public address of the UDP socket as the server saw it ("" if it never answered).
    public_address: str
    local_address: str
    server: str
    #: Whether the server offered a second address (CHANGE-REQUEST answered).
    classified: bool
    seconds: float
    #: pystun3's own word for it.
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def stun_server(setting: str, relay_endpoint: str) -> tuple[str, int] | None:
    """The STUN server of ``relay.stun``: "off" none, "HOST:PORT" that one, "" the relay's
    own responder (its host, DEFAULT_STUN_PORT; none for a relay not on tcp://)."""
    if setting == "off":
        return None
    if setting:
        return host_port(setting)
    relay = tcp_address(relay_endpoint)
    return (relay[0], DEFAULT_STUN_PORT) if relay is not None else None


def local_ip_toward(server: tuple[str, int]) -> str:
    """The local IP this machine sends from to ``server`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(server)
        return str(probe.getsockname()[0])


def classify(server: tuple[str, int], *, timeout: float = TEST_TIMEOUT) -> NatReport:
    """Run the RFC 3489 tests against STUN server ``server`` (host, port)."""
    started = time.monotonic()
    host = socket.gethostbyname(server[0])
    target = (host, server[1])
    local_ip = local_ip_toward(target)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.bind((local_ip, 0))
        local_port = sock.getsockname()[1]
        stun._initialize()  # pystun3 fills its lookup tables here, not at import
        first = stun.stun_test(sock, host, server[1], local_ip, local_port)
        public = f"{first['ExternalIP']}:{first['ExternalPort']}" if first["Resp"] else ""
        where = f"{host}:{server[1]}"

        def report(nat_type: str, classified: bool, detail: str = "") -> NatReport:
            took = round(time.monotonic() - started, 3)
            return NatReport(nat_type, public, f"{local_ip}:{local_port}", where, classified, took, detail)

        if not first["Resp"]:
            return report("blocked", False, stun.Blocked)
        if first["ChangedIP"] is None:
            return report("open" if first["ExternalIP"] == local_ip else "nat", False)
        detail, _ = stun.get_nat_type(sock, local_ip, local_port, stun_host=host, stun_port=server[1])
        return report(NAT_TYPES.get(detail, "unknown"), True, detail)
