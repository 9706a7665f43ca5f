"""Recovery replays and history replies: packed into frames within the frame bounds like
live traffic, the reply first, never reordered against live messages; and the hub's
history read, whether history.lua returns the entries itself or they are read with XRANGE
(and read again when the channel changed between the two reads)."""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import pytest
from redis.asyncio import Redis

from common.broker import Publication
from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.config import HistoryPolicy
from common.protocol import Codec
from edge.hub import Hub
from edge.stats import EdgeStats
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

MAX_FRAME_BYTES = 8_192
MAX_FRAME_MESSAGES = 100


async def publish(publisher: Publisher, channel: str, n: int, batch: int = 500) -> int:
    top = 0
    for i in range(0, n, batch):
        msgs = [UpstreamMessage(channel, {"i": j, "price": 100.25 + j % 7})
                for j in range(i, min(i + batch, n))]
        top = (await publisher.publish_batch(msgs))[-1].offset
    return top


async def epoch_of(redis: Redis, key_prefix: str, channel: str) -> str:
    epoch = await redis.hget(Keys(key_prefix).meta(channel), "epoch")
    assert isinstance(epoch, str)
    return epoch


def after_reply(client: ProtoClient, rid: int) -> tuple[int, list[tuple[int, int, int]]]:
    """The index of the reply to `rid` in the client's messages, and the frames from the
    one holding it on."""
    index = next(i for i, m in enumerate(client.messages)
                 if m.get("id") == rid and m["type"] != "pub")
    frames = [f for f in client.frames if f[0] + f[1] > index]
    return index, frames


@pytest.mark.parametrize("direct_write", [True, False], ids=["direct", "queued"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_replay_is_packed_into_frames_within_the_bounds_reply_first(
    edge_factory: EdgeFactory, publisher: Publisher, redis: Redis, key_prefix: str,
    direct_write: bool,
    binary: bool,
) -> None:
    edge = await edge_factory(direct_write=direct_write, max_frame_bytes=MAX_FRAME_BYTES,
                              max_frame_messages=MAX_FRAME_MESSAGES)
    channel = "trades.PACK"
    top = await publish(publisher, channel, 3_000)
    epoch = await epoch_of(redis, key_prefix, channel)
    client = await ProtoClient.open(edge.url, binary=binary)
    reply = await client.subscribe(channel, recover=(0, epoch))
    assert reply["recovered"] is True and reply["offset"] == top
    await client.wait_for(lambda: len(client.offsets[channel]) == top)
    assert client.offsets[channel] == list(range(1, top + 1))
    index, frames = after_reply(client, reply["id"])
    first, count, _ = frames[0]
    assert first == index, "the reply is the first message of its frame"
    assert count > 1, "the reply shares its frame with the first replayed publications"
    assert client.messages[index + 1]["offset"] == 1
    for _, count, size in frames:
        assert count <= MAX_FRAME_MESSAGES
        # max_frame_bytes bounds the messages; the array adds its brackets and commas
        assert size <= MAX_FRAME_BYTES + count + 2
    # Greedy packing: on average well over half of what a frame may hold.
    per_frame = (top + 1) / len(frames)
    average = sum(size for _, _, size in frames) / (top + 1)
    assert per_frame >= 0.5 * min(MAX_FRAME_MESSAGES, MAX_FRAME_BYTES / average), frames
    await client.close()


@pytest.mark.parametrize("direct_write", [True, False], ids=["direct", "queued"])
async def test_live_messages_during_replays_are_neither_lost_doubled_nor_reordered(
    edge_factory: EdgeFactory, publisher: Publisher, redis: Redis, key_prefix: str,
    direct_write: bool,
) -> None:
    """Replays of thousands of messages while the channel keeps publishing: each client
    gets its reply, then every offset after its position exactly once, in order."""
    edge = await edge_factory(direct_write=direct_write, max_frame_bytes=MAX_FRAME_BYTES,
                              max_frame_messages=MAX_FRAME_MESSAGES, recovery_limit=20_000)
    channel = "account.REPLAY.orders"
    publisher.history["account"] = HistoryPolicy(20_000, 3_600.0)
    await publish(publisher, channel, 4_000)
    epoch = await epoch_of(redis, key_prefix, channel)
    running = asyncio.Event()
    running.set()
    last = 0

    async def keep_publishing() -> None:
        nonlocal last
        i = 0
        while running.is_set():
            results = await publisher.publish_batch(
                [UpstreamMessage(channel, {"live": i + k}) for k in range(20)]
            )
            last = results[-1].offset
            i += 20
            await asyncio.sleep(0)

    task = asyncio.create_task(keep_publishing())
    clients: list[tuple[ProtoClient, int, int]] = []
    try:
        for since in (0, 1_000, 2_500, 3_999):
            client = await ProtoClient.open(edge.url)
            reply = await client.subscribe(channel, recover=(since, epoch))
            assert reply["recovered"] is True, reply
            clients.append((client, since, reply["id"]))
    finally:
        running.clear()
        await task
    def caught_up(c: ProtoClient) -> bool:
        return c.offsets[channel][-1:] == [last]

    for client, since, rid in clients:
        await client.wait_for(partial(caught_up, client), 20)
        assert client.offsets[channel] == list(range(since + 1, last + 1))
        index, _ = after_reply(client, rid)
        assert all(m["type"] != "pub" for m in client.messages[:index])
        await client.close()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "msgpack"])
