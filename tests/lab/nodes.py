"""The real relay and nodes inside a lab (tests/lab/netlab.py): what every lab test and
script starts the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshnet.identity import Identity
from tests.harness import Mesh, MeshProcess
from tests.lab.netlab import Host, Lab

#: The relay's second address on the lab's internet: with it, its STUN responder answers
#: RFC 3489's CHANGE-REQUEST, which classifying a NAT needs.
RELAY_SECOND_IP = "198.51.100.2"
STUN_PORT, STUN_ALT_PORT = 3478, 3479


@dataclass
class LabRelay:
    host: Host
    identity: Identity
    endpoint: str


def start_relay(lab: Lab, mesh: Mesh, *, stun: bool = True) -> LabRelay:
    """The relay on a public host of ``lab`` (open access), with its STUN responder on both
    of its addresses when ``stun``."""
    host = lab.public_host("relay", *([RELAY_SECOND_IP] if stun else []))
    settings = {"addresses": [host.ip, RELAY_SECOND_IP], "port": STUN_PORT, "alt_port": STUN_ALT_PORT}
    path, identity, endpoint = mesh.relay_config(host=host.ip, access="open", stun=settings if stun else None)
    mesh.start_relay(path, prefix=lab.command(host.ns, []))
    return LabRelay(host, identity, endpoint)


def node_config(
    mesh: Mesh,
    relay: LabRelay,
    name: str,
    tmp: Path,
    identity: Identity,
    *,
    log_level: str = "info",
    jobs: dict[str, Any] | None = None,
    **relay_settings: Any,
) -> tuple[Path, str]:
    """A node of ``relay`` with direct links on (and ``relay_settings``); its config and
    its API endpoint (ipc: the test's process sits in no namespace, a socket file reaches
    it in any)."""
    api = f"ipc://{tmp}/{name}.sock"
    path, _, _ = mesh.node_config(
        name,
        identity,
        relay=(relay.endpoint, relay.identity.peer_id),
        api={"endpoint": api},
        log_level=log_level,
        jobs=jobs,
        relay_settings={"direct_links": True, **relay_settings},
    )
    return path, api


def spawn_node(lab: Lab, mesh: Mesh, host: Host, name: str, config: Path) -> MeshProcess:
    """``meshnet node`` run inside ``host``'s namespace."""
    return mesh.spawn(name, ["node", "--config", str(config)], prefix=lab.command(host.ns, []))
