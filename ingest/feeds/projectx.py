"""The ProjectX gateway (as TopStepX runs it) as an `Upstream`: two SignalR hubs to channels.

Market hub (``/hubs/market``), per contract id: ``SubscribeContractQuotes``,
``SubscribeContractTrades``, ``SubscribeContractMarketDepth``; events arrive as
``(contractId, data)``:

- ``GatewayQuote`` -> ``quotes.<sym>``. Quotes are partial updates: each is merged into
  the latest full quote of its contract (a null field keeps the old value) and the full
  merged quote is published, fields renamed to the project's quote schema (bestBid ->
  bid, bestAsk -> ask, lastPrice -> last, changePercent -> change_pct, bidSize ->
  bid_size, askSize -> ask_size, timestamp -> ts in ms; others kept). An update that
  changes nothing is not published.
- ``GatewayTrade`` (one trade or a list) -> ``trades.<sym>`` as ``{price, size, side, ts}``
  (TradeLogType 0 = buy, 1 = sell: the aggressor), and into `BarBuilder`s for
  ``bars.1s.<sym>`` and ``bars.1m.<sym>`` (the gateway sends no bars). Bars close on a
  later trade or on time (a timer flushes them `bar_grace` seconds after their end).
- ``GatewayDepth`` (a list of entries) -> ``depth.<sym>``, keyed ``bid:<price>`` /
  ``ask:<price>``. DomType codes, from the gateway's documentation: 0 Unknown, 1 Ask,
  2 Bid, 3 BestAsk, 4 BestBid, 5 Trade, 6 Reset, 7 Low, 8 High, 9 NewBestBid,
  10 NewBestAsk, 11 Fill. Ask/BestAsk/NewBestAsk set the ask level at ``price`` to
  ``volume`` and Bid/BestBid/NewBestBid the bid level (``volume`` 0 deletes the key);
  Reset deletes every level we know of for the contract; Trade, Fill, Low, High and
  Unknown are not book levels and are skipped (trades come from GatewayTrade). The
  documentation does not say how ``volume`` ("total volume at this price level")
  differs from ``currentVolume``: ``volume`` is the level's size, as other clients read
  it, and ``currentVolume`` is passed along as ``current_volume``. No level outlives the
  connection that reported it (`reset_depth_on_reconnect`): after a (re)connect, a level
  known from before that the gateway does not report again within `depth_settle` seconds
  is deleted. "Known" includes what an earlier leader published: the worker hands the
  feed the depth snapshot when it becomes leader (`resume`).

User hub (``/hubs/user``): ``SubscribeAccounts``, and per account ``SubscribeOrders``,
``SubscribePositions``, ``SubscribeTrades``. Events carry one payload, a list of them,
or ``{action, data}`` wrappers (all seen in the wild): all are accepted.

- ``GatewayUserAccount`` -> ``account.<id>.balance`` (the payload as it is).
- ``GatewayUserOrder`` -> ``account.<id>.orders``, key = order id. A filled, cancelled,
  expired or rejected order (OrderStatus 2-5) is published as a delete carrying its final
  state, so that the snapshot holds the working orders (`delete_closed_orders`).
- ``GatewayUserPosition`` -> ``account.<id>.positions``, key = contract id; size 0 deletes.
- ``GatewayUserTrade`` -> ``account.<id>.trades``.

Events for accounts not configured are dropped.

Idempotency. A gateway re-sends its current state when a connection subscribes (the quote,
the book, positions, the balance, recent trades), so after a reconnect, or when a standby
takes over from a dead leader, much of what arrives was published already. Nothing of it
may be published twice, and nothing new may be taken for old:

- **Events with ids** carry them as ``msg_id`` (the publisher keeps one entry per id and
  channel): user trades ``t:<trade id>`` (``:voided`` added when voided); orders
  ``o:<order id>:<updateTimestamp>:<digest>`` (the update time, plus a digest of the
  payload for two changes in one timestamp); bars ``b:<start>`` (one bar per interval
  start, whoever builds it).
- **States** (quotes, depth levels, positions, balances) are published with
  ``if_changed``: the publish script skips one that leaves the channel's snapshot as it is
  (the same value for its key, the delete of a key that is not there, a merge that changes
  no field). The snapshot holds the latest version of every key, whoever published it, so
  a re-sent state is skipped in any process, and a real change (A, B, A) is always
  published. Their ``msg_id`` is ``<run_id>:<n>``, unique to this process: it makes a
  retried publish batch exact (A, B sent twice must not become A, B, A, B). Content ids
  (``q:<timestamp>:<digest>``) would be wrong for states: after A, B under one timestamp,
  a new leader seeing A, then B again would take its B for the old one and drop a real
  change. Within a session, an unchanged quote, position or balance is not even sent.
- **Market trades** have no gateway id: ``mt:<gateway timestamp>:<digest>:<k>``, where
  ``<digest>`` is the published payload's and ``k`` counts the equal trades (same
  timestamp, same digest) seen before *on this connection* (counters reset on every
  connect; kept for the latest `TRADE_STAMPS_KEPT` timestamps per contract). Every
  process computes the same ids for the same sequence, so trades re-sent after a
  (re)connect are duplicates, and two equal trades in one timestamp stay two messages.
  A trade without a gateway timestamp, or older than the counters kept, gets a
  ``<run_id>:<n>`` id: never dropped wrongly, but repeated if the gateway re-sends it.
  **Residual risk:** an equal trade that is genuinely new (same price, size, side and
  timestamp) and arrives on the new connection without the old one being re-sent first is
  taken for the old one and dropped; so is the second of two equal trades when the
  re-sent window starts between them. Both need two equal trades within one gateway
  timestamp (100 ns) straddling the reconnect.

What is not covered: the gateway's re-sent state is compared as it is, timestamps
included, so a gateway that re-stamps an unchanged level or position on subscribe gets it
published again (never wrong, only repeated). A position or an order that closed while no
leader was connected, and that the gateway does not re-send, stays in its snapshot until
its next update (the gateway's state after a subscribe is not known to be complete, so
nothing is swept there, unlike depth).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from enum import IntEnum
from typing import Any

from common.aio import wait_event
from common.backoff import Backoff
from common.channels import parse_channel, validate_key
from common.config import Setting, parse_csv, parse_ints, parse_nonempty
from common.errors import BadChannel, ConfigError
from ingest.bars import Bar, BarBuilder
from ingest.feeds import Feed, FeedContext
from ingest.feeds.signalr import HubConnection, HubState
from ingest.upstream import SnapshotReader, Upstream, UpstreamMessage

Clock = Callable[[], float]
BAR_INTERVALS = (1, 60)  # seconds: bars.1s and bars.1m


class DomType(IntEnum):
    """The gateway's depth entry types (its DomType enum)."""

    UNKNOWN = 0
    ASK = 1
    BID = 2
    BEST_ASK = 3
    BEST_BID = 4
    TRADE = 5
    RESET = 6
    LOW = 7
    HIGH = 8
    NEW_BEST_BID = 9
    NEW_BEST_ASK = 10
    FILL = 11


