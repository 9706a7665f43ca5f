"""The HTTP publish API in process (httpx over ASGI) against a real Valkey: offsets and
epochs come back, retries with an id are idempotent, and every kind of bad request is a
4xx that publishes nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from ingest.publisher import Publisher
from tests.inprocess.test_http_api import (
    AUTH,
    KEY,
    MAX_BATCH,
    MAX_BODY,
    OTHER_KEY,
    client_for,
    error_of,
    make_app,
    post,
)

integration = pytest.mark.integration


@pytest.fixture
async def api(publisher: Publisher) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(make_app(publisher)) as client:
        yield client


async def stream_len(redis: Redis, key_prefix: str, channel: str) -> int:
    return int(await redis.xlen(Keys(key_prefix).stream(channel)))


async def channel_exists(redis: Redis, key_prefix: str, channel: str) -> bool:
    keys = Keys(key_prefix)
    return bool(await redis.exists(keys.meta(channel), keys.stream(channel)))


# --- happy paths ---------------------------------------------------------------------------


@integration
async def test_publish_one_returns_offset_and_epoch_and_is_idempotent(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    fill = {"channel": "account.42.orders", "data": {"order": "o1", "status": "filled"},
            "key": "o1", "id": "fill-1"}
    first = await post(api, "/api/publish", fill)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body == {"channel": "account.42.orders", "offset": 1, "epoch": body["epoch"],
                    "duplicate": False, "unchanged": False}
    assert re.fullmatch(r"[0-9a-f]{12}", body["epoch"])

    second = await post(api, "/api/publish", {**fill, "id": "fill-2", "data": {"order": "o1"}})
    assert second.json() == {**body, "offset": 2}

    replay = await post(api, "/api/publish", fill)  # a client retrying after a timeout
    assert replay.status_code == 200
    assert replay.json() == {**body, "duplicate": True}

    keys = Keys(key_prefix)
    entries: list[tuple[str, dict[str, str]]] = await redis.xrange(  # type: ignore[assignment]
        keys.stream("account.42.orders")
    )
    assert [entry_id for entry_id, _ in entries] == ["1-0", "2-0"]
    assert json.loads(entries[0][1]["d"]) == fill["data"]
    assert entries[0][1]["k"] == "o1"


@integration
async def test_x_api_key_header_and_defaults(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    r = await post(api, "/api/publish", {"channel": "trades.ES", "data": [1, 2]},
                   headers={"X-API-Key": OTHER_KEY})
    assert r.status_code == 200, r.text
    assert r.json()["offset"] == 1 and r.json()["duplicate"] is False
    # Without an id a message is not idempotent: sending it again is a new publication.
    again = await post(api, "/api/publish", {"channel": "trades.ES", "data": [1, 2]})
    assert again.json()["offset"] == 2
    assert await stream_len(redis, key_prefix, "trades.ES") == 2


@integration
async def test_delete_removes_the_key_from_the_snapshot(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    base = {"channel": "account.7.positions", "key": "MNQ"}
    await post(api, "/api/publish", {**base, "data": {"qty": 2}})
    snap = Keys(key_prefix).snapshot("account.7.positions")
    assert await redis.hget(snap, "MNQ") == '{"qty":2}'
    r = await post(api, "/api/publish", {**base, "data": None, "delete": True})
    assert r.status_code == 200 and r.json()["offset"] == 2
    assert await redis.hget(snap, "MNQ") is None


@integration
async def test_if_changed_publishes_only_what_changes_the_snapshot(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    position = {"channel": "account.7.positions", "key": "MNQ", "data": {"qty": 2},
                "if_changed": True}
    flat = {**position, "data": {"qty": 0}, "delete": True}
    r = await post(api, "/api/publish/batch", {"messages": [
        {**flat, "key": "ES"},  # a delete of a key the new channel does not have
        position, position, flat, flat, position,
    ]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    epoch = results[1]["epoch"]
    assert [(x["offset"], x["epoch"], x["duplicate"], x["unchanged"]) for x in results] == [
        (0, "", False, True),  # no epoch yet: offset 0
        (1, epoch, False, False),
        (1, epoch, False, True),  # the same state: not published, the channel's top
        (2, epoch, False, False),
        (2, epoch, False, True),
        (3, epoch, False, False),
    ]
    assert await stream_len(redis, key_prefix, "account.7.positions") == 3
    one = await post(api, "/api/publish", position)
    assert one.json() == {"channel": "account.7.positions", "offset": 3, "epoch": epoch,
                          "duplicate": False, "unchanged": True}
    # Without the flag, the same state is published again.
    again = await post(api, "/api/publish", {**position, "if_changed": False})
    assert (again.json()["offset"], again.json()["unchanged"]) == (4, False)


@integration
async def test_batch_publishes_in_order_and_replays_as_duplicates(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    messages = [
        {"channel": "account.9.orders", "data": {"s": "new"}, "key": "a", "id": "m1"},
        {"channel": "account.9.orders", "data": {"s": "filled"}, "key": "a", "id": "m2"},
        {"channel": "account.9.balance", "data": {"cash": 100.5}, "id": "b1"},
    ]
    r = await post(api, "/api/publish/batch", {"messages": messages})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [(x["channel"], x["offset"], x["duplicate"]) for x in results] == [
        ("account.9.orders", 1, False),
        ("account.9.orders", 2, False),
        ("account.9.balance", 1, False),
    ]
    assert results[0]["epoch"] == results[1]["epoch"]

    replay = await post(api, "/api/publish/batch", {"messages": messages})
    assert replay.json()["results"] == [{**x, "duplicate": True} for x in results]
    assert await stream_len(redis, key_prefix, "account.9.orders") == 2
    assert await stream_len(redis, key_prefix, "account.9.balance") == 1


@integration
async def test_a_repeated_id_within_a_batch_is_a_duplicate(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    messages = [{"channel": "trades.NQ", "data": {"p": i}, "id": "same"} for i in range(3)]
    r = await post(api, "/api/publish/batch", {"messages": messages})
    assert [(x["offset"], x["duplicate"]) for x in r.json()["results"]] == [
        (1, False), (1, True), (1, True)
    ]
    assert await stream_len(redis, key_prefix, "trades.NQ") == 1


@integration
async def test_concurrent_requests_get_gapless_offsets(api: httpx.AsyncClient) -> None:
    responses = await asyncio.gather(*(
        post(api, "/api/publish", {"channel": "quotes.NQ", "data": {"bid": i}, "id": f"q{i}"})
        for i in range(30)
    ))
    assert all(r.status_code == 200 for r in responses)
    assert sorted(r.json()["offset"] for r in responses) == list(range(1, 31))
    assert len({r.json()["epoch"] for r in responses}) == 1


# --- authentication --------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-key"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"X-API-Key": "wrong-key"},
        {"X-API-Key": KEY + "x"},
        {"X-API-Key": KEY[:-1]},
    ],
    ids=["missing", "bad-bearer", "not-bearer", "empty-bearer", "bad-header", "longer",
         "prefix"],
)
async def test_missing_or_bad_key_is_401_and_publishes_nothing(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str, headers: dict[str, str]
) -> None:
    r = await post(api, "/api/publish", {"channel": "trades.ES", "data": 1}, headers=headers)
    error_of(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    r = await post(api, "/api/publish/batch", {"messages": [{"channel": "trades.ES", "data": 1}]},
                   headers=headers)
    error_of(r, 401, "unauthorized")
    assert not await channel_exists(redis, key_prefix, "trades.ES")


@integration
async def test_keys_never_reach_the_log(
    api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="test.api")
    await post(api, "/api/publish", {"channel": "trades.ES", "data": 1},
               headers={"Authorization": "Bearer not-the-key-4711"})
    await post(api, "/api/publish", {"channel": "trades.ES", "data": 1},
               headers={"X-API-Key": OTHER_KEY})
    await post(api, "/api/publish", {"channel": "nope", "data": 1})
    assert "status=401" in caplog.text and "key=2" in caplog.text
    for secret in (KEY, OTHER_KEY, "not-the-key-4711"):
        assert secret not in caplog.text


# --- bad input -----------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"channel": "trades.ES", "data": ', "malformed_json"),
        (b"", "malformed_json"),
        (b'{"channel": "trades.ES", "data": NaN}', "malformed_json"),
        (b'{"channel": "trades.ES", "data": "\xff"}', "malformed_json"),
        (b'{"channel": "trades.ES", "data": "\\ud800"}', "malformed_json"),
        (b"[" * 2000 + b"]" * 2000, "malformed_json"),
        (b'["trades.ES", 1]', "bad_request"),
        (b'{"channel": "trades.ES"}', "bad_request"),
        (b'{"data": 1}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "msg_id": "x"}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "id": 5}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "id": "' + b"x" * 257 + b'"}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "delete": "yes"}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "if_changed": 1}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "if_changed": null}', "bad_request"),
        (b'{"channel": "trades.ES", "data": 1, "key": "a\\nb"}', "bad_key"),
        (b'{"channel": "trades.ES", "data": 1, "key": 7}', "bad_key"),
    ],
    ids=["truncated", "empty", "nan", "not-utf8", "lone-surrogate", "deep", "array", "no-data",
         "no-channel", "unknown-field", "id-not-string", "id-too-long", "delete-not-bool",
         "if-changed-not-bool", "if-changed-null", "key-control-char", "key-not-string"],
)
async def test_malformed_or_misshapen_body_is_400(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str, content: bytes, code: str
) -> None:
    r = await post(api, "/api/publish", content=content,
                   headers={**AUTH, "Content-Type": "application/json"})
    error_of(r, 400, code)
    assert not await channel_exists(redis, key_prefix, "trades.ES")


@integration
@pytest.mark.parametrize(
    "channel", ["nope", "quotes.", "orders.MNQ", "account.42.wallet", "quotes.MN Q", 42, None,
                "quotes." + "X" * 130],
)
async def test_bad_channel_is_400(api: httpx.AsyncClient, channel: object) -> None:
    r = await post(api, "/api/publish", {"channel": channel, "data": 1})
    error = error_of(r, 400, "bad_channel")
    assert "index" not in error


@integration
async def test_batch_with_one_bad_item_publishes_nothing(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    messages: list[Any] = [
        {"channel": "account.5.orders", "data": {"s": "new"}, "key": "a", "id": "x1"},
        {"channel": "trades.ES", "data": {"p": 1}},
        {"channel": "account.5.wallet", "data": {}},
        {"channel": "trades.ES", "data": {"p": 2}},
    ]
    r = await post(api, "/api/publish/batch", {"messages": messages})
    error = error_of(r, 400, "bad_channel")
    assert error["index"] == 2 and error["message"].startswith("messages[2]:")

    messages[2] = {"channel": "trades.ES", "data": 1, "delete": 1}
    error = error_of(await post(api, "/api/publish/batch", {"messages": messages}),
                     400, "bad_request")
    assert error["index"] == 2

    messages[2] = "not an object"
    error = error_of(await post(api, "/api/publish/batch", {"messages": messages}),
                     400, "bad_request")
    assert error["index"] == 2

    for channel in ("account.5.orders", "trades.ES"):
        assert not await channel_exists(redis, key_prefix, channel)
    assert not [k async for k in redis.scan_iter(match=f"{key_prefix}:{{account.5.orders}}:ids:*")]


@integration
@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"messages": []}, "bad_request"),
        ({"messages": {"channel": "trades.ES", "data": 1}}, "bad_request"),
        ({"channel": "trades.ES", "data": 1}, "bad_request"),
        ([{"channel": "trades.ES", "data": 1}], "bad_request"),
        ({"messages": [{"channel": "trades.ES", "data": i} for i in range(MAX_BATCH + 1)]},
         "too_many_messages"),
    ],
    ids=["empty", "not-array", "single-form", "bare-array", "too-many"],
)
async def test_bad_batch_shape_is_400(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str, body: Any, code: str
) -> None:
    error_of(await post(api, "/api/publish/batch", body), 400, code)
    assert not await channel_exists(redis, key_prefix, "trades.ES")


@integration
async def test_oversized_body_is_413_whether_declared_or_streamed(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str
) -> None:
    big = json.dumps({"channel": "trades.ES", "data": "x" * MAX_BODY}).encode()
    error_of(await post(api, "/api/publish", content=big,
                        headers={**AUTH, "Content-Type": "application/json"}), 413,
             "body_too_large")

    streamed_chunks = 0

    async def chunks() -> AsyncIterator[bytes]:
        """No Content-Length (chunked): the limit must hold while reading the stream."""
        nonlocal streamed_chunks
        yield b'{"channel": "trades.ES", "data": "'
        for _ in range(1000):
            streamed_chunks += 1
            yield b"x" * 1024
        yield b'"}'

    r = await post(api, "/api/publish", content=chunks(),
                   headers={**AUTH, "Content-Type": "application/json"})
    error_of(r, 413, "body_too_large")
    assert streamed_chunks < 10  # cut off at the limit, not read to the end
    assert not await channel_exists(redis, key_prefix, "trades.ES")

    # Just under the limit is fine.
    fits = {"channel": "trades.ES", "data": "x" * (MAX_BODY - 100)}
    assert (await post(api, "/api/publish", fits)).status_code == 200


@integration
@pytest.mark.parametrize(
    "content_type",
    [None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
     "application/jsonx"],
)
async def test_wrong_content_type_is_415(
    api: httpx.AsyncClient, redis: Redis, key_prefix: str, content_type: str | None
) -> None:
    headers = dict(AUTH)
    if content_type is not None:
        headers["Content-Type"] = content_type
    body = json.dumps({"channel": "trades.ES", "data": 1}).encode()
    error_of(await post(api, "/api/publish", content=body, headers=headers), 415,
             "unsupported_media_type")
    assert not await channel_exists(redis, key_prefix, "trades.ES")


@integration
async def test_json_with_charset_is_accepted(api: httpx.AsyncClient) -> None:
    body = json.dumps({"channel": "trades.ES", "data": 1}).encode()
    r = await post(api, "/api/publish", content=body,
                   headers={**AUTH, "Content-Type": "Application/JSON; charset=UTF-8"})
    assert r.status_code == 200, r.text


# --- failures of the store and of the server ------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@integration
async def test_redis_down_is_503_without_internals(caplog: pytest.LogCaptureFixture) -> None:
    redis = Redis.from_url(f"redis://127.0.0.1:{_closed_port()}", socket_connect_timeout=2.0,
                           socket_timeout=2.0)
    try:
        async with client_for(make_app(Publisher(RedisBroker(redis)))) as client:
            r = await post(client, "/api/publish", {"channel": "trades.ES", "data": 1})
    finally:
        await redis.aclose()
    error_of(r, 503, "unavailable")
    assert r.headers["retry-after"] == "1"
    assert "127.0.0.1" not in r.text and "Error" not in r.text
    assert "api publish failed" in caplog.text
