"""``python -m tests.fuzz``: run the campaign, print the report, write it as JSON.

Exits 1 when any failure was found. ``--replay DECODER:INDEX`` regenerates one input of
the campaign with the same seed and runs it here, to reproduce a failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from tests.fuzz.campaign import DEFAULT_INPUTS, DEFAULT_SEED, Session, Settings, run_campaign
from tests.fuzz.checker import check_input, input_hex, input_size
from tests.fuzz.report import as_json, render
from tests.fuzz.targets import build_targets

#: Progress lines on stderr at most this often.
PROGRESS_EVERY_S = 10.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    parser.add_argument("--inputs", type=int, default=int(os.environ.get("FUZZ_INPUTS") or DEFAULT_INPUTS))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED") or DEFAULT_SEED))
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--memory-mib", type=int, default=1024, help="RLIMIT_AS of each worker")
    parser.add_argument("--only", action="append", default=[], metavar="DECODER", help="run only these decoders")
    parser.add_argument("--json", default=os.environ.get("FUZZ_JSON") or "fuzz-results.json")
    parser.add_argument("--replay", metavar="DECODER:INDEX", help="run one input of the campaign here")
    return parser.parse_args(argv)


class Progress:
    """A line on stderr now and then: a campaign of a million inputs takes minutes."""

    def __init__(self) -> None:
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int, failures: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_S or done == total:
            self.last = now
            sys.stderr.write(f"[fuzz] {done:,}/{total:,} inputs, {failures:,} failures, {now - self.started:,.0f} s\n")
            sys.stderr.flush()


def replay(seed: int, spec: str) -> int:
    name, _, index = spec.partition(":")
    with tempfile.TemporaryDirectory(prefix="meshnet-fuzz-") as workdir:
        session = Session(seed, build_targets, Path(workdir))
        data = session.make_input(name, int(index))
        print(f"{name} input {index} (seed {seed}), {input_size(data):,} bytes:")
        print(input_hex(data, limit=4096))
        if isinstance(data, (str, bytes)):  # a key or a config file: readable as text too
            text = data if isinstance(data, str) else data.decode("utf-8", "replace")
            print(repr(text[:4096]))
        outcome = check_input(session.targets[name], data)
    print(f"{outcome.verdict}: {outcome.category} {outcome.kind} {outcome.where}".rstrip())
    print(f"{outcome.cpu_ns / 1e6:.3f} ms CPU")
    return 1 if outcome.verdict == "failure" else 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    print(f"seed {args.seed} (FUZZ_SEED or --seed to change it)", flush=True)
    if args.replay:
        return replay(args.seed, args.replay)
    settings = Settings(
        seed=args.seed,
        inputs=args.inputs,
        targets=tuple(args.only),
        workers=args.workers,
        memory_limit=args.memory_mib << 20,
    )
    result = run_campaign(settings, Progress())
    print(render(result))
    Path(args.json).write_text(json.dumps(as_json(result), indent=2) + "\n")
    print(f"\nJSON report: {args.json}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
