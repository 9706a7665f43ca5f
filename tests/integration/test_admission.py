"""Admission before the upgrade against an in-process edge on loopback: origins (403),
connection limits in total and per client address (503 + Retry-After), X-Forwarded-For from
trusted proxies only, and the handshake deadline (the pure parts: tests/unit/test_admission.py).
The 1,000-connection floods against a real edge process are tests/integration/test_flood.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from edge.admission import RETRY_AFTER
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory
from tests.support.httpwait import metric
from tests.support.wsclient import ProtoClient, http_upgrade, upgrade_request

# --- an edge on loopback -------------------------------------------------------------------

integration = pytest.mark.integration


async def refused(url: str, **kwargs: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        await ProtoClient.open(url, **kwargs)  # type: ignore[arg-type]
    return info.value


def refusals(reason: str) -> str:
    return f'fanout_edge_connections_refused_total{{reason="{reason}"}}'


@integration
async def test_a_foreign_origin_gets_403_before_the_upgrade(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",
                                               "https://*.example.com"))
    answer = await http_upgrade("127.0.0.1", edge.port, headers=[("Origin", "http://evil.example")])
    assert answer.status == 403
    assert await answer.body() == b"origin not allowed\n"
    info = await refused(edge.url, origin="http://evil.example")
    assert info.response.status_code == 403
    stats = edge.edge.stats
    assert stats.connections_total == 0 and stats.subscriptions == 0  # nothing reached a session
    assert edge.edge.admission.limiter.total == 0
    assert await metric(edge.http, refusals("origin")) == 2

    for origin in ("https://app.example.com", "https://eu.app.example.com", None):
        client = await ProtoClient.open(edge.url, origin=origin)
        assert (await client.subscribe("quotes.ORIGIN"))["type"] == "subscribed"
        await client.close()
    assert stats.connections_total == 3
    assert await metric(edge.http, refusals("origin")) == 2


@integration
async def test_without_origin_refused_when_not_allowed(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",),
                              allow_no_origin=False)
    assert (await refused(edge.url)).response.status_code == 403
    client = await ProtoClient.open(edge.url, origin="https://app.example.com")
    await client.close()
    assert edge.edge.stats.refused["origin"] == 1


@integration
async def test_unset_allows_any_origin_with_a_warning(
    edge_factory: EdgeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "fanout.edge"):
        edge = await edge_factory()
    assert any("FANOUT_ALLOWED_ORIGINS" in r.getMessage() for r in caplog.records)
    client = await ProtoClient.open(edge.url, origin="http://evil.example")
    await client.close()


@integration
async def test_total_limit_answers_503_with_retry_after_and_frees_up(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    edge = await edge_factory(max_connections=3)
    clients = [await ProtoClient.open(edge.url) for _ in range(3)]
    answers = [await http_upgrade("127.0.0.1", edge.port) for _ in range(5)]
    assert {a.status for a in answers} == {503}
    assert all(RETRY_AFTER <= int(a.headers["retry-after"]) <= 2 * RETRY_AFTER for a in answers)
    assert await answers[0].body() == b"server full\n"
    assert (await refused(edge.url)).response.headers["Retry-After"].isdigit()
    await clients.pop().close()
    async with asyncio.timeout(5):
        while edge.edge.admission.limiter.total != 2:
            await asyncio.sleep(0.01)
    newcomer = await ProtoClient.open(edge.url)
    assert (await newcomer.subscribe("quotes.FULL"))["type"] == "subscribed"
    await publisher.publish(UpstreamMessage("quotes.FULL", {"bid": 1}))
    await newcomer.wait_for(lambda: newcomer.offsets["quotes.FULL"] == [1])
    assert await metric(edge.http, refusals("total_limit")) == 6
    assert await metric(edge.http, "fanout_edge_connections") == 3
    for c in [*clients, newcomer]:
        await c.close()
    for a in answers:
        await a.close()


@integration
async def test_forwarded_for_counts_only_from_trusted_proxies(edge_factory: EdgeFactory) -> None:
    """127.0.0.1 plays the load balancer; 127.0.0.2 is a client that sends the header
    itself. Linux routes all of 127.0.0.0/8 to loopback."""
    edge = await edge_factory(trusted_proxies=("127.0.0.1/32",), max_connections_per_ip=2)

    def xff(value: str) -> dict[str, Any]:
        return {"additional_headers": {"X-Forwarded-For": value}}

    held = [await ProtoClient.open(edge.url, **xff("203.0.113.7")) for _ in range(2)]
    assert (await refused(edge.url, **xff("203.0.113.7"))).response.status_code == 503
    held.append(await ProtoClient.open(edge.url, **xff("203.0.113.8")))
    held.append(await ProtoClient.open(edge.url, **xff("198.51.100.1, 203.0.113.9")))
    # From an untrusted peer the header is ignored: counted as the peer itself.
    spoofer: dict[str, Any] = {"local_addr": ("127.0.0.2", 0)}
    held += [await ProtoClient.open(edge.url, **xff("203.0.113.7"), **spoofer)
             for _ in range(2)]
    assert (await refused(edge.url, **xff("203.0.113.50"), **spoofer)).response.status_code == 503
    held.append(await ProtoClient.open(edge.url))  # the proxy's own (no header)
    assert edge.edge.admission.limiter.by_key == {
        "203.0.113.7": 2, "203.0.113.8": 1, "203.0.113.9": 1, "127.0.0.2": 2, "127.0.0.1": 1,
    }
    assert edge.edge.stats.refused["ip_limit"] == 2
    for c in held:
        await c.close()


@integration
async def test_slots_are_given_back_on_every_path(
    edge_factory: EdgeFactory, publisher: Publisher,
) -> None:
    """Many connections at once, ending every way there is; afterwards nothing is counted."""
    edge = await edge_factory(max_connections_per_ip=1000, connect_timeout=0.5)
    limiter = edge.edge.admission.limiter
    loop = asyncio.get_running_loop()

    async def normal() -> None:
        c = await ProtoClient.open(edge.url)
        await c.subscribe("quotes.PATHS")
        await c.close()

    async def server_closes() -> None:  # 3500: a bad frame
        c = await ProtoClient.open(edge.url)
        await c.ws.send("{not json")
        assert (await asyncio.wait_for(c.closed, 5))[0] == 3500

    async def connect_timeout() -> None:  # 3005
        c = await ProtoClient.open(edge.url, connect=False)
        assert (await asyncio.wait_for(c.closed, 5))[0] == 3005

    async def vanishes() -> None:  # TCP gone without a close frame
        c = await ProtoClient.open(edge.url)
        await c.subscribe("quotes.PATHS")
        c.ws.transport.abort()
        await c.close()

    async def abandons_handshake() -> None:  # the request, then gone before the answer
        _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(upgrade_request(f"127.0.0.1:{edge.port}"))
        await writer.drain()
        writer.transport.abort()

    async def library_refuses() -> None:  # admitted, then websockets refuses the request
        request = upgrade_request(f"127.0.0.1:{edge.port}").replace(
            b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request)
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 400")
        writer.close()

    kinds = [normal, server_closes, connect_timeout, vanishes, abandons_handshake,
             library_refuses]
    await asyncio.gather(*(kind() for kind in kinds for _ in range(30)))
    drained = [await ProtoClient.open(edge.url) for _ in range(20)]
    await edge.edge.drain(0.2)  # closes them (3000), then refuses newcomers the same way
    late = await ProtoClient.open(edge.url, connect=False)
    codes = await asyncio.gather(*(asyncio.wait_for(c.closed, 5) for c in [*drained, late]))
    assert {code for code, _ in codes} == {3000}
    deadline = loop.time() + 10
    while (limiter.total, limiter.by_key, edge.edge.stats.connections) != (0, {}, 0):
        assert loop.time() < deadline, (limiter.total, limiter.by_key)
        await asyncio.sleep(0.02)
    for c in [*drained, late]:
        await c.close()


@integration
async def test_other_paths_are_not_counted_and_direct_writes_still_work(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",),
                              max_connections=1)
    other = await http_upgrade("127.0.0.1", edge.port, path="/elsewhere",
                               headers=[("Origin", "http://evil.example")])
    assert other.status == 403  # Starlette's answer: no route; not an admission refusal
    assert edge.edge.stats.refused["origin"] == 0 and edge.edge.admission.limiter.total == 0
    await other.close()
    client = await ProtoClient.open(edge.url)
    await client.subscribe("quotes.DIRECT")
    await publisher.publish(UpstreamMessage("quotes.DIRECT", {"bid": 1}))
    await client.wait_for(lambda: client.offsets["quotes.DIRECT"] == [1])
    assert edge.edge.stats.frames_direct > 0  # edge/wire.py still knows the protocol
    await client.close()


# --- the handshake deadline ---------------------------------------------------------------


async def closed_after(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """What the server sent until it closed the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


