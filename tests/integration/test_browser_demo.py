"""The demo dashboard as the browser client's showcase, in a real headless Chromium: on open
the chart is filled from a `history` request for the selected symbol's 1-minute bars (not
one candle), and the depth ladder shows the `depth.<symbol>` snapshot and follows updates
(sizes change, deleted levels go, new levels appear).

Chromium comes from Debian's package (.ci/run installs it): skipped without it locally,
failed under CI."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.test_browser import ARTIFACTS, need
from tests.support.cdp import Browser, chromium_path

pytestmark = pytest.mark.integration

BARS = 12  # closed bars published before the page opens


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser(need(chromium_path(), "chromium"))
    await b.start()
    yield b
    await b.close()


def bar(symbol: str, start_s: int, i: int) -> dict[str, Any]:
    o = 100.0 + i
    return {"symbol": symbol, "interval": "1m", "t": start_s * 1000, "o": o, "h": o + 2,
            "l": o - 1, "c": o + 1, "v": 10 + i, "n": 3}


def depth_msg(symbol: str, side: str, px: float, size: int) -> UpstreamMessage:
    return UpstreamMessage(f"depth.{symbol}", {"side": side, "price": px, "size": size},
                           key=f"{side}:{px:.2f}", delete=size == 0)


def depth_updates_seen(updates: object) -> bool:
    """At least one depth message applied on top of the snapshot (conflation may merge the
    three into fewer)."""
    return isinstance(updates, int) and 1 <= updates <= 3


async def ladder_rows(browser: Browser) -> list[list[str]]:
    """The ladder as the page shows it: [bid size, price, ask size] of each filled row."""
    rows: list[list[str]] = await browser.js(
        "[...document.querySelectorAll('#depth tbody tr')]"
        ".map((tr) => [...tr.cells].map((td) => td.textContent))"
        ".filter((cells) => cells[1] !== '')")
    return rows


async def test_dashboard_loads_bar_history_and_shows_a_live_depth_ladder(
    edge: Any, publisher: Publisher, browser: Browser
) -> None:
    symbol = f"D{os.urandom(2).hex().upper()}"
    first = (int(time.time()) // 60 - BARS - 1) * 60
    for i in range(BARS):
        await publisher.publish(
            UpstreamMessage(f"bars.1m.{symbol}", bar(symbol, first + 60 * i, i)))
    book = [depth_msg(symbol, "bid", 99.0 - 0.25 * i, 10 + i) for i in range(5)]
    book += [depth_msg(symbol, "ask", 99.25 + 0.25 * i, 20 + i) for i in range(5)]
    await publisher.publish_batch(book)

    await browser.goto(f"{edge.http}/?symbols={symbol}&persist=0")
    await browser.wait_for(
        "window.fanoutDemo && window.fanoutDemo.chart().history.state === 'done'", 15)
    chart = await browser.js("window.fanoutDemo.chart()")
    assert chart["symbol"] == symbol
    assert chart["history"]["bars"] == BARS
    assert [b["t"] for b in chart["bars"]] == [(first + 60 * i) * 1000 for i in range(BARS)]
    await browser.wait_for(
        f"document.getElementById('chart-detail').textContent.startsWith('{BARS} bars')", 5)

    await browser.wait_for("document.querySelectorAll('#depth tr[data-side]:not([data-side=\"\"])')"
                           ".length === 10", 10)
    rows = await ladder_rows(browser)
    assert rows == [
        *[["", f"{99.25 + 0.25 * i:.2f}", str(20 + i)] for i in reversed(range(5))],
        *[[str(10 + i), f"{99.0 - 0.25 * i:.2f}", ""] for i in range(5)],
    ]

    # Updates: sizes change, a level goes; then a new bar closes. (Depth is "conflate":
    # offsets may skip, each message carries its key's latest value.)
    await publisher.publish_batch([
        depth_msg(symbol, "bid", 99.0, 5),
        depth_msg(symbol, "ask", 100.25, 0),
        depth_msg(symbol, "ask", 99.5, 31),
    ])
    await browser.wait_for(
        "[...document.querySelectorAll('#depth tbody tr')].some("
        "(tr) => tr.dataset.side === 'ask' && tr.cells[2].textContent === '31')", 10)
    rows = await ladder_rows(browser)
    assert rows == [
        *[["", f"{99.25 + 0.25 * i:.2f}", str(31 if i == 1 else 20 + i)]
          for i in reversed(range(4))],
        ["5", "99.00", ""],
        *[[str(10 + i), f"{99.0 - 0.25 * i:.2f}", ""] for i in range(1, 5)],
    ]
    depth = await browser.js("window.fanoutDemo.depth()")
    assert depth["bids"][0] == {"side": "bid", "price": 99.0, "size": 5}
    assert len(depth["asks"]) == 4

    await publisher.publish(UpstreamMessage(f"bars.1m.{symbol}",
                                            bar(symbol, first + 60 * BARS, BARS)))
    await browser.wait_for(f"window.fanoutDemo.chart().bars.length === {BARS + 1}", 10)
    await browser.screenshot(ARTIFACTS / "dashboard-depth-history.png")
    assert depth_updates_seen(await browser.js("window.fanoutDemo.depth().updates"))
    assert await browser.js("window.fanout.counters.gaps") == 0
