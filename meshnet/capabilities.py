"""What a device can do: the capabilities a node tells its relay, with their schema.

A node detects its own at start (cores, memory, CPU architecture, OS, NVIDIA GPUs through
``nvidia-smi`` when it exists, a device tier) and the config's ``jobs.capabilities``
overrides any of them and adds ``labels``. They go to the relay in ``register.caps``
(docs/protocol.md §4.5), where placement matches jobs' requirements against them
(:mod:`meshnet.requirements`).

The schema is flat (every key one value; ``labels`` one map of scalars) so that a peers
listing of thousands of devices stays shallow, and a requirement names one key. The
wire stays a plain map: a node of another implementation may send keys this one does
not know, and :func:`read_capabilities` reads the known ones, ignoring a value of the
wrong type (a device whose ``gpus`` is not a count has none, as far as placement goes).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("meshnet.capabilities")

#: The design's device classes, from the most to the least capable as a rule.
TIERS = ("server", "desktop", "laptop", "edge")
#: Keys whose value is a non-negative integer (``cores`` at least 1).
COUNTS = ("cores", "memory_bytes", "gpus", "gpu_memory_bytes", "executors")
#: Keys whose value is a short text.
TEXTS = ("arch", "os", "tier")
#: What a config may set in ``jobs.capabilities`` (``executors`` and ``kinds`` come from
#: the jobs section itself).
CONFIGURABLE = ("cores", "memory_bytes", "arch", "os", "gpus", "gpu_models", "gpu_memory_bytes", "tier", "labels")
MAX_LABELS = 32
MAX_TEXT = 128
#: How long ``nvidia-smi`` may take to answer at start (it loads the driver on first use).
NVIDIA_SMI_TIMEOUT = 10.0

#: ``platform.machine()`` spellings of one architecture, to the name Linux uses.
_ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64", "armv8": "aarch64"}


def check_capabilities(value: Mapping[str, Any]) -> dict[str, Any]:
    """The config's ``jobs.capabilities``, checked against the schema (``ValueError``
    naming the key otherwise). ``gpus`` may be a count; the rest as the wire has them."""
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if key not in CONFIGURABLE:
            raise ValueError(
                f"known capabilities ({', '.join(CONFIGURABLE)}), not {key!r}: a capability of your own goes "
                f"under labels, e.g. labels = {{ {key} = ... }}"
            )
        checked[key] = _checked(key, item)
    return checked


def _checked(key: str, item: Any) -> Any:
    if key in COUNTS:
        if type(item) is not int or item < (1 if key == "cores" else 0):
            raise ValueError(f"{key}: an integer of at least {1 if key == 'cores' else 0}, not {item!r}")
        return item
    if key == "tier":
        if item not in TIERS:
            raise ValueError(f"tier: one of {', '.join(TIERS)}, not {item!r}")
        return item
    if key in TEXTS:
        if not isinstance(item, str) or not 0 < len(item) <= MAX_TEXT:
            raise ValueError(f"{key}: a text of 1 to {MAX_TEXT} characters, not {item!r}")
        return item
    if key == "gpu_models":
        if not isinstance(item, list) or not all(isinstance(m, str) and len(m) <= MAX_TEXT for m in item):
            raise ValueError(f"gpu_models: a list of texts of at most {MAX_TEXT} characters, not {item!r}")
        return list(item)
    # labels
    if not isinstance(item, Mapping) or len(item) > MAX_LABELS:
        raise ValueError(f"labels: a table of at most {MAX_LABELS} labels")
    for name, label in item.items():
        if not isinstance(name, str) or not 0 < len(name) <= MAX_TEXT:
            raise ValueError(f"labels: names of 1 to {MAX_TEXT} characters, not {name!r}")
        if isinstance(label, str):
            if len(label) > MAX_TEXT:
                raise ValueError(f"labels.{name}: a text of at most {MAX_TEXT} characters")
        elif type(label) not in (int, float, bool):
            raise ValueError(f"labels.{name}: a text, number or boolean, not {label!r}")
    return dict(item)


def read_capabilities(caps: Mapping[str, Any]) -> dict[str, Any]:
    """The schema's keys of ``caps`` as a peer sent them (the wire's plain map), each
    one of the right type; others dropped (unknown keys are kept as they came)."""
    known: dict[str, Any] = {}
    for key, item in caps.items():
        if key == "kinds":
            if isinstance(item, list) and all(isinstance(k, str) for k in item):
                known[key] = item
        elif key in COUNTS or key in TEXTS or key in ("gpu_models", "labels"):
            try:
                known[key] = _checked(key, item)
            except ValueError:
                continue
        else:
            known[key] = item
    return known


def node_capabilities(
    executors: int,
    kinds: list[str],
    configured: Mapping[str, Any],
    *,
    detect_gpus: Callable[[], tuple[int, list[str], int]] | None = None,
) -> dict[str, Any]:
    """What a node tells its relay it can do: detected, then the config's values over
    them (the config is checked when loaded), then its executors and enabled kinds."""
    gpus, models, gpu_memory = (detect_gpus or nvidia_gpus)()
    caps: dict[str, Any] = {
        "cores": os.cpu_count() or 1,
        "memory_bytes": _memory_bytes(),
        "arch": machine_arch(),
        "os": platform.system().lower() or "unknown",
        "gpus": gpus,
    }
    if models:
        caps["gpu_models"] = models
        caps["gpu_memory_bytes"] = gpu_memory
    caps.update(configured)
    if "tier" not in caps:
        caps["tier"] = detect_tier(caps["cores"], caps["memory_bytes"], caps["arch"])
    caps["executors"] = executors
    caps["kinds"] = list(kinds)
    return caps


def machine_arch() -> str:
    machine = platform.machine().lower() or "unknown"
    return _ARCH_ALIASES.get(machine, machine)


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def nvidia_gpus() -> tuple[int, list[str], int]:
    """NVIDIA GPUs as ``nvidia-smi`` lists them: their count, models and the largest
    one's memory in bytes. None (0, [], 0) where it is not installed, which is the usual
    case, or fails (a driver not loaded): logged, and the node starts without."""
    command = shutil.which("nvidia-smi")
    if command is None:
        return 0, [], 0
    try:
        listed = subprocess.run(
            [command, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("gpu_detection_failed", command=command, error=str(exc))
        return 0, [], 0
    return parse_nvidia_smi(listed)


def parse_nvidia_smi(listed: str) -> tuple[int, list[str], int]:
    """``nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`` output:
    a line per GPU, ``NAME, MiB``."""
    models: list[str] = []
    largest = 0
    for line in listed.splitlines():
        name, _, mib = line.rpartition(",")
        name, mib = name.strip(), mib.strip()
        if not name:
            continue
        models.append(name[:MAX_TEXT])
        if mib.isdigit():
            largest = max(largest, int(mib) * 1024 * 1024)
    return len(models), models, largest


#: Where Linux lists batteries and mains adapters.
POWER_SUPPLIES = Path("/sys/class/power_supply")


def detect_tier(cores: int, memory_bytes: int, arch: str, *, power_supplies: Path = POWER_SUPPLIES) -> str:
    """A guess at the device's class, for a config that does not say: a battery makes a
    laptop; a small ARM board an edge device; many cores and much memory a server."""
    try:
        on_battery = any(p.name.startswith("BAT") for p in power_supplies.iterdir())
    except OSError:
        on_battery = False
    if on_battery:
        return "laptop"
    gib = memory_bytes / 2**30
    if arch in ("aarch64", "armv7l", "armv6l", "riscv64") and gib < 8:
        return "edge"
    if cores >= 16 and gib >= 64:
        return "server"
    return "desktop"
