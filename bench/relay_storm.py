"""``make bench-storm``: a relay restart under many nodes, with the relay's listen backlog
at libzmq's old default (100) and at MeshNet's (``relay.listen_backlog``).

For each backlog it starts a relay (a subprocess logging JSON, ``access = "open"``,
heartbeat 1 s, liveness 3) on a free loopback port and N simulated nodes in this process:
each its own identity and its own CurveZMQ DEALER set up as ``actors/relay_connection.py``
``_io_open`` does (the same reconnection interval and cap), registering, pinging every
heartbeat, registering again on ``not_registered``, watching its handshakes as a node does
(a new connection: silence counted from then, and a ping asks whether the relay knows
it), and, silent for heartbeat x liveness, closing its socket and reconnecting after
``RelayLink.on_lost``'s backoff. One thread, one ``zmq.Poller`` over every socket.

Once all N are registered and pinging, the relay is SIGKILLed and started again at once
on the same port. For each node: the time from the restart to its ``registered`` from the
new relay; also nodes that registered more than once after it, nodes that declared the
relay lost, and nodes the new relay expired (``peer_expired``) within ``SETTLE_S`` after the
last registration. Prints both backlogs side by side; writes the figures as JSON to
$BENCH_STORM_JSON (default bench-storm-results.json).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import tomli_w
import zmq
from zmq.utils.monitor import recv_monitor_message

from actors.relay_connection import HANDSHAKE_FAILURES, RECONNECT_IVL_MAX_MS, RECONNECT_IVL_MS
from bench.load import percentile
from meshnet.config import DEFAULT_LISTEN_BACKLOG
from meshnet.errors import ProtocolError
from meshnet.identity import Identity, curve_public_z85
from meshnet.listener_guard import raise_open_files_limit
from meshnet.node.core import RECENT_REGISTER
from meshnet.protocol import RELAY_TO_NODE, Error, Ping, Register, Registered, decode, encode
from meshnet.relay_link import RelayLink
from tests.harness import REPO, free_port

HEARTBEAT = 1.0
LIVENESS = 3
#: A node's relay.reconnect_min / reconnect_max defaults (meshnet.config).
RECONNECT_MIN = 0.1
RECONNECT_MAX = 5.0
#: libzmq's default listen backlog, then MeshNet's.
BACKLOGS = (100, DEFAULT_LISTEN_BACKLOG)
#: Nodes started per second at first (they do not all start at the same instant).
RAMP_PER_S = 500
#: Pinging, all registered, before the relay is killed.
STEADY_S = 3.0
#: How long after the last registration the new relay is watched for expiries.
SETTLE_S = 15.0
SETUP_TIMEOUT_S = 120.0
RECOVERY_TIMEOUT_S = 120.0
#: A poll over thousands of sockets costs a millisecond or two: at most one per this
#: period (what arrives meanwhile is read by the next), which bounds every time measured
#: here by as much.
LOOP_PERIOD_S = 0.01
MAX_BODY = 1024 * 1024
#: Kernel counters (/proc/net/netstat, this network namespace) read around each recovery.
KERNEL_COUNTERS = ("ListenOverflows", "ListenDrops", "TCPSynRetrans", "TCPReqQFullDrop", "SyncookiesSent")


def progress(text: str) -> None:
    sys.stderr.write(f"[bench-storm] {text}\n")
    sys.stderr.flush()


def kernel_counters() -> dict[str, int]:
    """TcpExt counters of /proc/net/netstat named in ``KERNEL_COUNTERS`` (empty elsewhere)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    found: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            found = {name: int(table[name]) for name in KERNEL_COUNTERS if name in table}
    return found


def machine_busy(before: Any, after: Any) -> float:
    """Percent of all CPUs' time between two ``psutil.cpu_times()`` spent not idle."""
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0))
    return round(100.0 * (total - idle) / total, 1) if total > 0 else math.nan


