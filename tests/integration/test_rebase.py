"""Redis coming back with fewer writes than it acknowledged: the publisher notices offsets
going back, gives the channel a new epoch and publishes the reused message again; clients
resync instead of silently holding other messages under the same offsets."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from common.broker.keys import Keys
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeServer
from tests.support.streams import xrange
from tests.support.wsclient import ProtoClient


@pytest.mark.integration
async def test_lost_writes_give_the_channel_a_new_epoch_and_clients_resync(
    edge: EdgeServer, publisher: Publisher, redis: Redis, key_prefix: str
) -> None:
    channel = "trades.RB"
    keys = Keys(key_prefix)
    client = await ProtoClient.open(edge.url)
    await client.subscribe(channel)
    first = [await publisher.publish(UpstreamMessage(channel, {"n": n})) for n in range(1, 6)]
    epoch = first[0].epoch
    await client.wait_for(lambda: client.offsets[channel] == [1, 2, 3, 4, 5])

    # Redis "comes back" without the last two writes (as after an AOF everysec crash): meta,
    # stream and snapshot as they were after offset 3.
    kept = await xrange(redis, keys.stream(channel), "-", "3-0")
    await redis.delete(keys.stream(channel))
    for entry_id, fields in kept:
        await redis.xadd(keys.stream(channel), cast(dict[Any, Any], fields), id=entry_id)
    await redis.hset(keys.meta(channel), "top", 3)
    await redis.hset(keys.snapshot(channel), "", '{"n":3}')

    r = await publisher.publish(UpstreamMessage(channel, {"n": 6}))
    assert r.epoch != epoch and r.offset == 5  # 4 was reused, then rebased and republished
    assert publisher.rebased == 1
    assert await redis.hget(keys.meta(channel), "epoch") == r.epoch

    # The subscriber held 4 and 5 of the lost history: it is resynced to the new epoch,
    # with the snapshot that has the republished message.
    await client.wait_for(lambda: bool(client.resyncs), 10)
    resync = client.resyncs[-1]
    assert resync["epoch"] == r.epoch and resync["offset"] == 5
    assert resync["snapshot"] == {"": {"n": 6}}
    # A client that comes back with a position of the old history resyncs too.
    late = await ProtoClient.open(edge.url)
    reply = await late.subscribe(channel, recover=(5, epoch), snapshot=True)
    assert reply["recovered"] is False and reply["epoch"] == r.epoch
    # And the next message continues the new epoch for everyone.
    nxt = await publisher.publish(UpstreamMessage(channel, {"n": 7}))
    assert (nxt.epoch, nxt.offset) == (r.epoch, 6)
    await client.wait_for(lambda: client.offsets[channel][-1:] == [6], 5)
    await asyncio.gather(client.close(), late.close())