@integration
async def test_a_connection_without_a_whole_request_is_closed_at_the_deadline(
    edge_factory: EdgeFactory,
) -> None:
    edge = await edge_factory(handshake_timeout=0.5)
    loop = asyncio.get_running_loop()
    ok = await ProtoClient.open(edge.url)  # a WebSocket outlives the deadline
    started = loop.time()
    silent = await asyncio.open_connection("127.0.0.1", edge.port)
    partial = await asyncio.open_connection("127.0.0.1", edge.port)
    partial[1].write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    # A kept-alive HTTP connection: one whole request, then half of the next.
    kept = await asyncio.open_connection("127.0.0.1", edge.port)
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await kept[0].readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHo")
    results = await asyncio.gather(*(closed_after(r) for r, _ in (silent, partial, kept)))
    elapsed = loop.time() - started
    assert results[:2] == [b"", b""]  # no answer, just closed
    assert 0.5 <= elapsed < 3.0, elapsed
    assert (await ok.request({"type": "ping"}))["type"] == "pong"
    assert edge.edge.stats.refused["handshake_timeout"] == 3
    for _, w in (silent, partial, kept):
        w.close()
    await ok.close()


@integration
async def test_a_slow_but_timely_handshake_is_served(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory(handshake_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    request = upgrade_request(f"127.0.0.1:{edge.port}")
    writer.write(request[:20])
    await asyncio.sleep(0.3)  # the point of the test: a pause inside the request
    writer.write(request[20:])
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    writer.close()
    assert edge.edge.stats.refused["handshake_timeout"] == 0


@integration
async def test_websockets_client_sees_refusals_as_invalid_status(edge_factory: EdgeFactory) -> None:
    """What a non-browser client library gets: the status and Retry-After."""
    edge = await edge_factory(max_connections=1)
    async with websockets.connect(edge.url) as first:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(edge.url):
                pass
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= RETRY_AFTER
        assert first.state is websockets.protocol.State.OPEN
