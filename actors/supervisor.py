"""Starts the node's actors in order, stops them in reverse, and drains on SIGTERM.

Order: identity → executors → job queue → client API (bound, not yet read) → relay
client → client API serving. The API endpoint is bound before the relay client
connects, so that a node that cannot take its endpoint (another node holds it) stops
with one line before it registers anywhere: registering would displace the running
node of the same identity at the relay. Stopping reverses the order (the relay client
before the client API, which so still carries the last answers of forwarded jobs to
their clients) after a drain: new jobs are refused, waiting ones are cancelled, running
ones get ``drain_grace`` seconds to finish and are then killed and reported, results
are flushed to clients, and the pool is stopped with its workers.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pykka
import structlog
import zmq

from actors.answers import Answers
from actors.client_api import ClientApiActor
from actors.executor import ExecutorActor, WorkerPool
from actors.identity import Describe, IdentityActor
from actors.job_queue import JobBook, JobQueueActor
from actors.messages import Abort, Alive, Drain
from actors.network_check import NetworkCheckActor
from actors.relay_client import RelayClient, RelayClientActor
from actors.supervision import Child, Supervisor
from meshnet.capabilities import node_capabilities
from meshnet.config import NodeConfig
from meshnet.endpoints import port_picker
from meshnet.errors import MeshError
from meshnet.identity import Sealer
from meshnet.jobs.registry import check_enabled
from meshnet.listener_guard import open_files_report, raise_open_files_limit
from meshnet.memory_budget import MemoryBudget
from meshnet.node.core import NodeCore
from meshnet.socket_loop import SocketLoop

log = structlog.get_logger("meshnet.node")

#: At least this long a stopping node waits for its peers to acknowledge what it sent
#: them last (its answers, its cancels), after the drain grace.
DELIVERY_WAIT = 1.0


class Node:
    """``on_fatal(why)``: called once (from any thread) when a supervised actor failed
    past its restart budget; whoever runs the node stops it then (``meshnet node``:
    exit status 1 after one ``node_failed`` line)."""

    def __init__(self, config: NodeConfig, on_fatal: Callable[[str], None] | None = None):
        self.config = config
        self.on_fatal = on_fatal
        #: Why the node must stop, once a supervised actor failed past its budget.
        self.failure: str | None = None
        #: The actors off the job loop: restarted when they fail (actors.supervision).
        self.supervisor = Supervisor(self._give_up)
        check_enabled(config.jobs.enabled, str(config.path or "config"))
        self.identity = config.load_identity()
        self.peer_id = self.identity.peer_id
        self.context = zmq.Context()
        self.started_at = time.monotonic()
        self.actors: list[pykka.ActorRef] = []
        self.identity_actor: Child | None = None
        self.executor: pykka.ActorRef | None = None
        self.queue: pykka.ActorRef | None = None
        self.book: JobBook | None = None
        self.memory = MemoryBudget(config.node.memory_budget_bytes)
        self.relay: pykka.ActorRef | None = None
        self.relay_client: RelayClient | None = None
        self.api: pykka.ActorRef | None = None
        self.endpoint = ""
        self.log = log.bind(peer_id=self.peer_id)

    def start(self) -> Node:
        config = self.config
        jobs = config.jobs
        workers = config.executor_count
        # Listeners and workers each hold descriptors: as many as the process may have
        # (the soft limit is often 1,024), a reserve of which no stranger can take.
        raise_open_files_limit(self.log)
        try:
            identity = self.identity
            sealer = Sealer(identity)
            self.identity_actor = self._supervise("identity", lambda s: IdentityActor.start(s, identity))
            # The job loop and the parts that run on it are made here and handed to each
            # other; the actors supervise them (start, stop, in order).
            loop = SocketLoop("jobs", trim_after=0.5)
            runner = WorkerPool(loop, workers=workers, enabled=jobs.enabled, max_payload=jobs.max_payload_bytes)
            # One budget of memory for the whole node: each part on the job loop tells it
            # what it holds (meshnet.memory_budget).
            memory = self.memory
            # Where each job's end goes, by the way back it carries (actors/answers.py).
            answers = Answers(loop)
            self.book = JobBook(
                runner=runner,
                slots=workers,
                capacity=jobs.queue_size,
                enabled=jobs.enabled,
                max_payload=jobs.max_payload_bytes,
                max_timeout=jobs.max_timeout,
                max_bytes=jobs.max_queued_bytes,
                max_per_origin=config.running_cap,
                memory=memory,
                answers=answers,
            )
            # Detected once (nvidia-smi may take a moment), told to the relay and checked
            # against jobs' requirements.
            capabilities = node_capabilities(workers, jobs.enabled, jobs.capabilities)
            self.executor = self._start(ExecutorActor.start(loop=loop, pool=runner))
            self.queue = self._start(JobQueueActor.start(self.book))
            self.api = self._start(
                ClientApiActor.start(
                    identity=identity,
                    endpoint=config.api.endpoint,
                    allowed_clients=config.api.allowed_clients,
                    book=self.book,
                    status=self.status,
                    default_timeout=jobs.default_timeout,
                    max_timeout=jobs.max_timeout,
                    max_payload=jobs.max_payload_bytes,
                    context=self.context,
                    loop=runner.loop,
                    config_path=config.path,
                    max_unread=config.api.max_unread_bytes,
                    memory=memory,
                    answers=answers,
                    capabilities=capabilities,
                )
            )
            self.endpoint = self.api.proxy().bind().get()
            if config.relay.endpoint:
                peer_id = self.peer_id
                network_check = self._supervise("network_check", lambda s: NetworkCheckActor.start(s, peer_id))
                relay = config.relay
                core = NodeCore(
                    peer_id=identity.peer_id,
                    relay_peer_id=relay.peer_id,
                    endpoint=relay.endpoint,
                    sealer=sealer,
                    heartbeat=relay.heartbeat_interval,
                    liveness=relay.liveness,
                    backoff_min=relay.reconnect_min,
                    backoff_max=relay.reconnect_max,
                    max_payload=jobs.max_payload_bytes,
                    capabilities=capabilities,
                    listen=relay.listen,
                    free_port=port_picker(relay.endpoint),
                    max_queued_bytes=relay.max_queued_bytes,
                    local_port=relay.local_port,
                    direct_port=relay.direct_port,
                    direct_links=relay.direct_links,
                    load=self.book.load,
                )
                self.relay_client = RelayClient(
                    core=core,
                    identity=identity,
                    book=self.book,
                    context=self.context,
                    loop=runner.loop,
                    memory=memory,
                    stun=relay.stun,
                    network_check=network_check,
                    answers=answers,
                )
                self.relay = self._start(RelayClientActor.start(self.relay_client))
            else:
                self.log.info("running_alone", reason="no relay configured (relay.endpoint is empty)")
            relay_post = self.relay_client.post if self.relay_client is not None else None
            self.api.proxy().serve(relay_post).get()
        except BaseException:
            self._stop_actors()
            raise
        self.log.info(
            "node_started",
            api=self.endpoint,
            executors=workers,
            relay=config.relay.endpoint or None,
            **open_files_report(),
        )
        return self

    def _supervise(self, name: str, start: Callable[[Supervisor], pykka.ActorRef]) -> Child:
        """Start actor ``name`` under the node's supervisor (checked as :meth:`_start`)."""
        child = self.supervisor.start(name, start)
        try:
            child.ask(Alive(), timeout=10)
        except pykka.ActorDeadError:
            raise MeshError(f"the {name} actor failed to start; its error is logged above") from None
        return child

    def _give_up(self, why: str) -> None:
        """A supervised actor failed past its budget (its thread): the node must stop."""
        if self.failure is None:
            self.failure = why
            if self.on_fatal is not None:
                self.on_fatal(why)
            else:
                self.log.error("node_failed", error=why)

    def _start(self, ref: pykka.ActorRef) -> pykka.ActorRef:
        """Keep ``ref`` for stopping; fail start-up if the actor died in ``on_start``
        (pykka would only log it, leaving a node without one of its parts)."""
        self.actors.append(ref)
        try:
            ref.ask(Alive(), timeout=10)
        except pykka.ActorDeadError:
            raise MeshError(f"{ref.actor_class.__name__} failed to start; its error is logged above") from None
        return ref

    def status(self) -> dict[str, Any]:
        """What ``meshnet status`` shows. Safe from any thread but the actors' own."""
        assert self.book is not None
        assert self.identity_actor is not None
        info: dict[str, Any] = {
            "peer_id": self.peer_id,
            "identity": self.identity_actor.ask(Describe(), timeout=5),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "api": self.endpoint,
            **self.book.on_loop(self.book.status),
            "memory": self.book.on_loop(self.memory.describe),
        }
        info["relay"] = self.relay_client.status() if self.relay_client is not None else None
        return info

    def drain(self, grace: float | None = None) -> None:
        """Refuse new jobs and wait up to ``grace`` seconds for running ones; then end them."""
        grace = self.config.jobs.drain_grace if grace is None else grace
        assert self.book is not None
        for ref in (self.api, self.relay):
            if ref is not None:
                ref.ask(Drain(), timeout=10)  # answered once they refuse new jobs
        self.book.on_loop(self.book.drain)
        # From here on new jobs are refused; what it waits for is said, so that a stop that
        # takes its grace says why.
        running, forwarded = self.book.on_loop(self._waiting_for)
        self.log.info("node_draining", grace_s=grace, running=running, forwarded=forwarded)
        deadline = time.monotonic() + grace
        if not self.book.idle.wait(max(0.0, deadline - time.monotonic())):
            self.log.warning("drain_grace_over", action="killing running jobs")
            self.book.abort(f"the node shut down and the job did not finish within {grace:g} s")
            self.book.idle.wait(10)
        if self.relay_client is not None:
            # Answers to jobs this node forwarded may still arrive within the grace; the
            # rest end now, while the client API is still up to deliver their status.
            ledger_idle = self.relay_client.ledger_idle
            if not ledger_idle.wait(max(0.0, deadline - time.monotonic())):
                self.relay_client.post(Abort("the node shut down before the peer answered"))
                ledger_idle.wait(10)
            # The answers of peers' jobs that ran here, and cancels, are sent until
            # acknowledged: within the grace (and a moment for the cancels of an abort),
            # the peers get them before the link closes.
            self.relay_client.delivered.wait(max(DELIVERY_WAIT, deadline - time.monotonic()))

    def _waiting_for(self) -> tuple[int, int]:
        """Job loop: the jobs running here, and those sent to peers and not answered."""
        assert self.book is not None
        forwarded = self.relay_client.core.in_flight if self.relay_client is not None else 0
        return len(self.book.queue.running), forwarded

    def stop(self, grace: float | None = None) -> None:
        try:
            if self.queue is not None and self.queue.is_alive():
                self.drain(grace)
        finally:
            self._stop_actors()
            self.log.info("node_stopped")

    def _stop_actors(self) -> None:
        for ref in reversed(self.actors):
            try:
                ref.stop(timeout=30)
            except pykka.ActorDeadError:
                pass
        self.actors.clear()
        self.supervisor.stop()  # started first, stopped last
        self.context.destroy(linger=0)
