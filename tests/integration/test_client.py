"""fanout_client (clients/python): the Python client's reconnect, recovery, resync, close-code and
heartbeat behaviour, against real edges (and one silent fake server)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import websockets
from fanout_client import (
    Backoff,
    ClientState,
    ClosedBadRequest,
    Event,
    FanoutClient,
    FanoutClosed,
    Gap,
    Publication,
    Resync,
    Subscription,
)
from redis.exceptions import RedisError
from websockets.asyncio.server import ServerConnection

from common.auth import sign_token
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer, RedisServer
from tests.support.wsclient import ProtoClient, wait_until

log = logging.getLogger("test.client")


def fast_backoff() -> Backoff:
    return Backoff(base=0.05, cap=0.2)


class Collector:
    """Reads a subscription in the background; tests wait on conditions with deadlines."""

    def __init__(self, sub: Subscription) -> None:
        self.events: list[Event] = []
        self.times: list[float] = []  # time.monotonic() of each event's arrival
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._run(sub))

    async def _run(self, sub: Subscription) -> None:
        try:
            async for event in sub:
                self.events.append(event)
                self.times.append(time.monotonic())
                self.changed.set()
        except Exception as exc:
            self.error = exc
        finally:
            self.changed.set()

    def pubs(self) -> list[Publication]:
        return [e for e in self.events if isinstance(e, Publication)]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        await wait_until(self.changed, cond, timeout)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


async def test_reconnect_delays_come_from_the_backoff_and_cycle_urls() -> None:
    """Nothing listens: every attempt fails at once; the delays are the injected ones."""
    draws: list[float] = []

    def rand(lo: float, hi: float) -> float:
        draws.append(hi)
        return 0.0

    urls = ["ws://127.0.0.1:1/ws", "ws://127.0.0.1:2/ws"]
    client = FanoutClient(urls, backoff=Backoff(base=0.1, cap=0.4, rand=rand))
    task = asyncio.create_task(client.connect())
    async with asyncio.timeout(10):
        while len(draws) < 4:
            await asyncio.sleep(0.01)
    assert draws[:4] == [0.1, 0.2, 0.4, 0.4]
    assert client.state in (ClientState.RECONNECTING, ClientState.CONNECTING)
    assert client.counters.reconnects >= 4
    assert client._url_index >= 4  # both URLs tried in turn
    await client.close()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    assert client.state == ClientState.CLOSED


# --- integration ---------------------------------------------------------------------------


@pytest.mark.integration
async def test_live_messages_in_order(edge: EdgeServer, publisher: Publisher) -> None:
    async with FanoutClient(edge.url, logger=log, backoff=fast_backoff()) as client:
        assert client.state == ClientState.OPEN
        col = Collector(client.subscribe("account.A1.orders"))
        await client_subscribed(client, "account.A1.orders")
        for i in range(20):
            await publisher.publish(UpstreamMessage("account.A1.orders", {"n": i}, key=f"o{i}"))
        await col.wait_for(lambda: len(col.pubs()) == 20)
        assert [p.offset for p in col.pubs()] == list(range(1, 21))
        assert [p.data for p in col.pubs()] == [{"n": i} for i in range(20)]
        assert col.pubs()[3].key == "o3"
        assert client.positions()["account.A1.orders"].offset == 20
        await col.stop()


@pytest.mark.integration
async def test_snapshot_comes_as_first_resync(edge: EdgeServer, publisher: Publisher) -> None:
    await publisher.publish(UpstreamMessage("quotes.NQ", {"bid": 1}))
    async with FanoutClient(edge.url, binary=True, backoff=fast_backoff()) as client:
        col = Collector(client.subscribe("quotes.NQ", snapshot=True))
        await col.wait_for(lambda: len(col.events) >= 1)
        first = col.events[0]
        assert isinstance(first, Resync) and first.offset == 1
        assert first.snapshot == {"": {"bid": 1}}
        assert client.counters.resynced == 0
        await col.stop()


async def client_subscribed(client: FanoutClient, channel: str, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while channel not in client.positions() or client._subs[channel].phase != "live":
            await asyncio.sleep(0.01)


@pytest.mark.integration
async def test_reconnects_to_next_url_and_recovers_contiguously(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    first = await edge_factory()
    second = await edge_factory()
    client = FanoutClient([first.url, second.url], logger=log, backoff=fast_backoff())
    await client.connect()
    channel = "account.A7.orders"
    col = Collector(client.subscribe(channel))
    await client_subscribed(client, channel)

    published = 0
    stop = asyncio.Event()

    async def publish() -> None:
        nonlocal published
        while not stop.is_set():
            await publisher.publish(UpstreamMessage(channel, {"n": published}))
            published += 1
            await asyncio.sleep(0.002)  # pacing, not waiting for anything

    pub_task = asyncio.create_task(publish())
    await col.wait_for(lambda: len(col.pubs()) >= 20)
    await first.stop()  # the connection ends (1012), the client moves to the second edge
    await col.wait_for(lambda: client.counters.recovered >= 1, 15)
    assert client.url == second.url
    seen = len(col.pubs())
    await col.wait_for(lambda: len(col.pubs()) >= seen + 20)
    stop.set()
    await pub_task
    await col.wait_for(lambda: len(col.pubs()) == published)
    assert [p.offset for p in col.pubs()] == list(range(1, published + 1))
    assert not [e for e in col.events if not isinstance(e, Publication)]
    assert client.counters.reconnects >= 1 and client.counters.resynced == 0
    await col.stop()
    await client.close()


@pytest.mark.integration
async def test_resync_after_history_lost(
    edge: EdgeServer, publisher: Publisher, redis_server: RedisServer,
) -> None:
    channel = "quotes.ES"
    async with FanoutClient(edge.url, logger=log, backoff=fast_backoff()) as client:
        col = Collector(client.subscribe(channel, snapshot=True))
        await client_subscribed(client, channel)
        for i in range(5):
            await publisher.publish(UpstreamMessage(channel, {"bid": i}))
        await col.wait_for(lambda: len(col.pubs()) == 5)
        old_epoch = client.positions()[channel].epoch

        await redis_server.wipe()
        async with asyncio.timeout(15):
            while True:
                try:
                    result = await publisher.publish(UpstreamMessage(channel, {"bid": 100}))
                    break
                except (RedisError, OSError):
                    await asyncio.sleep(0.05)
        assert result.epoch != old_epoch

        def resynced() -> bool:
            return any(isinstance(e, Resync) and e.epoch == result.epoch for e in col.events)

        await col.wait_for(resynced, 15)
        assert client.counters.resynced >= 1
        await publisher.publish(UpstreamMessage(channel, {"bid": 101}))
        await col.wait_for(
            lambda: (client.positions()[channel].offset,
                     client.positions()[channel].epoch) == (2, result.epoch))
        assert col.pubs()[-1].data == {"bid": 101}
        await col.stop()


@pytest.mark.integration
async def test_bad_frame_close_stops_the_client(edge: EdgeServer) -> None:
    client = FanoutClient(edge.url, logger=log, backoff=fast_backoff())
    await client.connect()
    col = Collector(client.subscribe("quotes.MNQ"))
    await client_subscribed(client, "quotes.MNQ")
    assert client._ws is not None
    await client._ws.send("{not json")  # the edge closes with 3500
    await col.wait_for(lambda: col.task.done())
    assert isinstance(col.error, ClosedBadRequest) and col.error.code == 3500
    assert client.state == ClientState.CLOSED
    assert client.counters.reconnects == 0
    await client.close()


@pytest.mark.integration
async def test_bad_connect_raises_from_connect(edge: EdgeServer) -> None:
    client = FanoutClient(edge.url, token=123, backoff=fast_backoff())  # type: ignore[arg-type]
    with pytest.raises(FanoutClosed) as info:
        async with asyncio.timeout(10):
            await client.connect()
    assert type(info.value) is ClosedBadRequest and info.value.code == 3500
    assert client.state == ClientState.CLOSED
    await client.close()


@pytest.mark.integration
async def test_a_refusal_before_the_upgrade_is_retried_after_its_retry_after(
    edge_factory: EdgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A full edge answers 503 with Retry-After (5-10 s): the client waits at least that
    long before its next attempt, however short its own backoff."""
    edge = await edge_factory(max_connections=1)
    holder = await ProtoClient.open(edge.url)
    client = FanoutClient(edge.url, logger=log, backoff=fast_backoff(), rand=lambda lo, hi: lo)
    task = asyncio.create_task(client.connect())
    with caplog.at_level(logging.INFO, "test.client"):
        async with asyncio.timeout(10):
            while not any("reconnect_wait" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)
    refused = next(r.getMessage() for r in caplog.records if "connect_refused" in r.getMessage())
    wait = next(r.getMessage() for r in caplog.records if "reconnect_wait" in r.getMessage())
    after = float(refused.rsplit("retry_after=", 1)[1])
    assert "status=503" in refused and 5 <= after <= 10
    assert float(wait.split("delay=")[1].split()[0]) == after  # rand gave the least: exactly it
    assert edge.edge.stats.refused["total_limit"] == 1
    await client.close()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    await holder.close()


