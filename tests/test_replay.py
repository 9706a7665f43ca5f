"""Recovery replays: packed into frames within the frame bounds like live traffic, the
reply first, never reordered against live messages."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from common.config import HistoryPolicy
from common.keys import Keys
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.wsclient import ProtoClient

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
    edge_factory, publisher: Publisher, redis: Redis, key_prefix: str, direct_write: bool,
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
    edge_factory, publisher: Publisher, redis: Redis, key_prefix: str, direct_write: bool
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
    for client, since, rid in clients:
        await client.wait_for(lambda c=client: c.offsets[channel][-1:] == [last], 20)
        assert client.offsets[channel] == list(range(since + 1, last + 1))
        index, _ = after_reply(client, rid)
        assert all(m["type"] != "pub" for m in client.messages[:index])
        await client.close()
