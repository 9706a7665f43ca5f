"""A ProjectX gateway for tests: one contract and one account, served by `HubServer`.

As a real gateway does, it sends every client the current state the moment it subscribes
(the quote, the book, the open position, the account, the last few trade events: its
"initial snapshot"), then the updates: `run` changes the market at a steady pace and sends
each change to the connections subscribed to it. A subscribe's state and the updates are
sent under one lock, so a client never gets an update before the state it changes.

Everything the gateway holds is kept, so a test can compare what fanout published with
what the gateway said: `expected_depth`, `expected_quote`, and `trades`, every trade sent
(counted: two equal trades in one timestamp, which it sends now and then, count twice).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter, defaultdict, deque
from typing import Any

from ingest.feeds.projectx import DomType, parse_ts, price_key
from tests.support.signalr_server import Call, HubServer

BID_PRICES = [98.0 + 0.25 * i for i in range(9)]  # 98.00 .. 100.00
ASK_PRICES = [100.25 + 0.25 * i for i in range(9)]  # 100.25 .. 102.25
TradeKey = tuple[float, int, str, int]  # price, size, side, ts (ms): as published


def iso(ts: float) -> str:
    """A gateway timestamp, with the 7 fractional digits .NET writes."""
    seconds, ticks = divmod(round(ts * 10_000_000), 10_000_000)
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{ticks:07d}+00:00"


def _ms(stamp: str) -> int:
    ts = parse_ts(stamp)
    assert ts is not None
    return round(ts * 1000)


class GatewaySim:
    """The gateway's state and behaviour; `server.after_call` is taken over."""

    def __init__(
        self, server: HubServer, contract: str, account: int, *, seed: int,
        replay_trades: int = 5,
    ) -> None:
        self.server = server
        self.contract = contract
        self.account_id = account
        self.rng = random.Random(seed)
        self.lock = asyncio.Lock()
        self.subscribers: dict[str, set[int]] = defaultdict(set)  # target -> connections
        self.snapshots_sent: list[tuple[int, str]] = []  # (connection, subscribe target)
        self.paused = False
        self.steps = 0
        stamp = iso(time.time())
        self.quote: dict[str, Any] = {
            "symbol": "F.US.MNQ", "symbolName": "/MNQ", "lastPrice": 100.0, "bestBid": 100.0,
            "bestAsk": 100.25, "volume": 1000, "timestamp": stamp,
        }
        self.book: dict[tuple[int, float], dict[str, Any]] = {}
        for kind, prices in ((DomType.BID, BID_PRICES[4:]), (DomType.ASK, ASK_PRICES[:5])):
            for price in prices:
                self.book[(kind, price)] = self._level(kind, price, 10, stamp)
        # Never flat: a gateway does not re-send a closed position, so one closed while no
        # leader listened would stay in the snapshot (a documented limitation).
        self.position: dict[str, Any] = {
            "id": 456, "accountId": account, "contractId": contract,
            "creationTimestamp": stamp, "type": 1, "size": 1, "averagePrice": 100.0,
        }
        self.account: dict[str, Any] = {
            "id": account, "name": "Main", "balance": 50_000.0, "canTrade": True,
            "isVisible": True, "simulated": True,
        }
        self.recent: deque[list[dict[str, Any]]] = deque(maxlen=replay_trades)
        self.trades: Counter[TradeKey] = Counter()
        server.after_call = self._on_call

    # -- what a test compares with

    def expected_depth(self) -> dict[str, int]:
        """The depth snapshot fanout should hold: level key -> size."""
        return {
            f"{'bid' if kind == DomType.BID else 'ask'}:{price_key(price)}": level["volume"]
            for (kind, price), level in self.book.items()
        }

    def expected_quote(self) -> dict[str, Any]:
        q = self.quote
        return {"bid": q["bestBid"], "ask": q["bestAsk"], "last": q["lastPrice"],
                "volume": q["volume"], "ts": _ms(q["timestamp"])}

    # -- driving it

    async def run(self, rate: float) -> None:
        """Change the market `rate` times a second, forever (nothing while paused)."""
        while True:
            if not self.paused:
                await self.step()
            await asyncio.sleep(1 / rate)

    async def step(self) -> None:
        """One random change of the quote, the book, the trades, the position or the
        account, sent to its subscribers."""
        rng = self.rng
        async with self.lock:
            stamp = iso(time.time())
            self.steps += 1
            if rng.random() < 0.6:
                name = rng.choice(["bestBid", "bestAsk", "lastPrice", "volume"])
                value = (self.quote["volume"] + rng.randint(1, 5) if name == "volume"
                         else 100.0 + 0.25 * rng.randint(-4, 4))
                if value != self.quote[name]:
                    self.quote.update({name: value, "timestamp": stamp})
                    await self._send("SubscribeContractQuotes", "GatewayQuote", self.contract,
                                     {name: value, "timestamp": stamp})
            if rng.random() < 0.8:
                kind = rng.choice([DomType.BID, DomType.ASK])
                price = rng.choice(BID_PRICES if kind == DomType.BID else ASK_PRICES)
                volume = 0 if rng.random() < 0.25 else rng.randint(1, 20)
                level = self._level(kind, price, volume, stamp)
                if volume:
                    self.book[(kind, price)] = level
                else:
                    self.book.pop((kind, price), None)  # a delete of a level not there, too
                await self._send("SubscribeContractMarketDepth", "GatewayDepth", self.contract,
                                 [level])
            if rng.random() < 0.5:
                await self._send("SubscribeContractTrades", "GatewayTrade", self.contract,
                                 self._trade_event(stamp))
            if self.steps % 15 == 0:
                self.position = {**self.position, "size": rng.randint(1, 3),
                                 "averagePrice": 100.0 + 0.25 * rng.randint(-4, 4)}
                await self._send("SubscribePositions", "GatewayUserPosition", self.position)
            if self.steps % 15 == 7:
                self.account = {**self.account,
                                "balance": self.account["balance"] + rng.randint(-50, 50)}
                await self._send("SubscribeAccounts", "GatewayUserAccount", self.account)

    async def change_unheard(self) -> str:
        """Change the book and trade while nobody is subscribed (a failover's gap): one
        level removed, one resized, one trade. The key of the level removed."""
        async with self.lock:
            assert not self.server.live(), "somebody listens"
            stamp = iso(time.time())
            (kind, price), *rest = sorted(self.book)
            del self.book[(kind, price)]
            other = rest[len(rest) // 2]
            self.book[other] = self._level(*other, self.book[other]["volume"] + 1, stamp)
            self._trade_event(stamp)
            return f"{'bid' if kind == DomType.BID else 'ask'}:{price_key(price)}"

    # -- internals

    @staticmethod
    def _level(kind: int, price: float, volume: int, stamp: str) -> dict[str, Any]:
        return {"timestamp": stamp, "type": int(kind), "price": price, "volume": volume,
                "currentVolume": volume}

    def _trade_event(self, stamp: str) -> list[dict[str, Any]]:
        """A trade event: one trade, or now and then two equal ones in one timestamp."""
        rng = self.rng
        kind = rng.randint(0, 1)
        trade: dict[str, Any] = {"symbolId": "F.US.MNQ", "price": 100.0 + 0.25 * rng.randint(-4, 4),
                 "timestamp": stamp, "type": kind, "volume": rng.randint(1, 5)}
        event = [trade] * (2 if rng.random() < 0.2 else 1)
        self.recent.append(event)
        key = (trade["price"], trade["volume"], "buy" if kind == 0 else "sell", _ms(stamp))
        self.trades[key] += len(event)
        return event

    async def _send(self, subscription: str, target: str, *args: Any) -> None:
        for connection in sorted(self.subscribers[subscription]):
            if not await self.server.send_to(connection, target, *args):
                self.subscribers[subscription].discard(connection)

    async def _on_call(self, call: Call) -> None:
        """A subscribe: the current state to that connection, then its updates."""
        async with self.lock:
            args: list[tuple[str, tuple[Any, ...]]] = []
            if call.target == "SubscribeContractQuotes":
                args = [("GatewayQuote", (self.contract, dict(self.quote)))]
            elif call.target == "SubscribeContractMarketDepth":
                args = [("GatewayDepth", (self.contract, list(self.book.values())))]
            elif call.target == "SubscribeContractTrades":
                args = [("GatewayTrade", (self.contract, event)) for event in self.recent]
            elif call.target == "SubscribePositions":
                args = [("GatewayUserPosition", (self.position,))]
            elif call.target == "SubscribeAccounts":
                args = [("GatewayUserAccount", (self.account,))]
            for target, arguments in args:
                await self.server.send_to(call.connection, target, *arguments)
            self.snapshots_sent.append((call.connection, call.target))
            self.subscribers[call.target].add(call.connection)
