"""A/B of a job path: this tree's nodes against another checkout's, in the same run.

``python -m bench.ab OTHER_CHECKOUT [--path local|relayed|direct] [--rounds N] [--big]``
starts, for each tree, what the path needs (a standalone node; or two nodes on one relay,
relayed or on a direct link) with the code of that tree, and measures them in interleaved
rounds: no-op jobs/s with 48 in flight (``--big``: 8 MiB echoes, MB/s both ways), and CPU
per job of the nodes and their workers. Prints each round, the medians and the ratio of
this tree to the other. Every change to a job path is measured this way against the main
it started from before it lands: machines like this one are too noisy for figures taken
minutes apart (``bench.direct_ab`` adds the raw direct route as a third subject).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import psutil

import tests.harness as harness
from bench.direct_ab import _round, ab_parser, ab_payload
from bench.load import Target
from bench.run import CORES, until_linked
from meshnet.identity import Identity
from tests.harness import Mesh

PATHS = ("local", "relayed", "direct")


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
    args = parser.parse_args()
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
            subjects = {
                "this tree": _subject(mesh, "new", args.path, relay, harness.REPO),
                str(args.other): _subject(mesh, "old", args.path, relay, args.other.resolve()),
            }
            figures: dict[str, list[tuple[float, float]]] = {name: [] for name in subjects}
            for r in range(args.rounds):
                for name, (target, processes) in subjects.items():
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
