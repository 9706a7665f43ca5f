"""Request rate limits: the token bucket (pure), and an edge closing a flooding client with
3007 while a bystander is served (integration)."""

from __future__ import annotations

import asyncio

import pytest

from edge.limits import TokenBucket
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.support.wsclient import ProtoClient


def test_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert not bucket.take(0.05)  # half a token
    assert bucket.take(0.1)  # one token after 0.1 s at 10/s
    assert not bucket.take(0.1)
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]  # capped at burst


def test_bucket_rejects_bad_settings_and_a_clock_going_back() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=0, now=0.0)
    bucket = TokenBucket(rate=1, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)  # no tokens from a clock that went back


@pytest.mark.integration
async def test_flooding_client_is_closed_3007_and_others_are_served(
    edge_factory, publisher: Publisher
) -> None:
    edge = await edge_factory(request_rate=20.0, request_burst=50)
    bystander = await ProtoClient.open(edge.url)
    await bystander.subscribe("trades.LIM")
    flooder = await ProtoClient.open(edge.url)  # connect: 1 request
    for i in range(100):
        await flooder.send({"type": "ping", "id": 1000 + i})
    code, reason = await asyncio.wait_for(flooder.closed, 5)
    assert code == 3007 and reason == "too many requests retry_after_ms=5000"
    # The burst (plus what the rate refilled meanwhile) was answered before the close.
    assert 50 <= sum(m.get("type") == "pong" for m in flooder.messages) < 60
    r = await publisher.publish(UpstreamMessage("trades.LIM", {"p": 1}))
    await bystander.wait_for(lambda: bystander.offsets["trades.LIM"] == [r.offset], 5)
    polite = await ProtoClient.open(edge.url)  # within the rate: never closed
    for _ in range(10):
        assert (await polite.request({"type": "ping"}))["type"] == "pong"
        await asyncio.sleep(0.06)
    assert not polite.closed.done()
    for c in (bystander, flooder, polite):
        await c.close()
