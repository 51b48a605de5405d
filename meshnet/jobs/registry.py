"""Which job kinds exist and which handler runs each.

Kinds come from the built-ins and from plugins: any installed distribution can add one
through the entry-point group ``meshnet.jobs`` (name = kind, value = ``module:function``).
A node runs only the kinds its config enables; no code ever travels over the wire.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from meshnet.errors import ConfigError
from meshnet.jobs import builtin
from meshnet.protocol.messages import KIND_PATTERN

ENTRY_POINT_GROUP = "meshnet.jobs"
Handler = Callable[[Any], Any]

BUILTIN_KINDS: dict[str, Handler] = {"echo": builtin.echo, "sha256": builtin.sha256, "sleep": builtin.sleep}
#: Kinds that exist to test failure handling; never enabled by default.
TEST_KINDS: dict[str, Handler] = {"fail": builtin.fail, "crash": builtin.crash}


def available_kinds() -> dict[str, str]:
    """Every known kind and where it comes from (``builtin``, ``test`` or ``plugin:DIST``)."""
    kinds = {name: "builtin" for name in BUILTIN_KINDS} | {name: "test" for name in TEST_KINDS}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        kinds.setdefault(ep.name, f"plugin:{ep.dist.name if ep.dist else ep.value}")
    return kinds


def check_enabled(enabled: list[str], where: str = "config") -> None:
    """Raise ``ConfigError`` naming the first enabled kind that does not exist."""
    known = available_kinds()
    for name in enabled:
        if not KIND_PATTERN.fullmatch(name) or name not in known:
            raise ConfigError(
                f"{where}: jobs.enabled lists {name!r}, which is not a known job kind; "
                f"known kinds: {', '.join(sorted(known))}"
            )


def load_handlers(enabled: list[str]) -> dict[str, Handler]:
    """Handlers for the enabled kinds; plugins are imported here, in the worker."""
    handlers: dict[str, Handler] = {}
    plugins = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    for name in enabled:
        if name in BUILTIN_KINDS:
            handlers[name] = BUILTIN_KINDS[name]
        elif name in TEST_KINDS:
            handlers[name] = TEST_KINDS[name]
        elif name in plugins:
            handlers[name] = plugins[name].load()
        else:
            raise ConfigError(f"jobs.enabled lists {name!r}, which is not a known job kind")
    return handlers
