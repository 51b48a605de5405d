"""What a node tells its relay it can do."""

from __future__ import annotations

import os
from typing import Any


def node_capabilities(executors: int, kinds: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    """What a node tells the relay it can do; config values win over detected ones."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    return {"cores": os.cpu_count() or 1, "memory_bytes": memory, "executors": executors, "kinds": kinds, **extra}
