"""A simulated market-data feed: the upstream of the demo, the tests and the benchmarks.

Per symbol a random-walk book produces quotes, trades and depth-level updates, and
`BarBuilder`s turn the trades into 1-second and 1-minute bars. Everything random comes from
one `random.Random(seed)` drawn in a fixed order, so a seed replays the same market (only
timestamps, and the bars cut from them, follow the clock). Messages are paced in small
batches, one sleep per batch, so that 100k messages/s stay affordable.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from common.channels import parse_channel
from common.config import Setting, parse_float, parse_int
from common.errors import BadChannel, ConfigError
from ingest.bars import Bar, BarBuilder
from ingest.feeds import Feed, FeedContext
from ingest.upstream import Upstream, UpstreamMessage

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[object]]

QUOTE_SHARE = 0.6  # of events; trades are the next 0.3, depth updates the rest
TRADE_SHARE = 0.3
MOVE_PROBABILITY = 0.3  # a quote moves the best bid/ask by a tick this often
WIDE_SPREAD_PROBABILITY = 0.1  # a quote has a two-tick spread this often
DEPTH_LEVELS = 10  # levels per side the simulated book keeps
DEPTH_DELETE_PROBABILITY = 0.15
BAR_INTERVALS = (1, 60)  # seconds

BATCH_SECONDS = 0.01  # pace in batches of ~10 ms worth of messages: <= ~100 sleeps/s
MAX_BATCH = 2_000
MAX_LAG = 1.0  # s of backlog worth catching up; beyond it (a suspended process) is dropped
MAX_SKEW = 0.5  # s ahead of schedule that can only mean the clock stepped back
BAR_SLACK = 0.001  # s past a bar's end to wake, so that the flush surely sees it closed


@dataclass(frozen=True, slots=True)
class InstrumentSpec:
    """Where a simulated symbol's price starts, and its price grid."""

    start_price: float
    tick: float
    decimals: int  # digits after the point of a price on this tick grid


_INDEX = {"NQ": 21_000.0, "MNQ": 21_000.0, "ES": 6_000.0, "MES": 6_000.0}
INSTRUMENTS: dict[str, InstrumentSpec] = {
    **{root: InstrumentSpec(price, 0.25, 2) for root, price in _INDEX.items()},
    "YM": InstrumentSpec(44_000.0, 1.0, 0),
    "MYM": InstrumentSpec(44_000.0, 1.0, 0),
    "RTY": InstrumentSpec(2_300.0, 0.1, 1),
    "M2K": InstrumentSpec(2_300.0, 0.1, 1),
}
DEFAULT_INSTRUMENT = InstrumentSpec(100.0, 0.01, 2)

# A futures root with a contract month: MNQZ5, ESH26.
_CONTRACT_RE = re.compile(r"([A-Z0-9]+?)[FGHJKMNQUVXZ][0-9]{1,2}")


def instrument_spec(symbol: str) -> InstrumentSpec:
    """The spec of a symbol by its root: MNQ, MNQZ5 and CON.F.US.MNQ.Z25 all trade like MNQ."""
    for segment in reversed(symbol.upper().split(".")):
        if segment in INSTRUMENTS:
            return INSTRUMENTS[segment]
        match = _CONTRACT_RE.fullmatch(segment)
        if match and match.group(1) in INSTRUMENTS:
            return INSTRUMENTS[match.group(1)]
    return DEFAULT_INSTRUMENT


# An event before it gets its msg_id: channel, data, key, delete.
_Item = tuple[str, dict[str, Any], str, bool]


