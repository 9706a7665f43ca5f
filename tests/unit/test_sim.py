"""The simulated feed and the bar builder: pure, with a fake clock and a recording sleep."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from typing import Any

import pytest

from common.channels import parse_channel
from ingest.bars import Bar, BarBuilder, interval_label
from ingest.config import IngestConfig
from ingest.feeds import UnknownFeed, make_upstream
from ingest.feeds.sim import (
    DEPTH_LEVELS,
    MAX_LAG,
    SimSettings,
    SimulatedFeed,
    instrument_spec,
)
from ingest.upstream import Upstream, UpstreamMessage

SYMBOLS = ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM", "AAPL")
START = 1_700_000_000.25  # not on a second boundary, so bar edges are not coincidences


class FakeClock:
    """A clock that only moves when the feed sleeps; records every sleep."""

    def __init__(self, t: float = START) -> None:
        self.t = t
        self.sleeps: list[float] = []
        self.jumps: dict[int, float] = {}  # sleep call number -> extra seconds (may be < 0)

    def __call__(self) -> float:
        return self.t

    async def sleep(self, delay: float) -> None:
        assert delay >= 0, delay
        self.sleeps.append(delay)
        self.t += delay + self.jumps.pop(len(self.sleeps), 0.0)


def make(
    symbols: tuple[str, ...] = SYMBOLS,
    rate: float = 100.0,
    seed: int = 7,
    n: int | None = 5_000,
    clock: FakeClock | None = None,
    run_id: str | None = "run",
) -> tuple[SimulatedFeed, FakeClock]:
    clock = clock or FakeClock()
    feed = SimulatedFeed(
        symbols, rate, seed, clock=clock, sleep=clock.sleep, max_messages=n, run_id=run_id
    )
    return feed, clock


async def collect(feed: SimulatedFeed) -> list[UpstreamMessage]:
    return [m async for m in feed.messages()]


def content(messages: list[UpstreamMessage]) -> list[tuple[str, str, bool, dict[str, Any]]]:
    """What must replay identically for a seed: everything but wall-clock timestamps."""
    return [
        (m.channel, m.key, m.delete, {k: v for k, v in m.data.items() if k != "ts"})
        for m in messages
    ]


def on_tick(price: float, tick: float) -> bool:
    return abs(price / tick - round(price / tick)) < 1e-6


# --- bars ----------------------------------------------------------------------------------


def test_interval_labels() -> None:
    assert [interval_label(s) for s in (1, 5, 60, 90, 300, 3600, 7200, 86_400)] == [
        "1s", "5s", "1m", "90s", "5m", "1h", "2h", "1d",
    ]
    for bad in (0, -60, 10_001):
        with pytest.raises(ValueError):
            interval_label(bad)


def test_bar_ohlcv_within_one_interval() -> None:
    b = BarBuilder(1, "MNQ")
    assert b.add(100.1, 21000.0, 2) == []
    assert b.add(100.4, 21001.5, 1) == []
    assert b.add(100.6, 20999.25, 3) == []
    assert b.add(100.99, 21000.5, 4) == []
    assert b.current == Bar("MNQ", "1s", 100, 21000.0, 21001.5, 20999.25, 21000.5, 10, 4)
    # A trade exactly on the next boundary belongs to the next bar and closes this one.
    closed = b.add(101.0, 21002.0, 1)
    assert closed == [Bar("MNQ", "1s", 100, 21000.0, 21001.5, 20999.25, 21000.5, 10, 4)]
    assert b.current == Bar("MNQ", "1s", 101, 21002.0, 21002.0, 21002.0, 21002.0, 1, 1)


def test_bar_alignment_to_the_interval() -> None:
    b = BarBuilder(60, "ES")
    b.add(6_059.9, 6000.0, 1)  # 6000 = 100 minutes: the bar starts there, not at 6059.9
    assert b.closes_at == 6_060
    (bar,) = b.add(6_060.0, 6001.0, 2)
    assert bar.start == 6_000 and bar.start % 60 == 0
    assert bar.to_dict() == {
        "symbol": "ES", "interval": "1m", "t": 6_000_000,
        "o": 6000.0, "h": 6000.0, "l": 6000.0, "c": 6000.0, "v": 1, "n": 1,
    }
    b2 = BarBuilder(60, "ES")
    b2.add(1_700_000_029.7, 1.0, 1)
    assert b2.current is not None and b2.current.start == 1_699_999_980


def test_bar_gaps_produce_no_bars() -> None:
    b = BarBuilder(1, "X")
    b.add(10.5, 1.0, 1)
    (bar,) = b.add(13.2, 2.0, 1)  # 11 and 12 had no trades: no bars for them
    assert bar.start == 10
    assert b.flush(13.99) == []
    (bar,) = b.flush(14.0)
    assert (bar.start, bar.open, bar.trades) == (13, 2.0, 1)


def test_bar_flush_closes_on_time_and_once() -> None:
    b = BarBuilder(1, "X")
    assert b.flush(1e9) == [] and b.current is None and b.closes_at is None
    b.add(50.2, 5.0, 3)
    assert b.flush(50.999) == []
    assert b.flush(51.0) == [Bar("X", "1s", 50, 5.0, 5.0, 5.0, 5.0, 3, 1)]
    assert b.flush(52.0) == []
    assert b.current is None


def test_late_trade_never_reopens_a_closed_bar() -> None:
    b = BarBuilder(1, "X")
    b.add(10.5, 1.0, 1)
    b.add(10.2, 0.5, 1)  # earlier timestamp, same open bar: counted in it
    (bar,) = b.flush(11.0)
    assert (bar.start, bar.low, bar.volume, bar.trades) == (10, 0.5, 2, 2)
    b.add(10.9, 3.0, 1)  # belongs to a published bar: goes to the next one instead
    assert b.current is not None and b.current.start == 11


def test_bar_rejects_bad_trades() -> None:
    b = BarBuilder(1, "X")
    with pytest.raises(ValueError):
        b.add(1.0, 1.0, -1)
    with pytest.raises(ValueError):
        b.add(1.0, math.nan, 1)
    with pytest.raises(ValueError):
        b.add(math.inf, 1.0, 1)


# --- feed: content ---------------------------------------------------------------------


async def test_same_seed_same_messages() -> None:
    first, _ = make(run_id="a")
    second, _ = make(run_id="b")
    a, b = await collect(first), await collect(second)
    assert len(a) == len(b) == 5_000
    assert content(a) == content(b)
    other, _ = make(seed=8)
    assert content(await collect(other)) != content(a)


async def test_market_events_do_not_depend_on_the_clock() -> None:
    """Only bars follow the clock; every other message replays for the seed."""
    a, _ = make(clock=FakeClock(START))
    b, _ = make(clock=FakeClock(START + 12_345.678))
    ma, mb = await collect(a), await collect(b)
    not_bars_a = [m for m in content(ma) if not m[0].startswith("bars.")]
    not_bars_b = [m for m in content(mb) if not m[0].startswith("bars.")]
    assert len(not_bars_a) > 4_000
    n = min(len(not_bars_a), len(not_bars_b))
    assert not_bars_a[:n] == not_bars_b[:n]


async def test_msg_ids_unique_sequential_and_run_id_random() -> None:
    feed, _ = make(n=100, run_id="r1")
    ids = [m.msg_id for m in await collect(feed)]
    assert ids == [f"r1:{i}" for i in range(1, 101)]
    # A second iteration continues the market and the sequence (nothing lost in between).
    ids2 = [m.msg_id for m in await collect(feed)]
    assert ids2 == [f"r1:{i}" for i in range(101, 201)]
    one, two = SimulatedFeed(("X",), 1.0, 1), SimulatedFeed(("X",), 1.0, 1)
    assert one.run_id != two.run_id
    int(one.run_id, 16)


async def test_channels_valid_and_all_kinds_present() -> None:
    feed, _ = make(rate=30.0, n=20_000)  # 74 s: at least one minute boundary
    messages = await collect(feed)
    kinds: Counter[str] = Counter()
    for m in messages:
        channel = parse_channel(m.channel)
        assert channel.symbol in SYMBOLS
        if channel.namespace != "depth":
            assert m.data["symbol"] == channel.symbol
        bars = channel.namespace == "bars"
        kinds[m.channel.rsplit(".", 1)[0] if bars else channel.namespace] += 1
    assert set(kinds) == {"quotes", "trades", "depth", "bars.1s", "bars.1m"}
    events = kinds["quotes"] + kinds["trades"] + kinds["depth"]
    assert 0.52 < kinds["quotes"] / events < 0.65
    assert 0.25 < kinds["trades"] / events < 0.34
    assert 0.07 < kinds["depth"] / events < 0.2
    for m in messages:
        if m.channel.startswith("bars."):
            interval = parse_channel(m.channel).interval
            assert m.data["interval"] == interval
            assert m.data["t"] % (1000 if interval == "1s" else 60_000) == 0


async def test_prices_positive_on_tick_and_realistic() -> None:
    feed, _ = make(n=30_000)
    expected = {"MNQ": 21_000, "NQ": 21_000, "MES": 6_000, "ES": 6_000, "M2K": 2_300,
                "RTY": 2_300, "MYM": 44_000, "YM": 44_000, "AAPL": 100}
    ticks = {"MNQ": 0.25, "NQ": 0.25, "MES": 0.25, "ES": 0.25, "M2K": 0.1, "RTY": 0.1,
             "MYM": 1.0, "YM": 1.0, "AAPL": 0.01}
    for m in await collect(feed):
        symbol = parse_channel(m.channel).symbol
        assert symbol is not None
        tick, d = ticks[symbol], m.data
        if m.channel.startswith("quotes."):
            prices = [d["bid"], d["ask"], d["last"]]
            assert d["bid"] < d["ask"] and d["bid_size"] > 0 and d["ask_size"] > 0
            assert on_tick(d["change"], tick)
        elif m.channel.startswith("trades."):
            prices = [d["price"]]
            assert d["side"] in ("buy", "sell") and d["size"] > 0
        elif m.channel.startswith("depth."):
            prices = [d["price"]]
        else:
            prices = [d["o"], d["h"], d["l"], d["c"]]
            assert d["l"] <= min(d["o"], d["c"]) <= max(d["o"], d["c"]) <= d["h"]
        for price in prices:
            assert price > 0 and on_tick(price, tick), (m.channel, price)
            assert abs(price / expected[symbol] - 1) < 0.05, (m.channel, price)


async def test_prices_stay_positive_at_the_bottom_of_the_grid() -> None:
    feed, _ = make(symbols=("AAPL",), n=3_000)
    feed._markets[0].bid = feed._markets[0].ask = 1  # white box: one tick above zero
    for m in await collect(feed):
        for field in ("bid", "ask", "price", "o", "l"):
            if field in m.data:
                assert m.data[field] >= 0.01, m


def test_instrument_specs_by_root() -> None:
    assert instrument_spec("MNQ").tick == 0.25
    assert instrument_spec("CON.F.US.MNQ.Z25").tick == 0.25
    assert instrument_spec("ESZ5").start_price == 6_000
    assert instrument_spec("MYMH26").tick == 1.0
    assert instrument_spec("M2K").tick == 0.1
    assert instrument_spec("AAPL").tick == 0.01
    assert instrument_spec("NQX").tick == 0.01  # not a contract month: not NQ


async def test_depth_deletes_and_book_stays_consistent() -> None:
    feed, _ = make(symbols=("MNQ", "YM"), n=30_000)
    book: dict[str, dict[str, dict[str, Any]]] = {"MNQ": {}, "YM": {}}
    best: dict[str, tuple[float, float]] = {}
    deletes = 0
    for m in await collect(feed):
        symbol = m.channel.split(".", 1)[1]
        if m.channel.startswith("quotes."):
            best[symbol] = (m.data["bid"], m.data["ask"])
        if not m.channel.startswith("depth."):
            continue
        d = m.data
        decimals = 2 if symbol == "MNQ" else 0
        assert m.key == f"{d['side']}:{d['price']:.{decimals}f}"
        assert m.delete == (d["size"] == 0)
        if m.delete:
            deletes += 1
            book[symbol].pop(m.key, None)
        else:
            book[symbol][m.key] = d
    assert deletes > 100
    for symbol, levels in book.items():
        bid, ask = best[symbol]
        tick = instrument_spec(symbol).tick
        assert levels
        for level in levels.values():
            if level["side"] == "bid":
                assert bid - DEPTH_LEVELS * tick < level["price"] <= bid
            else:
                assert ask <= level["price"] < ask + DEPTH_LEVELS * tick


# --- feed: pacing ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("symbols", "rate", "n"),
    [(SYMBOLS[:4], 1_000.0, 20_000), (("MNQ",), 100_000.0, 30_000), (("MNQ", "ES"), 5.0, 200)],
)
async def test_pacing_matches_the_rate(symbols: tuple[str, ...], rate: float, n: int) -> None:
    feed, clock = make(symbols=symbols, rate=rate, n=n)
    assert len(await collect(feed)) == n
    total_rate = rate * len(symbols)
    expected = n / total_rate
    # Off by at most a batch, or the bars flushed at once at a boundary (they count too).
    slack = max(feed.batch_size, 2 * len(symbols)) / total_rate
    assert abs(sum(clock.sleeps) - expected) <= slack + 1e-6
    # One sleep per batch (plus wake-ups to close bars on time), never one per message.
    batches = n / feed.batch_size
    assert len(clock.sleeps) <= batches * 1.1 + 2 * expected + 5


async def test_quiet_bars_arrive_on_time() -> None:
    feed, clock = make(symbols=("MNQ",), rate=0.5, n=150)
    late = []
    async for m in feed.messages():
        if m.channel.startswith("bars."):
            seconds = 1 if m.channel.startswith("bars.1s") else 60
            late.append(clock() - (m.data["t"] / 1000 + seconds))
    assert len(late) > 30
    assert all(0 <= x <= 0.01 for x in late), late


async def test_catch_up_is_capped_after_a_stall() -> None:
    clock = FakeClock()
    clock.jumps[50] = 100.0  # the process was suspended for 100 s
    feed, _ = make(symbols=("MNQ",), rate=1_000.0, n=5_000, clock=clock)
    burst = 0
    seen_stall = False
    async for _ in feed.messages():
        if len(clock.sleeps) >= 50 and not seen_stall:
            seen_stall = True
            burst = 0
            stall_sleeps = len(clock.sleeps)
        if seen_stall and any(s > 0 for s in clock.sleeps[stall_sleeps:]):
            break
        burst += 1
    # It catches up MAX_LAG worth of messages, not 100 s worth, then paces again.
    assert 0.8 * MAX_LAG * 1_000 <= burst <= MAX_LAG * 1_000 + 3 * feed.batch_size


async def test_clock_stepping_back_does_not_stall_the_feed() -> None:
    clock = FakeClock()
    clock.jumps[20] = -3_600.0
    feed, _ = make(symbols=("MNQ",), rate=1_000.0, n=3_000, clock=clock)
    assert len(await collect(feed)) == 3_000
    assert max(clock.sleeps) <= 2 * feed.batch_size / 1_000.0
    assert sum(clock.sleeps) < 3.5


async def test_real_clock_and_sleep_pace() -> None:
    feed = SimulatedFeed(("MNQ",), 2_000.0, 1, max_messages=300)
    started = time.monotonic()
    assert len(await collect(feed)) == 300
    elapsed = time.monotonic() - started
    assert 0.1 <= elapsed < 3.0


# --- construction --------------------------------------------------------------------------


async def test_max_messages_zero_and_bad_arguments() -> None:
    feed, clock = make(n=0)
    assert await collect(feed) == [] and clock.sleeps == []
    for bad_rate in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            SimulatedFeed(("MNQ",), bad_rate, 1)
    for bad_symbols in ((), ("MNQ", "MNQ"), ("MN Q",), ("x" * 130,)):
        with pytest.raises(ValueError):
            SimulatedFeed(bad_symbols, 1.0, 1)
    with pytest.raises(ValueError):
        SimulatedFeed(("MNQ",), 1.0, 1, max_messages=-1)


async def test_the_registry_opens_the_sim_feed_from_config() -> None:
    states: list[tuple[str, str]] = []
    config = IngestConfig(sim=SimSettings(symbols=("MNQ", "ES"), rate=3.0, seed=5))
    feed: Upstream = make_upstream(config, logging.getLogger("test"),
                                   lambda connection, state: states.append((connection, state)))
    assert isinstance(feed, SimulatedFeed)
    assert (feed.name, feed.symbols, feed.rate, feed.seed) == ("sim", ("MNQ", "ES"), 3.0, 5)
    assert states == [("sim", "live")]
    with pytest.raises(UnknownFeed, match="expected one of sim, ws, projectx"):
        make_upstream(IngestConfig(feed="other"), logging.getLogger("test"))


async def test_consumer_can_stop_early() -> None:
    feed = SimulatedFeed(("MNQ",), 1_000_000.0, 1)
    gen = feed.messages()
    received = [await anext(gen) for _ in range(10)]
    await gen.aclose()  # type: ignore[attr-defined]
    assert len(received) == 10
    await asyncio.sleep(0)
