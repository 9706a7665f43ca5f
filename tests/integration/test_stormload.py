"""bench/stormload.c, the reconnect storm's C load client, against a scripted edge: what it
counts (gaps, dups, conflated, recovered, resynced, deferred, refused, gap notices) is what
bench/reconnect.py reports, so each count is provoked here and checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

SOURCE = Path(__file__).resolve().parents[2] / "bench" / "stormload.c"
EPOCH = "e0e0e0e0e0e0"
LINE_TIMEOUT = 20.0  # s for one answer of stormload

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler (cc)")


@dataclass
class FakeEdge:
    """Answers connect and subscribe like an edge (offset 10 first, `recovered` on a recover
    with the right epoch); the test pushes the rest through `conns`."""

    conns: dict[int, ServerConnection] = field(default_factory=dict)  # client -> connection
    subscribes: list[dict[str, Any]] = field(default_factory=list)
    pongs: asyncio.Queue[int] = field(default_factory=asyncio.Queue)
    refuse: int = 0  # handshakes to answer with 503 (Retry-After: 0)
    defer: set[str] = field(default_factory=set)  # channels whose next subscribe gets unavailable
    new_epoch: set[str] = field(default_factory=set)  # channels answered recovered: false

    def process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        if self.refuse:
            self.refuse -= 1
            return Response(503, "Service Unavailable", Headers({"Retry-After": "0"}), b"full")
        return None

    async def handler(self, conn: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):  # the storm aborts every connection
            await self._serve(conn)

    async def _serve(self, conn: ServerConnection) -> None:
        client = -1
        async for text in conn:
            m = json.loads(text)
            if m["type"] == "connect":
                await conn.send(json.dumps({"type": "connected", "id": m["id"], "client": "x"}))
            elif m["type"] == "pong":
                await self.pongs.put(client)
            elif m["type"] == "subscribe":
                self.subscribes.append(m)
                ch = m["channel"]
                if ch.startswith("account.c"):
                    client = int(ch[len("account.c"):].split("x")[0])
                    self.conns[client] = conn
                if ch in self.defer:
                    self.defer.discard(ch)
                    await conn.send(json.dumps({"type": "error", "id": m["id"],
                                                "code": "unavailable", "message": "busy",
                                                "retry_after_ms": 50}))
                    continue
                recover = m.get("recover")
                ok = recover is not None and recover["epoch"] == EPOCH
                # A new epoch: the position is lost even if `recovered` says true (the rule
                # of the Python client: recovered only in the epoch it asked for).
                epoch = "ffffffffffff" if ch in self.new_epoch else EPOCH
                # Keys in another order than the edge's: the client must scan, not match.
                await conn.send(json.dumps({
                    "delivery": "conflate" if ch == "quotes.STORM0" else "all",
                    "recovered": ok, "offset": recover["offset"] if ok else 10,
                    "epoch": epoch, "channel": ch, "id": m["id"], "type": "subscribed"}))


def pub(channel: str, offset: int) -> dict[str, Any]:
    return {"type": "pub", "channel": channel, "offset": offset, "data": {"t": [1, {"x": "]"}]}}


class Storm:
    """stormload's stdin/stdout."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def line(self) -> str:
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), LINE_TIMEOUT)
        assert raw, "stormload exited"
        return raw.decode().strip()

    async def command(self, text: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self.line()


@pytest.fixture(scope="module")
def stormload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("stormload") / "stormload"
    subprocess.run(["cc", "-O2", "-Wall", "-Werror", "-o", str(binary), str(SOURCE)],
                   check=True, timeout=120)
    return binary


@pytest.fixture
async def edges() -> AsyncIterator[tuple[FakeEdge, list[int]]]:
    edge = FakeEdge()
    async with (serve(edge.handler, "127.0.0.1", 0, subprotocols=["fanout.json"],  # type: ignore[list-item]
                      process_request=edge.process_request) as a,
                serve(edge.handler, "127.0.0.1", 0, subprotocols=["fanout.json"],  # type: ignore[list-item]
                      process_request=edge.process_request) as b):
        ports = [next(iter(s.sockets)).getsockname()[1] for s in (a, b)]
        yield edge, ports


async def test_stormload_counts_what_the_edge_does(
    stormload: Path, edges: tuple[FakeEdge, list[int]], tmp_path: Path
) -> None:
    edge, ports = edges
    proc = await asyncio.create_subprocess_exec(
        str(stormload), "--ports", f"{ports[0]},{ports[1]}", "--clients", "2", "--timeout", "15",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    storm = Storm(proc)
    try:
        assert await storm.line() == "ready 2"
        assert len(edge.subscribes) == 40
        assert all("recover" not in m for m in edge.subscribes)
        assert {m["channel"] for m in edge.subscribes[:20]} | {
            m["channel"] for m in edge.subscribes[20:]} == {
            *(f"quotes.STORM{k}" for k in range(4)),
            *(f"account.c{i}x{j}.{kind}" for i in range(2) for j in range(4)
              for kind in ("orders", "positions", "balance", "trades"))}

        # Client 0: a gap (13 skipped), a dup, a conflated skip on a conflating channel, an
        # array frame with a ping in it, a gap notice, a pub of another client's channel.
        c0 = edge.conns[0]
        await c0.send(json.dumps(pub("account.c0x0.orders", 11)))
        await c0.send(json.dumps([pub("account.c0x0.orders", 12), {"type": "ping"},
                                  pub("account.c0x0.orders", 14)]))
        assert await asyncio.wait_for(edge.pongs.get(), LINE_TIMEOUT) == 0
        await c0.send(json.dumps(pub("account.c0x0.orders", 14)))
        await c0.send(json.dumps(pub("quotes.STORM0", 12)))
        await c0.send(json.dumps({"type": "gap", "channel": "quotes.STORM1", "from": 11,
                                  "to": 12}))
        await c0.send(json.dumps(pub("account.c1x0.orders", 50)))  # not its channel: ignored
        await c0.send(json.dumps(pub("quotes.STORM2", 11)))
        tops = tmp_path / "tops.txt"
        tops.write_text("account.c0x0.orders 14\nquotes.STORM2 11\naccount.c1x0.orders 10\n")
        # quotes.STORM2 is shared: client 1 is behind on it until it gets 11 too.
        await edge.conns[1].send(json.dumps(pub("quotes.STORM2", 11)))
        check = json.loads(await storm.command(f"check {tops} 10"))
        assert check["behind"] == 0 and check["pairs"] == 4
        stats = json.loads(await storm.command("stats"))
        assert (stats["gaps"], stats["dups"], stats["conflated"], stats["gap_notices"]) == (
            1, 1, 1, 1), stats

        # The storm: one 503, one deferred subscribe, a channel whose epoch changed.
        edge.subscribes.clear()
        edge.refuse = 1
        edge.defer = {"account.c1x2.balance"}
        edge.new_epoch = {"quotes.STORM3"}
        result = json.loads(await storm.command("storm"))
        assert result["back"] == 2 and not result["timed_out"], result
        assert 0 < result["p50"] <= result["max"] < 15
        # Where the time went: each back client was upgraded, then connected, then back.
        assert 0 < result["upgraded_p50"] <= result["connected_p50"] <= result["p50"]
        assert result["upgraded_p90"] <= result["connected_p90"] <= result["p90"]
        assert result["refused"] == 1 and result["deferred"] == 1
        assert result["recovered"] == 38 and result["resynced"] == 2  # STORM3 for both
        recovers = {(m["channel"], m["recover"]["offset"]) for m in edge.subscribes}
        assert ("account.c0x0.orders", 14) in recovers and ("quotes.STORM0", 12) in recovers
        assert sum(m["channel"] == "account.c1x2.balance" for m in edge.subscribes) == 2

        tops.write_text("account.c1x1.trades 11\n")  # never published to it: stays behind
        check = json.loads(await storm.command(f"check {tops} 0.3"))
        assert check == {"behind": 1, "pairs": 1, "waited": pytest.approx(0.3, abs=0.3)}
        assert await storm.command("quit") == "bye"
        assert await asyncio.wait_for(proc.wait(), LINE_TIMEOUT) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
