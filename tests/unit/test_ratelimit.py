"""Token buckets (meshnet.ratelimit), on a clock the test sets."""

from __future__ import annotations

import pytest

from meshnet.ratelimit import SourceBuckets, TokenBucket


def test_a_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait(0.0) == pytest.approx(0.5)
    assert not bucket.take(0.4)
    assert bucket.take(0.5)
    taken = sum(bucket.take(t / 100) for t in range(50, 1050))  # 10 s of asking 100 times a second
    assert 19 <= taken <= 20  # 2 a second (the last token is a rounding away)


def test_a_bucket_never_holds_more_than_its_burst_and_ignores_a_clock_going_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=2)
    assert bucket.take(0.0) and bucket.take(0.0)
    assert bucket.wait(1000.0) == 0
    assert [bucket.take(1000.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(999.0)


def test_each_source_has_its_own_bucket_and_the_table_is_bounded() -> None:
    buckets = SourceBuckets(rate=1.0, burst=1, max_sources=3)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0)
    for n in range(100):
        buckets.take(f"flood-{n}", 0.0)
    assert len(buckets) == 3
    assert buckets.take("a", 0.0), "a forgotten source starts again with a full bucket"


@pytest.mark.parametrize("rate, burst", [(0, 1), (1, 0), (-1, 5)])
def test_a_bucket_that_could_never_give_a_token_is_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)