DOM_SIDES: dict[int, str] = {
    DomType.ASK: "ask",
    DomType.BEST_ASK: "ask",
    DomType.NEW_BEST_ASK: "ask",
    DomType.BID: "bid",
    DomType.BEST_BID: "bid",
    DomType.NEW_BEST_BID: "bid",
}
TRADE_SIDES = {0: "buy", 1: "sell"}  # TradeLogType: the aggressor
CLOSED_ORDER_STATUSES = frozenset({2, 3, 4, 5})  # Filled, Cancelled, Expired, Rejected
QUOTE_FIELDS = {
    "bestBid": "bid",
    "bestAsk": "ask",
    "bidSize": "bid_size",
    "askSize": "ask_size",
    "lastPrice": "last",
    "changePercent": "change_pct",
    "symbol": "upstream_symbol",  # the gateway's symbol id (F.US.EP), not the contract
    "symbolName": "symbol_name",
}
QUOTE_TIMES = ("timestamp", "lastUpdated")  # -> ts (ms), the first one present
TRADE_STAMPS_KEPT = 1024  # distinct trade timestamps per contract whose counters are kept
MAX_STAMP_LENGTH = 64  # a longer raw timestamp goes into a trade id as its digest


# --- helpers (pure) ------------------------------------------------------------------------


def parse_ts(value: object) -> float | None:
    """Seconds since the epoch of a gateway timestamp (ISO 8601, 'Z' or an offset)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    if parsed.tzinfo is None:  # the gateway speaks UTC
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def price_key(price: float) -> str:
    """A price as a key: shortest exact decimal, no exponent (21000.0 -> '21000')."""
    try:
        text = format(Decimal(repr(float(price))).normalize(), "f")
    except (InvalidOperation, ValueError):
        text = repr(price)
    return text


def digest(value: object) -> str:
    """A short, stable digest of a JSON value (sorted keys): the same content, the same id."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _trade_side(kind: object) -> str | None:
    return TRADE_SIDES.get(kind) if isinstance(kind, int) else None


def _dicts(data: object) -> list[dict[str, Any]]:
    """One payload or a list of them."""
    if isinstance(data, dict):
        return [data]
    if isinstance(data, list):
        return [item for item in data if isinstance(item, dict)]
    return []