class _Symbol:
    """The simulated market of one symbol. Prices are kept in whole ticks, so always on tick.

    Hot path of the feed (100k+ messages/s): draws use `rng.random()` only, and the float
    prices are recomputed only when their ticks change.
    """

    __slots__ = (
        "ask",
        "ask_px",
        "ask_size",
        "bar_builders",
        "bar_channels",
        "bid",
        "bid_px",
        "bid_size",
        "book",
        "change_px",
        "decimals",
        "depth_channel",
        "last",
        "last_px",
        "open",
        "quotes_channel",
        "symbol",
        "tick",
        "trades_channel",
        "volume",
    )

    def __init__(self, symbol: str, rng: random.Random) -> None:
        spec = instrument_spec(symbol)
        self.symbol = symbol
        self.tick = spec.tick
        self.decimals = spec.decimals
        self.quotes_channel = f"quotes.{symbol}"
        self.trades_channel = f"trades.{symbol}"
        self.depth_channel = f"depth.{symbol}"
        self.bar_builders = tuple(BarBuilder(seconds, symbol) for seconds in BAR_INTERVALS)
        self.bar_channels = tuple(f"bars.{b.interval}.{symbol}" for b in self.bar_builders)
        start = spec.start_price * (1.0 + (rng.random() - 0.5) * 0.01)
        self.bid = max(round(start / spec.tick), 1)
        self.ask = self.bid + 1
        self.bid_px = self.price(self.bid)
        self.ask_px = self.price(self.ask)
        self.bid_size = 1 + int(rng.random() * 60)
        self.ask_size = 1 + int(rng.random() * 60)
        self.last = self.bid
        self.last_px = self.bid_px
        self.open = self.bid  # the session open: "change" is measured from it
        self.change_px = 0.0
        self.volume = 0
        self.book: dict[str, dict[int, int]] = {"bid": {}, "ask": {}}

    def price(self, ticks: int) -> float:
        return round(ticks * self.tick, self.decimals)

    def depth_item(self, side: str, ticks: int, size: int) -> _Item:
        price = self.price(ticks)
        key = f"{side}:{price:.{self.decimals}f}"
        data = {"side": side, "price": price, "size": size}
        return (self.depth_channel, data, key, size == 0)

    def quote(self, rng: random.Random, ts: float) -> list[_Item]:
        """Move the best bid/ask (sometimes), resize it, and drop depth levels now invalid."""
        draw = rng.random
        r = draw()
        step = -1 if r < MOVE_PROBABILITY / 2 else 1 if r < MOVE_PROBABILITY else 0
        spread = 2 if draw() < WIDE_SPREAD_PROBABILITY else 1
        self.bid_size = 1 + int(draw() * 60)
        self.ask_size = 1 + int(draw() * 60)
        bid = max(self.bid + step, 1)
        ask = bid + spread
        moved = bid != self.bid or ask != self.ask
        if moved:
            if bid != self.bid:
                self.bid, self.bid_px = bid, self.price(bid)
            self.ask, self.ask_px = ask, self.price(ask)
        items: list[_Item] = [
            (
                self.quotes_channel,
                {
                    "symbol": self.symbol,
                    "bid": self.bid_px,
                    "ask": self.ask_px,
                    "bid_size": self.bid_size,
                    "ask_size": self.ask_size,
                    "last": self.last_px,
                    "change": self.change_px,
                    "volume": self.volume,
                    "ts": int(ts * 1000),
                },
                "",
                False,
            )
        ]
        if moved:
            items.extend(self._prune())
        return items

    def _prune(self) -> list[_Item]:
        """Deletes for levels that crossed the best price or fell out of the book's depth."""
        bids, asks = self.book["bid"], self.book["ask"]
        bid, ask = self.bid, self.ask
        items = []
        for ticks in sorted([t for t in bids if t > bid or t <= bid - DEPTH_LEVELS]):
            del bids[ticks]
            items.append(self.depth_item("bid", ticks, 0))
        for ticks in sorted([t for t in asks if t < ask or t >= ask + DEPTH_LEVELS]):
            del asks[ticks]
            items.append(self.depth_item("ask", ticks, 0))
        return items

    def trade(self, rng: random.Random, ts: float) -> list[_Item]:
        """A trade at the best bid or ask, and the bars it closes (sent before it)."""
        draw = rng.random
        buy = draw() < 0.5
        size = 1 + int(draw() * 5) if draw() < 0.9 else 6 + int(draw() * 45)
        if buy:
            ticks, price = self.ask, self.ask_px
        else:
            ticks, price = self.bid, self.bid_px
        if ticks != self.last:
            self.last, self.last_px = ticks, price
            self.change_px = self.price(ticks - self.open)
        self.volume += size
        items: list[_Item] = []
        for builder, channel in zip(self.bar_builders, self.bar_channels, strict=True):
            closed = builder.add(ts, price, size)
            if closed:
                items.extend(_bar_item(channel, bar) for bar in closed)
        items.append(
            (
                self.trades_channel,
                {
                    "symbol": self.symbol,
                    "price": price,
                    "size": size,
                    "side": "buy" if buy else "sell",
                    "ts": int(ts * 1000),
                },
                "",
                False,
            )
        )
        return items

    def depth(self, rng: random.Random) -> list[_Item]:
        """Set (or delete) the size of one level within the book's depth."""
        draw = rng.random
        side = "bid" if draw() < 0.5 else "ask"
        offset = int(draw() * DEPTH_LEVELS)
        size = 0 if draw() < DEPTH_DELETE_PROBABILITY else 1 + int(draw() * 200)
        ticks = max(self.bid - offset, 1) if side == "bid" else self.ask + offset
        levels = self.book[side]
        if size:
            levels[ticks] = size
        else:
            levels.pop(ticks, None)
        return [self.depth_item(side, ticks, size)]

    def flush_bars(self, now: float) -> Iterator[_Item]:
        for builder, channel in zip(self.bar_builders, self.bar_channels, strict=True):
            for bar in builder.flush(now):
                yield _bar_item(channel, bar)

    def next_bar_close(self) -> int | None:
        closes = [c for b in self.bar_builders if (c := b.closes_at) is not None]
        return min(closes) if closes else None


