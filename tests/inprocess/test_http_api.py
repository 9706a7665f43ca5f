"""The HTTP publish API in process (httpx over ASGI) with a publisher that stalls or fails:
503 and a bare 500 without internals, JSON errors for unknown paths; the key ring, the
limits and the OpenAPI document. Its helpers serve tests/integration/test_http_api.py too."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

from common.channels import parse_channel
from common.errors import BadChannel
from ingest.http_api import (
    CHANNEL_PATTERN,
    KeyRing,
    create_api_app,
    openapi_document,
)
from ingest.publisher import PublishResult
from ingest.upstream import UpstreamMessage

KEY = "test-key-0123456789abcdef"
OTHER_KEY = "second-key-fedcba9876543210"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 4096
MAX_BATCH = 10
TIMEOUT = 10.0  # s for any one request


def make_app(publisher: Any, *, publish_timeout: float = 5.0) -> Any:
    return create_api_app(
        publisher, [KEY, OTHER_KEY], max_body=MAX_BODY, max_batch=MAX_BATCH,
        publish_timeout=publish_timeout, logger=logging.getLogger("test.api"),
    )


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api.test", timeout=TIMEOUT
    )


async def post(
    client: httpx.AsyncClient, path: str, body: Any = None, *,
    headers: dict[str, str] | None = None, content: Any = None,
) -> httpx.Response:
    """POST with the test key (unless `headers` say otherwise), under a deadline."""
    hdrs = dict(AUTH if headers is None else headers)
    async with asyncio.timeout(TIMEOUT):
        if content is None:
            hdrs.setdefault("Content-Type", "application/json")
            content = json.dumps(body).encode()
        return await client.post(path, content=content, headers=hdrs)


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    return error


def test_key_ring() -> None:
    ring = KeyRing(["a-key", "b-key"])
    assert ring.match("a-key") == 1 and ring.match("b-key") == 2
    assert ring.match("c-key") is None and ring.match("") is None
    assert "a-key" not in repr(ring)
    with pytest.raises(ValueError):
        KeyRing([])
    with pytest.raises(ValueError):
        KeyRing(["ok", " padded"])
    with pytest.raises(TypeError):
        KeyRing("one-string")


class StallingPublisher:
    async def publish_batch(self, messages: Sequence[UpstreamMessage]) -> list[PublishResult]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class BrokenPublisher:
    async def publish_batch(self, messages: Sequence[UpstreamMessage]) -> list[PublishResult]:
        raise RuntimeError("secret internal detail")


async def test_a_stalled_store_is_503() -> None:
    async with client_for(make_app(StallingPublisher(), publish_timeout=0.05)) as client:
        r = await post(client, "/api/publish", {"channel": "trades.ES", "data": 1})
    error_of(r, 503, "unavailable")


async def test_an_unexpected_error_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    async with client_for(make_app(BrokenPublisher())) as client:
        r = await post(client, "/api/publish", {"channel": "trades.ES", "data": 1})
    error = error_of(r, 500, "internal")
    assert "secret" not in r.text and error["message"] == "internal server error"
    assert "secret internal detail" in caplog.text  # the stack trace went to the log


async def test_unknown_path_and_method_are_json_errors() -> None:
    async with client_for(make_app(BrokenPublisher())) as client, asyncio.timeout(TIMEOUT):
        error_of(await client.get("/api/nothing"), 404, "not_found")
        error_of(await client.get("/api/publish", headers=AUTH), 405, "method_not_allowed")
        health = await client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}


def test_limits_are_checked() -> None:
    log = logging.getLogger("test.api")
    with pytest.raises(ValueError):
        create_api_app(BrokenPublisher(), [], logger=log)
    with pytest.raises(ValueError):
        create_api_app(BrokenPublisher(), [KEY], max_batch=0, logger=log)
    with pytest.raises(ValueError):
        create_api_app(BrokenPublisher(), [KEY], max_body=10, logger=log)


# --- the OpenAPI document ------------------------------------------------------------------


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _resolve(doc: dict[str, Any], ref: str) -> object:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        assert isinstance(node, dict) and part in node, f"unresolved {ref}"
        node = node[part]
    return node


async def test_openapi_document_describes_the_routes() -> None:
    app = make_app(BrokenPublisher())
    async with client_for(app) as client, asyncio.timeout(TIMEOUT):
        r = await client.get("/api/openapi.json")  # no key needed
    assert r.status_code == 200
    doc = r.json()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    routes = {(route.path, method.lower()) for route in app.routes
              for method in (route.methods or ()) if method != "HEAD"}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert documented == routes
    refs = _refs(doc)
    assert refs and all(_resolve(doc, ref) for ref in refs)
    # Every schema is used, and every security requirement names a scheme that exists.
    used = {ref.rsplit("/", 1)[1] for ref in refs}
    assert used == set(doc["components"]["schemas"])
    schemes = doc["components"]["securitySchemes"]
    for item in doc["paths"].values():
        for op in item.values():
            assert set(op["responses"]) >= {"200"}
            assert op["operationId"]
            for requirement in op.get("security", []):
                assert set(requirement) <= set(schemes)
    publish = doc["paths"]["/api/publish"]["post"]
    assert {"200", "400", "401", "413", "415", "503"} <= set(publish["responses"])
    batch = doc["components"]["schemas"]["BatchRequest"]["properties"]["messages"]
    assert batch["maxItems"] == MAX_BATCH
    assert set(doc["components"]["schemas"]["Message"]["properties"]) == {
        "channel", "data", "key", "id", "delete", "if_changed"
    }
    result = doc["components"]["schemas"]["PublishResult"]
    assert set(result["required"]) == set(result["properties"]) == {
        "channel", "offset", "epoch", "duplicate", "unchanged"
    }
    codes = doc["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert {"bad_channel", "unauthorized", "body_too_large", "unavailable"} <= set(codes["enum"])


@pytest.mark.parametrize(
    "name",
    ["quotes.MNQ", "trades.CON.F.US.MNQ.Z25", "depth.ES:X-1_2", "bars.1m.ES", "bars.1234d.A",
     "account.42.orders", "account.a_b-c.balance", "account.1.positions", "account.1.trades",
     "quotes.", "quotes..MNQ", "quotes.MNQ.", "bars.12345s.ES", "bars.1w.ES", "bars.1m",
     "account.42", "account.4.2.orders", "account.42.wallet", "orders.MNQ", "quotes",
     "", "quotes.MN Q", "QUOTES.MNQ", "quotes.MNQ\n"],
)
def test_openapi_channel_pattern_agrees_with_the_grammar(name: str) -> None:
    try:
        parse_channel(name)
        valid = True
    except BadChannel:
        valid = False
    # JSON Schema patterns are searched, ECMA-262 style: its $ is Python's \Z.
    assert CHANNEL_PATTERN.endswith("$")
    assert bool(re.search(CHANNEL_PATTERN[:-1] + r"\Z", name)) == valid
    assert openapi_document(MAX_BODY, MAX_BATCH)["components"]["schemas"]["Message"][
        "properties"]["channel"]["pattern"] == CHANNEL_PATTERN
