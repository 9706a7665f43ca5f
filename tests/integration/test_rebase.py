"""Redis coming back with fewer writes than it acknowledged: the publisher notices offsets
going back, gives the channel a new epoch and publishes the reused message again; clients
resync instead of silently holding other messages under the same offsets."""

from __future__ import annotations

import asyncio

import fakeredis
import pytest
from redis.asyncio import Redis

from common.keys import Keys
from ingest.publisher import Publisher, PublishResult
from ingest.upstream import UpstreamMessage
from tests.support.wsclient import ProtoClient


def test_offsets_going_back_are_noticed_per_channel_and_epoch() -> None:
    p = Publisher(fakeredis.FakeAsyncRedis())

    def went_back(results: list[PublishResult]) -> list[int]:
        return p._went_back(results, {r.channel: p._seen.get(r.channel) for r in results})

    ok = [PublishResult("a", 5, "E", False), PublishResult("b", 2, "E", False)]
    assert went_back(ok) == []
    later = [
        PublishResult("a", 6, "E", False),  # goes on
        PublishResult("b", 9, "F", False),  # another epoch: a new history, fine
        PublishResult("a", 1, "E", True),  # a duplicate answers an old offset by design
        PublishResult("a", 6, "E", False, unchanged=True),  # the top as it is: fine
    ]
    assert went_back(later) == []
    back = [
        PublishResult("a", 6, "E", False),  # published at an offset it already got
        PublishResult("b", 8, "F", False, unchanged=True),  # the top fell below 9
    ]
    assert went_back(back) == [0, 1]


def test_batches_completing_out_of_order_are_not_taken_for_a_loss() -> None:
    """Two batches sent concurrently: the one sent first may complete last, with lower
    offsets than the other's. Only what was known before sending counts."""
    p = Publisher(fakeredis.FakeAsyncRedis())
    p._went_back([PublishResult("a", 5, "E", False)], {"a": None})
    before = {"a": p._seen.get("a")}  # both batches sent now
    assert p._went_back([PublishResult("a", 9, "E", False)], before) == []  # second, first
    assert p._went_back([PublishResult("a", 7, "E", False)], before) == []  # first, last
    assert p._seen["a"] == ("E", 9)
    assert p._went_back([PublishResult("a", 8, "E", False)], {"a": p._seen["a"]}) == [0]


@pytest.mark.integration
async def test_lost_writes_give_the_channel_a_new_epoch_and_clients_resync(
    edge, publisher: Publisher, redis: Redis, key_prefix: str
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
    kept = await redis.xrange(keys.stream(channel), "-", "3-0")
    await redis.delete(keys.stream(channel))
    for entry_id, fields in kept:
        await redis.xadd(keys.stream(channel), fields, id=entry_id)
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
