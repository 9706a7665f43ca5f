"""Bad input gets a documented error reply or close code, and nobody else notices."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgpack
import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


@pytest.fixture
async def bystander(edge: EdgeServer, publisher: Publisher) -> AsyncIterator[ProtoClient]:
    """A client reading quotes.ES throughout; must see every message."""
    client = await ProtoClient.open(edge.url)
    await client.subscribe("quotes.ES")
    yield client
    await client.close()


async def check_bystander(client: ProtoClient, publisher: Publisher) -> None:
    before = len(client.offsets["quotes.ES"])
    for i in range(5):
        await publisher.publish(UpstreamMessage("quotes.ES", {"bid": i}))
    await client.wait_for(lambda: len(client.offsets["quotes.ES"]) == before + 5)
    offsets = client.offsets["quotes.ES"]
    assert offsets == list(range(offsets[0], offsets[0] + len(offsets)))
    assert not client.closed.done()


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"type": "bogus"}, "unknown_type"),
        ({"type": "subscribe", "channel": "nope"}, "bad_channel"),
        ({"type": "subscribe", "channel": "quotes.A B"}, "bad_channel"),
        ({"type": "subscribe", "channel": "account.1.secrets"}, "bad_channel"),
        ({"type": "subscribe", "channel": 5}, "bad_channel"),
        ({"type": "subscribe", "channel": "quotes.ES", "recover": {"offset": -1}}, "bad_request"),
        ({"type": "unsubscribe", "channel": "quotes.NQ"}, "not_subscribed"),
        ({"type": "connect"}, "bad_request"),
    ],
)
async def test_request_errors_keep_the_connection(
    edge: EdgeServer, publisher: Publisher, bystander: ProtoClient, request_: dict[str, Any],
    code: str,
) -> None:
    client = await ProtoClient.open(edge.url)
    reply = await client.request(request_)
    assert reply["type"] == "error" and reply["code"] == code, reply
    assert isinstance(reply["message"], str) and "Traceback" not in reply["message"]
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await check_bystander(bystander, publisher)
    await client.close()


async def test_subscribe_twice(
    edge: EdgeServer, publisher: Publisher, bystander: ProtoClient,
) -> None:
    client = await ProtoClient.open(edge.url)
    assert (await client.subscribe("trades.ES"))["type"] == "subscribed"
    reply = await client.subscribe("trades.ES")
    assert reply["code"] == "already_subscribed"
    assert (await client.request({"type": "unsubscribe", "channel": "trades.ES"}))[
        "type"
    ] == "unsubscribed"
    assert (await client.subscribe("trades.ES"))["type"] == "subscribed"
    await client.close()


@pytest.mark.parametrize(
    "frame",
    ["{not json", "[1, 2]", '"hello"', "null", b"\xff\xfe binary garbage"],
)
async def test_malformed_frames_close_with_3500(
    edge: EdgeServer, publisher: Publisher, bystander: ProtoClient, frame: str | bytes
) -> None:
    client = await ProtoClient.open(edge.url)
    await client.ws.send(frame)
    code, reason = await asyncio.wait_for(client.closed, 5)
    assert code == 3500 and reason
    await check_bystander(bystander, publisher)


async def test_oversized_frame_closes_with_1009(
    edge: EdgeServer, publisher: Publisher, bystander: ProtoClient
) -> None:
    client = await ProtoClient.open(edge.url)
    await client.ws.send(json.dumps({"type": "ping", "pad": "x" * 70_000}))
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 1009
    await check_bystander(bystander, publisher)


async def test_first_frame_must_be_connect(edge: EdgeServer) -> None:
    client = await ProtoClient.open(edge.url, connect=False)
    await client.send({"type": "subscribe", "channel": "quotes.ES", "id": 1})
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3500


async def test_connect_timeout(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(connect_timeout=0.3)
    client = await ProtoClient.open(edge.url, connect=False)
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3005


async def test_no_pong_closes_within_interval_plus_timeout(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(ping_interval=0.4, pong_timeout=0.3)
    client = await ProtoClient.open(edge.url)
    client.answer_pings = False
    loop = asyncio.get_running_loop()
    started = loop.time()
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3003
    assert loop.time() - started <= 0.4 + 0.3 + 0.5
    # A client that answers stays connected across several pings.
    ok = await ProtoClient.open(edge.url)
    await ok.wait_for(lambda: sum(m["type"] == "ping" for m in ok.messages) >= 3, 5)
    assert not ok.closed.done()
    await ok.close()


async def test_msgpack_subprotocol(edge: EdgeServer, publisher: Publisher) -> None:
    client = await ProtoClient.open(edge.url, binary=True)
    assert client.ws.subprotocol == "fanout.msgpack"
    reply = await client.subscribe("trades.MNQ")
    assert reply["type"] == "subscribed"
    await publisher.publish(UpstreamMessage("trades.MNQ", {"price": 1.25, "side": "buy"}))
    await client.wait_for(lambda: client.offsets["trades.MNQ"] == [1])
    pub = next(m for m in client.messages if m["type"] == "pub")
    assert pub["data"] == {"price": 1.25, "side": "buy"}
    await client.ws.send(b"\xc1")  # never-used msgpack byte
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3500
    assert msgpack  # the client decoded binary frames with msgpack


async def test_health_ready_and_metrics(edge: EdgeServer, publisher: Publisher) -> None:
    client = await ProtoClient.open(edge.url)
    await client.subscribe("quotes.M2K")
    await publisher.publish(UpstreamMessage("quotes.M2K", {"bid": 1}))
    await client.wait_for(lambda: client.offsets["quotes.M2K"] == [1])
    async with httpx.AsyncClient(base_url=edge.http, timeout=5) as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["pubsub"] is True
        text = (await http.get("/metrics")).text
        index = await http.get("/")
        assert index.status_code == 200 and "<html" in index.text.lower()
    assert "fanout_edge_connections 1.0" in text
    assert "fanout_edge_subscriptions 1.0" in text
    assert 'fanout_edge_subscribes_total{outcome="fresh"} 1.0' in text
    assert "fanout_edge_messages_sent_total" in text
    assert "quotes.M2K" not in text  # no channel names as labels
    await client.close()


async def test_a_burst_of_subscribes_waits_for_redis_connections_instead_of_failing(
    edge: EdgeServer,
) -> None:
    """300 subscribes at once (a reconnect storm, or watchlists subscribing together): each
    reads history from Redis; more than the connection pool holds must wait their turn,
    not fail with `unavailable`."""
    client = await ProtoClient.open(edge.url)
    replies = await asyncio.gather(*(
        client.request({"type": "subscribe", "channel": f"trades.BURST{i}"}, timeout=30)
        for i in range(300)
    ))
    failed = [r for r in replies if r["type"] != "subscribed"]
    assert failed == []
    await client.close()
