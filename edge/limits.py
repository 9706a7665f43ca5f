"""Request rate limits of a client connection. Pure: the clock is passed in.

Why: each request costs the edge (and a `history` or `subscribe` costs Redis) something, and
one misbehaving client looping on requests must not take that from everyone else. A token
bucket allows bursts (a page subscribing to 100 channels at once) but not a sustained flood.
"""

from __future__ import annotations


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; each request takes one."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._at = now

    def take(self, now: float) -> bool:
        """Whether a request at `now` is within the limit (and count it if so)."""
        elapsed = max(now - self._at, 0.0)
        self._at = now
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
