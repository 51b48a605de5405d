"""The baselines MeshNet is held against: a raw pyzmq ROUTER that decodes a CBOR request
and answers it, with (``--workers N``) or without (``--workers 0``) a process pool.

It is the ceiling of MeshNet's design: the same ZeroMQ transport, the same CBOR, the same
pebble pool running the same worker function, and nothing else: no actors, no
validation, no queue bound, no sealing, no logging.

Request: [header CBOR {"id": bytes, "kind": str}, body: CBOR payload].
Reply:   [id, b"ok" | b"failed", body: CBOR result].
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import threading

import cbor2
import pebble
import zmq

from meshnet.jobs.worker import init_worker, run_job

KINDS = ["echo", "sha256", "sleep"]


def serve(endpoint: str, workers: int) -> None:
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

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
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
    args = parser.parse_args()
    serve(args.endpoint, args.workers)


if __name__ == "__main__":
    main()