def user_items(args: Sequence[object]) -> list[dict[str, Any]]:
    """A user hub event's payloads: plain, listed, spread, or wrapped as {action, data}."""
    items: list[dict[str, Any]] = []
    for arg in args:
        for item in _dicts(arg):
            inner = item.get("data")
            if "action" in item and isinstance(inner, dict):
                items.append(inner)
            else:
                items.append(item)
    return items


@dataclass
class _Market:
    """What we keep per contract."""

    contract: str
    symbol: str
    quotes: str
    trades: str
    depth: str
    bars: list[tuple[BarBuilder, str]]
    merged: dict[str, Any] = field(default_factory=dict)  # gateway fields, merged
    last_quote: dict[str, Any] | None = None
    book: dict[str, tuple[str, float]] = field(default_factory=dict)  # key -> side, price
    stale: set[str] = field(default_factory=set)  # book keys not reported since the connect
    # Market trade ids: per raw gateway timestamp, per payload digest, trades seen on this
    # connection; and the latest timestamp whose counters were pruned (seconds).
    trade_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    trade_floor: float | None = None

    def forget_trades(self) -> None:
        self.trade_counts.clear()
        self.trade_floor = None


# --- the mapping (pure, synchronous) -------------------------------------------------------


class ProjectXMapper:
    """Gateway events in, `UpstreamMessage`s out; holds the merge, book and bar state.

    Pure and synchronous (the clock is injected), so every mapping is tested exactly; the
    feed only wires it to the hubs.
    """

    def __init__(
        self,
        contracts: Sequence[str],
        accounts: Iterable[int | str] | None = None,
        *,
        logger: logging.Logger,
        symbol: Callable[[str], str] | Mapping[str, str] | None = None,
        bar_intervals: Sequence[int] = BAR_INTERVALS,
        run_id: str | None = None,
        clock: Clock = time.time,
        delete_closed_orders: bool = True,
    ) -> None:
        if len(set(contracts)) != len(contracts):
            raise ValueError(f"duplicate contracts: {contracts!r}")
        self.log = logger
        self.run_id = run_id if run_id is not None else os.urandom(8).hex()
        self.accounts = None if accounts is None else {str(a) for a in accounts}
        self.delete_closed_orders = delete_closed_orders
        self._clock = clock
        self._seq = 0
        if symbol is None:
            to_symbol: Callable[[str], str] = str
        elif callable(symbol):
            to_symbol = symbol
        else:
            mapping = dict(symbol)
            to_symbol = lambda contract: mapping.get(contract, contract)  # noqa: E731
        self.markets: dict[str, _Market] = {}
        for contract in contracts:
            sym = to_symbol(contract)
            builders = [BarBuilder(seconds, sym) for seconds in bar_intervals]
            market = _Market(
                contract,
                sym,
                f"quotes.{sym}",
                f"trades.{sym}",
                f"depth.{sym}",
                [(b, f"bars.{b.interval}.{sym}") for b in builders],
            )
            channels = (market.quotes, market.trades, market.depth, *(c for _, c in market.bars))
            for channel in channels:
                try:
                    parse_channel(channel)
                except BadChannel as exc:
                    raise ValueError(f"contract {contract!r} (symbol {sym!r}): {exc}") from None
            self.markets[contract] = market
        self._account_channels: dict[tuple[str, str], str | None] = {}
        self._last_account: dict[str, dict[str, Any]] = {}
        self._last_position: dict[tuple[str, str], dict[str, Any]] = {}
        self._unknown_contracts: set[str] = set()
        self.skipped_depth = 0  # depth entries that are not book levels (Trade, Fill, ...)
        self.malformed = 0  # payloads missing what their mapping needs

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self.run_id}:{self._seq}"

    def _market(self, contract: object) -> _Market | None:
        market = self.markets.get(contract) if isinstance(contract, str) else None
        if market is None and str(contract) not in self._unknown_contracts:
            self._unknown_contracts.add(str(contract))
            self.log.warning("projectx event for an unsubscribed contract contract=%s", contract)
        return market

    def _bad(self, what: str, payload: object) -> None:
        self.malformed += 1
        self.log.warning("projectx malformed event kind=%s payload=%.200r", what, payload)

    # -- market hub

    def quote(self, contract: object, data: object) -> list[UpstreamMessage]:
        """Merge a partial quote; the full quote, if anything changed."""
        market = self._market(contract)
        if market is None:
            return []
        partials = _dicts(data)
        if not partials:
            self._bad("quote", data)
            return []
        for partial in partials:
            market.merged.update((k, v) for k, v in partial.items() if v is not None)
        full: dict[str, Any] = {"symbol": market.symbol, "contract": market.contract}
        for name, value in market.merged.items():
            if name not in QUOTE_TIMES:
                full[QUOTE_FIELDS.get(name, name)] = value
        ts_raw = next((market.merged[t] for t in QUOTE_TIMES if t in market.merged), None)
        ts = parse_ts(ts_raw)
        if ts is not None:
            full["ts"] = round(ts * 1000)
        if full == market.last_quote:
            return []
        market.last_quote = full
        return [UpstreamMessage(market.quotes, full, msg_id=self._next_id(), if_changed=True)]

    def trades(self, contract: object, data: object) -> list[UpstreamMessage]:
        """Trades, each preceded by the bars it closed."""
        market = self._market(contract)
        if market is None:
            return []
        out: list[UpstreamMessage] = []
        for trade in data if isinstance(data, list) else [data]:
            price = _number(trade.get("price")) if isinstance(trade, dict) else None
            size = _number(trade.get("volume")) if isinstance(trade, dict) else None
            if not isinstance(trade, dict) or price is None or size is None or size < 0:
                self._bad("trade", trade)
                continue
            ts = parse_ts(trade.get("timestamp"))
            at = ts if ts is not None else self._clock()
            for builder, channel in market.bars:
                out.extend(self._bar(channel, bar) for bar in builder.add(at, price, int(size)))
            payload = {
                "symbol": market.symbol,
                "contract": market.contract,
                "price": price,
                "size": int(size),
                "side": _trade_side(trade.get("type")),
                "ts": round(at * 1000),
            }
            msg_id = self._trade_id(market, trade.get("timestamp"), ts, payload)
            out.append(UpstreamMessage(market.trades, payload, msg_id=msg_id))
        return out

    def _trade_id(
        self, market: _Market, stamp: object, ts: float | None, payload: dict[str, Any]
    ) -> str:
        """``mt:<gateway timestamp>:<digest>:<k>``, the same in every process that sees the
        same trades on its connection: k counts the equal trades (same timestamp and
        digest) seen before on this connection, so two equal trades stay two messages and a
        re-sent one is known. A version of ours without a timestamp, or for a trade older
        than the counters kept (pruned: its k is unknown, and a wrong k could drop it)."""
        if ts is None or not isinstance(stamp, str):
            return self._next_id()
        counts = market.trade_counts.get(stamp)
        if counts is None:
            if market.trade_floor is not None and ts <= market.trade_floor:
                return self._next_id()
            counts = market.trade_counts[stamp] = {}
            if len(market.trade_counts) > TRADE_STAMPS_KEPT:
                oldest = next(iter(market.trade_counts))  # trades come in time order, mostly
                del market.trade_counts[oldest]
                pruned = parse_ts(oldest)
                assert pruned is not None  # only parsed timestamps are kept
                floor = market.trade_floor
                market.trade_floor = pruned if floor is None else max(floor, pruned)
        content = digest(payload)
        seen = counts.get(content, 0)
        counts[content] = seen + 1
        if len(stamp) > MAX_STAMP_LENGTH:
            stamp = digest(stamp)
        return f"mt:{stamp}:{content}:{seen}"

    def depth(self, contract: object, data: object) -> list[UpstreamMessage]:
        """Depth entries as keyed level updates; Reset deletes the contract's levels."""
        market = self._market(contract)
        if market is None:
            return []
        out: list[UpstreamMessage] = []
        for entry in data if isinstance(data, list) else [data]:
            kind = entry.get("type") if isinstance(entry, dict) else None
            if kind == DomType.RESET:
                out.extend(self._clear_book(market))
                continue
            side = DOM_SIDES.get(kind) if isinstance(kind, int) else None
            if side is None:
                if isinstance(kind, int):
                    self.skipped_depth += 1
                else:
                    self._bad("depth", entry)
                continue
            assert isinstance(entry, dict)
            price = _number(entry.get("price"))
            volume = _number(entry.get("volume"))
            if price is None or volume is None:
                self._bad("depth", entry)
                continue
            size = max(int(volume), 0)
            key = f"{side}:{price_key(price)}"
            payload: dict[str, Any] = {"side": side, "price": price, "size": size}
            if "currentVolume" in entry:
                payload["current_volume"] = entry["currentVolume"]
            ts = parse_ts(entry.get("timestamp"))
            if ts is not None:
                payload["ts"] = round(ts * 1000)
            if size:
                market.book[key] = (side, price)
            else:
                market.book.pop(key, None)
            market.stale.discard(key)
            out.append(UpstreamMessage(
                market.depth, payload, key, self._next_id(), delete=not size, if_changed=True
            ))
        return out

    def reset_depth(self) -> list[UpstreamMessage]:
        """Deletes for every known level of every contract (before resubscribing)."""
        out: list[UpstreamMessage] = []
        for market in self.markets.values():
            out.extend(self._clear_book(market))
        return out

    def mark_depth_stale(self) -> None:
        """A (re)connect: every known level is stale until the gateway reports it again."""
        for market in self.markets.values():
            market.stale = set(market.book)

    def sweep_depth(self) -> list[UpstreamMessage]:
        """Deletes for the levels still stale: the gateway's book no longer has them."""
        out: list[UpstreamMessage] = []
        for market in self.markets.values():
            gone = {key: market.book.pop(key) for key in sorted(market.stale & set(market.book))}
            out.extend(self._level_deletes(market, gone))
            market.stale.clear()
        return out

    def seed_depth(self, contract: str, snapshot: Mapping[str, Any]) -> int:
        """Take `snapshot` (the depth channel's, from Redis: key -> level) as the book of
        `contract`: a new leader then deletes the levels the old one left behind once the
        gateway no longer reports them. Levels it cannot read are left out. How many."""
        market = self.markets[contract]
        book: dict[str, tuple[str, float]] = {}
        for key, level in snapshot.items():
            side, _, price_text = key.partition(":")
            price = _number(level.get("price")) if isinstance(level, dict) else None
            if price is None:
                try:
                    price = float(price_text)
                except ValueError:
                    continue
            if side in ("bid", "ask") and math.isfinite(price):
                book[key] = (side, price)
        market.book = book
        market.stale.clear()
        return len(book)

    def _clear_book(self, market: _Market) -> list[UpstreamMessage]:
        out = self._level_deletes(market, market.book)
        market.book = {}
        market.stale.clear()
        return out

    def _level_deletes(
        self, market: _Market, levels: Mapping[str, tuple[str, float]]
    ) -> list[UpstreamMessage]:
        return [
            UpstreamMessage(
                market.depth,
                {"side": side, "price": price, "size": 0},
                key,
                self._next_id(),
                delete=True,
                if_changed=True,
            )
            for key, (side, price) in sorted(levels.items())
        ]

    def market_connected(self) -> None:
        """A new market hub connection: trade ids count equal trades per connection."""
        for market in self.markets.values():
            market.forget_trades()

    def new_session(self) -> None:
        """A new upstream session (a leadership term): forget what this process published
        before. Another process may have published since, so only the snapshot (the
        publish script's `if_changed`) says what is news now. The book stays: `resume` or
        the sweep after the connect takes care of it."""
        self._last_account.clear()
        self._last_position.clear()
        for market in self.markets.values():
            market.merged.clear()
            market.last_quote = None
            market.forget_trades()
            market.stale.clear()

    def flush_bars(self, now: float) -> list[UpstreamMessage]:
        """Bars whose interval ended by `now` (seconds since the epoch)."""
        return [
            self._bar(channel, bar)
            for market in self.markets.values()
            for builder, channel in market.bars
            for bar in builder.flush(now)
        ]

    def next_bar_close(self) -> int | None:
        """When the first open bar ends; None if no bar is open."""
        closes = [
            c
            for market in self.markets.values()
            for builder, _ in market.bars
            if (c := builder.closes_at) is not None
        ]
        return min(closes) if closes else None

    def _bar(self, channel: str, bar: Bar) -> UpstreamMessage:
        data = bar.to_dict()
        return UpstreamMessage(channel, data, msg_id=f"b:{bar.start}")

    # -- user hub

    def _account_channel(self, account: object, kind: str) -> str | None:
        """The channel of an account's `kind`; None (dropped) if not ours or not valid."""
        if isinstance(account, bool) or not isinstance(account, int | str):
            return None
        name = str(account)
        if self.accounts is not None and name not in self.accounts:
            return None
        cache_key = (name, kind)
        if cache_key not in self._account_channels:
            channel: str | None = f"account.{name}.{kind}"
            try:
                parse_channel(channel)
            except BadChannel as exc:
                self.log.warning("projectx account without a channel account=%r error=%s",
                                 name, exc)
                channel = None
            self._account_channels[cache_key] = channel
        return self._account_channels[cache_key]

    def account(self, *args: object) -> list[UpstreamMessage]:
        out = []
        for item in user_items(args):
            channel = self._account_channel(item.get("id"), "balance")
            if channel is None:
                continue
            name = str(item["id"])
            if self._last_account.get(name) == item:
                continue
            self._last_account[name] = item
            out.append(UpstreamMessage(channel, item, msg_id=self._next_id(), if_changed=True))
        return out

    def order(self, *args: object) -> list[UpstreamMessage]:
        out = []
        for item in user_items(args):
            order_id = item.get("id")
            channel = self._account_channel(item.get("accountId"), "orders")
            if channel is None:
                continue
            if isinstance(order_id, bool) or not isinstance(order_id, int | str):
                self._bad("order", item)
                continue
            updated = item.get("updateTimestamp")
            msg_id = (
                f"o:{order_id}:{updated}:{digest(item)}" if isinstance(updated, str) and updated
                else self._next_id()
            )
            closed = self.delete_closed_orders and item.get("status") in CLOSED_ORDER_STATUSES
            out.append(UpstreamMessage(channel, item, str(order_id), msg_id, delete=closed))
        return out

    def position(self, *args: object) -> list[UpstreamMessage]:
        out = []
        for item in user_items(args):
            channel = self._account_channel(item.get("accountId"), "positions")
            if channel is None:
                continue
            contract, size = item.get("contractId"), _number(item.get("size"))
            if not isinstance(contract, str) or size is None:
                self._bad("position", item)
                continue
            try:
                key = validate_key(contract)
            except ValueError:
                self._bad("position", item)
                continue
            last_key = (channel, key)
            if self._last_position.get(last_key) == item:
                continue
            self._last_position[last_key] = item
            out.append(UpstreamMessage(
                channel, item, key, self._next_id(), delete=size == 0, if_changed=True
            ))
        return out

    def user_trade(self, *args: object) -> list[UpstreamMessage]:
        out = []
        for item in user_items(args):
            channel = self._account_channel(item.get("accountId"), "trades")
            if channel is None:
                continue
            trade_id = item.get("id")
            if isinstance(trade_id, bool) or not isinstance(trade_id, int | str):
                msg_id = self._next_id()
            else:
                msg_id = f"t:{trade_id}" + (":voided" if item.get("voided") else "")
            out.append(UpstreamMessage(channel, item, msg_id=msg_id))
        return out


