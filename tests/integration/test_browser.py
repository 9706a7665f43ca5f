"""The demo dashboard in a real headless Chromium, through a real HAProxy in front of two
edges: live quotes within seconds, and an edge killed under the page without a gap; and
fanout.js with a token function against an edge with authentication.

Chromium and HAProxy come from Debian's packages (`.ci/run` installs them). Without them
these tests are skipped locally, and fail under CI=true, where they must run."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from common.auth import sign_token
from fanout.embedded import free_port
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.cdp import Browser, chromium_path

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("FANOUT_ARTIFACTS", "build/artifacts"))


def need(tool: str | None, name: str) -> str:
    if tool is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return tool


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser(need(chromium_path(), "chromium"))
    await b.start()
    yield b
    await b.close()


async def haproxy(port: int, backends: list[int]) -> subprocess.Popen[bytes]:
    cfg = "\n".join([
        "defaults", "  mode http", "  timeout connect 2s", "  timeout client 60s",
        "  timeout server 60s", "  timeout tunnel 1h",
        "frontend fe", f"  bind 127.0.0.1:{port}", "  default_backend edges",
        "backend edges", "  balance roundrobin", "  option httpchk GET /readyz",
        *(f"  server e{i} 127.0.0.1:{p} check inter 200ms fall 2 rise 1"
          for i, p in enumerate(backends)),
        "",
    ])
    path = Path(tempfile.mkdtemp(prefix="fanout-haproxy-")) / "haproxy.cfg"
    path.write_text(cfg)
    proc = subprocess.Popen([need(shutil.which("haproxy"), "haproxy"), "-db", "-f", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc


async def publish_forever(publisher: Publisher, symbols: list[str], stop: asyncio.Event,
                          last: dict[str, int]) -> None:
    i = 0
    while not stop.is_set():
        for s in symbols:
            for r in await publisher.publish_batch([
                UpstreamMessage(f"quotes.{s}", {"symbol": s, "bid": 100 + i % 7,
                                                "ask": 101 + i % 7, "last": 100 + i % 5}),
                UpstreamMessage(f"trades.{s}", {"symbol": s, "price": 100 + i % 5, "size": 1,
                                                "side": "buy", "ts": 1_700_000_000_000 + i}),
            ]):
                last[r.channel] = r.offset
        i += 1
        await asyncio.sleep(0.05)


async def test_dashboard_shows_live_quotes(
    edge: EdgeServer, publisher: Publisher, browser: Browser,
) -> None:
    symbols = [f"B{os.urandom(2).hex().upper()}"]
    stop, last = asyncio.Event(), dict[str, int]()
    pub = asyncio.create_task(publish_forever(publisher, symbols, stop, last))
    try:
        await browser.goto(f"{edge.http}/?symbols={symbols[0]}")
        await browser.wait_for(
            f"window.fanoutDemo && window.fanoutDemo.quotes.get"
            f"  ? window.fanoutDemo.quotes.get('{symbols[0]}')?.offset > 0"
            f"  : document.querySelector('#quotes tr[data-symbol=\"{symbols[0]}\"] td.offset')"
            f"      ?.textContent > 0", 15)
        await browser.screenshot(ARTIFACTS / "dashboard.png")
        state = await browser.js("window.fanout.state")
        assert state == "open"
    finally:
        stop.set()
        await pub


async def test_edge_killed_under_the_page_loses_nothing(
    edge_factory: EdgeFactory, publisher: Publisher, browser: Browser
) -> None:
    port = free_port()
    # The page comes from HAProxy: only that origin may connect (FANOUT_ALLOWED_ORIGINS).
    edges = [await edge_factory(allowed_origins=(f"http://127.0.0.1:{port}",))
             for _ in range(2)]
    proxy = await haproxy(port, [e.port for e in edges])
    symbols = [f"K{os.urandom(2).hex().upper()}" for _ in range(2)]
    stop, last = asyncio.Event(), dict[str, int]()
    pub = asyncio.create_task(publish_forever(publisher, symbols, stop, last))
    try:
        await browser.goto(f"http://127.0.0.1:{port}/?symbols={','.join(symbols)}")
        client_id = await browser.wait_for(
            "window.fanout && window.fanout.state === 'open' && window.fanout.session"
            " && window.fanout.session.client", 20)
        node = client_id.split("-")[0]
        victim = next(e for e in edges if e.edge.node_id == node)
        await browser.wait_for("Object.values(window.fanoutDemo.received()).flat().length > 20")
        await victim.stop()  # the edge the page is connected to goes away
        await browser.wait_for(
            "window.fanout.counters.reconnects >= 1 && window.fanout.state === 'open'", 30)
        await browser.wait_for(
            "window.fanout.counters.recovered >= 1", 10)
        before = dict(last)
        await browser.wait_for(
            " && ".join(f"(window.fanout.positions()['{ch}']?.offset || 0) > {off}"
                        for ch, off in before.items()), 20)
        stop.set()
        await pub
        await browser.wait_for(
            " && ".join(f"(window.fanout.positions()['{ch}']?.offset || 0) >= {off}"
                        for ch, off in last.items()), 20)
        received = await browser.js("window.fanoutDemo.received()")
        for ch, offsets in received.items():
            assert offsets == list(range(offsets[0], offsets[0] + len(offsets))), ch
            assert offsets[-1] == last[ch]
        counters = await browser.js("window.fanout.counters")
        assert counters["gaps"] == 0 and counters["resynced"] == 0
        await browser.screenshot(ARTIFACTS / "dashboard-after-failover.png")
    finally:
        stop.set()
        if not pub.done():
            await pub
        proxy.terminate()
        proxy.wait(10)


async def test_a_page_of_another_origin_cannot_connect(
    edge_factory: EdgeFactory, browser: Browser
) -> None:
    """The demo page served by an edge whose allow-list names only another site: Chromium
    sends the page's origin with the handshake, the edge answers 403 before the upgrade,
    and fanout.js never gets a connection (it keeps retrying with backoff)."""
    edge = await edge_factory(allowed_origins=("https://app.example.com",))
    await browser.goto(f"{edge.http}/?symbols=NOPE")
    async with asyncio.timeout(15):
        while edge.edge.stats.refused["origin"] < 2:  # the first attempt and a retry
            await asyncio.sleep(0.05)
    assert await browser.js("window.fanout.state") != "open"
    assert edge.edge.stats.connections_total == 0


async def test_reload_recovers_from_session_storage(
    edge: EdgeServer, publisher: Publisher, browser: Browser
) -> None:
    symbol = f"R{os.urandom(2).hex().upper()}"
    stop, last = asyncio.Event(), dict[str, int]()
    pub = asyncio.create_task(publish_forever(publisher, [symbol], stop, last))
    try:
        await browser.goto(f"{edge.http}/?symbols={symbol}")
        await browser.wait_for(
            f"(window.fanoutDemo.received()['trades.{symbol}'] || []).length > 5", 15)
        # Let the page store its positions, then reload while publishing goes on.
        await browser.wait_for(
            f"JSON.parse(sessionStorage.getItem('fanout.positions') || '{{}}')"
            f"['trades.{symbol}']?.offset > 5")
        await browser.js("window.fanout.close(); true")  # stop consuming before the snapshot
        stored = await browser.js("JSON.parse(sessionStorage.getItem('fanout.positions'))")
        seen = (await browser.js("window.fanoutDemo.received()"))[f"trades.{symbol}"]
        assert stored[f"trades.{symbol}"]["offset"] == seen[-1]
        await browser.reload()
        await browser.wait_for(
            "window.fanout && window.fanout.state === 'open'"
            " && window.fanout.counters.recovered >= 2", 15)
        await browser.wait_for(
            f"(window.fanoutDemo.received()['trades.{symbol}'] || []).length > 5", 15)
        after = (await browser.js("window.fanoutDemo.received()"))[f"trades.{symbol}"]
        # The reloaded page goes on exactly after the stored position: no gap, no repeat.
        assert after[0] == stored[f"trades.{symbol}"]["offset"] + 1
        assert after == list(range(after[0], after[0] + len(after)))
        assert await browser.js("window.fanout.counters.resynced") == 0
    finally:
        stop.set()
        await pub


async def test_page_with_a_token_function_reads_its_account_and_refreshes(
    edge_factory: EdgeFactory, publisher: Publisher, browser: Browser
) -> None:
    """fanout.js in Chromium against an edge with authentication: the page's token function
    is called at connect and again to refresh the first token (which has about a second
    left), with no reconnect; its own account's channel streams, another account's is
    refused with permission_denied."""
    secret = os.urandom(24).hex()
    edge = await edge_factory(auth_secret=secret)
    now = time.time()
    tokens = [sign_token({"sub": "page", "exp": exp, "accounts": ["42"]}, secret.encode())
              for exp in (now - 29, now + 600)]
    await browser.goto(f"{edge.http}/healthz")  # any page of the edge's origin
    await browser.wait_for("document.readyState === 'complete'")
    await browser.js(f"""
        import('/static/fanout.js').then(({{ FanoutClient }}) => {{
          window.tokens = {json.dumps(tokens)};
          window.got = [];
          window.errors = [];
          const client = new FanoutClient('ws://' + location.host + '/ws', {{
            token: async () => window.tokens.shift() ?? null,
          }});
          client.subscribe('account.42.orders', {{
            onMessage: (data, meta) => window.got.push(meta.offset),
          }});
          client.subscribe('account.7.orders', {{ onError: (e) => window.errors.push(e.code) }});
          client.connect();
          window.client = client;
          return true;
        }})""")
    await browser.wait_for("window.client.state === 'open' && window.errors.length === 1", 15)
    assert await browser.js("window.errors") == ["permission_denied"]
    last = 0
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # past the first token's end
        last = (await publisher.publish(
            UpstreamMessage("account.42.orders", {"n": last}, "o"))).offset
        await asyncio.sleep(0.05)
    await browser.wait_for(f"window.got.at(-1) === {last}", 10)
    assert await browser.js("window.got") == list(range(1, last + 1))
    assert await browser.js("window.tokens.length") == 0  # connect + refresh
    assert await browser.js("window.client.counters.reconnects") == 0
    assert await browser.js("window.client.state") == "open"
