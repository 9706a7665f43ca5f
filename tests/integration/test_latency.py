"""End-to-end latency and client lag: the upstream receive time travels through publish.lua
to the edges, which observe delivery latency per namespace; ping round trips say how far
behind clients are. Read from the real /metrics."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory
from tests.support.wsclient import ProtoClient


def samples(text: str, name: str) -> dict[str, float]:
    """`name{labels} value` lines -> {labels: value}."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, _, value = line[len(name):].rpartition(" ")
            out[labels] = float(value)
    return out


@pytest.mark.integration
async def test_delivery_latency_counts_from_the_upstream_receive_time(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    edge = await edge_factory(ping_interval=0.2, pong_timeout=5.0)
    client = await ProtoClient.open(edge.url)
    await client.subscribe("trades.LAT")
    # Received from the upstream 300 ms ago: every one of them is at least that late.
    received = time.time() - 0.3
    results = await publisher.publish_batch(
        [UpstreamMessage("trades.LAT", {"i": i}, received_at=received) for i in range(50)])
    last = results[-1].offset
    await client.wait_for(lambda: client.offsets["trades.LAT"][-1:] == [last], 10)

    async with httpx.AsyncClient(timeout=5) as http:
        async with asyncio.timeout(10):  # until a ping has had its pong
            while True:
                text = (await http.get(f"{edge.http}/metrics")).text
                if samples(text, "fanout_edge_client_lag_seconds_count").get("", 0) >= 1:
                    break
                await asyncio.sleep(0.05)
    buckets = samples(text, "fanout_edge_delivery_latency_seconds_bucket")
    assert buckets['{le="0.25",namespace="trades"}'] == 0  # none earlier than it was received
    assert buckets['{le="+Inf",namespace="trades"}'] == 50  # each live message, once
    total = samples(text, "fanout_edge_delivery_latency_seconds_sum")['{namespace="trades"}']
    assert total >= 50 * 0.3
    await client.close()
