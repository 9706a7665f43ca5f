"""`fanout ingest` wired end to end: the generic WebSocket feed and the HTTP publish API in
one worker process, against a real Valkey."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
import websockets
from redis.asyncio import Redis

from common.broker.keys import Keys
from fanout.embedded import free_port
from tests.integration.conftest import RedisServer
from tests.support.streams import xrange


@pytest.mark.integration
async def test_ws_feed_and_publish_api_in_one_worker(
    redis_server: RedisServer, key_prefix: str,
) -> None:
    sent: list[dict[str, Any]] = []

    async def upstream(ws: Any) -> None:
        subscribe = json.loads(await ws.recv())
        assert subscribe == {"op": "subscribe", "symbols": ["ES"]}
        for i in range(20):
            msg = {"s": "ES", "seq": i, "bid": 100 + i}
            sent.append(msg)
            await ws.send(json.dumps(msg))
        await ws.wait_closed()

    api_port = free_port()
    async with websockets.serve(upstream, "127.0.0.1", 0) as server:
        ws_port = server.sockets[0].getsockname()[1]
        mapping = {"channel": "quotes.{s}", "id": "seq"}
        env = {
            **os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix,
            "FANOUT_FEED": "ws", "FANOUT_WS_URL": f"ws://127.0.0.1:{ws_port}/",
            "FANOUT_WS_SUBSCRIBE": json.dumps([{"op": "subscribe", "symbols": ["ES"]}]),
            "FANOUT_WS_MAPPING": json.dumps(mapping), "FANOUT_API_PORT": str(api_port),
            "FANOUT_API_KEYS": "test-key", "FANOUT_LEASE_TTL": "2",
        }
        proc = subprocess.Popen([sys.executable, "-m", "fanout", "ingest"], env=env)
        redis = Redis.from_url(redis_server.url, decode_responses=True)
        keys = Keys(key_prefix)
        try:
            async with asyncio.timeout(30):
                while await redis.hget(keys.meta("quotes.ES"), "top") != "20":
                    assert proc.poll() is None, "ingest exited"
                    await asyncio.sleep(0.05)
            entries = await xrange(redis, keys.stream("quotes.ES"))
            assert [json.loads(e[1]["d"]) for e in entries] == sent
            async with asyncio.timeout(30), httpx.AsyncClient(timeout=5) as http:
                while True:
                    try:
                        r = await http.post(
                            f"http://127.0.0.1:{api_port}/api/publish",
                            headers={"Authorization": "Bearer test-key"},
                            json={"channel": "account.7.orders", "data": {"id": 1}, "key": "1"},
                        )
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                assert r.status_code == 200, r.text
                assert r.json()["offset"] == 1
                bad = await http.post(f"http://127.0.0.1:{api_port}/api/publish",
                                      json={"channel": "account.7.orders", "data": {}})
                assert bad.status_code == 401
        finally:
            proc.terminate()
            assert proc.wait(15) == 0
            await redis.aclose()