async def test_silent_server_is_detected_and_client_reconnects() -> None:
    """A server that says connected (ping_interval 0.5, pong_timeout 0.3) and then never
    pings: the client gives up on it after 0.5 + 0.3 + 1 s and connects again."""
    connections = 0
    more = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        msg = json.loads(await ws.recv())
        assert msg["type"] == "connect"
        connections += 1
        more.set()
        await ws.send(json.dumps({"type": "connected", "id": msg["id"], "client": "x-1",
                                  "version": 1, "ping_interval": 0.5, "pong_timeout": 0.3}))
        with contextlib.suppress(websockets.ConnectionClosed):
            await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        client = FanoutClient(f"ws://127.0.0.1:{port}/ws", logger=log, backoff=fast_backoff())
        await client.connect()
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with asyncio.timeout(10):
            while connections < 2:
                more.clear()
                await more.wait()
        elapsed = loop.time() - started
        assert elapsed >= 1.5  # not before the heartbeat window
        assert client.counters.reconnects >= 1
        await client.close()


async def test_pings_are_answered_and_gaps_applied() -> None:
    """A scripted server: a drop-delivery subscription, a gap notice in a coalesced frame,
    and a ping that must be answered."""
    got_pong = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        msg = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "connected", "id": msg["id"], "client": "x-1",
                                  "version": 1, "ping_interval": 25, "pong_timeout": 10}))
        sub: dict[str, Any] = json.loads(await ws.recv())
        await ws.send(json.dumps([
            {"type": "subscribed", "id": sub["id"], "channel": "trades.X", "epoch": "e1",
             "offset": 3, "recovered": False, "delivery": "drop"},
            {"type": "pub", "channel": "trades.X", "offset": 4, "data": 1},
            {"type": "pub", "channel": "trades.X", "offset": 4, "data": 1},  # duplicate
            {"type": "gap", "channel": "trades.X", "from": 5, "to": 7},
            {"type": "pub", "channel": "trades.X", "offset": 8, "data": 2},
            {"type": "ping"},
        ]))
        async for raw in ws:
            if json.loads(raw).get("type") == "pong":
                got_pong.set()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with FanoutClient(f"ws://127.0.0.1:{port}/ws", backoff=fast_backoff()) as client:
            col = Collector(client.subscribe("trades.X"))
            await col.wait_for(lambda: len(col.events) == 3)
            assert col.events == [
                Publication("trades.X", 4, 1), Gap("trades.X", 5, 7),
                Publication("trades.X", 8, 2),
            ]
            async with asyncio.timeout(5):
                await got_pong.wait()
            assert client.counters.gaps == 1 and client.counters.duplicates == 1
            await col.stop()


