"""Token keys from a JWKS URL over HTTP: the fetch itself, then an edge against a JWKS served
on loopback whose keys the test rotates."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from common.auth import PrivateKey
from edge.tokens import fetch_url
from tests.support.httpwait import wait_http_ok
from tests.support.jwtkeys import JwksServer, jwks_document
from tests.support.wsclient import ProtoClient
from tests.unit.test_jwks import tok

# --- the HTTP fetch --------------------------------------------------------------------------


@pytest.fixture
async def jwks_server(keys: dict[str, PrivateKey]) -> AsyncIterator[JwksServer]:
    server = await JwksServer(jwks_document(keys, rsa="r1", p256="e1")).start()
    yield server
    await server.stop()


async def test_fetch_reads_the_body_and_max_age_and_follows_no_redirect(
    jwks_server: JwksServer
) -> None:
    jwks_server.cache_control = "public, max-age=120"
    fetched = await fetch_url(jwks_server.url, 5.0)
    assert json.loads(fetched.body) == jwks_server.document and fetched.max_age == 120
    jwks_server.status = 302
    with pytest.raises(OSError, match="302"):
        await fetch_url(jwks_server.url, 5.0)
    jwks_server.status = 503
    with pytest.raises(OSError, match="503"):
        await fetch_url(jwks_server.url, 5.0)


async def test_a_stalled_fetch_times_out_while_the_loop_runs_on(
    jwks_server: JwksServer
) -> None:
    jwks_server.stall = True
    fetch = asyncio.create_task(fetch_url(jwks_server.url, 1.0))
    # The server, in this same event loop, gets the request while the fetch is pending:
    # the loop is not blocked by it.
    await asyncio.wait_for(jwks_server.received.wait(), 5)
    assert not fetch.done()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await fetch
    assert time.monotonic() - started < 5


# --- an edge with a JWKS URL -----------------------------------------------------------------


async def _connect(edge: Any, token: str) -> tuple[ProtoClient, dict[str, Any] | None]:
    client = await ProtoClient.open(edge.url, connect=False)
    await client.send({"type": "connect", "id": 1, "token": token})

    def reply() -> dict[str, Any] | None:
        return next((m for m in client.messages if m.get("type") == "connected"), None)

    await client.wait_for(lambda: client.closed.done() or reply() is not None, 10)
    return client, reply()


async def _accepted(edge: Any, token: str) -> bool:
    client, reply = await _connect(edge, token)
    if reply is None:
        assert await asyncio.wait_for(client.closed, 5) == (3501, "invalid token")
    await client.close()
    return reply is not None


async def _metrics(edge: Any) -> str:
    async with httpx.AsyncClient(base_url=edge.http, timeout=5) as http:
        return (await http.get("/metrics")).text


@pytest.mark.integration
async def test_edge_follows_a_rotating_jwks(
    edge_factory: Any, jwks_server: JwksServer, keys: dict[str, PrivateKey]
) -> None:
    edge = await edge_factory(auth_jwks_url=jwks_server.url, auth_jwks_min_interval=60.0,
                              auth_jwks_refresh=3600.0)
    async with httpx.AsyncClient(base_url=edge.http, timeout=5) as http:
        await wait_http_ok(http, "/readyz")  # ready once the start-up fetch is in
        assert (await http.get("/readyz")).json()["auth"] is True
    assert jwks_server.hits == 1
    assert await _accepted(edge, tok(keys, "rsa", "r1", "RS256"))
    assert await _accepted(edge, tok(keys, "p256", "e1", "ES256"))
    assert not await _accepted(edge, tok(keys, "rsa2", "r1", "RS256"))  # r1's kid, not key
    assert jwks_server.hits == 1

    # Rotation: r1 out, r2 in. Five clients with r2 tokens at once: one refetch, all in.
    jwks_server.document = jwks_document(keys, p256="e1", rsa2="r2")
    accepted = await asyncio.gather(*(
        _accepted(edge, tok(keys, "rsa2", "r2", "RS256", n=i)) for i in range(5)))
    assert accepted == [True] * 5 and jwks_server.hits == 2
    # The rotated-out kid is refused, and so is a made-up one: no refetch for either
    # within the min interval, however many come.
    assert not await _accepted(edge, tok(keys, "rsa", "r1", "RS256"))
    for i in range(5):
        assert not await _accepted(edge, tok(keys, "rsa", f"made-up-{i}", "RS256"))
    assert jwks_server.hits == 2
    assert await _accepted(edge, tok(keys, "p256", "e1", "ES256"))
    text = await _metrics(edge)
    assert 'fanout_edge_jwks_fetches_total{result="ok"} 2.0' in text
    assert "fanout_edge_jwks_keys 2.0" in text and "r2" not in text  # no kids as labels


@pytest.mark.integration
async def test_edge_without_its_jwks_is_not_ready_and_sends_clients_back(
    edge_factory: Any, jwks_server: JwksServer, keys: dict[str, PrivateKey]
) -> None:
    jwks_server.status = 503
    edge = await edge_factory(auth_jwks_url=jwks_server.url, auth_jwks_min_interval=1.0)
    async with httpx.AsyncClient(base_url=edge.http, timeout=5) as http:
        async with asyncio.timeout(10):
            while jwks_server.hits < 1:
                await jwks_server.received.wait()
                jwks_server.received.clear()
        ready = await http.get("/readyz")
        assert ready.status_code == 503 and ready.json()["auth"] is False
        # A client that gets here anyway is told to come back (3004), not that its token
        # is bad (3501: it would never reconnect).
        client, reply = await _connect(edge, tok(keys, "rsa", "r1", "RS256"))
        assert reply is None
        assert await asyncio.wait_for(client.closed, 5) == (3004, "authentication unavailable")
        await client.close()
        jwks_server.status = 200  # the identity provider is back: retried within 1 s
        await wait_http_ok(http, "/readyz")
    assert await _accepted(edge, tok(keys, "rsa", "r1", "RS256"))
    text = await _metrics(edge)
    assert 'fanout_edge_jwks_fetches_total{result="error"}' in text
    assert 'fanout_edge_disconnects_total{reason="server_error"} 1.0' in text
