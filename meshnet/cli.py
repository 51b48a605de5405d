"""The ``meshnet`` command.

Every failure prints one line starting with ``error:`` and exits non-zero; tracebacks
are for bugs only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

from meshnet.config import (
    DEFAULT_API_ENDPOINT,
    default_config_path,
    init_config,
    key_file_is_private,
    load_node_config,
    load_relay_config,
)
from meshnet.errors import JobError, MeshError
from meshnet.logs import configure_logging
from meshnet.memory import keep_freed_buffers
from meshnet.requirements import check_requirements, describe

EXIT_FAILURE = 1
EXIT_JOB_FAILED = 2
#: What a shell expects of a command stopped by Ctrl-C (128 + SIGINT).
EXIT_INTERRUPTED = 130
#: How long ``submit`` waits, after Ctrl-C, for its cancelled job's end.
CANCEL_WAIT = 5.0


def _configure_logging(
    fmt: str = "console", level: str = "info", static: dict[str, str] | None = None, *, final: bool = True
) -> None:
    """Log as the config says; ``MESHNET_LOG_FORMAT`` / ``MESHNET_LOG_LEVEL`` override it."""
    fmt = os.environ.get("MESHNET_LOG_FORMAT", fmt)
    level = os.environ.get("MESHNET_LOG_LEVEL", level)
    if fmt not in ("console", "json") or level not in ("debug", "info", "warning", "error"):
        raise MeshError("MESHNET_LOG_FORMAT must be console or json, MESHNET_LOG_LEVEL debug, info, warning or error")
    configure_logging(fmt, level, static, final=final)


def _config_path(args: argparse.Namespace, name: str) -> Path:
    return Path(args.config) if args.config else default_config_path(name)


def _load_node(path: Path, create: bool) -> Any:
    if create and not path.exists():
        identity = init_config(path)
        structlog.get_logger("meshnet").info("config_created", path=str(path), peer_id=identity.peer_id)
    config = load_node_config(path)
    _warn_if_readable(path)
    return config


def _warn_if_readable(path: Path) -> None:
    if not key_file_is_private(path):
        structlog.get_logger("meshnet").warning(
            "config_readable_by_others", path=str(path), fix=f"chmod 600 {path}", why="it holds a private key"
        )


#: What stops a node or a relay.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Written to the wakeup pipe (no signal has number 0) when a node must stop because a
#: supervised actor failed past its restart budget.
FAILED = 0


def _catch_stop_signals() -> tuple[int, int]:
    """From now on SIGTERM and SIGINT are caught, however many come, and each one's
    number reaches a pipe, whose reading and writing ends this returns (the reading end
    for :func:`_wait_for_signal`; the writing end takes :data:`FAILED` too).
    Called before the process starts anything, so that a signal that comes while it
    starts is kept, not fatal.

    The C library's handler writes the number (``signal.set_wakeup_fd``): a signal sent
    to the process reaches whichever thread does not block it, often not the main one,
    and a Python handler runs only once the main thread runs Python again, which it does
    not while it waits. (Waiting on an Event, as this did, also took a lock in the
    handler: a second signal while the first held it hung the process for good.)"""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for stop in STOP_SIGNALS:
        signal.signal(stop, _noted)
    return read_end, write_end


def _noted(signum: int, frame: Any) -> None:
    """The Python side of a stop signal: nothing (its number went to the wakeup pipe)."""


def _wait_for_signal(read_end: int) -> int:
    """Block until the first stop signal (or :data:`FAILED`); return its number. The later
    ones are said and change nothing (other signals with a handler, SIGUSR1's thread
    dump, pass by)."""
    while True:
        received = os.read(read_end, 64)
        stops = [i for i, signum in enumerate(received) if signum in STOP_SIGNALS or signum == FAILED]
        if stops:
            later = bytes(received[stops[0] + 1 :])
            threading.Thread(target=_say_later_signals, args=(read_end, later), name="signals", daemon=True).start()
            return received[stops[0]]


def _say_later_signals(read_end: int, received: bytes) -> None:
    """The stop signals that come while the process stops: logged, nothing more."""
    log = structlog.get_logger("meshnet")
    while True:
        for signum in received:
            if signum in STOP_SIGNALS:
                log.info("signal_received", signal=signal.Signals(signum).name, action="already stopping")
        try:
            received = os.read(read_end, 64)
        except OSError:
            return


def cmd_init(args: argparse.Namespace) -> int:
    path = _config_path(args, "relay.toml" if args.relay else "node.toml")
    identity = init_config(path, relay=args.relay, overwrite=args.force)
    print(f"wrote {path}")
    print(f"peer id: {identity.peer_id}")
    return 0


def cmd_id(args: argparse.Namespace) -> int:
    path = _config_path(args, "node.toml")
    config = load_node_config(path) if not args.relay else load_relay_config(path)
    print(config.load_identity().peer_id)
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from actors.supervisor import Node  # the actors pull in pykka and multiprocessing: only nodes need them

    _configure_logging(final=False)
    config = _load_node(_config_path(args, "node.toml"), create=not args.config)
    _configure_logging(config.log.format, config.log.level, {"peer_id": config.load_identity().peer_id})
    keep_freed_buffers()  # this process is the node's own
    signals, wake = _catch_stop_signals()
    node = Node(config, on_fatal=lambda why: _wake(wake)).start()
    _install_thread_dump()
    log = structlog.get_logger("meshnet")
    try:
        signum = _wait_for_signal(signals)
        if signum != FAILED:
            log.info("signal_received", signal=signal.Signals(signum).name)
    finally:
        node.stop()
        _ignore_stop_signals()
    if node.failure is not None:
        log.error("node_failed", error=node.failure, fix="see the actor_restarted lines above for its errors")
        return 1
    return 0


def _wake(write_end: int) -> None:
    """Any thread: wake the main thread's wait, to stop the node (:data:`FAILED`)."""
    try:
        os.write(write_end, bytes([FAILED]))
    except BlockingIOError:
        pass  # the pipe is full of wakeups already


