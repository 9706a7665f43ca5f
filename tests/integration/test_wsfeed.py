"""The generic WebSocket JSON feed against a local websockets server on an ephemeral
loopback port: subscribe after every connect, reconnect after the server is killed and
restarted, an idle upstream counts as dead, backoff follows its schedule."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve

from common.backoff import Backoff
from ingest.feeds.ws import (
    FeedState,
    FieldMapping,
    WebSocketFeed,
)
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.unit.test_wsfeed import LOG, SUBSCRIBE, TIMEOUT, fast_backoff, make_feed

integration = pytest.mark.integration
SUBSCRIBE_FRAMES = [json.dumps(m, separators=(",", ":")) if not isinstance(m, str) else m
                    for m in SUBSCRIBE]


# --- against a local server -----------------------------------------------------------------


@dataclass
class Conn:
    """One connection the test server accepted: what it received, and its socket."""

    ws: ServerConnection
    received: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)

    async def next_received(self) -> str | bytes:
        async with asyncio.timeout(TIMEOUT):
            return await self.received.get()

    async def subscribed(self) -> list[str | bytes]:
        return [await self.next_received() for _ in SUBSCRIBE_FRAMES]

    async def send(self, *messages: Any) -> None:
        for message in messages:
            async with asyncio.timeout(TIMEOUT):
                await self.ws.send(json.dumps(message))


class FeedServer:
    """A websockets server on 127.0.0.1 that can be killed (no close frame) and restarted
    on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self.server: Server | None = None
        self.connections: asyncio.Queue[Conn] = asyncio.Queue()
        self.live: list[Conn] = []

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/feed?token=SECRET-IN-QUERY"

    async def start(self) -> None:
        self.server = await serve(self._handle, "127.0.0.1", self.port, ping_interval=None)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, ws: ServerConnection) -> None:
        conn = Conn(ws)
        self.live.append(conn)
        await self.connections.put(conn)
        with contextlib.suppress(Exception):
            async for frame in ws:
                await conn.received.put(frame)

    async def next_connection(self) -> Conn:
        async with asyncio.timeout(TIMEOUT):
            return await self.connections.get()

    async def kill(self) -> None:
        """As kill -9 would: connections drop without a close frame, the port closes."""
        assert self.server is not None
        for conn in self.live:
            conn.ws.transport.abort()
        self.live.clear()
        self.server.close(close_connections=False)
        async with asyncio.timeout(TIMEOUT):
            await self.server.wait_closed()
        self.server = None

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            async with asyncio.timeout(TIMEOUT):
                await self.server.wait_closed()


@pytest.fixture
async def feed_server() -> AsyncIterator[FeedServer]:
    server = FeedServer()
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def consuming(feed: WebSocketFeed) -> AsyncIterator[asyncio.Queue[UpstreamMessage]]:
    """Run the feed in a task, its messages into a queue; cancel it at the end."""
    out: asyncio.Queue[UpstreamMessage] = asyncio.Queue()

    async def consume() -> None:
        async for msg in feed.messages():
            await out.put(msg)

    task = asyncio.create_task(consume())
    try:
        yield out
    finally:
        task.cancel()
        async with asyncio.timeout(TIMEOUT):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert feed.state is FeedState.STOPPED


async def take(queue: asyncio.Queue[UpstreamMessage], n: int) -> list[UpstreamMessage]:
    async with asyncio.timeout(TIMEOUT):
        return [await queue.get() for _ in range(n)]


