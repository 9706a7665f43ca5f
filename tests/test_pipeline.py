"""End to end against a real Valkey: publish -> stream -> edge -> client."""

from __future__ import annotations

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.wsclient import ProtoClient

pytestmark = pytest.mark.integration


def quote(i: int) -> dict[str, float]:
    return {"bid": 100.0 + i, "ask": 100.25 + i}


async def test_live_messages_arrive_in_order(edge, publisher: Publisher) -> None:
    client = await ProtoClient.open(edge.url)
    reply = await client.subscribe("quotes.MNQ", snapshot=True)
    assert reply["type"] == "subscribed" and reply["recovered"] is False
    for i in range(50):
        await publisher.publish(UpstreamMessage("quotes.MNQ", quote(i)))
    await client.wait_for(lambda: len(client.offsets["quotes.MNQ"]) == 50)
    assert client.offsets["quotes.MNQ"] == list(range(1, 51))
    await client.close()


async def test_recovery_replays_exactly_the_missed_messages(edge, publisher: Publisher) -> None:
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


async def test_snapshot_merges_quotes_and_keeps_keys(edge, publisher: Publisher) -> None:
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
    edge, redis, key_prefix: str
) -> None:
    from common.config import DEFAULT_HISTORY, HistoryPolicy
    from common.keys import Keys

    history = {**DEFAULT_HISTORY, "bars": HistoryPolicy(5, 600.0)}
    pub = Publisher(redis, Keys(key_prefix), history)
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


async def test_history_trim_by_age(redis, key_prefix: str) -> None:
    from common.config import DEFAULT_HISTORY, HistoryPolicy
    from common.keys import Keys

    keys = Keys(key_prefix)
    pub = Publisher(redis, keys, {**DEFAULT_HISTORY, "trades": HistoryPolicy(1000, 0.2)})
    for i in range(5):
        await pub.publish(UpstreamMessage("trades.RTY", {"p": i}))
    assert await redis.xlen(keys.stream("trades.RTY")) == 5
    await _server_clock_passes(redis, 0.25)
    await pub.publish(UpstreamMessage("trades.RTY", {"p": 5}))
    entries = await redis.xrange(keys.stream("trades.RTY"))
    assert [e[0] for e in entries] == ["6-0"]


async def _server_clock_passes(redis, seconds: float) -> None:
    """Wait until the server's own clock (which the script trims by) has advanced."""
    import asyncio

    def now(t: list[int]) -> float:
        return int(t[0]) + int(t[1]) / 1e6

    start = now(await redis.time())
    async with asyncio.timeout(10):
        while now(await redis.time()) < start + seconds:
            await asyncio.sleep(0.02)
