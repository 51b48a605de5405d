"""Real MeshNet processes for tests: relays and nodes as subprocesses on loopback.

Each process logs JSON to stderr; a reader thread collects the events so that a test
waits for what it needs (``wait_for("relay_registered")``) instead of sleeping.
Everything started is stopped at the end, also when the test fails, descendants
(the pool's workers and forkserver) included.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import psutil
import tomli_w
import zmq

from meshnet.errors import ProtocolError, SealError
from meshnet.identity import Identity, Sealer, curve_public_z85
from meshnet.jobs.model import JobSpec, Outcome
from meshnet.protocol import (
    NODE_TO_NODE,
    RELAY_TO_NODE,
    Ack,
    Deliver,
    PeerAck,
    Register,
    Registered,
    Send,
    Unroutable,
    decode,
    decode_inner,
    encode,
    encode_inner_parts,
)
from meshnet.session import Execute, SessionCore, Settled, Transmit, box_ref, split_box_ref

REPO = Path(__file__).resolve().parent.parent


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``meshnet ARGS`` to its end, as a user would; its output is captured."""
    return subprocess.run(
        [sys.executable, "-m", "meshnet.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MeshProcess:
    """One ``meshnet`` subprocess and the JSON log events it has written."""

    def __init__(self, name: str, args: list[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()):
        self.name = name
        self.args = args
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            [*prefix, sys.executable, "-m", "meshnet.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
            cwd=REPO,
        )
        self.pid = self.popen.pid
        self.seen: dict[int, psutil.Process] = {}
        self._reader = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            line = line.rstrip("\n")
            with self._cond:
                self.raw.append(line)
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    event = None
                if isinstance(event, dict):
                    self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def find(self, event: str, **fields: Any) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())]

    def wait_for(self, event: str, timeout: float = 20.0, count: int = 1, **fields: Any) -> dict[str, Any]:
        """Block until the process has logged ``event`` (with ``fields``) ``count`` times."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    e for e in self.events if e.get("event") == event and all(e.get(k) == v for k, v in fields.items())
                ]
                if len(found) >= count:
                    return found[count - 1]
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.raw[-30:])
                    raise AssertionError(f"{self.name} did not log {event} {fields} x{count}; last lines:\n{tail}")
                self._cond.wait(remaining)

    def wait_until(self, found: Callable[[], Any], timeout: float) -> Any:
        """Block until ``found()`` (called with each new log line) is truthy; its value,
        or None at the timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = found()
                remaining = deadline - time.monotonic()
                if value or remaining <= 0 or (self.popen.poll() is not None and not self._reader.is_alive()):
                    return value or None
                self._cond.wait(remaining)

    def descendants(self) -> list[psutil.Process]:
        """The process's descendants now; every one seen is remembered for ``stop``."""
        try:
            children = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in children:
            self.seen.setdefault(child.pid, child)
        return children

    def signal(self, signum: int) -> None:
        self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL for whatever is left, the process's descendants included."""
        self.descendants()
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        for child in self.seen.values():
            try:
                child.kill()  # psutil checks the pid still belongs to the same process
            except psutil.NoSuchProcess:
                pass
        self._reader.join(5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()


@dataclass
class Pair:
    """A relay and two registered nodes, A and B."""

    relay: MeshProcess
    relay_path: Path
    relay_endpoint: str
    relay_id: Identity
    a: MeshProcess
    a_api: str
    a_id: Identity
    b: MeshProcess
    b_api: str
    b_id: Identity


class Mesh:
    """A factory of relays and nodes for one test, with their config files."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.processes: list[MeshProcess] = []

    def relay_config(
        self,
        identity: Identity | None = None,
        *,
        allowed: list[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        heartbeat: float = 0.5,
        access: str = "allow-list",
        stun: dict[str, Any] | None = None,
        **relay: Any,
    ) -> tuple[Path, Identity, str]:
        identity = identity or Identity.generate()
        endpoint = f"tcp://{host}:{port or free_port()}"
        document = {
            "identity": {"private_key": identity.private_key_text},
            "relay": {
                "bind": endpoint,
                "access": access,
                "allowed_peers": allowed or [],
                "heartbeat_interval": heartbeat,
                **relay,
            },
            # Off unless a test asks: UDP 3478 is one port for the whole machine.
            "stun": stun if stun is not None else {"enabled": False},
            "log": {"format": "json", "level": "info"},
        }
        path = self.tmp / f"relay-{identity.peer_id[-6:]}.toml"
        path.write_text(tomli_w.dumps(document))
        path.chmod(0o600)
        return path, identity, endpoint

    def node_config(
        self,
        name: str,
        identity: Identity | None = None,
        *,
        relay: tuple[str, str] | None = None,
        heartbeat: float = 0.5,
        jobs: dict[str, Any] | None = None,
        api: dict[str, Any] | None = None,
        log_level: str = "info",
        relay_settings: dict[str, Any] | None = None,
    ) -> tuple[Path, Identity, str]:
        identity = identity or Identity.generate()
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        document: dict[str, Any] = {
            "identity": {"private_key": identity.private_key_text},
            "api": {"endpoint": endpoint, **(api or {})},
            "jobs": {"executors": 2, **(jobs or {})},
            "log": {"format": "json", "level": log_level},
        }
        if relay is not None:
            document["relay"] = {
                "endpoint": relay[0],
                "peer_id": relay[1],
                "heartbeat_interval": heartbeat,
                "reconnect_min": 0.05,
                "reconnect_max": 0.5,
                # Loopback nodes share one IP: with direct links they would connect over
                # it as over a LAN, and a test of the relayed path would test nothing.
                # The lab's tests turn them on.
                "direct_links": False,
                **(relay_settings or {}),
            }
        path = self.tmp / f"node-{name}.toml"
        path.write_text(tomli_w.dumps(document))
        path.chmod(0o600)
        return path, identity, endpoint

    def spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None, prefix: Sequence[str] = ()
    ) -> MeshProcess:
        """``meshnet ARGS`` as a process (run by ``prefix``, e.g. in a lab namespace)."""
        proc = MeshProcess(name, args, env, prefix)
        self.processes.append(proc)
        return proc

    def start_relay(self, path: Path, name: str = "relay", prefix: Sequence[str] = ()) -> MeshProcess:
        proc = self.spawn(name, ["relay", "--config", str(path)], prefix=prefix)
        proc.wait_for("relay_started")
        return proc

    def start_node(
        self,
        name: str,
        path: Path,
        *,
        registered: bool = False,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
    ) -> MeshProcess:
        proc = self.spawn(name, ["node", "--config", str(path)], env, prefix)
        proc.wait_for("node_started")
        if registered:
            proc.wait_for("relay_registered")
        return proc

    def start_pair(
        self,
        *,
        a_jobs: dict[str, Any] | None = None,
        b_jobs: dict[str, Any] | None = None,
        b_log: str = "info",
        extra_allowed: tuple[str, ...] = (),
        relay_settings: dict[str, Any] | None = None,
    ) -> Pair:
        a_id, b_id = Identity.generate(), Identity.generate()
        relay_path, relay_id, relay_endpoint = self.relay_config(allowed=[a_id.peer_id, b_id.peer_id, *extra_allowed])
        relay = self.start_relay(relay_path)
        link = (relay_endpoint, relay_id.peer_id)
        a_path, _, a_api = self.node_config("a", a_id, relay=link, jobs=a_jobs, relay_settings=relay_settings)
        b_path, _, b_api = self.node_config(
            "b", b_id, relay=link, jobs=b_jobs, log_level=b_log, relay_settings=relay_settings
        )
        a = self.start_node("a", a_path, registered=True)
        b = self.start_node("b", b_path, registered=True)
        return Pair(relay, relay_path, relay_endpoint, relay_id, a, a_api, a_id, b, b_api, b_id)

    def close(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()
        self.processes.clear()


@contextmanager
def raw_dealer(
    endpoint: str, identity: Identity | None = None, server_peer_id: str | None = None, *, reads: bool = True
) -> Iterator[zmq.Socket]:
    """A raw DEALER, as a hand-written client or node would open it (CurveZMQ with
    ``identity`` towards ``server_peer_id`` when both are given). ``reads=False``: one
    that never reads, down to libzmq's own queue (which would otherwise read up to 1000
    messages for it) and the kernel's buffer."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    if not reads:
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 64 * 1024)
    if identity is not None and server_peer_id is not None:
        public, secret = identity.zmq_curve_keys()
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_serverkey = curve_public_z85(server_peer_id)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        yield sock
    finally:
        sock.close(0)
        context.term()


