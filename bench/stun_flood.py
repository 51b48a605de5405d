"""Relayed echo latency while the relay's STUN port is flooded, against before it.

``python -m bench.stun_flood [--rounds N] [--against CHECKOUT]``: a relay answering STUN
on loopback and two nodes on it (with ``--against``, each round again with the relay and
nodes of another checkout, interleaved); 300 relayed echo jobs one after another, then 50,000 binding requests from
500 sources at 20,000 a second (tests.floods) while echoes go on. Prints each round's
p50 before and during, the answers the flood drew, and the median ratio: the responder
has a loop of its own and drops what is over its buckets before parsing, so relaying
should not notice (goal: within 1.5x).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import tests.harness as harness
from tests.floods import FloodRun, flood_a_relay
from tests.harness import Mesh


def one_round(checkout: Path) -> FloodRun:
    saved, harness.REPO = harness.REPO, checkout  # the processes run the code where they start
    try:
        with tempfile.TemporaryDirectory() as tmp:
            mesh = Mesh(Path(tmp))
            try:
                return flood_a_relay(mesh)
            finally:
                mesh.close()
    finally:
        harness.REPO = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--against", type=Path, help="another checkout, measured in the same rounds")
    args = parser.parse_args()
    trees = {"this tree": harness.REPO, **({str(args.against): args.against.resolve()} if args.against else {})}
    ratios: dict[str, list[float]] = {name: [] for name in trees}
    for round_ in range(1, args.rounds + 1):
        for name, checkout in trees.items():
            run = one_round(checkout)
            before, during = statistics.median(run.before), statistics.median(run.during)
            ratios[name].append(during / before)
            answered = sum(run.flood.answers.values())
            print(
                f"round {round_}, {name}: relayed echo p50 {before * 1000:.2f} ms before, {during * 1000:.2f} ms "
                f"during ({len(run.during)} jobs): {during / before:.2f}x; the flood drew {answered} answers to "
                f"{run.flood.sent} requests in {run.flood.took:.2f} s"
            )
    for name, values in ratios.items():
        print(f"median ratio during/before, {name}: {statistics.median(values):.2f}x (goal: 1.5x or less)")


if __name__ == "__main__":
    main()
