"""What a job requires of the device that runs it, matched against capabilities (sans-IO).

A requirement map names schema keys of :mod:`meshnet.capabilities`:

- a count (``cores``, ``memory_bytes``, ``gpus``, ``gpu_memory_bytes``, ``executors``)
  is a minimum: ``{"gpus": 1}`` is any device with at least one GPU;
- a text (``arch``, ``os``, ``tier``) is that value, or any of a list of them:
  ``{"tier": ["server", "desktop"]}``;
- ``kinds`` lists job kinds the device must have enabled (a job's own kind is always
  required: placement adds it);
- ``labels`` is a map each of whose labels the device must carry with that value.

:func:`unmet` names the first requirement a device does not meet, in words a user reads
in a ``no_device`` refusal: "gpus >= 1".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from meshnet.capabilities import COUNTS, MAX_LABELS, MAX_TEXT, TEXTS, TIERS

KEYS = (*COUNTS, *TEXTS, "kinds", "labels")
MAX_CHOICES = 16
MAX_KINDS = 16


def check_requirements(requires: Any) -> dict[str, Any]:
    """``requires`` as a job may carry it, checked (``ValueError`` naming the key)."""
    if requires is None:
        return {}
    if not isinstance(requires, Mapping):
        raise ValueError("a map of requirements")
    checked: dict[str, Any] = {}
    for key, want in requires.items():
        if key in COUNTS:
            if type(want) is not int or want < 0:
                raise ValueError(f"{key}: a minimum, an integer of at least 0, not {want!r}")
        elif key in TEXTS:
            choices = want if isinstance(want, list) else [want]
            if not 0 < len(choices) <= MAX_CHOICES or not all(
                isinstance(c, str) and 0 < len(c) <= MAX_TEXT for c in choices
            ):
                raise ValueError(f"{key}: a text, or a list of at most {MAX_CHOICES} texts, not {want!r}")
            if key == "tier" and not set(choices) <= set(TIERS):
                raise ValueError(f"tier: one of {', '.join(TIERS)} (or a list of them), not {want!r}")
        elif key == "kinds":
            if not isinstance(want, list) or len(want) > MAX_KINDS or not all(isinstance(k, str) for k in want):
                raise ValueError(f"kinds: a list of at most {MAX_KINDS} job kinds, not {want!r}")
        elif key == "labels":
            if not isinstance(want, Mapping) or len(want) > MAX_LABELS:
                raise ValueError(f"labels: a map of at most {MAX_LABELS} labels")
            if not all(isinstance(n, str) and type(v) in (str, int, float, bool) for n, v in want.items()):
                raise ValueError("labels: names to texts, numbers or booleans")
        else:
            raise ValueError(f"a known requirement ({', '.join(KEYS)}), not {key!r}")
        checked[key] = want
    return checked


def unmet(caps: Mapping[str, Any], requires: Mapping[str, Any]) -> str | None:
    """The first of ``requires`` (checked) that a device with capabilities ``caps`` (as
    :func:`meshnet.capabilities.read_capabilities` reads them) does not meet, described;
    None when it meets them all."""
    for key, want in requires.items():
        have = caps.get(key)
        if key in COUNTS:
            if type(have) is not int or have < want:
                return f"{key} >= {want}"
        elif key in TEXTS:
            choices = want if isinstance(want, list) else [want]
            if have not in choices:
                return f"{key} = {' or '.join(choices)}"
        elif key == "kinds":
            enabled = have if isinstance(have, list) else []
            missing = [k for k in want if k not in enabled]
            if missing:
                return f"kinds include {', '.join(missing)}"
        elif key == "labels":
            labels = have if isinstance(have, Mapping) else {}
            for name, value in want.items():
                if name not in labels or labels[name] != value or type(labels[name]) is not type(value):
                    return f"labels.{name} = {value!r}"
    return None


def describe(requires: Mapping[str, Any]) -> str:
    """All of ``requires`` in words, for logs and listings."""
    parts = []
    for key, want in requires.items():
        if key in COUNTS:
            parts.append(f"{key} >= {want}")
        elif key in TEXTS:
            parts.append(f"{key} = {' or '.join(want if isinstance(want, list) else [want])}")
        elif key == "kinds":
            parts.append(f"kinds include {', '.join(want)}")
        else:
            parts.extend(f"labels.{name} = {value!r}" for name, value in want.items())
    return ", ".join(parts) or "nothing"
