"""Which path reaches each peer now.

A path is shared by every peer (the relay: one link carries them all) or a peer's own
(a direct link punched to it, a LAN address). The current path of a peer is the best of
those up, direct before LAN before relay. The session does not care which path carried
a message; it only needs to know when a peer's current path changed, to send again what
was in flight on the old one.
"""

from __future__ import annotations

#: Best first.
PREFERENCE = ("direct", "lan", "relay")


class PathTable:
    def __init__(self) -> None:
        #: Shared paths that are up.
        self.shared: set[str] = set()
        #: Each peer's own paths that are up.
        self.own: dict[str, set[str]] = {}

    def set(self, path: str, up: bool, peer: str | None = None) -> None:
        """Path ``path`` (of ``peer``; None: shared by all) went up or down."""
        if path not in PREFERENCE:
            raise ValueError(f"unknown path {path!r}; expected one of {', '.join(PREFERENCE)}")
        paths = self.shared if peer is None else self.own.setdefault(peer, set())
        if up:
            paths.add(path)
        else:
            paths.discard(path)
            if peer is not None and not paths:
                del self.own[peer]

    def current(self, peer: str) -> str | None:
        """The path to send to ``peer`` on now (None: none is up)."""
        own = self.own.get(peer, ())
        for path in PREFERENCE:
            if path in own or path in self.shared:
                return path
        return None
