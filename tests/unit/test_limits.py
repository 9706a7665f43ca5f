"""Request rate limits: the token bucket."""

from __future__ import annotations

import pytest

from edge.limits import TokenBucket


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # one token after 0.1 s at 10/s
    assert not bucket.take(0.1)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_bucket_rejects_bad_settings_and_a_clock_going_back() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0.0)
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)  # no tokens from a clock that went back