class RelayProcess:
    """``meshnet relay`` as a subprocess, its JSON log in a file."""

    def __init__(self, config: Path, log_path: Path):
        self.log_path = log_path
        self.started_wall = time.time()
        with log_path.open("w") as log_file:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "meshnet.cli", "relay", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                cwd=REPO,
                env={**os.environ, "PYTHONUNBUFFERED": "1", "MESHNET_LOG_FORMAT": "json", "MESHNET_LOG_LEVEL": "info"},
            )
        self.process = psutil.Process(self.popen.pid)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("event") == name:
                found.append(event)
        return found

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def wait_started(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.events("relay_started"):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the relay did not start; its log ends:\n{self.tail()}")
            time.sleep(0.02)

    def up_after(self) -> float | None:
        """Seconds from this process's start to its ``relay_started`` line."""
        started = self.events("relay_started")
        if not started:
            return None
        return datetime.fromisoformat(started[0]["timestamp"].replace("Z", "+00:00")).timestamp() - self.started_wall

    def cpu_seconds(self) -> float:
        try:
            times = self.process.cpu_times()
        except psutil.NoSuchProcess:
            return math.nan
        return times.user + times.system

    def cpu_by_thread(self) -> dict[str, float]:
        """CPU seconds of the relay's threads: libzmq's I/O thread (CurveZMQ handshakes,
        encryption), then its Python threads in the order the relay starts them: the main
        thread (start-up), the ZAP authenticator, the relay's loop."""
        found: dict[str, float] = {}
        python = iter(("main", "zap", "loop"))
        try:
            threads = sorted(self.process.threads(), key=lambda t: t.id)
        except psutil.NoSuchProcess:
            return found
        for thread in threads:
            try:
                name = Path(f"/proc/{self.popen.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                continue
            if name.startswith("ZMQbg/IO"):
                key = "io"
            elif name.startswith("ZMQbg/"):
                continue
            else:
                key = next(python, "other")
            found[key] = round(found.get(key, 0.0) + thread.user_time + thread.system_time, 2)
        return found

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(30)


@dataclass(eq=False)
class SimNode:
    identity: Identity
    public: bytes
    secret: bytes
    sock: zmq.Socket | None = None
    monitor: zmq.Socket | None = None
    #: The node's own link core (registration, liveness, backoff), as a node runs it.
    link: RelayLink = field(
        default_factory=lambda: RelayLink(
            heartbeat=HEARTBEAT, liveness=LIVENESS, backoff_min=RECONNECT_MIN, backoff_max=RECONNECT_MAX
        )
    )
    last_register: float = -math.inf
    handshakes: int = 0
    ping_seq: int = 0
    registered_at: list[float] = field(default_factory=list)
    lost_at: list[float] = field(default_factory=list)


class Swarm:
    """N simulated nodes of one relay, driven by one thread."""

    def __init__(self, count: int, endpoint: str, relay_peer_id: str):
        self.endpoint = endpoint
        self.server_key = curve_public_z85(relay_peer_id)
        self.context = zmq.Context(io_threads=1)
        # A DEALER and its monitor's two PAIRs per node, and a node's old ones while
        # libzmq reaps them.
        self.context.max_sockets = 6 * count + 64
        self.poller = zmq.Poller()
        self.owners: dict[zmq.Socket, tuple[SimNode, bool]] = {}
        self.timers: list[tuple[float, int, Callable[[SimNode, float], None], SimNode]] = []
        self._order = itertools.count()
        self.last_poll = 0.0
        self.errors: Counter[str] = Counter()
        self.handshake_failures = 0
        self.undecodable = 0
        self.nodes = []
        for _ in range(count):
            identity = Identity.generate()
            public, secret = identity.zmq_curve_keys()
            self.nodes.append(SimNode(identity, public, secret))

    # -- timers and the loop --

    def call_at(self, when: float, action: Callable[[SimNode, float], None], node: SimNode) -> None:
        heapq.heappush(self.timers, (when, next(self._order), action, node))

    def run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Serve every node until ``until()`` or ``timeout`` seconds; True on ``until()``."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            if now >= deadline:
                return False
            gap = self.last_poll + LOOP_PERIOD_S - now
            if gap > 0:
                time.sleep(gap)
                now = time.monotonic()
            wake = min(self.timers[0][0] if self.timers else deadline, deadline)
            events = self.poller.poll(max(0, math.ceil((wake - now) * 1000)))
            now = self.last_poll = time.monotonic()
            for sock, _ in events:
                owner = self.owners.get(sock)
                if owner is None:
                    continue
                node, is_monitor = owner
                if is_monitor:
                    self._on_monitor(node, sock, now)
                elif sock is node.sock:
                    self._on_readable(node, sock, now)
            while self.timers and self.timers[0][0] <= now:
                _, _, action, node = heapq.heappop(self.timers)
                action(node, now)
        return True

    def start(self) -> None:
        """Nodes start at ``RAMP_PER_S``, each with its own heartbeat phase."""
        now = time.monotonic()
        for i, node in enumerate(self.nodes):
            self.call_at(now + i / RAMP_PER_S, self._start_node, node)

    def _start_node(self, node: SimNode, now: float) -> None:
        self._connect(node, now)
        self.call_at(now + random.uniform(0, 1) * min(node.link.heartbeat, 1.0), self._tick, node)

    # -- a node, as actors/relay_connection.py and meshnet/node/core.py drive one --

    def _connect(self, node: SimNode, now: float) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.curve_publickey = node.public
        sock.curve_secretkey = node.secret
        sock.curve_serverkey = self.server_key
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        sock.setsockopt(zmq.RCVHWM, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, int(random.uniform(*RECONNECT_IVL_MS)))
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
        # An address of its own: pyzmq's default names the socket's descriptor, which a
        # socket opened as another closes takes again while the old monitor's is bound.
        monitor = sock.get_monitor_socket(
            HANDSHAKE_FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED,
            addr=f"inproc://storm-monitor-{next(self._order)}",
        )
        sock.connect(self.endpoint)
        node.sock, node.monitor, node.handshakes = sock, monitor, 0
        for s, is_monitor in ((sock, False), (monitor, True)):
            self.owners[s] = (node, is_monitor)
            self.poller.register(s, zmq.POLLIN)
        node.link.connecting(now)
        self._register(node, now)

    def _close(self, node: SimNode) -> None:
        # The monitor stopped first: libzmq's I/O thread sends monitor events with a
        # blocking send, and one sent once the monitor's reading end is closed blocks it
        # for good, and every socket of the context with it. A closed socket keeps its
        # monitor until the reaper destroys it, so closing the socket first is not enough.
        if node.sock is not None:
            node.sock.disable_monitor()
        for s in (node.monitor, node.sock):
            if s is not None:
                self.poller.unregister(s)
                self.owners.pop(s, None)
                s.close(0)
        node.sock = node.monitor = None

    def _send(self, node: SimNode, message: Any) -> None:
        if node.sock is not None:
            try:
                node.sock.send_multipart(encode(message), zmq.NOBLOCK)
            except zmq.Again:  # its queue (1000 messages) is full: a real node drops it too
                self.errors["send_queue_full"] += 1

    def _register(self, node: SimNode, now: float) -> None:
        node.last_register = now
        self._send(node, Register(peer_id=node.identity.peer_id, max_body=MAX_BODY))

    def _ping(self, node: SimNode) -> None:
        node.ping_seq += 1
        self._send(node, Ping(seq=node.ping_seq))

    def _tick(self, node: SimNode, now: float) -> None:
        action = node.link.on_tick(now)
        if action == "lost":
            self._lost(node, now)
        elif action == "ping":
            self._ping(node)
        self.call_at(now + min(node.link.heartbeat, 1.0), self._tick, node)

    def _lost(self, node: SimNode, now: float) -> None:
        """Close, and connect again after the link's jittered backoff."""
        node.lost_at.append(now)
        delay = node.link.on_lost()
        self._close(node)
        self.call_at(now + delay, self._connect, node)

    def _on_monitor(self, node: SimNode, monitor: zmq.Socket, now: float) -> None:
        while node.monitor is monitor:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                # RelayClient's Disconnected: registering again, with its patience.
                if node.link.registered:
                    node.link.connecting(now)
                continue
            if event["event"] != zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshake_failures += 1
                continue
            node.handshakes += 1
            if node.handshakes > 1:
                # libzmq connected again by itself (RelayClient._on_reconnected): silence
                # counts from now; a ping asks a relay that may have restarted whether it
                # knows this node, unless a register has just gone out.
                node.link.on_heard(now)
                if node.link.registered:
                    self._ping(node)
                elif now - node.last_register >= RECENT_REGISTER:
                    self._register(node, now)

    def _on_readable(self, node: SimNode, sock: zmq.Socket, now: float) -> None:
        while node.sock is sock:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            node.link.on_heard(now)
            try:
                message = decode(frames, RELAY_TO_NODE, max_body=MAX_BODY)
            except ProtocolError:
                self.undecodable += 1
                continue
            if isinstance(message, Registered):
                node.link.on_registered(message.observed, message.heartbeat, now)
                node.registered_at.append(now)
            elif isinstance(message, Error):
                if message.code == "not_registered":
                    if node.link.on_not_registered(now):  # one register answers them all
                        self._register(node, now)
                else:
                    self.errors[message.code] += 1
            # ack, pong: heard; nothing else to do

    def all_registered(self) -> bool:
        return all(node.link.registered for node in self.nodes)

    def close(self) -> None:
        for node in self.nodes:
            self._close(node)
        self.context.destroy(linger=0)


def relay_config(path: Path, identity: Identity, endpoint: str, backlog: int) -> None:
    document = {
        "identity": {"private_key": identity.private_key_text},
        "relay": {
            "bind": endpoint,
            "access": "open",
            "heartbeat_interval": HEARTBEAT,
            "liveness": LIVENESS,
            "listen_backlog": backlog,
        },
        "log": {"format": "json", "level": "info"},
    }
    path.write_text(tomli_w.dumps(document))
    path.chmod(0o600)


def storm(count: int, backlog: int, tmp: Path) -> dict[str, Any]:
    """One relay restart under ``count`` nodes with listen backlog ``backlog``."""
    identity = Identity.generate()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    config = tmp / f"relay-{backlog}.toml"
    relay_config(config, identity, endpoint, backlog)
    relays: list[RelayProcess] = []
    swarm: Swarm | None = None
    try:
        relays.append(RelayProcess(config, tmp / f"relay-{backlog}-first.log"))
        relays[0].wait_started()
        progress(f"backlog {backlog}: {count} nodes registering")
        swarm = Swarm(count, endpoint, identity.peer_id)
        setup_started = time.monotonic()
        swarm.start()
        if not swarm.run(swarm.all_registered, SETUP_TIMEOUT_S):
            missing = sum(not node.link.registered for node in swarm.nodes)
            raise RuntimeError(f"{missing} of {count} nodes did not register within {SETUP_TIMEOUT_S:g} s")
        setup_s = time.monotonic() - setup_started
        steady_until = time.monotonic() + STEADY_S
        swarm.run(lambda: time.monotonic() >= steady_until and swarm.all_registered(), SETUP_TIMEOUT_S)
        progress(f"backlog {backlog}: all registered in {setup_s:.1f} s; killing the relay and starting it again")

        before = kernel_counters()
        killed_at = time.monotonic()
        relays[0].kill()
        relays.append(RelayProcess(config, tmp / f"relay-{backlog}-second.log"))
        new_relay = relays[1]
        cpu_before = psutil.Process().cpu_times()
        machine_before = psutil.cpu_times()

        def back(node: SimNode) -> bool:
            return bool(node.registered_at) and node.registered_at[-1] > killed_at

        all_back = swarm.run(lambda: all(back(node) for node in swarm.nodes), RECOVERY_TIMEOUT_S)
        recovered_at = time.monotonic()
        after = kernel_counters()
        relay_cpu = new_relay.cpu_seconds()
        relay_threads = new_relay.cpu_by_thread()
        up_after = new_relay.up_after()
        cpu_after = psutil.Process().cpu_times()
        machine_after = psutil.cpu_times()
        progress(f"backlog {backlog}: {'all' if all_back else 'not all'} back; watching for {SETTLE_S:g} s")
        swarm.run(lambda: False, SETTLE_S)

        times = sorted(
            min(t for t in node.registered_at if t > killed_at) - killed_at
            for node in swarm.nodes
            if any(t > killed_at for t in node.registered_at)
        )
        return {
            "nodes": count,
            "listen_backlog": backlog,
            "setup_s": round(setup_s, 2),
            "relay_up_s": None if up_after is None else round(up_after, 3),
            "registered_again": len(times),
            "all_registered_s": round(times[-1], 3) if len(times) == count else None,
            "p50_s": round(percentile(times, 0.50), 3) if times else None,
            "p99_s": round(percentile(times, 0.99), 3) if times else None,
            "over_3s": sum(t > 3.0 for t in times) + (count - len(times)),
            "registered_more_than_once": sum(
                sum(t > killed_at for t in node.registered_at) > 1 for node in swarm.nodes
            ),
            "declared_relay_lost": sum(any(t > killed_at for t in node.lost_at) for node in swarm.nodes),
            "expired": len(new_relay.events("peer_expired")),
            "relay_registrations": len(new_relay.events("peer_registered")),
            "relay_cpu_s": round(relay_cpu, 2),
            "relay_cpu_by_thread_s": relay_threads,
            "bench_cpu_s": round((cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system), 2),
            "recovery_window_s": round(recovered_at - killed_at, 3),
            "machine_busy_percent": machine_busy(machine_before, machine_after),
            "kernel": {name: after[name] - before[name] for name in after if name in before},
            "errors": dict(swarm.errors),
            "handshake_failures": swarm.handshake_failures,
            "undecodable": swarm.undecodable,
        }
    except BaseException:
        if relays:
            sys.stderr.write(f"[bench-storm] the relay's log ends:\n{relays[-1].tail()}\n")
        raise
    finally:
        if swarm is not None:
            swarm.close()
        for relay in relays:
            relay.kill()


ROWS = [
    ("relay up after the restart (s)", "relay_up_s", "{:.2f}"),
    ("all registered again (max, s)", "all_registered_s", "{:.2f}"),
    ("re-registration p50 (s)", "p50_s", "{:.2f}"),
    ("re-registration p99 (s)", "p99_s", "{:.2f}"),
    ("nodes over 3 s", "over_3s", "{:,}"),
    ("registered more than once", "registered_more_than_once", "{:,}"),
    ("nodes that declared the relay lost", "declared_relay_lost", "{:,}"),
    ("expired by the new relay", "expired", "{:,}"),
    ("relay CPU until all back (s)", "relay_cpu_s", "{:.2f}"),
    ("bench CPU until all back (s)", "bench_cpu_s", "{:.2f}"),
    ("all CPUs busy until all back (%)", "machine_busy_percent", "{:.0f}"),
]


def table(results: dict[str, Any]) -> str:
    runs = results["runs"]
    header = ["metric"] + [f"backlog {run['listen_backlog']}" for run in runs]
    lines = [header]
    for label, key, fmt in ROWS:
        lines.append([label] + [("-" if run[key] is None else fmt.format(run[key])) for run in runs])
        if key == "relay_cpu_s":
            for thread, name in (("io", "libzmq I/O (CurveZMQ)"), ("zap", "ZAP"), ("loop", "relay loop")):
                lines.append(
                    [f"  of which its {name} thread"]
                    + [f"{run['relay_cpu_by_thread_s'].get(thread, math.nan):.2f}" for run in runs]
                )
    for name in KERNEL_COUNTERS:
        if all(name in run["kernel"] for run in runs):
            lines.append([f"kernel {name}"] + [f"{run['kernel'][name]:,}" for run in runs])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [
        f"relay restart under {results['nodes']:,} simulated nodes (heartbeat {HEARTBEAT:g} s, liveness {LIVENESS}; "
        f"{results['cores']} cores)"
    ]
    for line in lines:
        out.append(
            "  ".join([line[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(line[1:], widths[1:], strict=True)])
        )
    out.append(
        f"times from the SIGKILL to each node's registered from the new relay; expiries over {SETTLE_S:g} s after; "
        "kernel counters are this network namespace's, over the recovery"
    )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay_storm", description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2000, help="simulated nodes (default 2000)")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error("--nodes: expected at least 1")
    before, after = raise_open_files_limit()
    if before != after:
        progress(f"open files limit raised from {before} to {after}")
    started = time.monotonic()
    results: dict[str, Any] = {"nodes": args.nodes, "cores": len(os.sched_getaffinity(0)), "runs": []}
    with tempfile.TemporaryDirectory(prefix="meshnet-storm-") as tmp:
        for backlog in BACKLOGS:
            results["runs"].append(storm(args.nodes, backlog, Path(tmp)))
    results["seconds"] = round(time.monotonic() - started, 1)
    print(table(results))
    path = Path(os.environ.get("BENCH_STORM_JSON", "bench-storm-results.json"))
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"figures written to {path} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
