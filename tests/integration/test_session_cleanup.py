"""An ended connection is freed at once, not by the garbage collector: the edge holds nothing
of a client that has gone."""

from __future__ import annotations

import asyncio
import gc

import pytest

from edge.sendqueue import SendQueue
from edge.session import Session
from edge.wire import RawWebSocket
from edge.wsprotocol import EdgeWebSocketProtocol
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeServer
from tests.integration.test_malformed import masked
from tests.support.wsclient import ProtoClient


@pytest.mark.integration
async def test_an_ended_connection_is_freed_at_once_not_by_the_garbage_collector(
    edge: EdgeServer, publisher: Publisher
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
