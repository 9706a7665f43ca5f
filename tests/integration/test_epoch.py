"""History lost (Redis restarted empty): never a silent gap."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import RedisError

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeServer, RedisServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


async def test_epoch_change_gives_resync_and_not_recovered(
    edge: EdgeServer, publisher: Publisher, redis_server: RedisServer
) -> None:
    client = await ProtoClient.open(edge.url)
    await client.subscribe("quotes.ES", snapshot=True)
    for i in range(5):
        await publisher.publish(UpstreamMessage("quotes.ES", {"bid": i}))
    await client.wait_for(lambda: len(client.offsets["quotes.ES"]) == 5)
    old_position = client.positions["quotes.ES"]

    await redis_server.wipe()
    # The publisher's connection pool reconnects by itself; retry until the server is back.
    async with asyncio.timeout(15):
        while True:
            try:
                result = await publisher.publish(UpstreamMessage("quotes.ES", {"bid": 100}))
                break
            except (RedisError, OSError):
                await asyncio.sleep(0.05)
    assert result.offset == 1 and result.epoch != old_position[1]

    # The connected client is told: a resync with the new epoch and the snapshot.
    await client.wait_for(lambda: any(r["epoch"] == result.epoch for r in client.resyncs), 15)
    resync = next(r for r in client.resyncs if r["epoch"] == result.epoch)
    assert resync["channel"] == "quotes.ES"
    if resync["offset"] == 1:
        assert resync["snapshot"] == {"": {"bid": 100}}
    await publisher.publish(UpstreamMessage("quotes.ES", {"bid": 101}))
    await client.wait_for(lambda: client.positions["quotes.ES"] == (2, result.epoch))

    # A client coming back with a position of the old epoch is not recovered.
    late = await ProtoClient.open(edge.url)
    reply = await late.subscribe("quotes.ES", recover=old_position)
    assert reply["recovered"] is False
    assert reply["epoch"] == result.epoch and reply["offset"] == 2
    assert reply["snapshot"] == {"": {"bid": 101}}
    await late.close()
    await client.close()


async def test_position_ahead_of_channel_is_not_recovered(
    edge: EdgeServer, publisher: Publisher,
) -> None:
    r = await publisher.publish(UpstreamMessage("trades.YM", {"p": 1}))
    client = await ProtoClient.open(edge.url)
    reply = await client.subscribe("trades.YM", recover=(50, r.epoch))
    assert reply["recovered"] is False and reply["offset"] == 1
    assert reply["snapshot"] == {"": {"p": 1}}
    await client.close()
