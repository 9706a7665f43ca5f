"""The ProjectX feed against the SignalR test server: subscriptions, events to channels,
reconnect and resubscribe, the book an earlier leader published, the user hub alone."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from common.backoff import Backoff
from common.channels import parse_channel
from ingest.feeds.projectx import (
    DomType,
    ProjectXFeed,
)
from ingest.feeds.signalr import HubState
from ingest.upstream import Resumable, UpstreamMessage
from tests.support.signalr_server import Call, HubServer, wait_for
from tests.unit.test_projectx import ACCOUNT, ES, LOG, MNQ, ORDER, POSITION, TRADE, iso

# --- the feed against the test server ------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[HubServer]:
    srv = HubServer(token="jwt-px", ping_interval=0.5)
    await srv.start()
    yield srv
    await srv.kill()


class Consumer:
    """Runs `feed.messages()` in a task and keeps what it yields."""

    def __init__(self, feed: ProjectXFeed) -> None:
        self.feed = feed
        self.messages: list[UpstreamMessage] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for message in self.feed.messages():
            self.messages.append(message)

    def on(self, channel: str) -> list[UpstreamMessage]:
        return [m for m in self.messages if m.channel == channel]

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def make_feed(server: HubServer, **kwargs: Any) -> ProjectXFeed:
    options: dict[str, Any] = {
        "logger": LOG,
        "backoff": lambda: Backoff(base=0.02, cap=0.1),
        "ping_interval": 1.0,
        "server_timeout": 5.0,
        "run_id": "px",
        "bar_grace": 0.05,
    }
    options.update(kwargs)
    return ProjectXFeed(server.base_url, lambda: "jwt-px", [MNQ, ES], [123], **options)


def subscriptions(server: HubServer, connection_numbers: set[int]) -> list[tuple[Any, ...]]:
    return sorted(
        (c.hub, c.target, tuple(c.arguments))
        for c in server.calls
        if c.connection in connection_numbers
    )


EXPECTED_SUBSCRIPTIONS = sorted([
    ("/hubs/market", "SubscribeContractQuotes", (MNQ,)),
    ("/hubs/market", "SubscribeContractTrades", (MNQ,)),
    ("/hubs/market", "SubscribeContractMarketDepth", (MNQ,)),
    ("/hubs/market", "SubscribeContractQuotes", (ES,)),
    ("/hubs/market", "SubscribeContractTrades", (ES,)),
    ("/hubs/market", "SubscribeContractMarketDepth", (ES,)),
    ("/hubs/user", "SubscribeAccounts", ()),
    ("/hubs/user", "SubscribeOrders", (123,)),
    ("/hubs/user", "SubscribePositions", (123,)),
    ("/hubs/user", "SubscribeTrades", (123,)),
])


@pytest.mark.integration
async def test_feed_subscribes_and_maps_gateway_events(server: HubServer) -> None:
    states: list[tuple[str, HubState]] = []
    feed = make_feed(server, on_state=lambda hub, state: states.append((hub, state)))
    consumer = Consumer(feed)
    try:
        await wait_for(lambda: feed.state is HubState.LIVE, what="both hubs live")
        assert ("market", HubState.LIVE) in states and ("user", HubState.LIVE) in states
        assert {c.query["access_token"] for c in server.live()} == {"jwt-px"}
        assert subscriptions(server, {1, 2}) == EXPECTED_SUBSCRIPTIONS

        now = time.time()
        market = "/hubs/market"
        await server.emit("GatewayQuote", MNQ, {"bestBid": 1.0, "bestAsk": 1.5,
                                                "timestamp": iso(now)}, hub=market)
        await server.emit("GatewayQuote", MNQ, {"bestAsk": 1.25}, hub=market)
        await server.emit("GatewayTrade", MNQ, [{"price": 1.25, "volume": 2, "type": 0,
                                                 "timestamp": iso(now)}], hub=market)
        await server.emit("GatewayDepth", MNQ, [
            {"type": DomType.BID, "price": 1.0, "volume": 5, "timestamp": iso(now)},
            {"type": DomType.BID, "price": 1.0, "volume": 0, "timestamp": iso(now)},
        ], hub=market)
        user = "/hubs/user"
        await server.emit("GatewayUserAccount", ACCOUNT, hub=user)
        await server.emit("GatewayUserOrder", [{"action": 0, "data": ORDER}], hub=user)
        await server.emit("GatewayUserPosition", {**POSITION, "size": 0}, hub=user)
        await server.emit("GatewayUserTrade", TRADE, hub=user)

        await wait_for(lambda: len(consumer.on(f"depth.{MNQ}")) == 2, what="depth")
        quotes = consumer.on(f"quotes.{MNQ}")
        assert [q.data["ask"] for q in quotes] == [1.5, 1.25]
        assert quotes[-1].data["bid"] == 1.0  # merged
        (trade,) = consumer.on(f"trades.{MNQ}")
        assert trade.data["price"] == 1.25 and trade.data["side"] == "buy"
        assert [(d.key, d.delete) for d in consumer.on(f"depth.{MNQ}")] == [
            ("bid:1", False), ("bid:1", True),
        ]
        await wait_for(lambda: len(consumer.on("account.123.trades")) == 1, what="user events")
        assert consumer.on("account.123.balance")[0].data == ACCOUNT
        assert consumer.on("account.123.orders")[0].key == "789"
        (position,) = consumer.on("account.123.positions")
        assert position.key == ES and position.delete
        # With no further trade, the 1 s bar closes on time.
        await wait_for(lambda: consumer.on(f"bars.1s.{MNQ}"), timeout=5, what="the 1 s bar")
        (bar,) = consumer.on(f"bars.1s.{MNQ}")
        assert bar.data["v"] == 2 and bar.data["t"] == int(now) * 1000
        for message in consumer.messages:
            parse_channel(message.channel)
    finally:
        await consumer.close()
    assert feed.state is HubState.STOPPED
    assert not server.live()  # the hubs closed their connections


@pytest.mark.integration
@pytest.mark.parametrize("settle", [1.0, 0.0])
async def test_feed_reconnects_and_resubscribes_after_a_server_restart(
    server: HubServer, settle: float
) -> None:
    resend: list[dict[str, Any]] = []

    async def gateway(call: Call) -> None:  # the book, as a gateway sends it on subscribe
        if call.target == "SubscribeContractMarketDepth" and call.arguments == [ES] and resend:
            await server.send_to(call.connection, "GatewayDepth", ES, resend)

    server.after_call = gateway
    feed = make_feed(server, depth_settle=settle)
    consumer = Consumer(feed)
    try:
        await wait_for(lambda: feed.state is HubState.LIVE, what="both hubs live")
        first = {c.number for c in server.live()}
        await server.emit("GatewayDepth", ES, [
            {"type": DomType.ASK, "price": 6000.5, "volume": 3},
            {"type": DomType.BID, "price": 6000.0, "volume": 4},
        ], hub="/hubs/market")
        await wait_for(lambda: len(consumer.on(f"depth.{ES}")) == 2, what="depth")

        await server.kill()
        await wait_for(lambda: feed.state is not HubState.LIVE, what="the loss")
        resend.append({"type": DomType.BID, "price": 6000.0, "volume": 4})  # ask 6000.5 gone
        await server.start()  # the same port
        await wait_for(lambda: feed.state is HubState.LIVE, what="both hubs live again")
        second = {c.number for c in server.live()}
        assert first.isdisjoint(second)
        assert subscriptions(server, second) == EXPECTED_SUBSCRIPTIONS
        expect = 4 if settle else 5
        await wait_for(lambda: len(consumer.on(f"depth.{ES}")) == expect, timeout=settle + 5,
                       what="the book again")
        depth = consumer.on(f"depth.{ES}")
        if settle:
            # The level the gateway reports again is sent as it is (the publish script skips
            # it: unchanged); the one it no longer has is deleted once the book settled.
            assert [(d.key, d.delete) for d in depth[2:]] == [
                ("bid:6000", False), ("ask:6000.5", True),
            ]
        else:
            # The levels of the lost connection are deleted before resubscribing.
            assert [(d.key, d.delete) for d in depth[2:]] == [
                ("ask:6000.5", True), ("bid:6000", True), ("bid:6000", False),
            ]
        assert all(d.if_changed for d in depth)
        await server.emit("GatewayUserTrade", TRADE, hub="/hubs/user")
        await wait_for(lambda: consumer.on("account.123.trades"), what="events flow again")
    finally:
        await consumer.close()


@pytest.mark.integration
async def test_feed_resumes_the_book_an_earlier_leader_published(server: HubServer) -> None:
    async def gateway(call: Call) -> None:
        if call.target == "SubscribeContractMarketDepth" and call.arguments == [MNQ]:
            await server.send_to(call.connection, "GatewayDepth", MNQ, [
                {"type": DomType.BID, "price": 1.0, "volume": 5},
            ])

    server.after_call = gateway
    feed = make_feed(server, depth_settle=0.2)
    read: list[str] = []

    async def snapshot(channel: str) -> dict[str, Any]:
        read.append(channel)
        if channel != f"depth.{MNQ}":
            return {}
        return {"bid:1": {"side": "bid", "price": 1.0, "size": 5},
                "ask:2": {"side": "ask", "price": 2.0, "size": 1}}

    assert isinstance(feed, Resumable)
    await feed.resume(snapshot)
    assert sorted(read) == sorted([f"depth.{MNQ}", f"depth.{ES}"])
    consumer = Consumer(feed)
    try:
        await wait_for(lambda: len(consumer.on(f"depth.{MNQ}")) == 2, what="the sweep")
        assert [(d.key, d.delete) for d in consumer.on(f"depth.{MNQ}")] == [
            ("bid:1", False), ("ask:2", True),
        ]
    finally:
        await consumer.close()


@pytest.mark.integration
async def test_feed_with_accounts_only_opens_only_the_user_hub(server: HubServer) -> None:
    feed = ProjectXFeed(server.base_url, "jwt-px", [], [123], logger=LOG)
    assert set(feed.hubs) == {"user"}
    consumer = Consumer(feed)
    try:
        await wait_for(lambda: feed.state is HubState.LIVE, what="the user hub live")
        assert {c.hub for c in server.live()} == {"/hubs/user"}
    finally:
        await consumer.close()
    with pytest.raises(ValueError, match="contracts, accounts or both"):
        ProjectXFeed(server.base_url, "jwt-px", [], [], logger=LOG)
