"""The reconnect schedule: capped exponential ceilings, full jitter, reset."""

from __future__ import annotations

import random

from common.backoff import Backoff


def test_ceilings_double_up_to_the_cap() -> None:
    b = Backoff(base=0.5, cap=20.0)
    assert [b.ceiling(i) for i in range(8)] == [0.5, 1, 2, 4, 8, 16, 20, 20]
    assert b.ceiling(10_000) == 20.0


def test_delays_are_drawn_from_zero_to_the_ceiling() -> None:
    calls: list[tuple[float, float]] = []

    def rand(lo: float, hi: float) -> float:
        calls.append((lo, hi))
        return hi

    b = Backoff(base=1.0, cap=5.0, rand=rand)
    assert [b.next_delay() for _ in range(5)] == [1, 2, 4, 5, 5]
    assert calls == [(0, 1), (0, 2), (0, 4), (0, 5), (0, 5)]
    b.reset()
    assert b.next_delay() == 1


def test_full_jitter_spreads_delays_within_bounds() -> None:
    rng = random.Random(7)
    b = Backoff(base=0.5, cap=20.0, rand=rng.uniform)
    delays = [b.next_delay() for _ in range(200)]
    assert all(0 <= d <= 20 for d in delays)
    late = delays[10:]
    assert min(late) < 5 and max(late) > 15  # spread over the whole range, not clustered
