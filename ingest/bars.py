"""OHLCV bars built from trades.

Upstreams that send only trades (the simulator, most real feeds) still get ``bars.<i>.<SYM>``
channels: one `BarBuilder` per symbol and interval turns the trade stream into bars. Pure
and synchronous, so it is exact to test and cheap to call per trade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_INTERVAL_NUMBER = 9999  # the channel grammar allows 1-4 digits before the unit


def interval_label(seconds: int) -> str:
    """The channel name of an interval: 1 -> "1s", 60 -> "1m", 3600 -> "1h", 86400 -> "1d".

    The largest unit that divides the interval exactly, so every label is a valid interval
    of the channel grammar and round-trips to the same number of seconds.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
        raise ValueError(f"bar interval must be a positive whole number of seconds: {seconds!r}")
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        if seconds % size == 0:
            number = seconds // size
            if number > MAX_INTERVAL_NUMBER:
                break
            return f"{number}{unit}"
    raise ValueError(f"bar interval of {seconds} s has no channel name (too long)")


@dataclass(frozen=True, slots=True)
class Bar:
    """One closed (or, from `BarBuilder.current`, still open) bar.

    `start` is whole seconds since the epoch, a multiple of the interval, so that bars of
    every upstream and every restart line up on the same boundaries.
    """

    symbol: str
    interval: str  # channel label: "1s", "1m", ...
    start: int  # seconds since the epoch, aligned to the interval
    open: float
    high: float
    low: float
    close: float
    volume: int
    trades: int

    @property
    def start_ms(self) -> int:
        return self.start * 1000

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, short names as charting libraries expect them."""
        return {
            "symbol": self.symbol,
            "interval": self.interval,
            "t": self.start_ms,
            "o": self.open,
            "h": self.high,
            "l": self.low,
            "c": self.close,
            "v": self.volume,
            "n": self.trades,
        }


class BarBuilder:
    """Builds the bars of one symbol and one interval from its trades.

    A bar closes when a trade of a later interval arrives (`add`) or when the caller's clock
    passes the end of its interval (`flush`): flushing on a timer makes bars arrive on time
    when trading is quiet. Intervals without trades produce no bar. A closed bar is never
    reopened: a late trade (timestamp in an interval already closed, e.g. after the clock
    stepped back) counts in the bar that is open, or in the next one.
    """

    __slots__ = (
        "_bucket",
        "_close",
        "_high",
        "_last_closed",
        "_low",
        "_open",
        "_trades",
        "_volume",
        "interval",
        "interval_seconds",
        "symbol",
    )

    def __init__(self, interval_seconds: int, symbol: str) -> None:
        self.interval = interval_label(interval_seconds)
        self.interval_seconds = interval_seconds
        self.symbol = symbol
        self._bucket: int | None = None  # interval number of the open bar, None if none
        self._last_closed: int | None = None
        self._open = self._high = self._low = self._close = 0.0
        self._volume = 0
        self._trades = 0

    def add(self, ts: float, price: float, size: int) -> list[Bar]:
        """Count one trade (`ts` in seconds since the epoch); return the bars it closed."""
        if not math.isfinite(ts) or not math.isfinite(price):
            raise ValueError(f"trade needs a finite timestamp and price: {ts!r}, {price!r}")
        if size < 0:
            raise ValueError(f"trade size must not be negative: {size!r}")
        bucket = math.floor(ts / self.interval_seconds)
        closed: list[Bar] = []
        if self._bucket is not None:
            if bucket > self._bucket:
                closed.append(self._close_bar())
            else:
                bucket = self._bucket  # same interval, or late: joins the open bar
        if self._bucket is None:
            if self._last_closed is not None and bucket <= self._last_closed:
                bucket = self._last_closed + 1  # late after a flush: never reopen a bar
            self._bucket = bucket
            self._open = self._high = self._low = self._close = price
            self._volume = size
            self._trades = 1
            return closed
        if price > self._high:
            self._high = price
        elif price < self._low:
            self._low = price
        self._close = price
        self._volume += size
        self._trades += 1
        return closed

    def flush(self, now_ts: float) -> list[Bar]:
        """Close the open bar if `now_ts` is past the end of its interval."""
        if self._bucket is None or now_ts < (self._bucket + 1) * self.interval_seconds:
            return []
        return [self._close_bar()]

    @property
    def closes_at(self) -> int | None:
        """When the open bar's interval ends (seconds since the epoch); None if no bar is open.

        A feed sleeps no longer than this so that `flush` runs on time.
        """
        if self._bucket is None:
            return None
        return (self._bucket + 1) * self.interval_seconds

    @property
    def current(self) -> Bar | None:
        """The open bar as it stands, for a chart's last candle; None if no bar is open."""
        if self._bucket is None:
            return None
        return self._bar(self._bucket)

    def _bar(self, bucket: int) -> Bar:
        return Bar(
            self.symbol,
            self.interval,
            bucket * self.interval_seconds,
            self._open,
            self._high,
            self._low,
            self._close,
            self._volume,
            self._trades,
        )

    def _close_bar(self) -> Bar:
        assert self._bucket is not None
        bar = self._bar(self._bucket)
        self._last_closed = self._bucket
        self._bucket = None
        return bar
