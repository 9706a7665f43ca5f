"""Waiting for a server started by a test to answer over HTTP, and reading its /metrics
(not a test module)."""

from __future__ import annotations

import asyncio
import subprocess

import httpx


async def wait_http_ok(
    http: httpx.AsyncClient, url: str, timeout: float = 20.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Until GET `url` answers 200: connection errors mean not yet; the process (if
    given) exiting meanwhile fails at once instead of waiting out the timeout."""
    async with asyncio.timeout(timeout):
        while True:
            assert proc is None or proc.poll() is None, "the server exited"
            try:
                if (await http.get(url)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.05)


async def metric(base: str, sample: str) -> float:
    """The value of one sample of the server's /metrics at `base`, e.g.
    ``fanout_edge_connections_refused_total{reason="origin"}``."""
    async with httpx.AsyncClient(base_url=base, timeout=5, trust_env=False) as http:
        text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no {sample} in /metrics")
