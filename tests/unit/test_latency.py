"""The latency histogram as Prometheus reads it: cumulative buckets labelled `le`."""

from __future__ import annotations

import pytest

from edge.stats import Histogram


def test_histogram_buckets_are_cumulative_and_le() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 2.0):
        hist.observe(value)
    assert hist.buckets() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]  # 0.1 is in le="0.1"
    assert hist.total == pytest.approx(2.65)