# --- the feed ------------------------------------------------------------------------------


class ProjectXFeed:
    """An `Upstream` of a ProjectX gateway: the market hub for `contracts`, the user hub for
    `accounts` (each hub only if it has something to subscribe).

    `base_url` is the realtime host (``https://rtc.topstepx.com``); `token` the JWT, or a
    function returning the current one (called at every connect, so a refreshed token is
    used after the next reconnect). `symbols` maps contract ids to channel symbols
    (default: the contract id itself, ``CON.F.US.MNQ.Z25``, valid in the grammar).
    `on_state(hub, state)` reports each hub's state for a metric; `states` holds them.
    One consumer of `messages` at a time.

    With `reset_depth_on_reconnect`, the levels known at a (re)connect (the previous
    connection's, or those `resume` read from the depth snapshot) that the gateway has not
    reported again `depth_settle` seconds after the market hub is live are deleted; 0
    deletes them all before resubscribing instead (the book then flashes empty and every
    level is published again).
    """

    name = "projectx"

    def __init__(
        self,
        base_url: str,
        token: str | Callable[[], str],
        contracts: Sequence[str],
        accounts: Sequence[int] = (),
        *,
        logger: logging.Logger,
        symbols: Callable[[str], str] | Mapping[str, str] | None = None,
        market_hub: str = "/hubs/market",
        user_hub: str = "/hubs/user",
        skip_negotiation: bool = True,
        backoff: Callable[[], Backoff] = Backoff,
        ping_interval: float = 15.0,
        server_timeout: float = 30.0,
        bar_intervals: Sequence[int] = BAR_INTERVALS,
        bar_grace: float = 0.25,
        reset_depth_on_reconnect: bool = True,
        depth_settle: float = 1.0,
        delete_closed_orders: bool = True,
        queue_size: int = 10_000,
        clock: Clock = time.time,
        run_id: str | None = None,
        on_state: Callable[[str, HubState], None] | None = None,
        reconnect_when_refused: bool = True,
    ) -> None:
        if not contracts and not accounts:
            raise ValueError("the ProjectX feed needs contracts, accounts or both")
        self.log = logger
        self.bar_grace = bar_grace
        self.reset_depth_on_reconnect = reset_depth_on_reconnect
        self.depth_settle = depth_settle
        self.mapper = ProjectXMapper(
            contracts,
            accounts,
            logger=logger,
            symbol=symbols,
            bar_intervals=bar_intervals,
            run_id=run_id,
            clock=clock,
            delete_closed_orders=delete_closed_orders,
        )
        self._clock = clock
        self._on_state = on_state
        self._queue: asyncio.Queue[UpstreamMessage] = asyncio.Queue(queue_size)
        self._bar_opened = asyncio.Event()
        self._sweep_at: float | None = None  # loop time of the next depth sweep
        self._sweep_changed = asyncio.Event()
        self._running = False
        self.states: dict[str, HubState] = {}
        self.hubs: dict[str, HubConnection] = {}
        base = base_url.rstrip("/")

        def hub(name: str, path: str) -> HubConnection:
            self.states[name] = HubState.STOPPED
            connection = HubConnection(
                base + path,
                logger=logger,
                access_token=token,
                skip_negotiation=skip_negotiation,
                backoff=backoff(),
                ping_interval=ping_interval,
                server_timeout=server_timeout,
                reconnect_when_refused=reconnect_when_refused,
                on_state=lambda state: self._state_changed(name, state),
                name=name,
            )
            self.hubs[name] = connection
            return connection

        if contracts:
            market = hub("market", market_hub)
            market.on("GatewayQuote", self._on_quote)
            market.on("GatewayTrade", self._on_trade)
            market.on("GatewayDepth", self._on_depth)
            market.on_open(self._market_opened)
            for contract in contracts:
                market.subscribe("SubscribeContractQuotes", contract)
                market.subscribe("SubscribeContractTrades", contract)
                market.subscribe("SubscribeContractMarketDepth", contract)
        if accounts:
            user = hub("user", user_hub)
            user.on("GatewayUserAccount", self._on_account)
            user.on("GatewayUserOrder", self._on_order)
            user.on("GatewayUserPosition", self._on_position)
            user.on("GatewayUserTrade", self._on_user_trade)
            user.subscribe("SubscribeAccounts")
            for account in accounts:
                user.subscribe("SubscribeOrders", account)
                user.subscribe("SubscribePositions", account)
                user.subscribe("SubscribeTrades", account)

    @property
    def state(self) -> HubState:
        """The worst of the hubs' states: live only when every hub is."""
        order = (HubState.STOPPED, HubState.BACKING_OFF, HubState.CONNECTING, HubState.LIVE)
        return min(self.states.values(), key=order.index)

    async def resume(self, snapshot: SnapshotReader) -> None:
        """Take the depth snapshots as the books (the worker calls this when it becomes
        leader): levels an earlier leader published are then ours to delete when the
        gateway no longer reports them (see `depth_settle`)."""
        for contract, market in self.mapper.markets.items():
            levels = self.mapper.seed_depth(contract, await snapshot(market.depth))
            self.log.info("projectx depth resumed channel=%s levels=%d", market.depth, levels)

    async def messages(self) -> AsyncIterator[UpstreamMessage]:
        """Gateway messages in arrival order, forever; raises if a hub gives up."""
        if self._running:
            raise RuntimeError("ProjectXFeed.messages has one consumer at a time")
        self._running = True
        self.mapper.new_session()
        self._sweep_at = None
        loop = asyncio.get_running_loop()
        failed: asyncio.Future[None] = loop.create_future()
        closing = False

        def ended(task: asyncio.Task[None]) -> None:
            if closing or task.cancelled() or failed.done():
                return
            exc = task.exception() or RuntimeError(f"{task.get_name()} ended")
            failed.set_exception(exc)

        tasks = [
            asyncio.create_task(hub.run(), name=f"projectx-{name}")
            for name, hub in self.hubs.items()
        ]
        tasks.append(asyncio.create_task(self._bar_timer(), name="projectx-bars"))
        tasks.append(asyncio.create_task(self._depth_sweeper(), name="projectx-depth"))
        for task in tasks:
            task.add_done_callback(ended)
        try:
            while True:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    getter = asyncio.create_task(self._queue.get())
                    waiters: set[asyncio.Future[Any]] = {getter, failed}
                    try:
                        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        if not getter.done():
                            getter.cancel()
                    if getter.cancelled() or not getter.done():
                        failed.result()  # raises the hub's error
                        continue
                    item = getter.result()
                yield item
        finally:
            closing = True
            for hub in self.hubs.values():
                await hub.stop()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if failed.done() and not failed.cancelled():
                failed.exception()
            self._running = False

    # -- internals

    def _state_changed(self, hub: str, state: HubState) -> None:
        self.states[hub] = state
        if hub == "market" and self.reset_depth_on_reconnect and self.depth_settle > 0:
            # Live: the subscriptions are done, the gateway's book is on its way. Not live
            # (lost before the sweep): the next connect marks the levels again.
            live = state is HubState.LIVE
            loop = asyncio.get_running_loop()
            self._sweep_at = loop.time() + self.depth_settle if live else None
            self._sweep_changed.set()
        if self._on_state is not None:
            self._on_state(hub, state)

    async def _put(self, messages: list[UpstreamMessage]) -> None:
        for message in messages:
            await self._queue.put(message)

    async def _market_opened(self) -> None:
        self.mapper.market_connected()
        if not self.reset_depth_on_reconnect:
            return
        if self.depth_settle > 0:
            self.mapper.mark_depth_stale()
        else:
            await self._put(self.mapper.reset_depth())

    async def _on_quote(self, *args: object) -> None:
        if len(args) < 2:
            self.log.warning("projectx GatewayQuote with %d arguments", len(args))
            return
        await self._put(self.mapper.quote(args[0], args[1]))

    async def _on_trade(self, *args: object) -> None:
        if len(args) < 2:
            self.log.warning("projectx GatewayTrade with %d arguments", len(args))
            return
        await self._put(self.mapper.trades(args[0], args[1]))
        self._bar_opened.set()

    async def _on_depth(self, *args: object) -> None:
        if len(args) < 2:
            self.log.warning("projectx GatewayDepth with %d arguments", len(args))
            return
        await self._put(self.mapper.depth(args[0], args[1]))

    async def _on_account(self, *args: object) -> None:
        await self._put(self.mapper.account(*args))

    async def _on_order(self, *args: object) -> None:
        await self._put(self.mapper.order(*args))

    async def _on_position(self, *args: object) -> None:
        await self._put(self.mapper.position(*args))

    async def _on_user_trade(self, *args: object) -> None:
        await self._put(self.mapper.user_trade(*args))

    async def _depth_sweeper(self) -> None:
        """Delete the levels still stale `depth_settle` s after the market hub went live."""
        loop = asyncio.get_running_loop()
        while True:
            self._sweep_changed.clear()
            due = self._sweep_at
            if due is None:
                await self._sweep_changed.wait()
                continue
            delay = due - loop.time()
            if delay > 0:
                # Not wait_for: on 3.11 it loses a cancel that comes as the event is set
                # (the hub stopping sets it), and this task would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._sweep_changed.wait()
                continue
            self._sweep_at = None
            await self._put(self.mapper.sweep_depth())

    async def _bar_timer(self) -> None:
        """Close bars on time when trading is quiet: `bar_grace` s after their end."""
        while True:
            close = self.mapper.next_bar_close()
            if close is None:
                await self._bar_opened.wait()
                self._bar_opened.clear()
                continue
            now = self._clock()
            delay = close + self.bar_grace - now
            if delay > 0:
                self._bar_opened.clear()
                await wait_event(self._bar_opened, delay)
                continue  # a new bar may close sooner; or it is time
            await self._put(self.mapper.flush_bars(now))


