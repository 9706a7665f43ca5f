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