def cmd_relay(args: argparse.Namespace) -> int:
    from relay_server.daemon import RelayServer

    _configure_logging(final=False)
    path = _config_path(args, "relay.toml")
    if not args.config and not path.exists():
        init_config(path, relay=True)
    config = load_relay_config(path)
    _warn_if_readable(path)
    _configure_logging(config.log.format, config.log.level, {"relay_id": config.load_identity().peer_id})
    keep_freed_buffers()  # this process is the relay's own
    signals, _ = _catch_stop_signals()
    server = RelayServer(config).start()
    try:
        _wait_for_signal(signals)
    finally:
        server.stop()
        _ignore_stop_signals()
    return 0


def _ignore_stop_signals() -> None:
    """Stopped: a stop signal that comes now changes nothing. Ignored, not caught: while
    the interpreter finalizes it puts back the default action of a signal it catches, so
    a late second signal (make's, or a group's sent twice) killed a process that had
    stopped cleanly (exit status -2 instead of 0)."""
    for stop in STOP_SIGNALS:
        signal.signal(stop, signal.SIG_IGN)


def _install_thread_dump() -> None:
    """SIGUSR1 logs every thread's traceback: the first thing to look at when a node hangs."""
    import pykka.debug

    signal.signal(signal.SIGUSR1, pykka.debug.log_thread_tracebacks)


def _client(args: argparse.Namespace) -> Any:
    from meshnet.client import MeshClient

    return MeshClient(args.node)


def _parse_payload(args: argparse.Namespace) -> Any:
    if args.payload is not None and args.payload_file is not None:
        raise MeshError("give --payload or --payload-file, not both")
    if args.payload_file is not None:
        try:
            data = Path(args.payload_file).read_bytes()
        except OSError as exc:
            raise MeshError(f"cannot read {args.payload_file}: {exc.strerror}") from None
        if args.payload_file.endswith(".json"):
            return _json(data.decode("utf-8", "replace"), args.payload_file)
        return data
    if args.payload is None:
        return None
    return _json(args.payload, "--payload")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeshError(f"{where} is not valid JSON ({exc}); quote strings, e.g. --payload '\"hi\"'") from None


def _printable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes_hex": value.hex()}
    if isinstance(value, dict):
        return {str(k): _printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_printable(v) for v in value]
    return value


