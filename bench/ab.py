"""A/B of a job path: this tree's nodes against another checkout's, in the same run.

``python -m bench.ab OTHER_CHECKOUT [--path local|relayed|direct] [--rounds N] [--big]
[--client raw|meshclient]`` starts, for each tree, what the path needs (a standalone node; or two nodes on one relay,
relayed or on a direct link) with the code of that tree, and measures them in interleaved
rounds: no-op jobs/s with 48 in flight (``--big``: 8 MiB echoes, MB/s both ways), and CPU
per job of the nodes and their workers. Prints each round, the medians and the ratio of
this tree to the other. Every change to a job path is measured this way against the main
it started from before it lands: machines like this one are too noisy for figures taken
minutes apart (``bench.direct_ab`` adds the raw direct route as a third subject).

``--client raw`` (the default) drives both trees with one raw load generator that speaks
the plain protocol; ``--client meshclient`` drives each tree with its own ``MeshClient``,
in a process of its own (``bench/meshclient_load.py``, 20,000 no-op jobs a round): what a
user of each version gets, the client's protocol (result batches) included.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

import tests.harness as harness
from bench.cost import cpu_seconds
from bench.direct_ab import _round, ab_parser, ab_payload, node_us_per_job
from bench.load import Target
from bench.run import CORES, until_linked
from meshnet.identity import Identity
from tests.harness import Mesh

PATHS = ("local", "relayed", "direct")
CLIENT_JOBS = 20_000
CLIENT_SCRIPT = Path(__file__).resolve().with_name("meshclient_load.py")


def _client_round(target: Target, processes: dict[str, psutil.Process], checkout: Path) -> tuple[float, float]:
    """jobs/s through the checkout's own MeshClient, and microseconds of node CPU per job."""
    command = [sys.executable, str(CLIENT_SCRIPT), target.endpoint, str(CLIENT_JOBS), "48"]
    command += [target.to] if target.to else []
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    with subprocess.Popen(
        command, cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as client:
        assert client.stdin is not None and client.stdout is not None
        if client.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the MeshClient of {checkout} did not start")
        before = cpu_seconds(processes)
        client.stdin.write("go\n")
        client.stdin.flush()
        rate = float(client.stdout.readline())
        after = cpu_seconds(processes)
    return rate, node_us_per_job(before, after, CLIENT_JOBS)


def _subject(
    mesh: Mesh, tag: str, path: str, relay: tuple[str, str] | None, checkout: Path
) -> tuple[Target, dict[str, psutil.Process]]:
    """The nodes of one tree for ``path``, and the target that drives them."""
    saved, harness.REPO = harness.REPO, checkout  # nodes run the code where they start
    try:
        if path == "local":
            config, _, api = mesh.node_config(tag, jobs={"executors": CORES})
            node = mesh.start_node(tag, config)
            return Target(tag, api, "meshnet"), {"a": psutil.Process(node.pid)}
        assert relay is not None
        ids = {name: Identity.generate() for name in "ab"}
        nodes = {}
        for name, identity in ids.items():
            config, _, api = mesh.node_config(
                f"{tag}{name}", identity, relay=relay, heartbeat=1.0, jobs={"executors": CORES},
                relay_settings={"direct_links": path == "direct", "stun": "off"},
            )  # fmt: skip
            nodes[name] = (mesh.start_node(f"{tag}{name}", config, registered=True), api)
    finally:
        harness.REPO = saved
    target = Target(tag, nodes["a"][1], "meshnet", to=ids["b"].peer_id)
    if path == "direct":
        until_linked(target, nodes["a"][0])
    return target, {name: psutil.Process(process.pid) for name, (process, _) in nodes.items()}


def main() -> int:
    parser = ab_parser(__doc__, rounds=5)
    parser.add_argument("--path", choices=PATHS, default="local")
    parser.add_argument("--client", choices=("raw", "meshclient"), default="raw")
    args = parser.parse_args()
    if args.client == "meshclient" and args.big:
        parser.error("--big is measured with the raw client")
    big, unit = ab_payload(args.big)
    with tempfile.TemporaryDirectory() as tmp:
        mesh = Mesh(Path(tmp))
        try:
            relay = None
            if args.path != "local":
                # One relay, in this tree's code, for both trees' nodes: a node registers
                # the keys the relay allows (open access here) whatever its version.
                relay_path, relay_id, endpoint = mesh.relay_config(access="open", heartbeat=1.0)
                mesh.start_relay(relay_path)
                relay = (endpoint, relay_id.peer_id)
            checkouts = {"this tree": harness.REPO, str(args.other): args.other.resolve()}
            subjects = {
                name: _subject(mesh, tag, args.path, relay, checkouts[name])
                for name, tag in zip(checkouts, ("new", "old"), strict=True)
            }
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}
            for r in range(args.rounds):
                for name, (target, processes) in subjects.items():
                    if args.client == "meshclient":
                        figures[name].append(_client_round(target, processes, checkouts[name]))
                    else:
                        figures[name].append(_round(target, processes, big))
                    rate, cpu = figures[name][-1]
                    line = f"round {r + 1}: {args.path}: {name}: {rate:,.0f} {unit}, {cpu:.0f} us CPU per job"
                    print(line, flush=True)
            medians = {name: statistics.median(rate for rate, _ in values) for name, values in figures.items()}
            for name, values in figures.items():
                cpu = statistics.median(c for _, c in values)
                print(f"median {args.path}: {name}: {medians[name]:,.0f} {unit}, {cpu:.0f} us CPU per job")
            this, other = medians.values()
            print(f"{args.path}: this tree / {args.other}: {this / other:.2f}x")
        finally:
            mesh.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
