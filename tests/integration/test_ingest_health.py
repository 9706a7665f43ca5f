"""The ingest worker's /healthz and /readyz beside /metrics: two real `fanout ingest`
processes of one feed against their own Valkey, which the test then stops."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from fanout.embedded import EmbeddedValkey
from tests.support.edgeproc import ingest_process

pytestmark = pytest.mark.integration


async def test_health_says_leader_or_standby_and_readiness_follows_redis() -> None:
    valkey = EmbeddedValkey()
    valkey.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            workers = [
                (await stack.enter_async_context(
                    ingest_process(valkey.url, FANOUT_LEASE_TTL="1", FANOUT_RATE="5"))).http
                for _ in range(2)
            ]
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=5))
            for base in workers:
                assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}
                assert "fanout_ingest_published_total" in (await http.get(f"{base}/metrics")).text
                assert (await http.get(f"{base}/other")).status_code == 404

            async def roles() -> dict[str, str]:
                return {(await http.get(f"{b}/readyz")).json()["role"]: b for b in workers}

            async with asyncio.timeout(20):  # one of them wins the lease within its TTL
                while sorted(found := await roles()) != ["leader", "standby"]:
                    await asyncio.sleep(0.05)
            body = (await http.get(f"{workers[0]}/readyz")).json()
            assert body["redis"] is True and body["feed"] == "sim" and body["owner"]
            # The leader publishes the simulated feed and times upstream -> Redis.
            leader = found["leader"]
            async with asyncio.timeout(20):
                while "fanout_ingest_upstream_latency_seconds_count 0.0" in (
                        text := (await http.get(f"{leader}/metrics")).text):
                    await asyncio.sleep(0.05)
            assert "fanout_ingest_upstream_latency_seconds_bucket" in text

            valkey.stop()  # Redis gone: not ready, but alive (its loop still answers)
            for base in workers:
                async with asyncio.timeout(20):
                    while (await http.get(f"{base}/readyz")).status_code != 503:
                        await asyncio.sleep(0.05)
                assert (await http.get(f"{base}/readyz")).json()["redis"] is False
                assert (await http.get(f"{base}/healthz")).status_code == 200
    finally:
        valkey.stop()