def receive(sock: zmq.Socket, accept: dict, timeout_ms: int = 10_000) -> Any:
    """The next answer on ``sock``, decoded by the table ``accept``, past the relay's
    acknowledgements of what it read (flow control, not answers)."""
    while True:
        assert sock.poll(timeout_ms), "no answer"
        message = decode(sock.recv_multipart(), accept, max_body=1 << 30)
        if type(message).TYPE != "ack":
            return message


class SessionPeer:
    """A test's own node on a raw DEALER registered at a relay, speaking the node-to-node
    protocol through the real :class:`SessionCore`: it submits jobs, answers and acks as
    a node would, and reads only when the test says so (:meth:`pump`)."""

    def __init__(self, sock: zmq.Socket, identity: Identity):
        self.sock = sock
        self.identity = identity
        self.sealer = Sealer(identity)
        self.core = SessionCore(budget=1 << 30)
        self.settled: dict[bytes, Outcome] = {}
        self.other: list[Any] = []
        self._received = 0
        sock.send_multipart(encode(Register(peer_id=identity.peer_id)))
        assert isinstance(receive(sock, RELAY_TO_NODE), Registered)
        self._apply(self.core.on_path("relay", True, time.monotonic()))

    def submit(self, peer: str, kind: str, payload: Any, timeout: float = 30.0) -> bytes:
        job_id = os.urandom(16)
        spec = JobSpec(id=job_id, kind=kind, payload=cbor2.dumps(payload), timeout=timeout, origin="test")
        self._apply(self.core.submit(spec, peer, time.monotonic()))
        return job_id

    def round_trip(self, peer: str) -> None:
        """Probe ``peer`` and read until it answers: it has read all sent before."""
        answers = self._acks()
        self._apply(self.core.probe(peer, time.monotonic()))
        self.pump(lambda: self._acks() > answers)

    def _acks(self) -> int:
        return sum(isinstance(box, PeerAck) for box in self.other)

    def send_raw(self, peer: str, body: bytes, ref: bytes) -> None:
        """Send ``body`` to ``peer`` as a sealed box, whatever it holds."""
        self.sock.send_multipart(encode(Send(to=peer, ref=ref, op="sealed", body=body)))

    def pump(self, until: Callable[[], bool], timeout: float = 30.0, *, wake_at: float | None = None) -> None:
        """Read and answer what arrives, and keep the session's timers, until ``until()``
        (asked again at ``wake_at`` too, when given: a condition on the clock)."""
        deadline = time.monotonic() + timeout
        while not until():
            now = time.monotonic()
            assert now < deadline, "the peer did not answer in time"
            due = min(d for d in (self.core.next_deadline(), wake_at, deadline) if d is not None)
            wait = max(0.0, due - now)
            if self.sock.poll(int(wait * 1000) + 1):
                frames = self.sock.recv_multipart()
                message = decode(frames, RELAY_TO_NODE, max_body=1 << 30)
                if isinstance(message, Ack):
                    continue
                self._received += sum(len(frame) for frame in frames)
                self.sock.send_multipart(encode(Ack(received=self._received)))
                now = time.monotonic()
                if isinstance(message, Deliver):
                    try:
                        plaintext = self.sealer.open(message.sender, message.body)
                        box = decode_inner(plaintext, NODE_TO_NODE, max_size=1 << 30)
                    except (SealError, ProtocolError) as exc:  # dropped, as a node does
                        self.other.append(exc)
                        continue
                    self.other.append(box)
                    self._apply(self.core.on_box(message.sender, box, now))
                elif isinstance(message, Unroutable):
                    self.other.append(message)
                    named = split_box_ref(message.ref)
                    if named is not None:
                        self._apply(self.core.on_bounce(message.to, *named, message.reason, message.message, now))
                else:
                    self.other.append(message)
            due = self.core.next_deadline()
            if due is not None and due <= time.monotonic():
                self._apply(self.core.on_tick(time.monotonic()))

    def _apply(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, Transmit):
                box = event.box
                sealed = self.sealer.seal_parts(event.peer, encode_inner_parts(box))
                self.sock.send_multipart(encode(Send(to=event.peer, ref=box_ref(box), op="sealed", body=sealed)))
            elif isinstance(event, Settled):
                self.settled[event.job.id] = event.outcome
            elif isinstance(event, Execute):
                outcome = Outcome.refused("unknown_kind", "a test's peer runs nothing")
                self._apply(self.core.job_finished(event.peer, event.job.id, outcome, time.monotonic()))


