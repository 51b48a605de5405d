"""The campaign's report: a table for people (stdout) and the same figures as JSON."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from tests.fuzz.campaign import (
    MAX_SUSPECTS,
    RERUNS,
    SIZE_FLOOR,
    SLOW_FACTOR,
    SLOW_MIN_NS,
    CampaignResult,
    TargetResult,
)
from tests.fuzz.checker import CATEGORIES, SLOW, Failure, normalise

#: Error kinds listed per decoder in the table (the JSON has them all).
KINDS_SHOWN = 8
#: Examples of each kind of failure: in the table, in the JSON.
EXAMPLES_SHOWN = 2
EXAMPLES_KEPT = 5


def slow_rule() -> str:
    return (
        f"CPU time per byte (an input counted as at least {SIZE_FLOOR} bytes) over {SLOW_FACTOR}x the decoder's "
        f"median and over {SLOW_MIN_NS / 1e6:g} ms, in the least of its first run and {RERUNS} reruns "
        f"(the {MAX_SUSPECTS} costliest suspects per decoder are rerun)"
    )


def failure_groups(failures: list[Failure]) -> list[tuple[tuple[str, str], list[Failure]]]:
    """Failures grouped by category and normalised detail (a slow input's figures vary),
    in category order, largest group first."""
    groups: dict[tuple[str, str], list[Failure]] = defaultdict(list)
    for failure in failures:
        groups[(failure.category, normalise(failure.detail))].append(failure)
    return sorted(groups.items(), key=lambda item: (CATEGORIES.index(item[0][0]), -len(item[1])))


def _slowest_cells(target: TargetResult) -> list[str]:
    slowest = target.slowest
    if slowest is None:
        return ["-", "-", "-", ""]
    return [f"{slowest.ns_per_byte:,.0f}", f"{slowest.size:,}", f"{slowest.cpu_ns / 1e6:,.2f}", slowest.head_hex]


def summary_table(result: CampaignResult) -> list[str]:
    header = ["decoder", "inputs", "accepted", "refused", "failures", "median ns/B", "slowest ns/B", "size", "CPU ms"]
    rows = [header]
    heads = []
    for target in result.targets.values():
        refused = sum(target.refusals.values())
        cells = _slowest_cells(target)
        rows.append(
            [
                target.name,
                f"{target.ran:,}",
                f"{target.accepted:,}",
                f"{refused:,}",
                f"{len(target.failures):,}",
                f"{target.median_ns_per_byte:,.0f}",
                *cells[:3],
            ]
        )
        heads.append(cells[3])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for number, row in enumerate(rows):
        cells = zip(row, widths, strict=True)
        text = "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(cells))
        head = "slowest input's first bytes" if number == 0 else heads[number - 1]
        lines.append(f"{text}  {head}")
    return lines


def error_kind_lines(target: TargetResult) -> list[str]:
    lines = [f"  {target.name}  ({target.call})"]
    for kind, count in target.refusals.most_common(KINDS_SHOWN):
        lines.append(f"    {count:>8,}  {kind}")
    rest = target.refusals.most_common()[KINDS_SHOWN:]
    if rest:
        lines.append(f"    {sum(c for _, c in rest):>8,}  ({len(rest)} other kinds)")
    return lines


def failure_lines(target: TargetResult) -> list[str]:
    lines = []
    for (category, detail), failures in failure_groups(target.failures):
        lines.append(f"  {target.name}: {len(failures):,} x {category}: {detail}")
        for failure in failures[:EXAMPLES_SHOWN]:
            where = f" at {failure.where}" if failure.where else ""
            figures = f" [{failure.detail}]" if failure.category == SLOW else ""
            lines.append(f"    input {failure.index} ({failure.size:,} bytes){where}{figures}: {failure.input_hex}")
    return lines


def render(result: CampaignResult) -> str:
    """The report as text."""
    s = result.settings
    lines = [
        f"MeshNet fuzz campaign: seed {s.seed}, {s.inputs:,} inputs per decoder, {s.workers} workers "
        f"(RLIMIT_AS {s.memory_limit >> 20} MiB each), {result.wall_s:,.0f} s",
        f"slow rule: {slow_rule()}",
        "",
        *summary_table(result),
        "",
        "error kinds (exception: reason, numbers and quoted values taken out):",
    ]
    for target in result.targets.values():
        lines += error_kind_lines(target)
    failures = result.failures
    lines.append("")
    if not failures:
        lines.append("no failures")
    else:
        replay = f"python -m tests.fuzz --seed {s.seed} --replay DECODER:INDEX"
        lines.append(f"FAILURES: {len(failures):,} (to reproduce one: {replay})")
        for target in result.targets.values():
            lines += failure_lines(target)
    return "\n".join(lines)


def _failure_json(failure: Failure) -> dict[str, Any]:
    return {
        "index": failure.index,
        "detail": failure.detail,
        "size": failure.size,
        "where": failure.where,
        "input_hex": failure.input_hex,
    }


def as_json(result: CampaignResult) -> dict[str, Any]:
    """The report as a JSON document."""
    s = result.settings
    decoders = {}
    for target in result.targets.values():
        slowest = target.slowest
        decoders[target.name] = {
            "call": target.call,
            "inputs": target.ran,
            "accepted": target.accepted,
            "refused": sum(target.refusals.values()),
            "error_kinds": dict(target.refusals.most_common()),
            "median_ns_per_byte": round(target.median_ns_per_byte, 1),
            "slowest_per_byte": None
            if slowest is None
            else {
                "index": slowest.index,
                "size": slowest.size,
                "cpu_ns": slowest.cpu_ns,
                "ns_per_byte": round(slowest.ns_per_byte, 1),
                "first_bytes_hex": slowest.head_hex,
            },
            "failures": [
                {
                    "category": category,
                    "detail": detail,
                    "count": len(failures),
                    "examples": [_failure_json(f) for f in failures[:EXAMPLES_KEPT]],
                }
                for (category, detail), failures in failure_groups(target.failures)
            ],
        }
    return {
        "seed": s.seed,
        "inputs_per_decoder": s.inputs,
        "workers": s.workers,
        "memory_limit_bytes": s.memory_limit,
        "wall_s": round(result.wall_s, 1),
        "slow_rule": slow_rule(),
        "failures": len(result.failures),
        "decoders": decoders,
    }