def _bar_item(channel: str, bar: Bar) -> _Item:
    return (channel, bar.to_dict(), "", False)


class SimulatedFeed:
    """An `Upstream` of simulated quotes, trades, depth and bars for `symbols`.

    `rate` is messages per second per symbol (bars included), so the feed emits
    ``rate * len(symbols)`` messages/s on average. Events go to the symbols in turn (round
    robin); ~60% are quotes, ~30% trades, ~10% depth updates. The market state lives in the
    instance: calling `messages` again continues it (and the msg_id sequence), one consumer
    at a time. `max_messages` ends each `messages` iteration after that many messages.
    `run_id` (default random, from os.urandom, not the seed) prefixes every msg_id, so that a
    restarted feed never repeats an id a publisher still remembers.
    """

    name = "sim"

    def __init__(
        self,
        symbols: tuple[str, ...],
        rate: float,
        seed: int,
        *,
        clock: Clock = time.time,
        sleep: Sleep = asyncio.sleep,
        max_messages: int | None = None,
        run_id: str | None = None,
    ) -> None:
        if not symbols:
            raise ValueError("the simulated feed needs at least one symbol")
        if len(set(symbols)) != len(symbols):
            raise ValueError(f"duplicate symbols: {symbols!r}")
        if not math.isfinite(rate) or rate <= 0:
            raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
        if max_messages is not None and max_messages < 0:
            raise ValueError(f"max_messages must be >= 0, got {max_messages!r}")
        self.symbols = tuple(symbols)
        self.rate = float(rate)
        self.seed = seed
        self.max_messages = max_messages
        self.run_id = run_id if run_id is not None else os.urandom(8).hex()
        self._clock = clock
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._markets = [_Symbol(symbol, self._rng) for symbol in self.symbols]
        for market in self._markets:
            for channel in (
                market.quotes_channel,
                market.trades_channel,
                market.depth_channel,
                *market.bar_channels,
            ):
                try:
                    parse_channel(channel)
                except BadChannel as exc:
                    raise ValueError(f"symbol {market.symbol!r}: {exc}") from None
        total = self.rate * len(self.symbols)
        self.batch_size = max(1, min(MAX_BATCH, round(total * BATCH_SECONDS)))
        self._next = 0  # index of the market of the next event
        self._seq = 0
        # Simulated but not yet yielded (a batch cut short by max_messages or the consumer).
        self._pending: deque[UpstreamMessage] = deque()

    async def messages(self) -> AsyncIterator[UpstreamMessage]:
        """Simulated messages, paced to the rate, until `max_messages` (or forever)."""
        limit = self.max_messages
        if limit == 0:
            return
        clock, sleep, pending = self._clock, self._sleep, self._pending
        total_rate = self.rate * len(self.symbols)
        batch = self.batch_size
        start = clock()
        sent = 0  # messages yielded: message i is due at start + i / total_rate
        while True:
            now = clock()
            self._flush_bars(now)
            delay = start + sent / total_rate - now
            if delay > batch / total_rate + MAX_SKEW:  # the clock stepped back: re-anchor
                start, delay = now - sent / total_rate, 0.0
            elif delay < -MAX_LAG:  # far behind: catch up MAX_LAG, forget the rest
                start += -delay - MAX_LAG
                delay = -MAX_LAG
            if delay > 0 and not pending:
                bar_close = self._next_bar_close()
                if bar_close is not None and bar_close - now < delay:
                    delay = bar_close - now + BAR_SLACK  # wake to flush the bar on time
                await sleep(delay)
                continue
            if delay <= 0:
                self._fill(batch)
            while pending:
                yield pending.popleft()
                sent += 1
                if sent == limit:
                    return
            if start + sent / total_rate <= clock():
                await sleep(0)  # catching up: still let the event loop run once a batch

    def _fill(self, events: int) -> None:
        """Simulate `events` events into the pending messages (the feed's hot loop)."""
        rng = self._rng
        draw = rng.random
        clock = self._clock
        markets = self._markets
        append = self._pending.append
        run_id = self.run_id
        index, seq = self._next, self._seq
        for _ in range(events):
            market = markets[index]
            index = index + 1 if index + 1 < len(markets) else 0
            r = draw()
            if r < QUOTE_SHARE:
                items = market.quote(rng, clock())
            elif r < QUOTE_SHARE + TRADE_SHARE:
                items = market.trade(rng, clock())
            else:
                items = market.depth(rng)
            for channel, data, key, delete in items:
                seq += 1
                append(UpstreamMessage(channel, data, key, f"{run_id}:{seq}", delete))
        self._next, self._seq = index, seq

    def _flush_bars(self, now: float) -> None:
        for market in self._markets:
            for channel, data, key, delete in market.flush_bars(now):
                self._seq += 1
                self._pending.append(
                    UpstreamMessage(channel, data, key, f"{self.run_id}:{self._seq}", delete)
                )

    def _next_bar_close(self) -> int | None:
        closes = [c for m in self._markets if (c := m.next_bar_close()) is not None]
        return min(closes) if closes else None



