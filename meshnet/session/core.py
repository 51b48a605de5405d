"""The node-to-node protocol as one object: jobs sent to peers and jobs run for them,
over a :class:`~meshnet.session.peer.PeerSession` per peer.

Sans-IO. The relay client (and, next, the direct links) feed it what the node's
clients and peers send, path events and the clock; it returns :data:`Event`s: boxes to
seal and send, jobs to run here, runs to stop, and the one terminal status of each job
this node sent. The rules it keeps:

- A job sent to a peer ends once (:class:`Settled`), with a status that happened: its
  peer's answer; ``timed_out`` past its timeout and ``DEADLINE_GRACE``; ``refused`` only
  when it never reached the peer (over the peer's ``max_payload``, or its peer was never
  heard from and the relay says it is not connected); ``peer_lost`` when the peer is gone
  (it restarted, or it answered nothing for ``PEER_SILENCE`` while its path was up, or
  for ``PEER_DOWN_CHECK`` after the relay said it left), never because a path was.
- The relay is a path, not a witness: what it says in the clear (``peer_down``,
  ``unroutable``) can delay a job, never end it with a status that is untrue. A
  ``peer_down`` is checked (the peer is probed; a direct path that is up answers it
  alone), and a ``too_large`` bounce of a box within the limits both the relay and the
  peer stated is not believed: the box goes again on its timer.
- A job from a peer runs at most once: its session hands each message on once, and a
  session's messages are told from any other session's (ids, counters, sequence numbers).
- Its answer is sent until the peer acknowledges it, on whichever path is current.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from meshnet.jobs.model import CANCELLED_BY_SUBMITTER, JobSpec, Outcome, job_id_text
from meshnet.protocol.messages import Hello, Job, JobCancel, JobResult, Punch, Sealed
from meshnet.session.paths import PathTable
from meshnet.session.peer import PeerSession, Pending
from meshnet.session.state import State

#: How long past a job's own timeout the submitting node waits for the executing node's
#: answer before it reports ``timed_out`` itself (the executing node enforces the
#: timeout and normally answers first; this covers a silent or stuck peer).
DEADLINE_GRACE = 2.0
#: A peer that answers nothing (not an ack, not a probe) for this long while this node
#: waits on it and has a path to it is given up: its jobs end ``peer_lost``. Longer than
#: a relay restart takes to be noticed and mended (liveness 3 s, reconnect backoff up to
#: 5 s, registration): the relay's own ``peer_down`` says sooner that a peer has gone.
PEER_SILENCE = 20.0
#: After the relay says a peer left (``peer_down``), the peer is probed; it is given up if
#: nothing comes from it for this long while a path to it is up. Long against a round
#: trip, short against a job: a relay cannot end jobs with a false ``peer_down``, and a
#: peer that is really gone is given up within this of the relay's word.
PEER_DOWN_CHECK = 2.0
#: Ids of jobs cancelled before they arrived (re-ordered on the way), remembered per peer.
MAX_EARLY_CANCELS = 1024
#: Pings whose path is remembered, for all peers (a session keeps at most 64 each).
MAX_PINGS_KEPT = 4096
#: Sessions kept at once; the idle ones beyond it are forgotten, oldest first.
MAX_SESSIONS = 4096


@dataclass(frozen=True)
class Transmit:
    """Seal ``box`` for ``peer`` and send it on ``path``. ``box.ctr`` names it in a bounce."""

    peer: str
    path: str
    box: Sealed


@dataclass(frozen=True)
class Execute:
    """Run ``job`` here for ``peer``; report its end with :meth:`SessionCore.job_finished`."""

    peer: str
    job: Job


@dataclass(frozen=True)
class StopRun:
    """Stop the run of ``job_id`` for ``peer`` (cancelled, or its session ended)."""

    peer: str
    job_id: bytes
    reason: str


@dataclass(frozen=True)
class Settled:
    """``job``, sent to a peer, ended with ``outcome``: answer its submitter."""

    job: JobSpec
    peer: str
    outcome: Outcome


@dataclass(frozen=True)
class Control:
    """A message for another part of the node than the job path (a hole punch's), from
    ``peer``, handed on once like any other."""

    peer: str
    message: Sealed


@dataclass(frozen=True)
class Ponged:
    """``peer`` answered ping ``number`` after ``rtt`` seconds; the answer came on ``path``."""

    peer: str
    number: int
    rtt: float
    path: str


@dataclass(frozen=True)
class Notice:
    """Something to log: ``event`` with ``fields``."""

    event: str
    fields: dict[str, Any]


Event = Transmit | Execute | StopRun | Settled | Control | Ponged | Notice


@dataclass(eq=False)
class SentJob:
    """A job this node sent to a peer, until it ends."""

    spec: JobSpec
    peer: str
    deadline: float
    size: int
    #: Its message in the peer's current session.
    pending: Pending | None = None
    #: Its place in the deadline heap.
    order: int = 0
    #: Bounces the path sent back for it, and the last one's reason (named if it ends late).
    bounces: int = 0
    bounced: str = ""


@dataclass
class PeerJobs:
    """One peer's jobs, in the current session with it."""

    #: Sent by us, not ended.
    sent: dict[bytes, SentJob] = field(default_factory=dict)
    #: Run by us for the peer: job id -> seq of its message.
    running: dict[bytes, int] = field(default_factory=dict)
    #: Seqs of the peer's job messages cancelled before they arrived.
    cancelled_early: OrderedDict[int, None] = field(default_factory=OrderedDict)
    #: Since when this node has waited on the peer (None: it does not).
    waiting_since: float | None = None
    #: Since when the relay's ``peer_down`` for the peer is being checked (None: it is not),
    #: and why the relay said it.
    down_since: float | None = None
    down_reason: str = ""


#: A box's name on a relay link (``send.ref``): its session id and counter, 8 bytes each,
#: so that a bounce names the box; the relay echoes it and knows nothing of it.
BOX_REF_BYTES = 16


def box_ref(box: Sealed) -> bytes:
    return box.sid.to_bytes(8, "big") + box.ctr.to_bytes(8, "big")


def split_box_ref(ref: bytes) -> tuple[int, int] | None:
    """The session id and counter a ``box_ref`` names (None: not one)."""
    if len(ref) != BOX_REF_BYTES:
        return None
    return int.from_bytes(ref[:8], "big"), int.from_bytes(ref[8:], "big")


def clock_session_id() -> int:
    """A session id above any this node took before, in this life or an earlier one:
    the wall clock in nanoseconds (a restarted node's ids are above its last life's
    unless the clock was set back meanwhile)."""
    return time.time_ns()


class SessionCore:
    def __init__(
        self,
        *,
        budget: int,
        new_sid: Callable[[], int] = clock_session_id,
        silence: float = PEER_SILENCE,
        grace: float = DEADLINE_GRACE,
        max_payload: int | None = None,
        down_check: float = PEER_DOWN_CHECK,
        batch: int | None = None,
    ):
        #: Bytes of jobs and results held for peers (sent and unacknowledged, or waiting).
        self.budget = budget
        #: The largest payload or result this node takes (told to each peer in its hellos).
        self.max_payload = max_payload
        #: The most messages this node reads in one sealed batch (told in its hellos).
        self.batch = batch
        self.down_check = down_check
        self.held = 0
        self.silence = silence
        self.grace = grace
        self._new_sid = new_sid
        self.sessions: OrderedDict[str, PeerSession] = OrderedDict()
        self.jobs: dict[str, PeerJobs] = {}
        #: Every job sent and not ended, by id.
        self.sent: dict[bytes, SentJob] = {}
        self.paths = PathTable()
        self._path_of: dict[str, str | None] = {}
        self._path_since: dict[str, float] = {}
        #: (deadline, order, job id): ids, not jobs, so that an ended job's payload is not
        #: kept until its deadline comes up in the heap (behind a slow job, for a day).
        self._deadlines: list[tuple[float, int, bytes]] = []
        self._order = 0
        self.counts: Counter[str] = Counter()
        self._pings = 0
        #: The path each ping went out on (the current one when it was asked for), while
        #: it may be answered: a round trip counts for a path only if it came back there.
        self._ping_paths: OrderedDict[int, str | None] = OrderedDict()
        #: The last round trip measured to each peer on each path: seconds, and when.
        self.round_trips: dict[str, dict[str, tuple[float, float]]] = {}

    # -- this node's side --

    def submit(self, spec: JobSpec, peer: str, now: float) -> list[Event]:
        """Send job ``spec`` to ``peer``."""
        if spec.id in self.sent:
            refusal = Outcome.refused("duplicate", f"job {job_id_text(spec.id)} is already in flight")
            return [Settled(spec, peer, refusal)]
        size = len(memoryview(spec.payload))
        if self.held + size > self.budget:
            busy = (
                f"{self.held} bytes of jobs and results already wait for peers to acknowledge them "
                f"(relay.max_queued_bytes is {self.budget})"
            )
            return [Settled(spec, peer, Outcome.refused("relay_busy", busy))]
        job = SentJob(spec, peer, now + spec.timeout + self.grace, size)
        self.sent[spec.id] = job
        jobs = self._jobs(peer)
        jobs.sent[spec.id] = job
        self._order += 1
        job.order = self._order
        heapq.heappush(self._deadlines, (job.deadline, self._order, spec.id))
        return self._send_job(job, now)

    def _send_job(self, job: SentJob, now: float) -> list[Event]:
        spec = job.spec
        session = self.sessions.get(job.peer)
        limit = session.peer_max_payload if session is not None else None
        if limit is not None and job.size > limit:
            return self._settle(job, _too_large(job.peer, "payload", job.size, limit), now)
        message = Job(id=spec.id, kind=spec.kind, timeout=spec.timeout, payload=spec.payload)
        events = self._send(job.peer, message, job.size, now, job)
        self.sessions[job.peer].awaiting = True
        return events

    def cancel(self, job_id: bytes, requester: str, now: float) -> list[Event]:
        """Ask the peer to stop job ``job_id``, if ``requester`` submitted it; its answer
        (``cancelled``, or how it ended first) ends it."""
        job = self.sent.get(job_id)
        if job is None or job.spec.origin != requester or job.pending is None:
            return []
        return self._send(job.peer, JobCancel(id=job_id, job_seq=job.pending.seq), 0, now)

    def send_control(self, peer: str, message: Sealed, now: float) -> list[Event]:
        """Send ``message`` (a hole punch's) to ``peer`` in its session: numbered, sent
        again until acknowledged, like a job."""
        return self._send(peer, message, 0, now)

    def ping(self, peer: str, now: float) -> tuple[int, list[Event]]:
        """Measure a round trip to ``peer`` on its current path: the ping's number, and
        what to send. Its answer comes as :class:`Ponged`; a ping lost is not sent again."""
        session = self._session(peer, now)
        number = self._new_ping(peer)
        return number, self._transmits(peer, session.ping(number, now))

    def _new_ping(self, peer: str) -> int:
        self._pings += 1
        self._ping_paths[self._pings] = self._path_of.get(peer)
        while len(self._ping_paths) > MAX_PINGS_KEPT:
            self._ping_paths.popitem(last=False)
        return self._pings

    def probe(self, peer: str, now: float) -> list[Event]:
        """Ask ``peer`` for an answer now (an ack): whether it hears us, and how fast."""
        session = self.sessions.get(peer)
        return self._transmits(peer, session.probe(now)) if session is not None else []

    def abort_all(self, reason: str, now: float) -> list[Event]:
        """End every job sent (the node shuts down): ``cancelled``, and their peers asked
        to stop them."""
        events: list[Event] = []
        for job in list(self.sent.values()):
            events += self._end(job, Outcome.cancelled(reason), now)
        return events

    # -- the peer's side --

    def job_finished(self, peer: str, job_id: bytes, outcome: Outcome, now: float) -> list[Event]:
        """A job run here for ``peer`` ended: its answer goes to the peer."""
        jobs = self.jobs.get(peer)
        job_seq = jobs.running.pop(job_id, None) if jobs is not None else None
        if job_seq is None:
            return [Notice("answer_dropped", {"job_id": job_id.hex(), "to": peer, "reason": "its session has ended"})]
        return self._answer(peer, job_id, job_seq, outcome, now)

    def _answer(self, peer: str, job_id: bytes, job_seq: int, outcome: Outcome, now: float) -> list[Event]:
        size = len(memoryview(outcome.result)) if outcome.result is not None else 0
        session = self.sessions.get(peer)
        limit = session.peer_max_payload if session is not None else None
        notes: list[Event] = []
        if limit is not None and size > limit:
            # The submitter would drop it (on a direct link, its connection with it): it
            # learns why instead, under the same seq.
            why = f"the result could not be delivered: it is {size} bytes and peer {peer} takes at most {limit}"
            outcome, size = Outcome("failed", error_type="ResultTooLarge", message=why), 0
            notes.append(Notice("result_too_large", {"job_id": job_id.hex(), "to": peer, "error": why}))
        result = JobResult(
            id=job_id, job_seq=job_seq, status=outcome.status, error=outcome.error, result=outcome.result
        )
        return notes + self._send(peer, result, size, now)

    # -- from the paths --

    def on_box(self, peer: str, box: Sealed, now: float, path: str = "relay") -> list[Event]:
        """A box ``peer`` sealed (opened and decoded), that came on ``path``."""
        session = self._session(peer, now)
        events: list[Event] = []
        limit = box.max_payload if isinstance(box, Hello) else None
        if limit is not None and limit != session.peer_max_payload and session.takes(box):
            # The peer's limit, before the jobs that waited for its hello go: those over
            # it are refused now, never sent. (Only from a hello the session takes: a
            # replayed one, or one of the peer's older session, says nothing now.)
            events += self._refuse_over_limit(peer, session, limit, now)
        heard = session.heard
        received = session.on_box(box, now)
        jobs = self.jobs.get(peer)
        if jobs is not None and jobs.down_since is not None and session.heard != heard:
            jobs.down_since = None  # the relay said it left; it speaks
            events.append(Notice("peer_down_disproved", {"peer": peer, "relay_said": jobs.down_reason}))
        if received.pong is not None:
            number, rtt = received.pong
            if self._ping_paths.pop(number, None) == path:
                self.round_trips.setdefault(peer, {})[path] = (rtt, now)
            events.append(Ponged(peer, number, rtt, path))
        if received.restarted is not None:
            events += self._session_ended(peer, *received.restarted, now, restarted=True)
        for pending in received.acked:
            self._release(pending)
        message = received.message
        if isinstance(message, Job):
            events += self._on_job(peer, message, now)
        elif isinstance(message, JobResult):
            job = self.sent.get(message.id)
            # The job's own answer: not one to an earlier job with its id (ended here,
            # answered late), which would end this one with another's result.
            if job is not None and job.peer == peer and job.pending is not None and job.pending.seq == message.job_seq:
                error = message.error or {}
                outcome = Outcome(
                    message.status,
                    result=message.result,
                    error_type=error.get("type", ""),
                    message=error.get("message", ""),
                    reason=error.get("reason", ""),
                )
                events += self._settle(job, outcome, now)
        elif isinstance(message, JobCancel):
            jobs = self._jobs(peer)
            if jobs.running.get(message.id) == message.job_seq:
                events.append(StopRun(peer, message.id, CANCELLED_BY_SUBMITTER))
            elif not session.inbound.has(message.job_seq):
                # Overtook its job on the way: the job is answered ``cancelled`` when it
                # comes. (Had it come, it has ended here: the cancel is too late.)
                jobs.cancelled_early[message.job_seq] = None
                while len(jobs.cancelled_early) > MAX_EARLY_CANCELS:
                    jobs.cancelled_early.popitem(last=False)
        elif isinstance(message, Punch):
            events.append(Control(peer, message))
        if received.dropped is not None:
            self.counts["boxes_dropped"] += 1
        # The replies first: after a restart, a hello's answer must reach the peer before
        # the jobs sent again in the new session.
        return self._transmits(peer, received.replies) + events

    def _on_job(self, peer: str, job: Job, now: float) -> list[Event]:
        jobs = self._jobs(peer)
        job_seq = job.seq or 0
        if job.id in jobs.running:
            # The peer ended the first job with this id (timed out there) and reused the
            # id before this node's run of it ended: the new one cannot run beside it.
            busy = f"a job with id {job_id_text(job.id)} from this peer still runs here"
            return self._answer(peer, job.id, job_seq, Outcome.refused("duplicate", busy), now)
        if job_seq in jobs.cancelled_early:
            del jobs.cancelled_early[job_seq]
            return self._answer(peer, job.id, job_seq, Outcome.cancelled(CANCELLED_BY_SUBMITTER), now)
        jobs.running[job.id] = job_seq
        return [Execute(peer, job)]

    def on_bounce(self, peer: str, sid: int, counter: int, reason: str, text: str, now: float) -> list[Event]:
        """The path could not deliver our box ``counter`` of session ``sid`` to ``peer``
        (the relay's ``unroutable``)."""
        session = self.sessions.get(peer)
        if session is None or session.local_sid != sid:
            return []  # a box of a session that has ended since
        seq = session.seq_of(counter)
        pending = session.find(seq) if seq is not None else None
        if pending is None:
            if session.remote_sid is None and reason == "peer_not_connected":
                # Our hello found no such peer, and we never heard from it: its jobs never
                # left this node, and are refused now rather than left to time out.
                return self._refuse_waiting(peer, reason, text, now)
            return []
        message = pending.message
        job = self.sent.get(message.id) if isinstance(message, Job) else None
        if job is not None:
            job.bounces += 1
            job.bounced = reason
        if reason != "too_large":
            return []  # sent again on its timer, or when the peer's path changes
        if session.peer_max_payload is not None:
            # Every box goes out within the relay's stated limit (the node checks) and
            # within the peer's (it said it in its hello): the claim is not believed. The
            # box goes again on its timer; a relay that never carries it delays the job
            # to its timeout, which names these bounces.
            return [Notice("relay_claim_ignored", {"peer": peer, "claim": reason, "text": text})]
        if job is not None:
            assert isinstance(message, Job)
            # It never reached the peer, and never will: it goes on as a small cancel in
            # its place (the peer's stream must have no hole), at once.
            events = self._settle(job, Outcome.refused("too_large", f"the relay refused to carry it: {text}"), now)
            self._replace(session, pending, JobCancel(id=message.id, job_seq=pending.seq))
            pending.due = now
            return events + self._tick(peer, session, now)
        elif isinstance(message, JobResult) and message.status == "succeeded":
            why = f"the result could not be delivered: the relay refused to carry it: {text}"
            failure = Outcome("failed", error_type="ResultTooLarge", message=why)
            failed = JobResult(id=message.id, job_seq=message.job_seq, status="failed", error=failure.error)
            self._replace(session, pending, failed)
            pending.due = now
            return [
                Notice("result_too_large", {"job_id": message.id.hex(), "to": peer, "error": why}),
                *self._tick(peer, session, now),
            ]
        return []

    def on_path(self, path: str, up: bool, now: float, peer: str | None = None) -> list[Event]:
        """Path ``path`` (``peer``'s own, or shared by all when None) went up or down."""
        self.paths.set(path, up, peer)
        events: list[Event] = []
        for name in [peer] if peer is not None else list(self.sessions):
            session = self.sessions.get(name)
            if session is not None:
                events += self._update_path(name, session, now)
        return events

    def on_peer_down(self, peer: str, reason: str, now: float) -> list[Event]:
        """The relay says the peer left (``reason``). Taken as a question, not an answer: a
        relay may say it of a peer that is alive. Over a direct path that is up the peer
        answers for itself (nothing changes); else it is probed, and given up only if
        nothing comes from it for ``PEER_DOWN_CHECK`` while a path to it is up."""
        session = self.sessions.get(peer)
        if session is None:
            return []
        if self._path_of.get(peer) not in (None, "relay"):
            return [Notice("peer_down_ignored", {"peer": peer, "relay_said": reason, "path": self._path_of[peer]})]
        jobs = self._jobs(peer)
        if jobs.down_since is None:
            jobs.down_since, jobs.down_reason = now, reason
        return self._transmits(peer, session.probe(now))

    def give_up(self, peer: str, why: str, now: float) -> list[Event]:
        """End the session with ``peer`` now: its jobs end ``peer_lost`` (or ``refused``
        if they never left), this side starts over with a new session id."""
        session = self.sessions.get(peer)
        if session is None:
            return []
        sent, unsent = session.start_over(now)
        return self._session_ended(peer, sent, unsent, now, lost=why)

    def on_tick(self, now: float) -> list[Event]:
        """Deadlines, re-sends, delayed acks, probes, silent peers."""
        events: list[Event] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, order, job_id = heapq.heappop(self._deadlines)
            job = self.sent.get(job_id)
            if job is not None and job.order == order:
                message = f"no answer from peer {job.peer} within the job's timeout plus {self.grace:g} s"
                if job.bounces:
                    message += f" (the relay bounced it {job.bounces} times, last: {job.bounced})"
                events += self._end(job, Outcome("timed_out", error_type="TimedOut", message=message), now)
        for peer, session in list(self.sessions.items()):
            checked = self._down_checked(peer, session)
            if checked is not None and now >= checked:
                jobs = self.jobs[peer]
                lost = (
                    f"peer {peer} is gone: the relay said {jobs.down_reason}, and nothing came from it for "
                    f"{self.down_check:g} s since"
                )
                events += self.give_up(peer, lost, now)
                continue
            since = self._waiting_since(peer, session)
            if since is not None and session.path_up:
                heard = self._answered_since(peer, session, since)
                if now - heard >= self.silence:
                    sent, unsent = session.start_over(now)
                    lost = f"peer {peer} answered nothing for {self.silence:g} s"
                    events += self._session_ended(peer, sent, unsent, now, lost=lost)
                    continue
            events += self._tick(peer, session, now)
        return events

    def _down_checked(self, peer: str, session: PeerSession) -> float | None:
        """When the check of the relay's ``peer_down`` for ``peer`` gives it up (None: no
        check runs, or no path is up to check on: the check waits for one)."""
        jobs = self.jobs.get(peer)
        if jobs is None or jobs.down_since is None or not session.path_up:
            return None
        return max(jobs.down_since, self._path_since.get(peer, jobs.down_since)) + self.down_check

    def next_deadline(self) -> float | None:
        """When :meth:`on_tick` has work next (None: nothing is timed)."""
        while self._deadlines and not self._live(self._deadlines[0]):
            heapq.heappop(self._deadlines)
        times = [self._deadlines[0][0]] if self._deadlines else []
        for peer, session in self.sessions.items():
            due = session.next_deadline()
            if due is not None:
                times.append(due)
            checked = self._down_checked(peer, session)
            if checked is not None:
                times.append(checked)
            since = self._waiting_since(peer, session)
            if since is not None and session.path_up:
                times.append(self._answered_since(peer, session, since) + self.silence)
        return min(times) if times else None

    def _live(self, entry: tuple[float, int, bytes]) -> bool:
        job = self.sent.get(entry[2])
        return job is not None and job.order == entry[1]

    @property
    def in_flight(self) -> int:
        return len(self.sent)

    @property
    def holding(self) -> bool:
        """Whether a message to a peer (a job's answer, a cancel, a job) is not yet
        acknowledged: a node stopping waits for this, within its grace."""
        return any(session.unacked or session.waiting for session in self.sessions.values())

    def batch_room(self, peer: str) -> tuple[int, int]:
        """How many messages ``peer`` reads in one sealed batch (1: it reads none), and how
        many bytes of payloads and results the batch may hold (the peer's max_payload:
        the relay refuses a body larger than what the peer said it takes)."""
        session = self.sessions.get(peer)
        if session is None or session.peer_batch is None or session.peer_max_payload is None:
            return 1, 0
        return session.peer_batch, session.peer_max_payload

    # -- internals --

    def _session(self, peer: str, now: float) -> PeerSession:
        session = self.sessions.get(peer)
        if session is not None:
            self.sessions.move_to_end(peer)
            return session
        session = PeerSession(peer, self._new_sid, self.max_payload, self.batch)
        self.sessions[peer] = session
        path = self.paths.current(peer)
        self._path_of[peer] = path
        self._path_since[peer] = now
        session.path_up = path is not None
        if len(self.sessions) > MAX_SESSIONS:
            idle = next(
                (p for p, s in self.sessions.items() if p != peer and not s.outstanding and not self._busy(p)), None
            )
            if idle is not None:
                self._forget(idle)
        return session

    def _busy(self, peer: str) -> bool:
        jobs = self.jobs.get(peer)
        return jobs is not None and bool(jobs.sent or jobs.running)

    def _forget(self, peer: str) -> None:
        del self.sessions[peer]
        self.jobs.pop(peer, None)
        self._path_of.pop(peer, None)
        self._path_since.pop(peer, None)
        self.round_trips.pop(peer, None)

    def _answered_since(self, peer: str, session: PeerSession, since: float) -> float:
        """When ``peer`` last answered what this node waits for, counting from when it
        started waiting and its path came up: an ack that acknowledged something, while
        messages to it are unacknowledged (a peer that probes but never acknowledges
        would otherwise have its answers held for ever); else any box (probes answered:
        it lives, and runs a long job)."""
        if session.unacked:
            answered = session.progress_at
        else:
            answered = session.last_heard
        return max(since if answered is None else answered, since, self._path_since.get(peer, since))

    def _waiting_since(self, peer: str, session: PeerSession) -> float | None:
        """Since when this node has waited on ``peer`` (for an ack, or for the answer to a
        job), without a pause; None when it does not."""
        jobs = self.jobs.get(peer)
        if jobs is None:
            return None
        if not (jobs.sent or session.unacked or session.waiting):
            jobs.waiting_since = None
        return jobs.waiting_since

    def _jobs(self, peer: str) -> PeerJobs:
        jobs = self.jobs.get(peer)
        if jobs is None:
            jobs = self.jobs[peer] = PeerJobs()
        return jobs

    def _send(self, peer: str, message: Sealed, size: int, now: float, job: SentJob | None = None) -> list[Event]:
        session = self._session(peer, now)
        jobs = self._jobs(peer)
        if jobs.waiting_since is None:
            jobs.waiting_since = now
        self.held += size
        boxes = session.send(message, size, now)
        if job is not None:
            job.pending = session.last_sent
        return self._transmits(peer, boxes)

    def _tick(self, peer: str, session: PeerSession, now: float) -> list[Event]:
        return self._transmits(peer, session.on_tick(now))

    def _transmits(self, peer: str, boxes: list[Sealed]) -> list[Event]:
        """``boxes`` to send to ``peer`` on its current path (none while it has none)."""
        path = self._path_of.get(peer)
        return [Transmit(peer, path, box) for box in boxes] if path is not None else []

    def _update_path(self, peer: str, session: PeerSession, now: float) -> list[Event]:
        path = self.paths.current(peer)
        if path == self._path_of.get(peer):
            return []
        self._path_of[peer] = path
        self._path_since[peer] = now
        boxes = session.set_path(path is not None, now)
        if path is not None and session.state is State.OPEN:
            # What the new path's round trip is: shown by ``meshnet peers`` and ``status``.
            boxes += session.ping(self._new_ping(peer), now)
        return self._transmits(peer, boxes)

    def _release(self, pending: Pending) -> None:
        """``pending`` holds nothing against the budget from now on (acknowledged, ended,
        or replaced by a small message)."""
        self.held -= pending.size
        pending.size = 0

    def _replace(self, session: PeerSession, pending: Pending, message: Sealed) -> None:
        """Send ``message`` under ``pending``'s seq from now on, if it is still to be sent
        or acknowledged in this session (see :meth:`PeerSession.replace`); what it held
        is released."""
        self._release(pending)
        if session.find(pending.seq) is pending:
            session.replace(pending.seq, message)

    def _settle(self, job: SentJob, outcome: Outcome, now: float) -> list[Event]:
        """End ``job`` with ``outcome`` (its peer's answer, or one decided here)."""
        del self.sent[job.spec.id]
        jobs = self.jobs.get(job.peer)
        if jobs is not None:
            jobs.sent.pop(job.spec.id, None)
            session = self.sessions.get(job.peer)
            if not jobs.sent and session is not None:
                session.awaiting = False
        self.counts[outcome.status] += 1
        if len(self._deadlines) > 2 * len(self.sent) + 64:
            self._deadlines = [entry for entry in self._deadlines if self._live(entry)]
            heapq.heapify(self._deadlines)
        return [Settled(job.spec, job.peer, outcome)]

    def _end(self, job: SentJob, outcome: Outcome, now: float) -> list[Event]:
        """End ``job`` here (timed out, aborted): its message, if not yet acknowledged,
        goes on as a small cancel (the peer's stream must have no hole), and if the peer
        may have it, a cancel follows."""
        events = self._settle(job, outcome, now)
        pending = job.pending
        session = self.sessions.get(job.peer)
        if pending is None or session is None:
            return events
        may_have_it = pending.sends > 0
        cancel = JobCancel(id=job.spec.id, job_seq=pending.seq)
        self._replace(session, pending, cancel)
        if may_have_it:
            events += self._send(job.peer, cancel, 0, now)
        return events

    def _refuse_over_limit(self, peer: str, session: PeerSession, limit: int, now: float) -> list[Event]:
        """``peer`` takes payloads of at most ``limit`` bytes: the jobs waiting to go to it
        that are larger end ``refused`` ``too_large`` now, each going on as a small cancel
        in its place (its seq is taken: the peer's stream must have no hole)."""
        session.peer_max_payload = limit
        events: list[Event] = []
        jobs = self.jobs.get(peer)
        for job in list(jobs.sent.values()) if jobs is not None else []:
            pending = job.pending
            if pending is None or job.size <= limit or pending.sends or session.find(pending.seq) is not pending:
                continue
            events += self._settle(job, _too_large(peer, "payload", job.size, limit), now)
            self._replace(session, pending, JobCancel(id=job.spec.id, job_seq=pending.seq))
        return events

    def _refuse_waiting(self, peer: str, reason: str, text: str, now: float) -> list[Event]:
        session = self.sessions[peer]
        sent, unsent = session.start_over(now)
        return self._session_ended(peer, sent, unsent, now, refused=(reason, text))

    def _session_ended(
        self,
        peer: str,
        sent: list[Pending],
        unsent: list[Pending],
        now: float,
        *,
        restarted: bool = False,
        lost: str = "",
        refused: tuple[str, str] | None = None,
    ) -> list[Event]:
        """The session with ``peer`` ended (``sent``/``unsent``: what it held). Jobs run
        here for the peer stop (nobody will take their answers). Jobs sent that the peer
        may have end ``peer_lost``. Jobs it never saw go again in the next session when
        the peer merely restarted, else are refused."""
        for pending in (*sent, *unsent):
            self._release(pending)
        jobs = self._jobs(peer)
        jobs.waiting_since = None
        jobs.down_since = None
        events: list[Event] = [StopRun(peer, job_id, "its submitter's session ended") for job_id in jobs.running]
        jobs.running.clear()
        jobs.cancelled_early.clear()
        never_sent = {id(p) for p in unsent} | {id(p) for p in sent if p.sends == 0}
        why = lost or f"peer {peer} restarted; the job's fate there is unknown"
        resend: list[SentJob] = []
        for job in list(jobs.sent.values()):
            if job.pending is not None and id(job.pending) in never_sent:
                if restarted:
                    resend.append(job)
                    continue
                reason, text = refused or ("peer_not_connected", why)
                events += self._settle(job, Outcome.refused(reason, text), now)
            else:
                events += self._settle(job, Outcome("peer_lost", error_type="PeerLost", message=why), now)
        events.append(Notice("session_ended", {"peer": peer, "why": why, "jobs_resent": len(resend)}))
        for job in resend:
            events += self._send_job(job, now)
        return events


def _too_large(peer: str, what: str, size: int, limit: int) -> Outcome:
    return Outcome.refused(
        "too_large", f"the {what} is {size} bytes; peer {peer} takes at most {limit} (its jobs.max_payload_bytes)"
    )
