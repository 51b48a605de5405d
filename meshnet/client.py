"""``MeshClient``: submit jobs to a node and get their results as futures.

One DEALER socket on a private :class:`SocketLoop` thread; any number of threads may
call :meth:`MeshClient.submit` at once. Every future ends: with the job's result, with
the :class:`~meshnet.errors.JobError` for its terminal status, or with
:class:`~meshnet.errors.NodeUnreachable`: when the client has no connection to its node
for ``connect_timeout`` seconds (none came up, or one was lost and did not come back),
or when a connected node does not answer within the job's timeout plus a grace.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import cbor2

from meshnet.client_connection import NodeConnection
from meshnet.config import DEFAULT_API_ENDPOINT, DEFAULT_MAX_PAYLOAD_BYTES
from meshnet.errors import LocalProtocolError, MeshError, NodeUnreachable
from meshnet.identity import Identity
from meshnet.protocol import (
    JOB_ID_BYTES,
    Cancel,
    PeersReply,
    PeersRequest,
    PingPeer,
    PingReply,
    StatusReply,
    StatusRequest,
    Submit,
    encode,
    validate,
)
from meshnet.socket_loop import SocketLoop

#: A reply type of the client API (``StatusReply``, ``PeersReply``).
_Reply = TypeVar("_Reply")

DEFAULT_TIMEOUT = 60.0
REQUEST_TIMEOUT = 10.0
#: How long a client goes without a connection to its node (at first, or after losing
#: one) before it fails what is pending with ``NodeUnreachable``. A running node accepts
#: within milliseconds on a LAN (libzmq retries a refused connection every 0.1-0.2 s),
#: so a few seconds tells "not running" from "slow to answer" without waiting out a
#: job's timeout.
DEFAULT_CONNECT_TIMEOUT = 3.0
#: Jobs ``map`` keeps in flight: half the default queue, leaving room for others.
DEFAULT_MAP_WINDOW = 32


class MeshClient:
    """A connection to one node's client API.

    ``identity`` and ``node_peer_id`` are needed only when the node's endpoint is not
    loopback (it then requires CurveZMQ and admits the client's peer id).

    ``connect_timeout``: seconds without a connection to the node (none yet, or the one
    there was is lost) after which every pending job and request fails with
    ``NodeUnreachable``, and :meth:`submit`, :meth:`status` and :meth:`peers` fail the
    same way at once until a connection comes up again. While connected, a job waits for
    its node up to its timeout plus ``meshnet.client_connection.CLIENT_GRACE``.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_API_ENDPOINT,
        *,
        identity: Identity | None = None,
        node_peer_id: str | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ):
        if (identity is None) != (node_peer_id is None):
            raise LocalProtocolError("pass both identity and node_peer_id for CurveZMQ, or neither")
        if not connect_timeout > 0:
            raise ValueError("connect_timeout must be a positive number of seconds")
        self.endpoint = endpoint
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout
        self._seq = itertools.count(1)
        self._loop = SocketLoop("mesh-client")
        self._node = NodeConnection(
            self._loop, endpoint, identity=identity, max_payload=max_payload, connect_timeout=connect_timeout
        )
        self._loop.start()
        opened: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._loop.call_soon(self._node.io_open, node_peer_id, opened)
        try:
            opened.result(timeout=10)
        except BaseException:
            self.close()
            raise

    # -- public API --

    def submit(
        self,
        kind: str,
        payload: Any = None,
        *,
        to: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        requires: dict[str, Any] | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Submit one job; the future resolves to its decoded result, and its ``device``
        names the device that ran it (or was to) once it has.

        ``to``: run on that device only. Without it the node places the job: here while
        it has an executor free, else on the least loaded device that meets
        ``requires`` (e.g. ``{"gpus": 1}``; docs/protocol.md §4.3.1), retried on another
        if one refuses it without running it.

        Raises ``NodeUnreachable`` at once while the client knows it cannot reach its
        node (see ``connect_timeout``)."""
        body = cbor2.dumps(payload)
        if len(body) > self.max_payload:
            raise LocalProtocolError(f"payload is {len(body)} bytes encoded; the limit is {self.max_payload}")
        job_id = os.urandom(JOB_ID_BYTES)
        submit = Submit(id=job_id, kind=kind, body=body, to=to, timeout=timeout, batch=True, requires=requires)
        validate(submit)
        frames = encode(submit)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.job_id = job_id.hex()  # type: ignore[attr-defined]
        future.device = None  # type: ignore[attr-defined]
        self._node.add_job(job_id, future)
        self._loop.call_soon(self._node.io_submit, job_id, frames, timeout)
        return future

    def run(
        self,
        kind: str,
        payload: Any = None,
        *,
        to: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        requires: dict[str, Any] | None = None,
    ) -> Any:
        """Submit one job and wait for its result (raises its ``JobError``)."""
        return self.submit(kind, payload, to=to, timeout=timeout, requires=requires).result()

    def map(
        self,
        kind: str,
        payloads: Iterable[Any],
        *,
        to: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        window: int = DEFAULT_MAP_WINDOW,
        requires: dict[str, Any] | None = None,
    ) -> Iterator[Any]:
        """Run a job per payload; yield results in payload order.

        At most ``window`` jobs are in flight at once, so that a long iterable does not
        overflow the node's queue (which would refuse the excess as ``busy``). The first
        job that does not succeed raises its ``JobError`` here.
        """
        if window < 1:
            raise ValueError("window must be at least 1")
        in_flight: deque[concurrent.futures.Future[Any]] = deque()
        for payload in payloads:
            if len(in_flight) >= window:
                yield in_flight.popleft().result()
            in_flight.append(self.submit(kind, payload, to=to, timeout=timeout, requires=requires))
        while in_flight:
            yield in_flight.popleft().result()

    def cancel(self, future: concurrent.futures.Future[Any]) -> None:
        """Ask the node to cancel the job behind ``future``; it ends as ``cancelled``
        unless it finished first."""
        self._loop.call_soon(self._node.io_send, encode(Cancel(id=bytes.fromhex(future.job_id))))  # type: ignore[attr-defined]

    def status(self, timeout: float = REQUEST_TIMEOUT) -> dict[str, Any]:
        """The node's status: id, relay link, queue, executors, job counts."""
        return self._request(StatusRequest(seq=next(self._seq)), StatusReply, timeout).info

    def peers(self, timeout: float = REQUEST_TIMEOUT) -> list[dict[str, Any]]:
        """Every peer the node's relay knows, in peer-id order (asked a page at a time:
        a mesh of any size); none for a node that runs alone (no relay). ``timeout``
        is per page."""
        listed: list[dict[str, Any]] = []
        after: str | None = None
        while True:
            reply = self._request(PeersRequest(seq=next(self._seq), after=after), PeersReply, timeout)
            listed += reply.peers
            if reply.next is None:
                return listed
            if after is not None and reply.next <= after:  # a cursor that goes back would loop for ever
                raise MeshError(f"the node at {self.endpoint} listed peers out of order ({reply.next} after {after})")
            after = reply.next

    def devices(
        self, requires: dict[str, Any], *, limit: int | None = None, timeout: float = REQUEST_TIMEOUT
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The devices that meet ``requires`` (docs/protocol.md §4.3.1: ``{"gpus": 1,
        "tier": ["server", "desktop"]}``), best first: most free executors, fewest queued,
        nearest; at most ``limit``. With an empty list, why none does (``no device has
        gpus >= 1``)."""
        request = PeersRequest(seq=next(self._seq), requires=requires, limit=limit)
        validate(request)
        reply = self._request(request, PeersReply, timeout)
        return reply.peers, reply.unmet

    def ping(self, peer: str, timeout: float = 5.0) -> dict[str, Any]:
        """One round trip to ``peer`` through this node, on the node's current path to it
        (and a direct link asked for, as a job does): ``rtt`` (seconds), ``path`` the
        answer came on (``relay``, ``direct`` or ``lan``), ``sent`` the path the ping went
        on, and ``address``, the peer's end of a direct link. Raises ``PingFailed`` when
        the peer does not answer within ``timeout``, or cannot be asked."""
        request = PingPeer(peer=peer, seq=next(self._seq), timeout=timeout)
        validate(request)
        reply = self._request(request, PingReply, timeout + REQUEST_TIMEOUT)
        return {"peer": reply.peer, "rtt": reply.rtt, "path": reply.path, "sent": reply.sent, "address": reply.address}

    def close(self) -> None:
        if not self._node.close():
            return
        self._loop.stop()
        if not self._loop.running:  # never destroy a context under a thread still using it
            self._node.context.destroy(linger=0)

    def __enter__(self) -> MeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --

    def _request(self, request: Any, reply_type: type[_Reply], timeout: float) -> _Reply:
        future: concurrent.futures.Future[_Reply] = concurrent.futures.Future()
        self._loop.call_soon(self._node.io_request, request, reply_type, future)
        try:
            return future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            self._loop.call_soon(self._node.requests.pop, request.seq, None)
            raise NodeUnreachable(
                f"no answer from the node at {self.endpoint} within {timeout:g} s; is it running?"
            ) from None