def stream_jobs(
    api: str,
    peer: str,
    jobs: int,
    job_of: Callable[[int], tuple[str, Any]],
    *,
    in_flight: int = 48,
    on_ended: Callable[[int], None] | None = None,
) -> dict[int, Any]:
    """Run ``jobs`` jobs (``job_of(i)``: kind and payload) on ``peer`` through the node at
    ``api``, ``in_flight`` at once; each ends once (asserted), with its result or its
    ``JobError``; ``on_ended(n)`` after the n-th has. Returns the ends by job."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from meshnet import MeshClient
    from meshnet.errors import JobError

    ends: dict[int, Any] = {}
    with MeshClient(api) as client:
        pending: dict[Any, int] = {}
        submitted = 0
        while submitted < jobs or pending:
            while submitted < jobs and len(pending) < in_flight:
                kind, payload = job_of(submitted)
                pending[client.submit(kind, payload, to=peer, timeout=60)] = submitted
                submitted += 1
            done, _ = wait(pending, timeout=90, return_when=FIRST_COMPLETED)
            assert done, f"no job ended within 90 s; {len(pending)} in flight"
            for future in done:
                i = pending.pop(future)
                assert i not in ends, f"job {i} ended twice"
                try:
                    ends[i] = future.result()
                except JobError as exc:
                    ends[i] = exc
                if on_ended is not None:
                    on_ended(len(ends))
    return ends