async def wait_until(condition: Any) -> None:
    """Poll a condition the feed exposes no event for (its state), under a deadline."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.002)


@integration
async def test_feed_subscribes_and_maps_what_the_server_sends(
    feed_server: FeedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.wsfeed")
    states: list[FeedState] = []
    feed = make_feed(feed_server.url, headers={"Authorization": "Bearer HEADER-SECRET"},
                     on_state=states.append)
    async with consuming(feed) as out:
        conn = await feed_server.next_connection()
        assert await conn.subscribed() == SUBSCRIBE_FRAMES
        assert conn.ws.request is not None
        assert conn.ws.request.headers["Authorization"] == "Bearer HEADER-SECRET"
        await conn.send(
            {"type": "subscribed"},  # an ack: matches no mapping, skipped
            {"type": "quote", "s": "MNQ", "seq": 1, "q": {"bid": 1}},
            [{"type": "trade", "s": "ES", "seq": 2, "p": 5}, {"type": "quote", "s": "ES"}],
            {"type": "order", "acct": {"id": "7"}, "seq": 3, "order": {"id": "o1", "q": 1}},
        )
        got = await take(out, 3)
        assert [(m.channel, m.msg_id, m.key) for m in got] == [
            ("quotes.MNQ", "1", ""), ("trades.ES", "2", ""), ("account.7.orders", "3", "o1"),
        ]
        assert got[0].data == {"bid": 1}
        assert feed.stats.unmatched == 1 and feed.stats.invalid == 1 and feed.stats.frames == 4
        assert feed.state is FeedState.LIVE
    assert states == [FeedState.CONNECTING, FeedState.LIVE, FeedState.STOPPED]
    assert "SECRET" not in caplog.text


@integration
async def test_reconnects_and_resubscribes_after_the_server_is_killed_and_restarted(
    feed_server: FeedServer,
) -> None:
    states: list[FeedState] = []
    feed = make_feed(feed_server.url, on_state=states.append)
    async with consuming(feed) as out:
        conn = await feed_server.next_connection()
        assert await conn.subscribed() == SUBSCRIBE_FRAMES
        await conn.send({"type": "trade", "s": "ES", "seq": 1})
        assert [m.msg_id for m in await take(out, 1)] == ["1"]

        await feed_server.kill()
        # While it is down, attempts fail and back off, again and again.
        await wait_until(lambda: feed.stats.connects >= feed.stats.connected + 2)
        assert feed.backoff.attempt >= 2
        await feed_server.start()

        conn = await feed_server.next_connection()
        assert await conn.subscribed() == SUBSCRIBE_FRAMES  # everything sent again
        await conn.send({"type": "trade", "s": "ES", "seq": 2})
        assert [m.msg_id for m in await take(out, 1)] == ["2"]
        assert feed.backoff.attempt == 0  # a working connection resets the schedule
        assert feed.stats.connected == 2 and feed.stats.disconnects == 1
    transitions = [s for i, s in enumerate(states) if i == 0 or states[i - 1] is not s]
    assert transitions[:4] == [
        FeedState.CONNECTING, FeedState.LIVE, FeedState.BACKING_OFF, FeedState.CONNECTING
    ]
    assert transitions[-2:] == [FeedState.LIVE, FeedState.STOPPED]


@integration
async def test_an_idle_upstream_is_taken_for_dead(feed_server: FeedServer) -> None:
    """The server keeps the connection open but sends nothing (and pings are off): after
    idle_timeout the feed closes it, connects and subscribes again."""
    feed = make_feed(feed_server.url, idle_timeout=0.2, ping_interval=None)
    async with consuming(feed):
        first = await feed_server.next_connection()
        assert await first.subscribed() == SUBSCRIBE_FRAMES
        second = await feed_server.next_connection()
        assert await second.subscribed() == SUBSCRIBE_FRAMES
        assert feed.stats.idle_timeouts >= 1
        async with asyncio.timeout(TIMEOUT):
            await first.ws.wait_closed()  # the feed closed the idle connection
        assert first.ws.close_code == 1001


@integration
async def test_the_server_closing_cleanly_also_reconnects(feed_server: FeedServer) -> None:
    feed = make_feed(feed_server.url)
    async with consuming(feed):
        conn = await feed_server.next_connection()
        await conn.subscribed()
        async with asyncio.timeout(TIMEOUT):
            await conn.ws.close(1012, "service restart")
        again = await feed_server.next_connection()
        assert await again.subscribed() == SUBSCRIBE_FRAMES


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_reconnect_delays_follow_the_backoff_schedule() -> None:
    """Nothing listens: every attempt fails, and the delays are the capped exponential's
    ceilings (the injected random source picks the top of each range). No time passes."""
    delays: list[float] = []
    enough = asyncio.Event()

    async def record(delay: float) -> None:
        delays.append(delay)
        if len(delays) >= 6:
            enough.set()
        await asyncio.sleep(0)

    states: list[FeedState] = []
    backoff = Backoff(base=0.5, cap=4.0, rand=lambda lo, hi: hi)
    feed = make_feed(f"ws://127.0.0.1:{_closed_port()}/", backoff=backoff, sleep=record,
                     on_state=states.append)
    async with consuming(feed):
        async with asyncio.timeout(TIMEOUT):
            await enough.wait()
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert feed.stats.connected == 0 and feed.stats.connects >= 6
    assert FeedState.LIVE not in states
    assert states[:3] == [FeedState.CONNECTING, FeedState.BACKING_OFF, FeedState.CONNECTING]


@integration
async def test_replayed_upstream_messages_are_published_once(
    feed_server: FeedServer, publisher: Publisher
) -> None:
    """An upstream that replays its recent messages after a reconnect: ids make the
    publisher answer duplicates, so the channel's offsets stay gapless and unique."""
    feed = make_feed(feed_server.url)
    trades = [{"type": "trade", "s": "ES", "seq": i, "p": i} for i in range(1, 6)]
    async with consuming(feed) as out:
        conn = await feed_server.next_connection()
        await conn.subscribed()
        await conn.send(*trades[:3])
        first = await publisher.publish_batch(await take(out, 3))
        await feed_server.kill()
        await feed_server.start()
        conn = await feed_server.next_connection()
        await conn.subscribed()
        await conn.send(*trades)  # replays 1-3, then 4-5 are new
        second = await publisher.publish_batch(await take(out, 5))
    assert [r.offset for r in first] == [1, 2, 3]
    assert [(r.offset, r.duplicate) for r in second] == [
        (1, True), (2, True), (3, True), (4, False), (5, False)
    ]


@integration
async def test_states_resent_after_a_reconnect_are_published_once(
    feed_server: FeedServer, publisher: Publisher
) -> None:
    """An upstream without ids that sends its current state on every subscribe: with
    ``if_changed`` the state already in the snapshot is not published again, a change is."""
    mapping = FieldMapping("depth.{s}", key="px", payload="l", if_changed=True)
    feed = WebSocketFeed(feed_server.url, SUBSCRIBE, [mapping], logger=LOG,
                         backoff=fast_backoff())
    book = [{"s": "ES", "px": str(px), "l": {"size": px % 7}} for px in range(1, 4)]
    async with consuming(feed) as out:
        conn = await feed_server.next_connection()
        await conn.subscribed()
        await conn.send(*book)
        first = await publisher.publish_batch(await take(out, 3))
        await feed_server.kill()
        await feed_server.start()
        conn = await feed_server.next_connection()
        await conn.subscribed()
        book[1] = {**book[1], "l": {"size": 0}}  # one level changed while we were away
        await conn.send(*book)
        second = await publisher.publish_batch(await take(out, 3))
    assert [(r.offset, r.unchanged) for r in first] == [(1, False), (2, False), (3, False)]
    assert [(r.offset, r.unchanged) for r in second] == [(3, True), (4, False), (4, True)]