# --- settings and registration (ingest/feeds/__init__.py) ----------------------------------

_GROUP = "feed projectx"


@dataclass(frozen=True, slots=True)
class ProjectXSettings:
    """FANOUT_FEED=projectx: the ProjectX gateway's SignalR hubs."""

    url: str = "https://rtc.topstepx.com"
    token: str = field(default="", repr=False)
    contracts: tuple[str, ...] = ()
    accounts: tuple[int, ...] = ()


PROJECTX_SETTINGS = (
    Setting("projectx.url", "--projectx-url", "FANOUT_PROJECTX_URL", parse_nonempty,
            "feed projectx: the gateway's base URL", file_key="projectx_url", group=_GROUP),
    Setting("projectx.token", "--projectx-token", "FANOUT_PROJECTX_TOKEN", parse_nonempty,
            "feed projectx: the JWT", secret=True, file_key="projectx_token", group=_GROUP),
    Setting("projectx.contracts", "--projectx-contracts", "FANOUT_PROJECTX_CONTRACTS",
            parse_csv, "feed projectx: comma-separated contract ids", metavar="IDS",
            default="none", file_key="projectx_contracts", group=_GROUP),
    Setting("projectx.accounts", "--projectx-accounts", "FANOUT_PROJECTX_ACCOUNTS",
            parse_ints, "feed projectx: comma-separated account ids for the user hub",
            metavar="IDS", default="none", file_key="projectx_accounts", group=_GROUP),
)


def check_projectx(settings: ProjectXSettings) -> None:
    if not settings.token:
        raise ConfigError("FANOUT_PROJECTX_TOKEN", "is required with FANOUT_FEED=projectx")
    if not settings.contracts and not settings.accounts:
        raise ConfigError(
            "FANOUT_PROJECTX_CONTRACTS", "name contracts and/or FANOUT_PROJECTX_ACCOUNTS"
        )


def open_projectx(settings: ProjectXSettings, context: FeedContext) -> Upstream:
    return ProjectXFeed(
        settings.url, settings.token, settings.contracts, settings.accounts,
        logger=context.logger.getChild("projectx"),
        backoff=context.backoff,
        on_state=lambda hub, state: context.on_state(hub, state.value),
    )


FEED = Feed("projectx", ProjectXSettings, PROJECTX_SETTINGS, open_projectx, check_projectx)
