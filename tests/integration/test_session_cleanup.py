"""A subscribe cancelled because its session ends leaves nothing behind in the hub, even
when a Redis call swallowed the cancellation (redis-py 8 can; Python 3.11's `wait_for` can
too). Found by the live fuzzer: subscriptions of ended sessions stayed registered, holding
the session, its socket and its queue (the edge's RSS grew ~2 KB per fuzzed connection;
tests/support/fuzz_live.py now also checks that the edge holds nothing of ended clients)."""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from common.channels import parse_channel
from common.protocol import Position
from edge.sendqueue import SendQueue
from edge.session import Session
from edge.wire import RawWebSocket
from edge.wsprotocol import EdgeWebSocketProtocol
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.test_malformed import masked
from tests.support.wsclient import ProtoClient
from tests.unit.test_hub import CH, FakeSession, confirmed, history, make_hub


async def test_a_cancelled_subscribe_registers_nothing_when_redis_swallows_the_cancel() -> None:
    reading = asyncio.Event()

    async def reader(hub: object, since: int) -> object:
        reading.set()
        with contextlib.suppress(asyncio.CancelledError):  # as redis-py may: the command
            await asyncio.sleep(0.05)  # returns normally after all
        return history("e", 6, 1, since)

    hub = make_hub(reader)  # type: ignore[arg-type]
    s = FakeSession()
    task = asyncio.create_task(hub.subscribe(s, parse_channel(CH), Position(2, "e"), False, 1))
    await confirmed(hub)
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert CH not in hub.channels  # nobody left: the channel state is gone too


async def test_a_subscribe_cancelled_during_its_redis_subscribe_leaves_no_channel() -> None:
    """The first subscribe of a channel creates its state and sends SUBSCRIBE; cancelled
    meanwhile, it must not leave behind a state that nothing will ever confirm (every later
    subscribe of the channel on this node would wait out the timeout)."""

    class SlowPubSub:
        async def subscribe(self, *channels: str) -> None:
            await asyncio.sleep(10)

        async def unsubscribe(self, *channels: str) -> None:
            pass

    hub = make_hub(lambda hub, since: history("e", 0, 1, since))  # type: ignore[arg-type,return-value]
    hub._pubsub = SlowPubSub()  # type: ignore[assignment]
    task = asyncio.create_task(hub.subscribe(FakeSession(), parse_channel(CH), None, False, 1))
    await asyncio.sleep(0.01)
    assert CH in hub.channels
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert CH not in hub.channels


@pytest.mark.integration
async def test_an_ended_connection_is_freed_at_once_not_by_the_garbage_collector(
    edge, publisher: Publisher
) -> None:
    """Reference counting frees a connection's session and protocol as soon as it ends,
    whichever way it ends. The edge raises the collector's thresholds (edge/server.py), so
    a connection left in a reference cycle waits for a full collection, which may not come
    for hours of traffic: found by the live fuzzer, whose edge's RSS grew ~1 KB per
    connection (the session and its queue, the protocol and its scope, exceptions holding
    the frames of the tasks that raised them)."""
    await publisher.publish(UpstreamMessage("trades.GC", {"p": 1}))
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        ok = await ProtoClient.open(edge.url)  # subscribes, recovers, closes normally
        reply = await ok.subscribe("trades.GC")
        await ok.subscribe("quotes.GC", recover=(0, reply["epoch"]))
        await ok.close()
        for frame in ("{not json", '{"type":"ping","x":NaN}', "x" * 70_000):  # 3500, 1009
            bad = await ProtoClient.open(edge.url)
            await bad.ws.send(frame)
            await asyncio.wait_for(bad.closed, 5)
            await bad.close()
        utf8 = await ProtoClient.open(edge.url)  # failed by the WebSocket layer: 3500
        utf8.ws.transport.write(masked(0x81, b'"\xff"'))
        await asyncio.wait_for(utf8.closed, 5)
        await utf8.close()
        gone = await ProtoClient.open(edge.url)  # subscribed, then the TCP connection drops
        await gone.subscribe("trades.GC")
        gone.ws.transport.abort()
        await gone.close()
        async with asyncio.timeout(15):
            while edge.edge.stats.connections or edge.edge.sessions:
                await asyncio.sleep(0.05)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if isinstance(o, Session | EdgeWebSocketProtocol | RawWebSocket | SendQueue)
                or (isinstance(o, asyncio.Transport)  # the edge's side of a connection
                    and (o.get_extra_info("sockname") or ("", 0))[1] == edge.port)]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