async def test_history_reply_holds_exactly_from_to_however_far_the_channel_moved_on(
    edge: EdgeServer, publisher: Publisher, redis: Redis, key_prefix: str, binary: bool
) -> None:
    channel = "trades.HIST"
    await publish(publisher, channel, 3_000)
    epoch = await epoch_of(redis, key_prefix, channel)
    client = await ProtoClient.open(edge.url, binary=binary)
    for first, last in ((10, 12), (100, 2_500), (2_990, 3_000)):
        reply = await client.request({"type": "history", "channel": channel, "epoch": epoch,
                                      "from": first, "to": last})
        assert reply["type"] == "history" and reply["epoch"] == epoch, reply
        pubs = reply["publications"]
        assert [p["offset"] for p in pubs] == list(range(first, last + 1))
        assert pubs[0] == {"type": "pub", "channel": channel, "offset": first,
                           "data": {"i": first - 1, "price": 100.25 + (first - 1) % 7}}
    reply = await client.request({"type": "history", "channel": channel, "epoch": epoch,
                                  "from": 2_999, "to": 3_001})
    assert reply["code"] == "history_unavailable"
    await client.close()


# --- the hub's history read, against a real Valkey ---------------------------------------


def make_hub(redis: Redis, key_prefix: str, inline: int) -> Hub:
    broker = RedisBroker(redis, Keys(key_prefix), inline_history=inline)
    return Hub(broker, EdgeStats(), logging.getLogger("t"), node_id="n", recovery_limit=5_000)


def summary(entries: list[Publication]) -> list[tuple[Any, ...]]:
    return [(p.channel, p.epoch, p.offset, p.key, p.data, p.deleted, p.frame(Codec.JSON))
            for p in entries]


async def test_xrange_read_equals_the_scripts_own(
    redis: Redis, publisher: Publisher, key_prefix: str
) -> None:
    channel = "depth.XR"
    msgs = [UpstreamMessage(channel, {"side": "bid", "price": i % 9, "size": i},
                            key=f"bid:{i % 9}", delete=i % 5 == 0) for i in range(1_500)]
    for i in range(0, len(msgs), 500):
        await publisher.publish_batch(msgs[i:i + 500])
    inline, ranged = make_hub(redis, key_prefix, 10_000), make_hub(redis, key_prefix, 0)
    for since, until in ((0, None), (700, None), (1_499, None), (1_500, None), (10, 20),
                         (10, 5_000)):
        a = await inline.read_history(channel, since, "0", "", until)
        b = await ranged.read_history(channel, since, "0", "", until)
        assert a.recoverable and b.recoverable
        assert (a.epoch, a.top, a.first) == (b.epoch, b.top, b.first)
        assert summary(a.entries) == summary(b.entries)
        end = 1_500 if until is None else min(until, 1_500)
        assert [p.offset for p in b.entries] == list(range(since + 1, end + 1))
    assert any(p.deleted for p in b.entries) and any(p.key for p in b.entries)


@pytest.mark.parametrize("change", ["trimmed", "new_epoch"])
async def test_a_channel_changed_between_the_two_reads_is_read_again_at_once(
    redis: Redis, publisher: Publisher, key_prefix: str, change: str
) -> None:
    """history.lua says "recoverable, read them yourself"; before the XRANGE, the stream is
    trimmed past the position (or the channel starts a new epoch). The XRANGE no longer
    matches, so the hub runs the script again with every entry inline, which now says
    "not recoverable" and returns the snapshot."""
    channel = "trades.RACE"
    await publish(publisher, channel, 1_000)
    keys = Keys(key_prefix)
    hub = make_hub(redis, key_prefix, 10)
    epoch = await epoch_of(redis, key_prefix, channel)
    broker = hub.broker
    assert isinstance(broker, RedisBroker)
    script = broker._history
    calls: list[list[Any]] = []

    async def history_then_change(*, keys: list[str], args: list[Any]) -> Any:
        result = await script(keys=keys, args=args)
        calls.append(list(args))
        if len(calls) == 1:
            if change == "trimmed":
                await redis.xtrim(keys[1], minid="900-0")
            else:
                await redis.delete(keys[0], keys[1], keys[2])
                await publisher.publish(UpstreamMessage(channel, {"new": 1}))
        return result

    broker._history = history_then_change  # type: ignore[assignment]
    result = await hub.read_history(channel, 100, "r", epoch)
    assert len(calls) == 2 and calls[1][6] == ""  # the second read: everything inline
    assert not result.recoverable and result.entries == [] and result.snapshot
    if change == "new_epoch":
        assert result.epoch != epoch == calls[0][5]
    assert await redis.exists(keys.stream(channel))
