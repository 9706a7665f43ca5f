"""The ingest worker's /healthz and /readyz beside /metrics: two real `fanout ingest`
processes of one feed against their own Valkey, which the test then stops."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import httpx
import pytest

from common.embedded import EmbeddedValkey, free_port, stop_process
from tests.httpwait import wait_http_ok

pytestmark = pytest.mark.integration


async def test_health_says_leader_or_standby_and_readiness_follows_redis() -> None:
    valkey = EmbeddedValkey()
    valkey.start()
    workers: list[tuple[subprocess.Popen[bytes], str]] = []
    try:
        for _ in range(2):
            port = free_port()
            env = {**os.environ, "FANOUT_REDIS_URL": valkey.url, "FANOUT_LOG_LEVEL": "warning",
                   "FANOUT_INGEST_METRICS_PORT": str(port), "FANOUT_LEASE_TTL": "1",
                   "FANOUT_RATE": "5"}
            proc = subprocess.Popen([sys.executable, "-m", "common.cli", "ingest"], env=env)
            workers.append((proc, f"http://127.0.0.1:{port}"))
        async with httpx.AsyncClient(timeout=5) as http:
            for proc, base in workers:
                await wait_http_ok(http, f"{base}/readyz", proc=proc)
                assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}
                assert "fanout_ingest_published_total" in (await http.get(f"{base}/metrics")).text
                assert (await http.get(f"{base}/other")).status_code == 404

            async def roles() -> list[str]:
                return sorted([(await http.get(f"{b}/readyz")).json()["role"] for _, b in workers])

            async with asyncio.timeout(20):  # one of them wins the lease within its TTL
                while await roles() != ["leader", "standby"]:
                    await asyncio.sleep(0.05)
            body = (await http.get(f"{workers[0][1]}/readyz")).json()
            assert body["redis"] is True and body["feed"] == "sim" and body["owner"]
            # The leader publishes the simulated feed and times upstream -> Redis.
            (leader,) = [b for _, b in workers
                         if (await http.get(f"{b}/readyz")).json()["role"] == "leader"]
            async with asyncio.timeout(20):
                while "fanout_ingest_upstream_latency_seconds_count 0.0" in (
                        text := (await http.get(f"{leader}/metrics")).text):
                    await asyncio.sleep(0.05)
            assert "fanout_ingest_upstream_latency_seconds_bucket" in text

            valkey.stop()  # Redis gone: not ready, but alive (its loop still answers)
            for _, base in workers:
                async with asyncio.timeout(20):
                    while (await http.get(f"{base}/readyz")).status_code != 503:
                        await asyncio.sleep(0.05)
                assert (await http.get(f"{base}/readyz")).json()["redis"] is False
                assert (await http.get(f"{base}/healthz")).status_code == 200
    finally:
        for proc, _ in workers:
            stop_process(proc)
        valkey.stop()
