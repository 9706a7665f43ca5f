"""Request rate limits: an edge closes a flooding client with 3007 while a bystander is
served."""

from __future__ import annotations

import asyncio

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory
from tests.support.wsclient import ProtoClient


@pytest.mark.integration
async def test_flooding_client_is_closed_3007_and_others_are_served(
    edge_factory: EdgeFactory, publisher: Publisher
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