async def test_a_recovery_reply_and_its_replay_in_one_frame_are_applied_in_order() -> None:
    """The edge packs a recovering subscribe's reply and replay into frames (the reply
    first, sharing the first frame): the client keeps its position and applies every
    replayed publication, across frames, exactly once."""
    connections: list[dict[str, Any]] = []

    async def handler(ws: ServerConnection) -> None:
        msg = json.loads(await ws.recv())
        await ws.send(json.dumps({"type": "connected", "id": msg["id"], "client": "x-1",
                                  "version": 1, "ping_interval": 25, "pong_timeout": 10}))
        sub: dict[str, Any] = json.loads(await ws.recv())
        connections.append(sub)
        pub = [{"type": "pub", "channel": "account.A.orders", "offset": o, "data": o}
               for o in range(9)]
        if len(connections) == 1:
            await ws.send(json.dumps([
                {"type": "subscribed", "id": sub["id"], "channel": "account.A.orders",
                 "epoch": "e1", "offset": 2, "recovered": False, "delivery": "all"},
                pub[3],
            ]))
            await ws.close(1012)
            return
        await ws.send(json.dumps([
            {"type": "subscribed", "id": sub["id"], "channel": "account.A.orders",
             "epoch": "e1", "offset": 6, "recovered": True, "delivery": "all"},
            pub[4], pub[5],
        ]))
        await ws.send(json.dumps([pub[6], pub[7]]))
        await ws.send(json.dumps(pub[8]))
        await ws.wait_closed()

    async with websockets.serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with FanoutClient(f"ws://127.0.0.1:{port}/ws", backoff=fast_backoff()) as client:
            col = Collector(client.subscribe("account.A.orders"))
            await col.wait_for(lambda: len(col.pubs()) == 6)
            assert [p.offset for p in col.pubs()] == [3, 4, 5, 6, 7, 8]
            assert connections[1]["recover"] == {"offset": 3, "epoch": "e1"}
            assert client.counters.recovered == 1 and client.counters.duplicates == 0
            await col.stop()


