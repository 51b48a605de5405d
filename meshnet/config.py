"""Config files: load, validate, generate.

Every value has a default that runs. A bad file or value raises one ``ConfigError``
whose message names the file, the key and what was expected; unknown keys are errors
too, since a typo that silently falls back to a default is worse than a refusal.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import cbor2
import platformdirs
import tomli_w

from meshnet.capabilities import check_capabilities
from meshnet.endpoints import host_port
from meshnet.errors import ConfigError, IdentityError
from meshnet.flow import DEFAULT_WINDOW
from meshnet.identity import Identity, is_peer_id
from meshnet.memory_budget import DEFAULT_MEMORY_BUDGET
from meshnet.outbox import DEFAULT_MAX_UNREAD_BYTES
from meshnet.protocol.messages import addresses, capabilities, clip
from meshnet.protocol.strict_cbor import describe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

DEFAULT_API_ENDPOINT = "tcp://127.0.0.1:7710"
DEFAULT_RELAY_BIND = "tcp://127.0.0.1:7700"
#: Largest job payload or result. Large enough for model inputs of a few tensors, small
#: enough that a full queue (64 jobs) cannot exhaust a small device's memory by itself.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
#: Payload bytes of the jobs a node holds waiting and running.
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024
#: Jobs and results a node keeps waiting for room on its link to the relay.
DEFAULT_RELAY_QUEUE_BYTES = 128 * 1024 * 1024
#: Connections the relay's listening socket holds until it accepts them (relay.listen_backlog).
DEFAULT_LISTEN_BACKLOG = 4096
#: listen(2) takes a C int.
MAX_LISTEN_BACKLOG = 2**31 - 1


def default_config_path(name: str = "node.toml") -> Path:
    """Where a node or relay keeps its config when none is given."""
    return Path(platformdirs.user_config_dir("meshnet")) / name


# -- value checkers: each returns the cleaned value or raises ValueError(expected) --


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError("a number greater than 0")
    try:
        return float(value)
    except OverflowError:  # an integer past a float's range (TOML integers have no bound)
        raise ValueError("a number greater than 0 that fits a 64-bit float") from None


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError("an integer greater than 0")
    return value


def _port_or_zero(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ValueError("a TCP port from 1 to 65535, or 0 for one chosen at each connection")
    return value


def _stun_server(value: Any) -> str:
    if value in ("", "off"):
        return str(value)
    if isinstance(value, str) and host_port(value) is not None:
        return value
    raise ValueError('"HOST:PORT" of a STUN server, "" for the relay\'s (its host, port 3478), or "off"')


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("true or false")
    return value


def _stun_addresses(value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 2 or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of at most two IP addresses")
    for text in value:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"a list of at most two IP addresses ({describe(text)} is not one)") from None
    if len(set(value)) != len(value):
        raise ValueError("two different IP addresses (a second one answers CHANGE-REQUEST)")
    return list(value)


def _port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 65535:
        raise ValueError("a port from 1 to 65535")
    return value


def _listen_backlog(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_LISTEN_BACKLOG:
        raise ValueError(f"an integer from 1 to {MAX_LISTEN_BACKLOG} (the kernel caps it at net.core.somaxconn)")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("a string")
    return value


def _endpoint(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError("a ZeroMQ endpoint such as 'tcp://127.0.0.1:7710'")
    return value


def _optional_endpoint(value: Any) -> str:
    return "" if value == "" else _endpoint(value)


def _peer_id(value: Any) -> str:
    if not is_peer_id(value):
        raise ValueError("a peer id (multibase base58btc, starting with 'z6Mk'), as `meshnet id` prints")
    return str(value)


def _optional_peer_id(value: Any) -> str:
    return "" if value == "" else _peer_id(value)


def _peer_ids(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise ValueError("a list of peer ids")
    return [_peer_id(v) for v in value]


def _addresses(value: Any) -> list[str]:
    # Sent to the relay in every register, within the wire's limits.
    return addresses(value)


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("a list of strings")
    return list(value)


def _one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError("one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return check


def _running_cap(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ValueError("'auto' or an integer of 0 (no cap) or more")


def _executors(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    try:
        return _positive_int(value)
    except ValueError:
        raise ValueError("'auto' (one per core) or an integer greater than 0") from None


#: Capabilities go to the relay in a ``register`` (whose header may be 64 KiB) and from
#: it to every node that lists peers: a few KiB describe any device.
MAX_CAPABILITIES_BYTES = 16 * 1024


def _capabilities(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("a table of capabilities")
    # Sent to the relay as CBOR, within the wire's limits: no TOML dates or times.
    checked = check_capabilities(capabilities(value))
    if len(cbor2.dumps(checked)) > MAX_CAPABILITIES_BYTES:
        raise ValueError(f"a table of capabilities of at most {MAX_CAPABILITIES_BYTES} bytes as CBOR")
    return checked


def _private_key(value: Any) -> str:
    try:
        Identity.from_private_key(value)
    except IdentityError as exc:
        raise ValueError(f"an Ed25519 private key as `meshnet init` writes it ({exc})") from None
    return str(value)


def _check(checker: Callable[[Any], Any]) -> dict[str, Any]:
    return {"check": checker}


# -- sections --


@dataclass
class IdentitySection:
    private_key: str = field(default="", metadata=_check(_private_key))
    #: Written for people reading the file; checked against the key when present.
    peer_id: str = field(default="", metadata=_check(_optional_peer_id))


@dataclass
class ApiSection:
    #: Where clients reach the node. Loopback by default; anywhere else needs CurveZMQ
    #: and ``allowed_clients``.
    endpoint: str = field(default=DEFAULT_API_ENDPOINT, metadata=_check(_endpoint))
    allowed_clients: list[str] = field(default_factory=list, metadata=_check(_peer_ids))
    #: Bytes of answers a client connection may leave unread: past half of it its new
    #: jobs are refused ``busy``, past all of it what waits is discarded (meshnet.outbox).
    max_unread_bytes: int = field(default=DEFAULT_MAX_UNREAD_BYTES, metadata=_check(_positive_int))


@dataclass
class RelayLinkSection:
    #: Empty: the node runs alone.
    endpoint: str = field(default="", metadata=_check(_optional_endpoint))
    #: The relay's peer id: its CurveZMQ server key derives from it.
    peer_id: str = field(default="", metadata=_check(_optional_peer_id))
    heartbeat_interval: float = field(default=1.0, metadata=_check(_positive_number))
    #: Missed heartbeats before the relay is declared lost.
    liveness: int = field(default=3, metadata=_check(_positive_int))
    reconnect_min: float = field(default=0.1, metadata=_check(_positive_number))
    reconnect_max: float = field(default=5.0, metadata=_check(_positive_number))
    #: The local TCP port the node connects to the relay from, kept while the connection
    #: lasts (libzmq reconnects from it too): what the relay observes on it is what a peer
    #: sees when this node punches from the same port. 0: a free port for each new socket.
    local_port: int = field(default=0, metadata=_check(_port_or_zero))
    #: The STUN server the node classifies its NAT against, off the hot path, before it
    #: offers peers a hole punch: "" the relay's own responder (the relay's host, port
    #: 3478), "HOST:PORT" another, "off" none (punches are then tried without the type).
    stun: str = field(default="", metadata=_check(_stun_server))
    #: The port of the node's direct listener (every address), which peers dial when this
    #: node's NAT forwards any port to it (or it has none), and nodes behind the same NAT
    #: dial over the LAN. 0: a free port chosen at start.
    direct_port: int = field(default=0, metadata=_check(_port_or_zero))
    #: false: this node makes no direct links (every job goes through the relay), and
    #: declines its peers' offers.
    direct_links: bool = field(default=True, metadata=_check(_bool))
    #: Addresses where this node accepts direct connections, told to peers.
    listen: list[str] = field(default_factory=list, metadata=_check(_addresses))
    #: Bytes of jobs and results waiting for room on the link to the relay (which takes
    #: a window of bytes at a time); past it, jobs for peers are refused ``relay_busy``.
    max_queued_bytes: int = field(default=DEFAULT_RELAY_QUEUE_BYTES, metadata=_check(_positive_int))


@dataclass
class JobsSection:
    enabled: list[str] = field(default_factory=lambda: ["echo", "sha256", "sleep"], metadata=_check(_strings))
    queue_size: int = field(default=64, metadata=_check(_positive_int))
    executors: int | str = field(default="auto", metadata=_check(_executors))
    default_timeout: float = field(default=60.0, metadata=_check(_positive_number))
    max_timeout: float = field(default=24 * 3600.0, metadata=_check(_positive_number))
    max_payload_bytes: int = field(default=DEFAULT_MAX_PAYLOAD_BYTES, metadata=_check(_positive_int))
    #: Payload bytes of the jobs waiting and running at once; past it new jobs are
    #: refused ``busy`` (a full queue of largest payloads would be 64 x 64 MiB).
    max_queued_bytes: int = field(default=DEFAULT_MAX_QUEUED_BYTES, metadata=_check(_positive_int))
    #: Jobs one submitter (a client connection, or a peer) may run at once; the executors
    #: go to the submitters in turn whatever this is. 0: no cap (a node one user feeds,
    #: whose every executor one submitter may take). "auto": one executor fewer than the
    #: node has (at least 1), so that no one submitter's long jobs hold them all.
    max_running_per_submitter: int | str = field(default=0, metadata=_check(_running_cap))
    #: On SIGTERM, how long running jobs may take to finish before they are killed.
    drain_grace: float = field(default=10.0, metadata=_check(_positive_number))
    #: Advertised to the relay, over what the node detects (meshnet.capabilities): any
    #: of cores, memory_bytes, arch, os, gpus, gpu_models, gpu_memory_bytes, tier, and
    #: labels of your own (e.g. ``gpus = 1``, ``tier = "server"``, ``labels = { site = "lab" }``).
    capabilities: dict[str, Any] = field(default_factory=dict, metadata=_check(_capabilities))


@dataclass
class NodeSection:
    #: Bytes the node holds at most, all its parts together: jobs waiting and running,
    #: answers its clients have not read (queued in ZeroMQ included), what its sessions
    #: hold for peers. Past it new jobs are refused ``busy`` and the slowest readers cut.
    memory_budget_bytes: int = field(default=DEFAULT_MEMORY_BUDGET, metadata=_check(_positive_int))


@dataclass
class LogSection:
    format: str = field(default="console", metadata=_check(_one_of("console", "json")))
    level: str = field(default="info", metadata=_check(_one_of("debug", "info", "warning", "error")))


@dataclass
class RelayServerSection:
    bind: str = field(default=DEFAULT_RELAY_BIND, metadata=_check(_endpoint))
    #: ``allow-list``: only ``allowed_peers`` may connect. ``open``: any key (local demos).
    access: str = field(default="allow-list", metadata=_check(_one_of("allow-list", "open")))
    allowed_peers: list[str] = field(default_factory=list, metadata=_check(_peer_ids))
    heartbeat_interval: float = field(default=1.0, metadata=_check(_positive_number))
    liveness: int = field(default=3, metadata=_check(_positive_int))
    max_message_bytes: int = field(default=DEFAULT_MAX_PAYLOAD_BYTES + 65536, metadata=_check(_positive_int))
    #: Messages queued per connected node before the relay answers ``unroutable: busy``.
    high_water_mark: int = field(default=1000, metadata=_check(_positive_int))
    #: Bytes the relay sends a node that it has not read, and as much again that waits
    #: for it (past both, messages to it are refused ``relay_busy``); and bytes it takes
    #: from a node before acknowledging them.
    max_unread_bytes: int = field(default=DEFAULT_WINDOW, metadata=_check(_positive_int))
    #: Connections waiting to be accepted (listen(2)'s backlog); the kernel caps it at
    #: net.core.somaxconn. libzmq's default, 100, overflowed under a burst of nodes
    #: reconnecting after a relay restart.
    listen_backlog: int = field(default=DEFAULT_LISTEN_BACKLOG, metadata=_check(_listen_backlog))


@dataclass
class StunSection:
    """The relay's STUN responder (UDP; meshnet.stun): nodes learn their public address
    and NAT type from it."""

    enabled: bool = field(default=True, metadata=_check(_bool))
    #: The IPs it answers on. Empty: the relay's bind address (all addresses if that is
    #: not an IP). A second IP lets it answer CHANGE-REQUEST, which NAT classification
    #: (full cone or restricted) needs.
    addresses: list[str] = field(default_factory=list, metadata=_check(_stun_addresses))
    port: int = field(default=3478, metadata=_check(_port))
    #: The second port, for CHANGE-REQUEST's "change port" (RFC 3489).
    alt_port: int = field(default=3479, metadata=_check(_port))


@dataclass
class NodeConfig:
    identity: IdentitySection = field(default_factory=IdentitySection)
    api: ApiSection = field(default_factory=ApiSection)
    relay: RelayLinkSection = field(default_factory=RelayLinkSection)
    jobs: JobsSection = field(default_factory=JobsSection)
    node: NodeSection = field(default_factory=NodeSection)
    log: LogSection = field(default_factory=LogSection)
    path: Path | None = None

    def load_identity(self) -> Identity:
        return Identity.from_private_key(self.identity.private_key)

    @property
    def executor_count(self) -> int:
        if self.jobs.executors == "auto":
            return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return int(self.jobs.executors)

    @property
    def running_cap(self) -> int | None:
        """Jobs one submitter may run at once (None: no cap); see
        ``jobs.max_running_per_submitter``."""
        cap = self.jobs.max_running_per_submitter
        if cap == "auto":
            cap = max(1, self.executor_count - 1)
        return int(cap) or None


@dataclass
class RelayConfig:
    identity: IdentitySection = field(default_factory=IdentitySection)
    relay: RelayServerSection = field(default_factory=RelayServerSection)
    stun: StunSection = field(default_factory=StunSection)
    log: LogSection = field(default_factory=LogSection)
    path: Path | None = None

    def load_identity(self) -> Identity:
        return Identity.from_private_key(self.identity.private_key)


def _build(cls: type, table: dict[str, Any], where: str, prefix: str) -> Any:
    known = {f.name: f for f in fields(cls) if f.name != "path"}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{prefix}{unknown[0]}'; expected one of {', '.join(sorted(known))}")
    values = {}
    for name, value in table.items():
        spec = known[name]
        key = f"{prefix}{name}"
        if "check" in spec.metadata:
            try:
                values[name] = spec.metadata["check"](value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {key} = {describe(value)}: expected {exc}") from None
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: [{key}] must be a table, got {type(value).__name__}")
            values[name] = _build(spec.default_factory, value, where, f"{key}.")  # type: ignore[arg-type]
    return cls(**values)


#: A config is a few kilobytes; anything far larger is not one (and tomllib's cost grows
#: faster than linearly on some shapes).
MAX_CONFIG_BYTES = 1024 * 1024


#: Parts a dotted key may have. MeshNet's deepest key has 3 (``jobs.capabilities.gpus``);
#: tomllib's cost grows with the square of a key's parts (8000 parts, 16 KB: a second).
MAX_KEY_PARTS = 64


def _check_key_parts(text: str, path: Path) -> None:
    """Refuse a key or table header of more than ``MAX_KEY_PARTS`` dotted parts before
    tomllib reads it (a quoted part with dots in it counts them too: no real key has
    that many)."""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if "=" in stripped:
            key = stripped.split("=", 1)[0]
        elif stripped.startswith("["):
            key = stripped
        else:
            continue
        if key.count(".") >= MAX_KEY_PARTS:
            raise ConfigError(
                f"{path}: line {number}: a key of more than {MAX_KEY_PARTS} dotted parts; MeshNet's have at most 3"
            )


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the right file?")
        text = data.decode("utf-8")
        _check_key_parts(text, path)
        table: dict[str, Any] = tomllib.loads(text)
        return table
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; create one with `meshnet init --config {path}`") from None
    except PermissionError:
        raise ConfigError(f"{path}: not readable by this user") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    except RecursionError:  # arrays or inline tables nested hundreds deep
        raise ConfigError(f"{path}: not valid TOML for MeshNet: values nested too deep") from None
    except ValueError as exc:  # tomllib: an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid TOML for MeshNet: {clip(str(exc), 200)}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def load_node_config(path: Path) -> NodeConfig:
    config: NodeConfig = _build(NodeConfig, _read(path), str(path), "")
    config.path = path
    _require_identity(config, path)
    if config.relay.endpoint and not config.relay.peer_id:
        raise ConfigError(
            f"{path}: relay.peer_id is missing: with relay.endpoint set, expected the relay's peer id "
            "(`meshnet id --relay --config RELAY.toml` prints it)"
        )
    if config.relay.reconnect_min > config.relay.reconnect_max:
        raise ConfigError(f"{path}: relay.reconnect_min: expected at most relay.reconnect_max")
    parts = config.jobs.max_queued_bytes + (2 * config.relay.max_queued_bytes if config.relay.endpoint else 0)
    if config.node.memory_budget_bytes < parts:
        what = "jobs.max_queued_bytes" + (" + 2 x relay.max_queued_bytes" if config.relay.endpoint else "")
        raise ConfigError(
            f"{path}: node.memory_budget_bytes: expected at least what its parts may hold on their own, "
            f"{what} = {parts}; raise it or lower those"
        )
    return config


def load_relay_config(path: Path) -> RelayConfig:
    config: RelayConfig = _build(RelayConfig, _read(path), str(path), "")
    config.path = path
    _require_identity(config, path)
    if config.stun.alt_port == config.stun.port:
        raise ConfigError(f"{path}: stun.alt_port: expected a port other than stun.port ({config.stun.port})")
    return config


def _require_identity(config: NodeConfig | RelayConfig, path: Path) -> None:
    if not config.identity.private_key:
        raise ConfigError(f"{path}: identity.private_key is missing; `meshnet init --config {path}` writes one")
    derived = config.load_identity().peer_id
    if config.identity.peer_id and config.identity.peer_id != derived:
        raise ConfigError(
            f"{path}: identity.peer_id = {config.identity.peer_id!r} does not match identity.private_key "
            f"(which gives {derived!r}); fix or remove identity.peer_id"
        )


def key_file_is_private(path: Path) -> bool:
    """False when group or others can read the file that holds a private key."""
    return not (path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def write_config(path: Path, document: dict[str, Any], *, overwrite: bool = False) -> None:
    """Write a TOML config readable by its owner only (it holds a private key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path}: already exists; pass --force to replace it (its identity is lost)") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        tomli_w.dump(document, fh)


def new_node_document(identity: Identity) -> dict[str, Any]:
    return {
        "identity": {"private_key": identity.private_key_text, "peer_id": identity.peer_id},
    }


def init_config(path: Path, *, relay: bool = False, overwrite: bool = False) -> Identity:
    """Create a config holding a new identity; every other value keeps its default."""
    identity = Identity.generate()
    document = new_node_document(identity)
    if relay:
        document["relay"] = {"access": "allow-list", "allowed_peers": []}
    write_config(path, document, overwrite=overwrite)
    return identity
