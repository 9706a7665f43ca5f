"""The deployment's own HAProxy configuration (deploy/haproxy/haproxy.cfg), run by a real
HAProxy in front of a real edge: WebSockets and health pass, the edges' /metrics does not
leak to the public side. Only what Docker provides is rewritten: the edge addresses (names
on Docker's network) and the listening ports."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from common.embedded import free_port, stop_process
from tests.httpwait import wait_http_ok
from tests.test_browser import need
from tests.wsclient import ProtoClient

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


async def test_deploy_haproxy_passes_websockets_and_hides_metrics(edge) -> None:
    www, stats = free_port(), free_port()
    path = Path(tempfile.mkdtemp(prefix="fanout-deploy-")) / "haproxy.cfg"
    path.write_text(local_config(edge.port, www, stats))
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
            assert (await http.get("/metrics")).status_code == 404
            assert (await http.get("/metrics/")).status_code == 404
            direct = await http.get(f"{edge.http}/metrics")  # the inside: Prometheus
            assert direct.status_code == 200 and "fanout_edge_connections" in direct.text
        client = await ProtoClient.open(f"ws://127.0.0.1:{www}/ws")
        assert (await client.subscribe("trades.LB"))["type"] == "subscribed"
        await client.close()
    finally:
        stop_process(proc)
