"""End to end against a real Valkey: publish -> stream -> edge -> client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis

from common.broker import Fence
from common.broker.keys import Keys
from common.broker.live import decode_live
from common.broker.redisbroker import RedisBroker
from ingest.publisher import FencedOut, Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.streams import xrange
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


def quote(i: int) -> dict[str, float]:
    return {"bid": 100.0 + i, "ask": 100.25 + i}


async def test_live_messages_arrive_in_order(edge: EdgeServer, publisher: Publisher) -> None:
    client = await ProtoClient.open(edge.url)
    reply = await client.subscribe("quotes.MNQ", snapshot=True)
    assert reply["type"] == "subscribed" and reply["recovered"] is False
    for i in range(50):
        await publisher.publish(UpstreamMessage("quotes.MNQ", quote(i)))
    await client.wait_for(lambda: len(client.offsets["quotes.MNQ"]) == 50)
    assert client.offsets["quotes.MNQ"] == list(range(1, 51))
    await client.close()


async def test_recovery_replays_exactly_the_missed_messages(
    edge: EdgeServer, publisher: Publisher,
) -> None:
    client = await ProtoClient.open(edge.url)
    await client.subscribe("trades.ES")
    for i in range(10):
        await publisher.publish(UpstreamMessage("trades.ES", {"p": i}))
    await client.wait_for(lambda: len(client.offsets["trades.ES"]) == 10)
    position = client.positions["trades.ES"]
    await client.close()
    for i in range(10, 25):
        await publisher.publish(UpstreamMessage("trades.ES", {"p": i}))
    again = await ProtoClient.open(edge.url)
    reply = await again.subscribe("trades.ES", recover=position)
    assert reply["recovered"] is True and reply["epoch"] == position[1]
    assert "snapshot" not in reply
    await publisher.publish(UpstreamMessage("trades.ES", {"p": 25}))
    await again.wait_for(lambda: len(again.offsets["trades.ES"]) == 16)
    assert again.offsets["trades.ES"] == list(range(11, 27))
    pubs = [m for m in again.messages if m.get("type") == "pub"]
    assert [p["data"]["p"] for p in pubs] == list(range(10, 26))
    # The reply comes before the replayed messages.
    kinds = [m["type"] for m in again.messages if m["type"] in ("subscribed", "pub")]
    assert kinds[0] == "subscribed"
    await again.close()


async def test_snapshot_merges_quotes_and_keeps_keys(
    edge: EdgeServer, publisher: Publisher,
) -> None:
    await publisher.publish(UpstreamMessage("quotes.NQ", {"bid": 1.0, "ask": 2.0, "last": 1.5}))
    await publisher.publish(UpstreamMessage("quotes.NQ", {"bid": 1.25}))
    await publisher.publish(UpstreamMessage("account.A1.orders", {"id": 7, "qty": 1}, key="7"))
    await publisher.publish(UpstreamMessage("account.A1.orders", {"id": 8, "qty": 2}, key="8"))
    await publisher.publish(UpstreamMessage("account.A1.orders", {"id": 7, "qty": 3}, key="7"))
    await publisher.publish(UpstreamMessage("depth.NQ", {"size": 5}, key="bid:1.0"))
    await publisher.publish(UpstreamMessage("depth.NQ", {"size": 0}, key="bid:1.0", delete=True))
    client = await ProtoClient.open(edge.url)
    q = await client.subscribe("quotes.NQ", snapshot=True)
    assert q["snapshot"] == {"": {"bid": 1.25, "ask": 2.0, "last": 1.5}}
    assert q["offset"] == 2
    o = await client.subscribe("account.A1.orders", snapshot=True)
    assert o["snapshot"] == {"7": {"id": 7, "qty": 3}, "8": {"id": 8, "qty": 2}}
    d = await client.subscribe("depth.NQ", snapshot=True)
    assert d["snapshot"] == {} and d["offset"] == 2
    fresh = await client.subscribe("trades.NQ")
    assert "snapshot" not in fresh and fresh["offset"] == 0
    await client.close()


async def test_idempotent_publish(publisher: Publisher) -> None:
    a = await publisher.publish(UpstreamMessage("trades.MES", {"p": 1}, msg_id="u-1"))
    b = await publisher.publish(UpstreamMessage("trades.MES", {"p": 1}, msg_id="u-1"))
    c = await publisher.publish(UpstreamMessage("trades.MES", {"p": 2}, msg_id="u-2"))
    assert (a.offset, a.duplicate) == (1, False)
    assert (b.offset, b.epoch, b.duplicate) == (1, a.epoch, True)
    assert (c.offset, c.duplicate) == (2, False)
    results = await publisher.publish_batch(
        [UpstreamMessage("trades.MES", {"p": i}, msg_id=f"u-{i}") for i in range(1, 5)]
    )
    assert [(r.offset, r.duplicate) for r in results] == [
        (1, True), (2, True), (3, False), (4, False)
    ]


async def test_history_trim_gives_not_recovered_with_snapshot(
    edge_factory: EdgeFactory, redis: Redis, key_prefix: str
) -> None:
    from common.broker.keys import Keys
    from common.config import DEFAULT_HISTORY, HistoryPolicy

    # The publisher trims to 5 while the edge's namespaces file says more: without its
    # recent window, the edge answers from what Redis holds (with it, it would recover the
    # client from memory, correctly: tests/inprocess/test_hub_window.py).
    edge = await edge_factory(recent_window_messages=0)

    history = {**DEFAULT_HISTORY, "bars": HistoryPolicy(5, 600.0)}
    pub = Publisher(RedisBroker(redis, Keys(key_prefix)), history)
    client = await ProtoClient.open(edge.url)
    await client.subscribe("bars.1m.ES")
    await pub.publish(UpstreamMessage("bars.1m.ES", {"c": 0}))
    await client.wait_for(lambda: len(client.offsets["bars.1m.ES"]) == 1)
    position = client.positions["bars.1m.ES"]
    await client.close()
    for i in range(1, 11):  # offsets 2..11; only 7..11 are kept
        await pub.publish(UpstreamMessage("bars.1m.ES", {"c": i}))
    again = await ProtoClient.open(edge.url)
    reply = await again.subscribe("bars.1m.ES", recover=position)
    assert reply["recovered"] is False
    assert reply["offset"] == 11 and reply["snapshot"] == {"": {"c": 10}}
    # Within the retained history recovery works.
    await again.close()
    third = await ProtoClient.open(edge.url)
    ok = await third.subscribe("bars.1m.ES", recover=(6, position[1]))
    assert ok["recovered"] is True
    await third.wait_for(lambda: len(third.offsets["bars.1m.ES"]) == 5)
    assert third.offsets["bars.1m.ES"] == [7, 8, 9, 10, 11]
    await third.close()


async def test_history_trim_by_age(redis: Redis, key_prefix: str) -> None:
    from common.config import DEFAULT_HISTORY, HistoryPolicy

    keys = Keys(key_prefix)
    pub = Publisher(RedisBroker(redis, keys),
                    {**DEFAULT_HISTORY, "trades": HistoryPolicy(1000, 0.2)})
    for i in range(5):
        await pub.publish(UpstreamMessage("trades.RTY", {"p": i}))
    assert await redis.xlen(keys.stream("trades.RTY")) == 5
    await _server_clock_passes(redis, 0.25)
    await pub.publish(UpstreamMessage("trades.RTY", {"p": 5}))
    entries = await xrange(redis, keys.stream("trades.RTY"))
    assert [e[0] for e in entries] == ["6-0"]


async def _server_clock_passes(redis: Redis, seconds: float) -> None:
    """Wait until the server's own clock (which the script trims by) has advanced."""
    import asyncio

    def now(t: tuple[int, int]) -> float:
        return int(t[0]) + int(t[1]) / 1e6

    start = now(await redis.time())
    async with asyncio.timeout(10):
        while now(await redis.time()) < start + seconds:
            await asyncio.sleep(0.02)


