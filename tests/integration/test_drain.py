"""A rolling restart: SIGTERM makes a real edge process unready, close its connections
(3000, reconnect) spread over FANOUT_DRAIN_SECONDS, refuse newcomers, then exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from fanout.embedded import free_port, stop_process
from tests.integration.conftest import RedisServer
from tests.support.httpwait import wait_http_ok
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


async def test_sigterm_drains_connections_gradually_then_exits(
    redis_server: RedisServer, key_prefix: str
) -> None:
    port = free_port()
    env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix,
           "FANOUT_LOG_LEVEL": "warning", "FANOUT_DRAIN_SECONDS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "edge", "--port", str(port)],
                            env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=2) as http:
            await wait_http_ok(http, "/readyz", proc=proc)
            clients = [await ProtoClient.open(f"ws://127.0.0.1:{port}/ws") for _ in range(60)]
            closed_at: list[float] = []
            for c in clients:
                c.closed.add_done_callback(lambda _: closed_at.append(time.monotonic()))
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(5):  # unready at once, while clients are still served
                while (await http.get("/readyz")).status_code != 503:
                    await asyncio.sleep(0.02)
            assert sum(not c.closed.done() for c in clients) > 30
            late = await ProtoClient.open(f"ws://127.0.0.1:{port}/ws", connect=False)
            assert await asyncio.wait_for(late.closed, 5) == (3000, "server shutting down")
            results = await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 10)
        assert set(results) == {(3000, "server shutting down")}
        spread = max(closed_at) - min(closed_at)
        assert 1.0 <= spread <= 3.0, spread  # 60 over 2 s: 2 every 50 ms, not all at once
        assert min(closed_at) - started < 1.0
        await asyncio.to_thread(proc.wait, 15)
        for c in [*clients, late]:
            await c.close()
    finally:
        stop_process(proc)
