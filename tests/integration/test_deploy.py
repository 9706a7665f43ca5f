"""The deployment's own HAProxy configuration (deploy/haproxy/haproxy.cfg), run by a real
HAProxy in front of a real edge: WebSockets and health pass, the edges' /metrics does not
leak to the public side, the edges see the client's address (X-Forwarded-For). Only what
Docker provides is rewritten: the edge addresses (names on Docker's network) and the
listening ports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
from fanout_client import FanoutClient, Publication

from fanout.embedded import free_port, stop_process
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer, RedisServer
from tests.integration.test_browser import need
from tests.integration.test_client import Collector, client_subscribed
from tests.support.edgeproc import EdgeProcess, edge_process
from tests.support.httpwait import wait_http_ok
from tests.support.wsclient import ProtoClient, http_upgrade

log = logging.getLogger("test.deploy")

pytestmark = pytest.mark.integration

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "haproxy" / "haproxy.cfg"


def local_config(edge_ports: list[int], www_port: int, stats_port: int) -> str:
    """The shipped config with edge-1.. at `edge_ports` (the rest disabled)."""
    text = CONFIG.read_text()
    text = text.replace("bind :8080", f"bind 127.0.0.1:{www_port}")
    text = text.replace("bind :8404", f"bind 127.0.0.1:{stats_port}")
    text = re.sub(r"(?m)^resolvers docker\n(?:    .*\n)+", "", text)
    text = text.replace(" resolvers docker init-addr last,libc,none", "")

    def server(m: re.Match[str]) -> str:
        i = int(m.group(1)) - 1
        if i < len(edge_ports):
            return f"    server edge-{i + 1} 127.0.0.1:{edge_ports[i]}"
        return f"    server edge-{i + 1} 127.0.0.1:{edge_ports[0]} disabled"

    return re.sub(r"(?m)^    server edge-(\d) edge-\d:8000$", server, text)


async def start_haproxy(edge_ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    """A real HAProxy running the shipped config (checked with -c first); its www port."""
    www, stats = free_port(), free_port()
    path = Path(tempfile.mkdtemp(prefix="fanout-deploy-")) / "haproxy.cfg"
    path.write_text(local_config(edge_ports, www, stats))
    binary = need(shutil.which("haproxy"), "haproxy")
    check = await asyncio.create_subprocess_exec(
        binary, "-c", "-f", str(path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    output, _ = await asyncio.wait_for(check.communicate(), 30)
    assert check.returncode == 0, output.decode()
    proc = subprocess.Popen([binary, "-db", "-f", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc, www


@contextlib.asynccontextmanager
async def deploy_haproxy(edge_port: int) -> AsyncIterator[int]:
    """The deployment's HAProxy in front of the edge at `edge_port`; yields its public port
    once it routes to the edge."""
    proc, www = await start_haproxy([edge_port])
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{www}", timeout=5) as http:
            await wait_http_ok(http, "/healthz")  # until the health check lets the edge in
        yield www
    finally:
        stop_process(proc)


async def test_deploy_haproxy_passes_websockets_and_hides_metrics(edge: EdgeServer) -> None:
    async with deploy_haproxy(edge.port) as www:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{www}", timeout=5) as http:
            assert (await http.get("/metrics")).status_code == 404
            assert (await http.get("/metrics/")).status_code == 404
            direct = await http.get(f"{edge.http}/metrics")  # the inside: Prometheus
            assert direct.status_code == 200 and "fanout_edge_connections" in direct.text
        client = await ProtoClient.open(f"ws://127.0.0.1:{www}/ws")
        assert (await client.subscribe("trades.LB"))["type"] == "subscribed"
        await client.close()


async def test_edge_killed_behind_haproxy_every_client_resumes_on_its_first_attempt(
    redis_server: RedisServer, key_prefix: str, publisher: Publisher
) -> None:
    """kill -9 of one of two edges behind the shipped config: HAProxy sends every reconnect
    to the live edge (retries + redispatch) although its checks still see the dead one up,
    so no client gets a 503 and waits out a backoff. Every client's offsets stay contiguous.
    The time each one took to resume is printed (run with -s), not asserted."""
    async with contextlib.AsyncExitStack() as stack:
        # HAProxy connects from 127.0.0.1 for all 100 clients: no per-address limit.
        edges = [await stack.enter_async_context(edge_process(
            redis_server.url, key_prefix, FANOUT_LOG_LEVEL="warning",
            FANOUT_MAX_CONNECTIONS_PER_IP="0")) for _ in range(2)]
        await _kill_one_behind_haproxy(edges, publisher)


def has_pubs(reader: Collector, n: int) -> bool:
    return len(reader.pubs()) >= n


def reached(reader: Collector, offset: int) -> bool:
    return bool(reader.pubs()) and reader.pubs()[-1].offset >= offset


async def _kill_one_behind_haproxy(edges: list[EdgeProcess], publisher: Publisher) -> None:
    proxy: subprocess.Popen[bytes] | None = None
    clients: list[FanoutClient] = []
    readers: list[Collector] = []
    stop = asyncio.Event()
    pub: asyncio.Task[None] | None = None
    try:
        proxy, www = await start_haproxy([e.port for e in edges])
        async with httpx.AsyncClient(timeout=2) as http:
            await wait_http_ok(http, f"http://127.0.0.1:{www}/readyz", proc=proxy)
        channels = [f"account.K{i}.orders" for i in range(10)]
        for i in range(100):
            client = FanoutClient(f"ws://127.0.0.1:{www}/ws", logger=log)
            await client.connect()
            clients.append(client)
            readers.append(Collector(client.subscribe(channels[i % len(channels)])))
        for i, client in enumerate(clients):
            await client_subscribed(client, channels[i % len(channels)], 30)

        published: dict[str, int] = {}
        killed_at = 0.0
        first_after: dict[str, int] = {}  # channel -> first offset published after the kill

        async def publish() -> None:
            while not stop.is_set():
                for ch in channels:
                    result = await publisher.publish(UpstreamMessage(ch, {"n": 1}))
                    published[ch] = result.offset
                    if killed_at and ch not in first_after:
                        first_after[ch] = result.offset
                await asyncio.sleep(0.005)  # pacing, not waiting for anything

        pub = asyncio.create_task(publish())
        for reader in readers:
            await reader.wait_for(partial(has_pubs, reader, 5), 30)

        victim = edges[0].proc
        killed_at = time.monotonic()
        victim.kill()
        victim.wait(10)

        def resumed(i: int) -> bool:
            ch = channels[i % len(channels)]
            return ch in first_after and any(
                p.offset >= first_after[ch] for p in readers[i].pubs())

        for i, reader in enumerate(readers):
            await reader.wait_for(partial(resumed, i), 30)
        stop.set()
        await pub
        for i, reader in enumerate(readers):
            last = published[channels[i % len(channels)]]
            await reader.wait_for(partial(reached, reader, last), 30)

        moved = [i for i, c in enumerate(clients) if c.counters.reconnects]
        assert moved, "no client was on the killed edge"
        for i, client in enumerate(clients):
            offsets = [p.offset for p in readers[i].pubs()]
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), i
            # One reconnect, and it worked: HAProxy never handed it the dead edge.
            assert client.counters.reconnects <= 1, (i, client.counters)
            assert client.counters.resynced == 0 and client.counters.gaps == 0
            assert client.url is not None and client.state == "open"
        assert all(clients[i].counters.recovered >= 1 for i in moved)
        waits = sorted(
            next(t for t, e in zip(readers[i].times, readers[i].events, strict=True)
                 if isinstance(e, Publication)
                 and e.offset >= first_after[channels[i % len(channels)]]) - killed_at
            for i in moved)
        print(f"\nedge kill -9: {len(moved)} of {len(clients)} clients moved; resumed after"
              f" p50 {waits[len(waits) // 2]:.3f} s, max {waits[-1]:.3f} s")
    finally:
        stop.set()
        if pub is not None and not pub.done():
            await pub
        for reader in readers:
            await reader.stop()
        for client in clients:
            await client.close()
        if proxy is not None:
            stop_process(proxy)


async def test_edges_count_the_clients_haproxy_forwards_for(edge_factory: EdgeFactory) -> None:
    """HAProxy (option forwardfor) connects from 127.0.0.1, the trusted proxy; browsers come
    from 127.0.0.2 and 127.0.0.3 (all of 127.0.0.0/8 is loopback on Linux). The per-IP
    limit counts the browsers, a 503 from the edge reaches them through HAProxy, and a
    forged X-Forwarded-For changes nothing."""
    edge = await edge_factory(trusted_proxies=("127.0.0.1/32",), max_connections_per_ip=2)
    async with deploy_haproxy(edge.port) as www:
        url = f"ws://127.0.0.1:{www}/ws"
        forged: dict[str, Any] = {"additional_headers": {"X-Forwarded-For": "203.0.113.7"}}
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