# --- state dedup: if_changed --------------------------------------------------------------


class LiveTap:
    """The live pub/sub messages of one channel, as an edge gets them: what was PUBLISHed."""

    def __init__(self, redis: Redis, keys: Keys, channel: str) -> None:
        self.redis, self.keys, self.channel = redis, keys, channel
        self.offsets: list[int] = []

    async def __aenter__(self) -> LiveTap:
        self.pubsub = self.redis.pubsub()
        await self.pubsub.subscribe(self.keys.live(self.channel))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.pubsub.aclose()

    async def until(self, offset: int) -> list[int]:
        """Every live offset up to `offset` (a publish known to come last)."""
        async with asyncio.timeout(5):
            while offset not in self.offsets:
                msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if msg is not None:
                    self.offsets += [p.offset for p in decode_live(self.channel, msg["data"])]
        return self.offsets


async def stream_offsets(redis: Redis, keys: Keys, channel: str) -> list[int]:
    entries = await xrange(redis, keys.stream(channel))
    return [int(entry_id.split("-")[0]) for entry_id, _ in entries]


async def test_if_changed_skips_a_keyed_state_the_snapshot_holds(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    ch = "depth.MNQ"

    def level(size: int, *, delete: bool = False, key: str = "bid:1") -> UpstreamMessage:
        return UpstreamMessage(ch, {"size": size}, key, delete=delete, if_changed=True)

    async with LiveTap(redis, keys, ch) as live:
        sent = [level(5), level(5), level(6), level(6), level(0, delete=True),
                level(0, delete=True), level(0, delete=True, key="bid:2"), level(6)]
        results = await publisher.publish_batch(sent)
        epoch = results[0].epoch
        assert [(r.offset, r.epoch, r.duplicate, r.unchanged) for r in results] == [
            (1, epoch, False, False),
            (1, epoch, False, True),  # the same value: unchanged, the channel's top
            (2, epoch, False, False),
            (2, epoch, False, True),
            (3, epoch, False, False),  # a delete of a key that is there
            (3, epoch, False, True),  # a delete of a key that is not
            (3, epoch, False, True),
            (4, epoch, False, False),
        ]
        assert [r.published for r in results] == [not r.unchanged for r in results]
        final = await publisher.publish(level(7, key="ask:2"))
        # Offsets stay gapless around what was skipped, in history and live alike.
        assert await stream_offsets(redis, keys, ch) == [1, 2, 3, 4, 5]
        assert await live.until(final.offset) == [1, 2, 3, 4, 5]
    assert await redis.hgetall(keys.snapshot(ch)) == {"bid:1": '{"size":6}',
                                                     "ask:2": '{"size":7}'}
    # Without the flag the same value is published again, as before.
    assert (await publisher.publish(UpstreamMessage(ch, {"size": 7}, "ask:2"))).offset == 6


async def test_if_changed_publishes_every_change_a_b_a(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    for ch, key in (("depth.ES", "ask:2"), ("trades.ES", ""), ("quotes.ES", ""),
                    ("account.7.balance", "")):
        values = [{"bid": 1}, {"bid": 2}, {"bid": 1}]
        results = await publisher.publish_batch(
            [UpstreamMessage(ch, v, key, if_changed=True) for v in values]
        )
        assert [(r.offset, r.unchanged) for r in results] == [(1, False), (2, False), (3, False)]
        assert await stream_offsets(redis, keys, ch) == [1, 2, 3], ch


async def test_if_changed_in_last_mode_compares_the_value(publisher: Publisher) -> None:
    ch = "bars.1m.NQ"
    bar = {"t": 0, "c": 1.5}
    results = await publisher.publish_batch([
        UpstreamMessage(ch, bar, if_changed=True),
        UpstreamMessage(ch, bar, if_changed=True),
        UpstreamMessage(ch, bar, if_changed=True, delete=True),  # no key to delete: the same
        UpstreamMessage(ch, {**bar, "c": 2.0}, if_changed=True),
    ])
    assert [(r.offset, r.unchanged) for r in results] == [
        (1, False), (1, True), (1, True), (2, False),
    ]


async def test_if_changed_in_merge_mode_skips_a_merge_that_changes_nothing(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    ch = "quotes.MNQ"
    steps: list[tuple[Any, bool]] = [
        ({"bid": 1.0, "ask": 2.0, "book": {"a": [1, 2], "b": None}}, False),
        ({"bid": 1.0}, True),  # a field with its value: no change
        ({"ask": 2, "bid": 1.0}, True),  # the same numbers, other order and text
        ({"book": {"b": None, "a": [1, 2]}}, True),  # nested: order does not matter
        ({}, True),  # nothing to merge
        ({"book": {"a": [2, 1], "b": None}}, False),  # an array's order does
        ({"book": {"a": [2, 1]}}, False),  # a nested object is replaced, not merged
        ({"last": None}, False),  # a new field, even null
        ({"last": None}, True),
        ({"bid": 1.25}, False),
        ([1, 2], False),  # not an object: it replaces the value
        ([1, 2], True),  # and the same text again is no change
        ({"bid": 1.0}, False),
    ]
    results = await publisher.publish_batch(
        [UpstreamMessage(ch, data, if_changed=True) for data, _ in steps]
    )
    assert [r.unchanged for r in results] == [skip for _, skip in steps]
    published = sum(not skip for _, skip in steps)
    assert await stream_offsets(redis, keys, ch) == list(range(1, published + 1))
    assert results[-1].offset == published
    assert await redis.hget(keys.snapshot(ch), "") == '{"bid":1.0}'  # replaced the array


async def test_if_changed_on_a_channel_without_an_epoch(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    ch = "account.9.positions"
    gone = await publisher.publish(UpstreamMessage(ch, {}, "ES", delete=True, if_changed=True))
    assert (gone.offset, gone.epoch, gone.unchanged) == (0, "", True)
    assert await redis.exists(keys.meta(ch), keys.stream(ch), keys.snapshot(ch)) == 0
    first = await publisher.publish(UpstreamMessage(ch, {"size": 1}, "ES", if_changed=True))
    assert (first.offset, first.unchanged) == (1, False) and first.epoch


async def test_if_changed_keeps_fencing_first_and_ids_their_meaning(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    ch = "account.7.balance"
    state = UpstreamMessage(ch, {"balance": 10}, msg_id="v1", if_changed=True)
    assert (await publisher.publish(state, Fence(2))).offset == 1
    # A known id is a duplicate, whatever the state says.
    again = await publisher.publish(state, Fence(2))
    assert (again.duplicate, again.unchanged) == (True, False)
    # An older token is refused even when there is nothing to publish.
    unchanged = UpstreamMessage(ch, {"balance": 10}, msg_id="v2", if_changed=True)
    with pytest.raises(FencedOut) as refused:
        await publisher.publish(unchanged, Fence(1))
    assert refused.value.reason == "token" and refused.value.fence == 2
    seconds, micros = await redis.time()
    with pytest.raises(FencedOut) as expired:
        await publisher.publish(unchanged, Fence(2, seconds * 1000 + micros // 1000 - 1))
    assert expired.value.reason == "expired"
    # A newer leader finding the state current fences the channel as a write would: the
    # old leader cannot put an older state over it afterwards.
    skipped = await publisher.publish(unchanged, Fence(3))
    assert (skipped.offset, skipped.unchanged) == (1, True)
    assert await redis.hget(keys.meta(ch), "fence") == "3"
    with pytest.raises(FencedOut):
        await publisher.publish(UpstreamMessage(ch, {"balance": 9}, if_changed=True), Fence(2))
    # What was skipped is not remembered as published: its id names nothing.
    idem = [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{{ch}}}:ids:*")]
    assert idem and not any([await redis.hexists(k, "v2") for k in idem])
    assert await stream_offsets(redis, keys, ch) == [1]
    changed = await publisher.publish(UpstreamMessage(ch, {"balance": 9}, msg_id="v2",
                                                      if_changed=True), Fence(3))
    assert (changed.offset, changed.duplicate, changed.unchanged) == (2, False, False)


async def test_a_channel_created_by_a_subscribe_lives_an_hour_until_published(
    edge: EdgeServer, publisher: Publisher, redis: Redis, key_prefix: str
) -> None:
    """Any valid name a client subscribes to creates the channel's meta; names nobody
    publishes to expire after FANOUT_UNPUBLISHED_TTL (1 h), not meta_ttl (30 d). The first
    publish keeps the subscriber's epoch and sets meta_ttl."""
    meta = Keys(key_prefix).meta("trades.NOPUB")
    client = await ProtoClient.open(edge.url)
    reply = await client.subscribe("trades.NOPUB")
    assert 3_500 < await redis.ttl(meta) <= 3_600
    r = await publisher.publish(UpstreamMessage("trades.NOPUB", {"p": 1}))
    assert r.epoch == reply["epoch"]
    assert await redis.ttl(meta) > 29 * 86_400
    await client.close()
