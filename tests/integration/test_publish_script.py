"""publish.lua on a real Valkey, beyond the broker contract: the commands a batch costs
(EVALSHA per channel, no SCRIPT EXISTS), surviving a flushed script cache, a channel's
share of a batch split over several calls, TTLs, cjson's number precision in merge
mode inside one call, the live message (one per call) and the idempotency buckets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.live import encode_live
from common.broker.redisbroker import RedisBroker
from common.broker.scripts import MAX_CALL_MESSAGES, group_publishes, publish_call, register
from common.broker.types import Fence, PublishRequest, PublishStatus
from fanout.embedded import EmbeddedValkey

TTL = 3600
P = PublishStatus


def req(value: object, channel: str = "trades.S", **kw: Any) -> PublishRequest:
    return PublishRequest(channel, json.dumps(value, separators=(",", ":")), **kw)


@pytest.fixture
async def private_redis() -> AsyncIterator[Redis]:
    """A server of this test's own: its command counts are this test's alone."""
    server = EmbeddedValkey()
    server.start()
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()
        server.stop()


async def command_calls(redis: Redis) -> dict[str, int]:
    stats = await redis.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()}


async def test_a_batch_is_one_evalsha_per_channel_and_no_script_exists(
    private_redis: Redis,
) -> None:
    broker = RedisBroker(private_redis, Keys("t"))
    channels = [f"trades.N{i}" for i in range(5)]
    await broker.publish([req(0, ch) for ch in channels], meta_ttl=TTL, idempotency_ttl=TTL)
    before = await command_calls(private_redis)
    batches, per_batch = 20, 100
    for b in range(batches):
        batch = [req(i, channels[i % 5], msg_id=f"{b}:{i}") for i in range(per_batch)]
        replies = await broker.publish(batch, Fence(1), meta_ttl=TTL, idempotency_ttl=TTL)
        assert {r.status for r in replies} == {P.PUBLISHED}
    after = await command_calls(private_redis)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert delta["evalsha"] == batches * len(channels)
    assert delta.get("script|exists", 0) == 0 and delta.get("script|load", 0) == 0
    assert delta["xadd"] == batches * per_batch
    # Per call, not per message: one live message, one lookup and one write of the ids.
    calls = batches * len(channels)
    assert delta["publish"] == calls
    assert delta["hset"] == 3 * calls  # the meta's top, the snapshot, the ids
    assert delta.get("get", 0) == delta.get("set", 0) == 0
    assert delta["hmget"] == 2 * calls + calls  # the ids' two buckets + the meta's state
    # Every offset once, in order.
    for ch in channels:
        assert await private_redis.hget(Keys("t").meta(ch), "top") == str(
            1 + batches * per_batch // 5)


async def test_a_flushed_script_cache_is_survived(private_redis: Redis) -> None:
    broker = RedisBroker(private_redis, Keys("t"))
    first = await broker.publish([req(1), req(2, "trades.T")], meta_ttl=TTL,
                                 idempotency_ttl=TTL)
    for n in range(3):
        await private_redis.script_flush()
        batch = [req(3 + n), req(3 + n, "trades.T", msg_id=f"x{n}"),
                 req(3 + n, "trades.T", msg_id=f"x{n}")]
        replies = await broker.publish(batch, meta_ttl=TTL, idempotency_ttl=TTL)
        assert [(r.offset, r.status) for r in replies] == [
            (2 + n, P.PUBLISHED), (2 + n, P.PUBLISHED), (2 + n, P.DUPLICATE)]
        assert {r.epoch for r in replies} == {first[0].epoch, first[1].epoch}
    # The other scripts reload too.
    await private_redis.script_flush()
    history = await broker.history("trades.S", 0, "1", limit=100, meta_ttl=TTL)
    assert [p.data for p in history.entries] == ["1", "3", "4", "5"]
    await private_redis.script_flush()
    assert (await broker.acquire("feed", "a", 5000)).token == 1
    calls = await command_calls(private_redis)
    # The first publish on the new server, three after a flush, the history, the acquire.
    assert calls["script|load"] == 6


async def test_a_channels_share_of_a_batch_may_take_several_calls(redis: Redis,
                                                                  key_prefix: str) -> None:
    broker = RedisBroker(redis, Keys(key_prefix))
    n = 2 * MAX_CALL_MESSAGES + 7
    batch = [req(i, msg_id=f"m{i}", max_length=n) for i in range(n)]
    batch.insert(5, req("other", "trades.O"))
    batch.append(req(0, msg_id="m0", max_length=n))  # a duplicate, answered from 2 calls back
    replies = await broker.publish(batch, meta_ttl=TTL, idempotency_ttl=TTL)
    own = [r for i, r in enumerate(replies) if i != 5]
    assert [r.offset for r in own] == [*range(1, n + 1), 1]
    assert [r.status for r in own] == [P.PUBLISHED] * n + [P.DUPLICATE]
    history = await broker.history("trades.S", 0, "0", limit=n, meta_ttl=TTL)
    assert [int(p.data) for p in history.entries] == list(range(n))
    # A policy change within a channel's share (not what the publisher sends) also splits.
    mixed = await broker.publish([req(1, "trades.M", max_length=3),
                                  req(2, "trades.M", max_length=5),
                                  req(3, "trades.M", max_length=3)],
                                 meta_ttl=TTL, idempotency_ttl=TTL)
    assert [r.offset for r in mixed] == [1, 2, 3]


async def test_ttls_are_set_by_a_call_that_creates_the_channel(redis: Redis,
                                                               key_prefix: str) -> None:
    keys = Keys(key_prefix)
    broker = RedisBroker(redis, keys)
    ch = "account.1.balance"
    await broker.publish([req({"a": 1}, ch, snapshot_mode="merge", msg_id="i1"),
                          req({"b": 2}, ch, snapshot_mode="merge")],
                         meta_ttl=100, idempotency_ttl=50)
    assert 90 < await redis.ttl(keys.meta(ch)) <= 100
    assert 90 < await redis.ttl(keys.snapshot(ch)) <= 100
    assert 0 < await redis.pttl(keys.stream(ch)) <= 300_000
    # The ids' hash (one time bucket) lives 2 idempotency TTLs after its last write.
    idem = [k async for k in redis.scan_iter(match=f"{key_prefix}:{{{ch}}}:ids:*")]
    assert len(idem) == 1 and await redis.hkeys(idem[0]) == ["i1"]
    assert 90 < await redis.ttl(idem[0]) <= 100
    assert json.loads((await redis.hgetall(keys.snapshot(ch)))[""]) == {"a": 1, "b": 2}


async def test_merge_precision_inside_one_call_is_as_across_calls(
    redis: Redis, key_prefix: str
) -> None:
    """cjson stores 14 significant digits: the stored state no longer equals the exact
    value, so publishing it again with if_changed is news, inside one call as across two
    (docs/architecture.md, publish.lua step 2)."""
    broker = RedisBroker(redis, Keys(key_prefix))
    exact = {"a": {"p": 0.1234567890123456}}
    merge = {"snapshot_mode": "merge", "if_changed": True}
    ch = "account.2.balance"
    await broker.publish([req({"b": 1}, ch, **merge)], meta_ttl=TTL, idempotency_ttl=TTL)
    one_call = await broker.publish([req(exact, ch, **merge), req(exact, ch, **merge),
                                     req({"b": 1}, ch, **merge)],
                                    meta_ttl=TTL, idempotency_ttl=TTL)
    assert [r.status for r in one_call] == [P.PUBLISHED, P.PUBLISHED, P.UNCHANGED]
    ch2 = "account.3.balance"
    await broker.publish([req({"b": 1}, ch2, **merge)], meta_ttl=TTL, idempotency_ttl=TTL)
    separate = [(await broker.publish([r], meta_ttl=TTL, idempotency_ttl=TTL))[0].status
                for r in (req(exact, ch2, **merge), req(exact, ch2, **merge),
                          req({"b": 1}, ch2, **merge))]
    assert separate == [P.PUBLISHED, P.PUBLISHED, P.UNCHANGED]
    assert await broker.snapshot(ch) == await broker.snapshot(ch2)


async def test_one_live_message_per_call_is_what_live_py_encodes(
    redis: Redis, key_prefix: str
) -> None:
    """publish.lua's live message, byte for byte, is common/broker/live.py's encoding of
    what the call published (a duplicate and an unchanged state in the middle are not in
    it, and the offsets stay consecutive)."""
    keys = Keys(key_prefix)
    broker = RedisBroker(redis, keys)
    ch = "depth.LIVE"
    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live(ch))
    try:
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        first = [req({"p": 1}, ch, key="bid:1", snapshot_mode="keyed", msg_id="a")]
        replies = await broker.publish(first, meta_ttl=TTL, idempotency_ttl=TTL)
        epoch = replies[0].epoch
        batch = [
            req({"p": "ü\nx"}, ch, key="bid:2 é", snapshot_mode="keyed", msg_id="b",
                received_ms=1_700_000_000_123),
            req({"p": 1}, ch, key="bid:1", snapshot_mode="keyed", msg_id="a"),  # duplicate
            req({"p": 1}, ch, key="bid:1", snapshot_mode="keyed", if_changed=True),  # same
            req(None, ch, key="bid:1", snapshot_mode="keyed", delete=True),
        ]
        replies = await broker.publish(batch, meta_ttl=TTL, idempotency_ttl=TTL)
        assert [(r.offset, r.status) for r in replies] == [
            (2, P.PUBLISHED), (1, P.DUPLICATE), (2, P.UNCHANGED), (3, P.PUBLISHED)]
        texts: list[str] = []
        while len(texts) < 2:
            msg = await pubsub.get_message(timeout=5)
            assert msg is not None
            texts.append(msg["data"])
        assert texts == [
            encode_live(epoch, 1, [("bid:1", '{"p":1}', False, 0)]),
            encode_live(epoch, 2, [("bid:2 é", '{"p":"\\u00fc\\nx"}', False, 1_700_000_000_123),
                                   ("bid:1", "null", True, 0)]),
        ]
    finally:
        await pubsub.aclose()


async def test_idempotency_buckets(redis: Redis, key_prefix: str) -> None:
    """An id is found for at least one idempotency TTL after it was published and at most
    two (its time bucket and the next); the bucket's hash lives 2 TTLs after its last
    write; a new epoch forgets the ids with the rest of the channel's state."""
    keys = Keys(key_prefix)
    script = register(redis, "publish")
    ch, ttl = "trades.IDEM", 100

    async def publish(msg_id: str, now: float, epoch: str = "e1") -> tuple[int, str, int]:
        batch = [req(1, ch, msg_id=msg_id)]
        call = group_publishes(batch)[0]
        k, a = publish_call(keys, call, batch, epoch, None, meta_ttl=TTL,
                            idempotency_ttl=ttl, now=now)
        offset, epoch_, status = await script(k, a)
        return int(offset), epoch_, int(status)

    assert await publish("a", 1000.0) == (1, "e1", P.PUBLISHED)
    assert await publish("a", 1099.9) == (1, "e1", P.DUPLICATE)  # same bucket
    assert await publish("a", 1150.0) == (1, "e1", P.DUPLICATE)  # the next one
    assert await publish("a", 1199.9) == (1, "e1", P.DUPLICATE)
    assert await publish("a", 1200.0) == (2, "e1", P.PUBLISHED)  # 2 buckets later: new
    assert await publish("a", 1200.0) == (2, "e1", P.DUPLICATE)
    assert await redis.hgetall(keys.idempotency(ch, 10)) == {"a": "e1:1"}
    assert await redis.hgetall(keys.idempotency(ch, 12)) == {"a": "e1:2"}
    assert 2 * ttl - 10 < await redis.ttl(keys.idempotency(ch, 12)) <= 2 * ttl
    # The channel's state lost (its meta expired): a new epoch, and no id survives it.
    await redis.delete(keys.meta(ch))
    assert await publish("b", 1250.0, "e2") == (1, "e2", P.PUBLISHED)
    assert await redis.hgetall(keys.idempotency(ch, 12)) == {"b": "e2:1"}
    assert not await redis.exists(keys.idempotency(ch, 11))
    assert await publish("a", 1250.0, "e2") == (2, "e2", P.PUBLISHED)