# --- settings and registration (ingest/feeds/__init__.py) ----------------------------------


def parse_symbols(setting: str, text: str) -> tuple[str, ...]:
    """Comma-separated symbols, each one that makes a valid channel name."""
    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    if not symbols:
        raise ConfigError(setting, "must name at least one symbol")
    for symbol in symbols:
        try:
            parse_channel(f"quotes.{symbol}")
        except BadChannel:
            raise ConfigError(setting, f"bad symbol {symbol!r}") from None
    return symbols


@dataclass(frozen=True, slots=True)
class SimSettings:
    """FANOUT_FEED=sim (the default feed): which market it simulates, how fast."""

    symbols: tuple[str, ...] = ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM")
    rate: float = 20.0  # simulated events per second per symbol
    seed: int = 1


SIM_SETTINGS = (
    Setting("sim.symbols", "--symbols", "FANOUT_SYMBOLS", parse_symbols,
            "comma-separated symbols of the simulated feed", file_key="symbols",
            group="ingest feed", metavar="SYMBOLS"),
    Setting("sim.rate", "--rate", "FANOUT_RATE", parse_float(0),
            "simulated events per second per symbol", file_key="rate", group="ingest feed"),
    Setting("sim.seed", "--seed", "FANOUT_SEED", parse_int(0),
            "random seed of the simulated feed", file_key="seed", group="ingest feed"),
)


def open_sim(settings: SimSettings, context: FeedContext) -> Upstream:
    context.on_state("sim", "live")  # no connection: live from the start
    return SimulatedFeed(settings.symbols, settings.rate, settings.seed)


FEED = Feed("sim", SimSettings, SIM_SETTINGS, open_sim)
