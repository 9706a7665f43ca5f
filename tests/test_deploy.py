"""The deployment's own HAProxy configuration (deploy/haproxy/haproxy.cfg), run by a real
HAProxy in front of a real edge: WebSockets and health pass, the edges' /metrics does not
leak to the public side, the edges see the client's address (X-Forwarded-For). Only what
Docker provides is rewritten: the edge addresses (names on Docker's network) and the
listening ports."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from common.embedded import free_port, stop_process
from tests.httpwait import wait_http_ok
from tests.test_browser import need
from tests.wsclient import ProtoClient, http_upgrade

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "haproxy" / "haproxy.cfg"


def local_config(edge_port: int, www_port: int, stats_port: int) -> str:
    text = CONFIG.read_text()
    text = text.replace("bind :8080", f"bind 127.0.0.1:{www_port}")
    text = text.replace("bind :8404", f"bind 127.0.0.1:{stats_port}")
    text = re.sub(r"(?m)^resolvers docker\n(?:    .*\n)+", "", text)
    text = text.replace(" resolvers docker init-addr last,libc,none", "")
    text = re.sub(r"(?m)^    server edge-(\d) edge-\d:8000$",
                  lambda m: f"    server edge-{m.group(1)} 127.0.0.1:{edge_port}"
                  + ("" if m.group(1) == "1" else " disabled"), text)
    return text


@contextlib.asynccontextmanager
async def deploy_haproxy(edge_port: int) -> AsyncIterator[int]:
    """The deployment's HAProxy in front of the edge at `edge_port`; yields its public port
    once it routes to the edge."""
    www, stats = free_port(), free_port()
    path = Path(tempfile.mkdtemp(prefix="fanout-deploy-")) / "haproxy.cfg"
    path.write_text(local_config(edge_port, www, stats))
    binary = need(shutil.which("haproxy"), "haproxy")
    check = await asyncio.create_subprocess_exec(
        binary, "-c", "-f", str(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 0, output.decode()
    proc = subprocess.Popen([binary, "-db", "-f", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{www}", timeout=5) as http:
            await wait_http_ok(http, "/healthz")  # until the health check lets the edge in
        yield www
    finally:
        stop_process(proc)


async def test_deploy_haproxy_passes_websockets_and_hides_metrics(edge) -> None:
    async with deploy_haproxy(edge.port) as www:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{www}", timeout=5) as http:
            assert (await http.get("/metrics")).status_code == 404
            assert (await http.get("/metrics/")).status_code == 404
            direct = await http.get(f"{edge.http}/metrics")  # the inside: Prometheus
            assert direct.status_code == 200 and "fanout_edge_connections" in direct.text
        client = await ProtoClient.open(f"ws://127.0.0.1:{www}/ws")
        assert (await client.subscribe("trades.LB"))["type"] == "subscribed"
        await client.close()


async def test_edges_count_the_clients_haproxy_forwards_for(edge_factory) -> None:
    """HAProxy (option forwardfor) connects from 127.0.0.1, the trusted proxy; browsers come
    from 127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux). The per-IP
    limit counts the browsers, a 503 from the edge reaches them through HAProxy, and a
    forged X-Forwarded-For changes nothing."""
    edge = await edge_factory(trusted_proxies=("127.0.0.1/32",), max_connections_per_ip=2)
    async with deploy_haproxy(edge.port) as www:
        url = f"ws://127.0.0.1:{www}/ws"
        forged = {"additional_headers": {"X-Forwarded-For": "203.0.113.7"}}
        held = [await ProtoClient.open(url, local_addr=("127.0.0.2", 0), **forged),
                await ProtoClient.open(url, local_addr=("127.0.0.2", 0))]
        answer = await http_upgrade("127.0.0.1", www, local_addr=("127.0.0.2", 0))
        assert answer.status == 503 and int(answer.headers["retry-after"]) >= 5
        await answer.close()
        held.append(await ProtoClient.open(url, local_addr=("127.0.0.3", 0)))
        assert edge.edge.admission.limiter.by_key == {"127.0.0.2": 2, "127.0.0.3": 1}
        assert edge.edge.stats.refused["ip_limit"] == 1
        for c in held:
            await c.close()
