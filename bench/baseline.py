"""The baselines MeshNet is held against: a raw pyzmq ROUTER that decodes a CBOR request
and answers it, with (``--workers N``) or without (``--workers 0``) a process pool.

It is the ceiling of MeshNet's design: the same ZeroMQ transport, the same CBOR, the same
worker processes running the same worker code, and nothing else: no actors, no
validation, no queue bound, no timeouts, no sealing, no logging.

``--pool pipes`` (baseline (a)) drives worker processes the way a MeshNet node does: each
has a Unix socket pair to the server, which writes a job to an idle worker and reads the
result in the same poll loop as its ROUTER. ``--pool pebble`` is the same server with a
pebble ``ProcessPool`` (the pool MeshNet used first): kept as a reference row, since it is
what a raw server is usually written with.

Request: [header CBOR {"id": bytes, "kind": str}, body: CBOR payload].
Reply:   [id, b"ok" | b"failed", body: CBOR result].
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import socket
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import cbor2
import pebble
import zmq

from meshnet.jobs.framing import FrameReader, frame_buffers, unsent
from meshnet.jobs.worker import init_worker, run_job, serve

KINDS = ["echo", "sha256", "sleep"]
MAX_PAYLOAD = 64 * 1024 * 1024


class RawPool:
    """Worker processes on socket pairs, driven from the caller's poll loop: the least a
    server can do to run jobs in other processes the way a MeshNet node does."""

    def __init__(self, workers: int):
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["meshnet.jobs.worker"])
        self.socks: dict[int, socket.socket] = {}
        for _ in range(workers):
            ours, theirs = socket.socketpair()
            mp.Process(target=serve, args=(theirs, KINDS, MAX_PAYLOAD), daemon=True).start()
            theirs.close()
            self.socks[ours.fileno()] = ours
        self._readers = {fd: FrameReader(MAX_PAYLOAD + 1024) for fd in self.socks}
        self._frames: dict[int, list] = {fd: [] for fd in self.socks}
        self._running: dict[int, Any] = {}
        self._idle = list(self.socks)
        self._waiting: deque = deque()

    def submit(self, tag: Any, kind: str, body: Any) -> None:
        self._waiting.append((tag, kind, body))
        self._dispatch()

    def readable(self, fd: int) -> list[tuple[Any, bool, Any]]:
        """Read from worker ``fd``; return (tag, succeeded, result) for a finished job."""
        done = []
        n = self.socks[fd].recv_into(self._readers[fd].buffer())
        self._frames[fd] += self._readers[fd].received(n)
        if len(self._frames[fd]) >= 2:
            status_line, result = self._frames[fd][:2]
            del self._frames[fd][:2]
            done.append((self._running.pop(fd), status_line.startswith(b"succeeded"), result))
            self._idle.append(fd)
            self._dispatch()
        return done

    def _dispatch(self) -> None:
        while self._waiting and self._idle:
            tag, kind, body = self._waiting.popleft()
            fd = self._idle.pop()
            self._running[fd] = tag
            buffers = frame_buffers([kind.encode(), body])
            while buffers:
                buffers = unsent(buffers, self.socks[fd].sendmsg(buffers))

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()

    def serve(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[zmq.Frame]], None],
        on_done: Callable[[Any, bool, Any], None],
    ) -> None:
        """Until SIGTERM: every message on ``sock`` to ``on_message`` (frames), every
        finished job to ``on_done`` (tag, succeeded, result)."""
        stop = _stop_event()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for fd in self.socks:
            poller.register(fd, zmq.POLLIN)
        print("ready", flush=True)
        while not stop.is_set():
            for item, _ in poller.poll(500):
                if item is sock:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        on_message(frames)
                else:
                    for tag, ok, result in self.readable(item):
                        on_done(tag, ok, result)


def _stop_event() -> threading.Event:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    return stop


def serve_pipes(endpoint: str, workers: int) -> None:
    """Baseline (a): worker processes on socket pairs, polled with the ROUTER."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    pool = RawPool(workers)

    def request(frames: list[zmq.Frame]) -> None:
        conn, header, body = frames
        fields = cbor2.loads(header.bytes)
        pool.submit((conn.bytes, fields["id"]), fields["kind"], body)

    def reply(tag: tuple[bytes, bytes], ok: bool, result: Any) -> None:
        router.send_multipart([*tag, b"ok" if ok else b"failed", result], copy=False)

    pool.serve(router, request, reply)
    pool.close()
    context.destroy(linger=0)


def serve_pebble(endpoint: str, workers: int) -> None:
    """The reference row, or baseline (b) with ``workers`` 0: a pebble pool, or none."""
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.bind(endpoint)
    results = context.socket(zmq.PULL)
    results.bind("inproc://results")
    local = threading.local()
    pool = None
    if workers:
        mp = multiprocessing.get_context("forkserver")
        mp.set_forkserver_preload(["meshnet.jobs.worker"])
        pool = pebble.ProcessPool(max_workers=workers, initializer=init_worker, initargs=(KINDS,), context=mp)
    else:
        init_worker(KINDS)

    def done(conn: bytes, job_id: bytes, future) -> None:
        # pebble's callback thread: a PUSH socket of its own hands the reply over.
        push = getattr(local, "push", None)
        if push is None:
            push = local.push = context.socket(zmq.PUSH)
            push.connect("inproc://results")
        status, result, _, _ = future.result()
        push.send_multipart([conn, job_id, b"ok" if status == "succeeded" else b"failed", result or b""])

    stop = _stop_event()
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    poller.register(results, zmq.POLLIN)
    print("ready", flush=True)
    while not stop.is_set():
        for sock, _ in poller.poll(500):
            if sock is results:
                while True:
                    try:
                        router.send_multipart(results.recv_multipart(zmq.NOBLOCK), copy=False)
                    except zmq.Again:
                        break
                continue
            while True:
                try:
                    conn, header, body = router.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                request = cbor2.loads(header.bytes)
                job_id, kind = request["id"], request["kind"]
                if pool is None:
                    status, result, _, _ = run_job(kind, body.bytes)
                    router.send_multipart([conn, job_id, b"ok" if status == "succeeded" else b"failed", result or b""])
                else:
                    future = pool.schedule(run_job, args=(kind, body.bytes))
                    future.add_done_callback(lambda f, c=conn.bytes, j=job_id: done(c, j, f))
    if pool is not None:
        pool.stop()
        pool.join()
    context.destroy(linger=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--pool", choices=["pipes", "pebble"], default="pipes")
    args = parser.parse_args()
    if args.pool == "pipes" and args.workers:
        serve_pipes(args.endpoint, args.workers)
    else:
        serve_pebble(args.endpoint, args.workers)


if __name__ == "__main__":
    main()