@pytest.mark.integration
async def test_not_recovered_after_history_lost_while_away(
    edge: EdgeServer, publisher: Publisher, redis_server: RedisServer
) -> None:
    """Positions survive close(); a recover into a lost epoch answers with a Resync."""
    channel = "quotes.YM"
    client = FanoutClient(edge.url, logger=log, backoff=fast_backoff())
    await client.connect()
    col = Collector(client.subscribe(channel))
    await client_subscribed(client, channel)
    for i in range(3):
        await publisher.publish(UpstreamMessage(channel, {"bid": i}))
    await col.wait_for(lambda: len(col.pubs()) == 3)
    await client.close()
    await col.wait_for(lambda: col.task.done())
    assert col.error is None  # close() ends iterators normally

    await redis_server.wipe()
    async with asyncio.timeout(15):
        while True:
            try:
                result = await publisher.publish(UpstreamMessage(channel, {"bid": 7}))
                break
            except (RedisError, OSError):
                await asyncio.sleep(0.05)

    await client.connect()
    col2 = Collector(client.subscribe(channel))
    # The edge may answer "unavailable" while its pub/sub link comes back: the client
    # retries after 1-5 s.
    await col2.wait_for(lambda: len(col2.events) >= 1, 20)
    assert col2.events[0] == Resync(channel, result.epoch, 1, {"": {"bid": 7}})
    assert client.counters.resynced == 1 and client.counters.recovered == 0
    await col2.stop()
    await client.close()


@pytest.mark.integration
async def test_token_function_refreshes_the_token_before_it_expires(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    """The first token has about a second left (its exp is within the edge's 30 s leeway):
    the client asks the function for a new one half way and sends `refresh`; the
    connection outlives the first token, with no reconnect."""
    secret = "k" * 32
    edge = await edge_factory(auth_secret=secret)
    issued: list[float] = []

    async def token() -> str:
        exp = time.time() + (60 if issued else -29)
        issued.append(exp)
        return sign_token({"sub": "t", "exp": exp, "accounts": ["A9"]}, secret.encode())

    async with FanoutClient(edge.url, token=token, logger=log, backoff=fast_backoff()) as client:
        col = Collector(client.subscribe("account.A9.orders"))
        await client_subscribed(client, "account.A9.orders")
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # past the first token's end
            await publisher.publish(UpstreamMessage("account.A9.orders", {"n": sent}, "o"))
            sent += 1
            await asyncio.sleep(0.05)
        await col.wait_for(lambda: len(col.pubs()) == sent)
        assert [p.offset for p in col.pubs()] == list(range(1, sent + 1))
        assert len(issued) == 2 and client.counters.reconnects == 0
        assert client.state == ClientState.OPEN
        await col.stop()


@pytest.mark.integration
async def test_without_a_fresh_token_the_client_reconnects_after_3006(
    edge_factory: EdgeFactory, publisher: Publisher, caplog: pytest.LogCaptureFixture
) -> None:
    """The token function fails for 1.5 s after its first call: the refreshes fail, the
    edge closes with 3006 at the first token's end, connect attempts fail until the
    function works again; then the client connects and recovers without a gap."""
    secret = "k" * 32
    edge = await edge_factory(auth_secret=secret)
    calls: list[float] = []

    def token() -> str:
        now = time.time()
        calls.append(now)
        if len(calls) > 1 and now - calls[0] < 1.5:
            raise RuntimeError("auth service down")
        exp = now + (60 if len(calls) > 1 else -29)
        return sign_token({"sub": "t", "exp": exp, "accounts": ["A9"]}, secret.encode())

    async with FanoutClient(edge.url, token=token, logger=log, backoff=fast_backoff()) as client:
        col = Collector(client.subscribe("account.A9.orders"))
        await client_subscribed(client, "account.A9.orders")
        sent = 0
        async with asyncio.timeout(10):
            while client.counters.reconnects == 0 or client.state != ClientState.OPEN:
                await publisher.publish(UpstreamMessage("account.A9.orders", {"n": sent}, "o"))
                sent += 1
                await asyncio.sleep(0.05)
        for _ in range(3):
            await publisher.publish(UpstreamMessage("account.A9.orders", {"n": sent}, "o"))
            sent += 1
        await col.wait_for(lambda: len(col.pubs()) == sent)
        assert [p.offset for p in col.pubs()] == list(range(1, sent + 1))
        assert len(calls) >= 3  # connect, failed refresh(es) or connects, the good one
        closes = [r.getMessage() for r in caplog.records
                  if r.getMessage().startswith("connection_closed")]
        assert closes and "code=3006" in closes[0], closes
        await col.stop()
