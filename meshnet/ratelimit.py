"""Token buckets, sans-IO: how often something a stranger can trigger may happen.

A bucket holds up to ``burst`` tokens and gains ``rate`` a second; each event takes one.
:class:`SourceBuckets` keeps one bucket per source in a bounded table (the least recently
seen sources are forgotten first: a flood from many sources costs a table of fixed size,
and a forgotten source starts again with a full bucket, no more than a new one would).
"""

from __future__ import annotations

from collections import OrderedDict


class TokenBucket:
    def __init__(self, rate: float, burst: float):
        if rate <= 0 or burst < 1:
            raise ValueError("a bucket needs a rate above 0 and room for at least one token")
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._at: float | None = None

    def _refill(self, now: float) -> None:
        if self._at is not None and now > self._at:
            self.tokens = min(self.burst, self.tokens + (now - self._at) * self.rate)
        if self._at is None or now > self._at:
            self._at = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0: one is there now); takes nothing."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> bool:
        """Take a token if one is there now."""
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class SourceBuckets:
    """A :class:`TokenBucket` per source, at most ``max_sources`` of them."""

    def __init__(self, rate: float, burst: float, max_sources: int = 4096):
        self.rate, self.burst, self.max_sources = rate, burst, max_sources
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = TokenBucket(self.rate, self.burst)
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
