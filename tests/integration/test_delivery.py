"""Delivery options a client chooses: max_rate; and what the reply says it gets."""

from __future__ import annotations

import asyncio
import time

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


async def test_max_rate_limits_frames_and_keeps_the_latest_value(
    edge: EdgeServer, publisher: Publisher
) -> None:
    client = await ProtoClient.open(edge.url)
    reply = await client.subscribe("quotes.MES", snapshot=True)
    assert reply["delivery"] == "conflate"
    slow = await ProtoClient.open(edge.url)
    await slow.request({"type": "subscribe", "channel": "quotes.MES", "max_rate": 5})
    expected: dict[str, int] = {}
    started = time.monotonic()
    last = 0
    for i in range(120):  # ~1.2 s at 100 updates/s, partial updates
        update = {"bid": i} if i % 2 else {"ask": i}
        expected.update(update)
        last = (await publisher.publish(UpstreamMessage("quotes.MES", update))).offset
        await asyncio.sleep(0.01)
    elapsed = time.monotonic() - started
    await slow.wait_for(lambda: slow.offsets.get("quotes.MES", [0])[-1:] == [last], 5)
    await client.wait_for(lambda: len(client.offsets["quotes.MES"]) == 120)
    pubs = [m for m in slow.messages if m.get("type") == "pub"]
    # At most 5 per second (plus the first, sent at once), offsets increasing.
    assert len(pubs) <= 5 * elapsed + 2
    assert [p["offset"] for p in pubs] == sorted({p["offset"] for p in pubs})
    state: dict[str, int] = {}
    for p in pubs:
        state.update(p["data"])
    assert state == expected  # merged partial updates: nothing of the latest state is lost
    await client.close()
    await slow.close()


@pytest.mark.parametrize(
    ("channel", "delivery"),
    [("quotes.X", "conflate"), ("depth.X", "conflate"), ("trades.X", "drop"),
     ("bars.1m.X", "drop"), ("account.1.orders", "all")],
)
async def test_reply_says_the_delivery(edge: EdgeServer, channel: str, delivery: str) -> None:
    client = await ProtoClient.open(edge.url)
    assert (await client.subscribe(channel))["delivery"] == delivery
    await client.close()


async def test_bad_max_rate(edge: EdgeServer) -> None:
    client = await ProtoClient.open(edge.url)
    for bad in (0, -1, 1001, "5", True):
        reply = await client.request({"type": "subscribe", "channel": "quotes.X", "max_rate": bad})
        assert reply["code"] == "bad_request"
    await client.close()
