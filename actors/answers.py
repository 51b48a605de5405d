"""Answers: where each job's one terminal status goes, by its way back.

A job carries its way back as data (``JobSpec.back``): ``ToClient`` for a client of this
node's API, ``ToPeer`` for the session of the peer that sent it. Whichever part ends a
job (the job book, the relay client for a job a peer ran, a refusal) hands the outcome
here, and the part that owns that way takes it: the client API sends the client its
result, the relay client answers in the peer's session. The answers of a client's pings
and peer queries go back the same way, by the request they name. All of them run on the job loop,
so a hand-over is a call; from another thread it hops onto the loop first.
"""

from __future__ import annotations

from collections.abc import Callable

from meshnet.jobs.model import JobSpec, Outcome, ToClient, ToPeer
from meshnet.node.effects import PeersAnswered, PingAnswered
from meshnet.socket_loop import SocketLoop

ClientTaker = Callable[[JobSpec, ToClient, Outcome], None]
PeerTaker = Callable[[JobSpec, ToPeer, Outcome], None]
RequestTaker = Callable[[PingAnswered | PeersAnswered], None]


class Answers:
    def __init__(self, loop: SocketLoop) -> None:
        self.loop = loop
        self._to_client: ClientTaker | None = None
        self._to_peer: PeerTaker | None = None
        self._to_requester: RequestTaker | None = None

    def serve_clients(self, take: ClientTaker) -> None:
        """The client API takes the answers of its clients' jobs (once, when it is made)."""
        self._to_client = take

    def serve_peers(self, take: PeerTaker) -> None:
        """The relay client takes the answers of jobs peers sent (once, when it is made)."""
        self._to_peer = take

    def serve_requests(self, take: RequestTaker) -> None:
        """The client API takes the answers of its clients' pings and peer queries."""
        self._to_requester = take

    def reply(self, answer: PingAnswered | PeersAnswered) -> None:
        """A ping's or a peers query's answer, to the client that asked. Loop thread."""
        if self._to_requester is not None:
            self._to_requester(answer)

    def answer(self, job: JobSpec, outcome: Outcome) -> None:
        """``job`` ended with ``outcome``: to its way back. Any thread."""
        if not self.loop.in_loop():
            self.loop.call_soon(self.answer, job, outcome)
            return
        back = job.back
        if type(back) is ToClient and self._to_client is not None:
            self._to_client(job, back, outcome)
        elif type(back) is ToPeer and self._to_peer is not None:
            self._to_peer(job, back, outcome)