def cmd_submit(args: argparse.Namespace) -> int:
    payload = _parse_payload(args)
    with _client(args) as client:
        future = client.submit(args.kind, payload, to=args.to, timeout=args.timeout, requires=args.requires)
        print(f"job {future.job_id}", file=sys.stderr, flush=True)
        try:
            try:
                result = future.result()
            except KeyboardInterrupt:
                # Ctrl-C: the job is ours to stop, not to leave running with nobody to read it.
                client.cancel(future)
                print(f"cancelling job {future.job_id}", file=sys.stderr, flush=True)
                try:
                    future.result(timeout=CANCEL_WAIT)
                except (JobError, concurrent.futures.TimeoutError):
                    pass
                return EXIT_INTERRUPTED
        except JobError as exc:
            reason = f" ({exc.reason})" if exc.reason else ""
            print(f"error: job {exc.status}{reason}: {exc}", file=sys.stderr)
            return EXIT_JOB_FAILED
    if future.device:
        print(f"ran on {future.device}", file=sys.stderr)
    print(json.dumps(_printable(result), default=str))
    return 0


MESH_COLUMNS = ("device", "tier", "cores", "gpus", "busy", "queued", "ran", "path", "rtt")


def _mesh_table(args: argparse.Namespace) -> int:
    """``status --mesh``: every device the relay lists, with what it has, how busy it is,
    what it has run, and this node's path and round trip to it."""
    with _client(args) as client:
        peers = client.peers()
        own = client.status()["peer_id"]
    if args.json:
        print(json.dumps(peers, default=str))
        return 0
    if not peers:
        print("no devices: this node runs alone (no relay configured), or its relay lists none")
        return 0
    rows = [MESH_COLUMNS]
    for peer in peers:
        caps = peer.get("caps") if isinstance(peer.get("caps"), dict) else {}
        load = peer.get("load") if isinstance(peer.get("load"), dict) else {}
        peer_id = str(peer.get("peer_id", "?"))
        executors = caps.get("executors", "?")
        rtt = peer.get("rtt_ms")
        rows.append(
            (
                f"{peer_id[:12]}…{peer_id[-6:]}" + (" (this node)" if peer_id == own else ""),
                str(caps.get("tier", "?")),
                str(caps.get("cores", "?")),
                str(caps.get("gpus", "?")),
                f"{load['busy']}/{executors}" if "busy" in load else f"?/{executors}",
                str(load.get("queued", "?")),
                str(load.get("ran", "?")),
                str(peer.get("path", "?")),
                f"{rtt} ms" if rtt is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(MESH_COLUMNS))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _requirements(text: str) -> dict[str, Any]:
    try:
        return check_requirements(json.loads(text))
    except (json.JSONDecodeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"requirements as a JSON map, e.g. '{{\"gpus\": 1}}': {exc}") from None


def cmd_peers(args: argparse.Namespace) -> int:
    unmet = None
    with _client(args) as client:
        if args.requires is not None:
            peers, unmet = client.devices(args.requires)
        else:
            peers = client.peers()
        alone = not peers and not args.json and client.status().get("relay") is None
    if args.json:
        print(json.dumps(peers, default=str))
        return 0
    if alone:
        print("no peers: this node runs alone (no relay configured)")
    elif unmet:
        print(f"no device meets {describe(args.requires)}: {unmet}")
    elif not peers:
        print("no peers connected to the relay")
    for peer in peers:
        caps = peer.get("caps", {})
        kinds = ",".join(caps.get("kinds", []))
        path, observed = peer.get("path", "relayed"), peer.get("observed", "")
        rtt = f"{peer['rtt_ms']} ms" if peer.get("rtt_ms") is not None else "-"
        try:  # a relay of another implementation may list anything here
            load = peer["load"]
            busy = f"{load['busy']}/{load['busy'] + load['free']}  queued={load['queued']}"
        except (KeyError, TypeError):
            busy = "?"
        device = f"tier={caps.get('tier', '?')}  gpus={caps.get('gpus', '?')}  busy={busy}"
        print(f"{peer['peer_id']}  path={path}  rtt={rtt}  observed={observed}  {device}  kinds={kinds}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    if args.mesh:
        return _mesh_table(args)
    with _client(args) as client:
        info = client.status()
    if args.json:
        print(json.dumps(info, default=str))
        return 0
    relay = info.get("relay")
    print(f"peer id:    {info['peer_id']}")
    print(f"api:        {info['api']}")
    if relay:
        port = relay.get("local_port")
        origin = f" from local port {port}" if port else ""
        rtt = f", rtt {relay['rtt_ms']} ms" if relay.get("rtt_ms") is not None else ""
        print(f"relay:      {relay['endpoint']}{origin} ({relay['state']}, observed {relay['observed'] or '-'}{rtt})")
    else:
        print("relay:      none (running alone)")
    print(f"executors:  {info['executors']}  running: {info['running']}")
    print(f"queue:      {info['queued']} / {info['queue_size']}{'  (draining)' if info['draining'] else ''}")
    counts = info.get("jobs", {})
    print("jobs:       " + (", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none yet"))
    if relay and relay.get("forwarded"):
        print("forwarded:  " + ", ".join(f"{k}={v}" for k, v in sorted(relay["forwarded"].items())))
    nat = (relay or {}).get("nat")
    if nat:
        print(f"nat:        {nat['nat_type']}, public udp {nat['public_address'] or '-'} (STUN {nat['server']})")
    for peer, link in sorted((relay or {}).get("peers", {}).items()):
        rtt = f"  rtt {link['rtt_ms']} ms" if link.get("rtt_ms") is not None else ""
        print(f"peer:       {peer}  path={link['path']}{rtt}")
    for peer, link in sorted((relay or {}).get("direct", {}).items()):
        rtt = f", relayed rtt {link['rtt_ms']} ms" if link.get("rtt_ms") is not None else ""
        why = f" ({link['why']})" if link.get("why") else ""
        print(f"direct:     {peer}  {link['stage']}{rtt}{why}")
    return 0


def cmd_ping(args: argparse.Namespace) -> int:
    """Round trips to a peer and the path each took, like ``tailscale ping``: the first
    ping also asks for a direct link, so a NATed pair shows its pongs move from the relay
    to the direct link. Stops at the first direct pong unless ``--no-until-direct``."""
    import time

    from meshnet.errors import PingFailed

    if args.count < 1 or not args.interval >= 0:
        raise MeshError("--count must be at least 1 and --interval at least 0")
    answered: list[float] = []
    with _client(args) as client:
        for n in range(args.count):
            started = time.monotonic()
            try:
                pong = client.ping(args.peer, timeout=args.timeout)
            except PingFailed as exc:
                print(f"no pong from {args.peer}: {exc}")
                if exc.code not in ("timed_out", "unavailable"):  # the next ping may be answered
                    return EXIT_FAILURE
            else:
                answered.append(pong["rtt"])
                where = pong["path"] + (f" {pong['address']}" if pong.get("address") else "")
                went = f" (sent via {pong['sent']})" if pong["sent"] != pong["path"] else ""
                print(f"pong from {args.peer} via {where} in {pong['rtt'] * 1000:.2f} ms{went}")
                if args.until_direct and pong["path"] != "relay":
                    break
            if n + 1 < args.count:
                time.sleep(max(0.0, args.interval - (time.monotonic() - started)))
    if not answered:
        print(f"{args.peer} answered none of the pings", file=sys.stderr)
        return EXIT_FAILURE
    ms = sorted(rtt * 1000 for rtt in answered)
    print(f"{len(answered)} answered; rtt min {ms[0]:.2f} ms, median {ms[len(ms) // 2]:.2f} ms, max {ms[-1]:.2f} ms")
    return 0


def _stun_server(text: str) -> tuple[str, int]:
    from meshnet.endpoints import host_port

    server = host_port(text)
    if server is None:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 198.51.100.1:3478, not {text!r}")
    return server


def cmd_netcheck(args: argparse.Namespace) -> int:
    """NAT type and public addresses, like ``tailscale netcheck``: STUN against the
    relay's responder (or ``--stun``), and what the relay observes of the node's TCP."""
    from meshnet.natcheck import classify, stun_server

    relay: dict[str, Any] | None = None
    if args.node is None and args.stun is None:
        args.node = os.environ.get("MESHNET_NODE", DEFAULT_API_ENDPOINT)
    if args.node is not None:
        try:
            with _client(args) as client:
                relay = client.status().get("relay")
        except MeshError as exc:
            if args.stun is None:
                raise MeshError(f"{exc}; or name a STUN server with --stun HOST:PORT") from None
    server = args.stun or (stun_server("", relay["endpoint"]) if relay else None)
    if server is None:
        raise MeshError("the node has no tcp:// relay to ask; name a STUN server with --stun HOST:PORT")
    try:
        report = classify(server)
    except OSError as exc:
        raise MeshError(f"STUN server {server[0]}:{server[1]} could not be asked: {exc}") from None
    info = {**report.as_dict(), "relay_observed_tcp": relay.get("observed") if relay else None}
    info["relay_rtt_ms"] = relay.get("rtt_ms") if relay else None
    info["mapping_varies_by_destination"] = report.nat_type == "symmetric" if report.classified else None
    if args.json:
        print(json.dumps(info))
        return 0
    varies = {True: "yes", False: "no", None: "unknown (the STUN server has one address)"}
    detail = f" (pystun3: {report.detail})" if report.detail else ""
    print(f"nat type:        {report.nat_type}{detail}")
    print(f"public udp:      {report.public_address or '-'}  (STUN {report.server}, from {report.local_address})")
    if relay:
        port = relay.get("local_port")
        print(f"relay sees tcp:  {relay.get('observed') or '-'}" + (f"  (from local port {port})" if port else ""))
        rtt = relay.get("rtt_ms")
        rtt_text = f"{rtt} ms" if rtt is not None else "-"
        print(f"relay rtt:       {rtt_text}  (the node's last heartbeat to {relay['endpoint']})")
    print(f"mapping varies:  {varies[info['mapping_varies_by_destination']]}")
    print(f"took:            {report.seconds:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshnet", description="Run jobs on a mesh of devices.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="write a config with a new identity")
    p.add_argument("--config", help=f"where to write it (default: {default_config_path()})")
    p.add_argument("--relay", action="store_true", help="write a relay config")
    p.add_argument("--force", action="store_true", help="replace an existing file (its identity is lost)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("id", help="print this device's peer id")
    p.add_argument("--config")
    p.add_argument("--relay", action="store_true", help="read a relay config")
    p.set_defaults(func=cmd_id)

    p = sub.add_parser("node", help="run a node")
    p.add_argument("--config", help="node config (default: created on first start in the user config dir)")
    p.set_defaults(func=cmd_node)

    p = sub.add_parser("relay", help="run a relay")
    p.add_argument("--config")
    p.set_defaults(func=cmd_relay)

    node_default = os.environ.get("MESHNET_NODE", DEFAULT_API_ENDPOINT)
    p = sub.add_parser("submit", help="submit a job and print its result")
    p.add_argument("kind")
    p.add_argument("--payload", help="the payload as JSON, e.g. '\"hi\"' or '{\"seconds\": 1}'")
    p.add_argument("--payload-file", help="payload file: parsed as JSON if it ends in .json, else sent as bytes")
    p.add_argument("--to", help="peer id of the device that must run it (default: the node places it)")
    p.add_argument(
        "--requires",
        type=_requirements,
        help="what the device that runs it must have, as JSON: '{\"gpus\": 1}' (without --to)",
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p.add_argument("--node", default=node_default, help=f"node API endpoint (default {node_default}, or $MESHNET_NODE)")
    p.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("peers", cmd_peers, "list the peers the relay knows"),
        ("status", cmd_status, "show the node's status"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--node", default=node_default)
        p.add_argument("--json", action="store_true")
        if name == "status":
            p.add_argument(
                "--mesh", action="store_true", help="every device of the mesh as a table: what it has, load, path"
            )
        if name == "peers":
            p.add_argument(
                "--requires",
                type=_requirements,
                help='only the devices that meet these, best first, as JSON: \'{"gpus": 1, "tier": "server"}\'',
            )
        p.set_defaults(func=func)

    p = sub.add_parser("ping", help="round trips to a peer, and the path each took")
    p.add_argument("peer", help="the peer's id")
    p.add_argument("--count", "-c", type=int, default=10, help="pings at most (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between pings (default 1)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for each pong (default 2)")
    p.add_argument(
        "--until-direct",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop at the first pong over a direct or LAN link (default: yes)",
    )
    p.add_argument("--node", default=node_default)
    p.set_defaults(func=cmd_ping)

    p = sub.add_parser("netcheck", help="NAT type and public addresses, by STUN against the relay")
    p.add_argument("--node", help=f"node API endpoint (default {node_default} unless --stun is given)")
    p.add_argument(
        "--stun",
        type=_stun_server,
        help="STUN server HOST:PORT (default: the node's relay, port 3478; a MeshNet relay answers the "
        "CHANGE-REQUEST tests only from the IP of a node registered there)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_netcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except MeshError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
