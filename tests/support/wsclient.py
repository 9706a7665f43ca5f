"""A minimal protocol client for tests: records every message, answers pings, tracks
positions per channel. (The full Python client, with reconnects, is a later issue's.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import websockets
from websockets.asyncio.client import ClientConnection


async def wait_until(changed: asyncio.Event, cond: Callable[[], bool],
                     timeout: float = 10.0) -> None:
    """Until `cond()` holds, re-checked whenever `changed` is set (by whoever changes what
    `cond` looks at); TimeoutError after `timeout` s."""
    async with asyncio.timeout(timeout):
        while not cond():
            changed.clear()
            if cond():
                return
            await changed.wait()


class ProtoClient:
    def __init__(self, ws: ClientConnection, binary: bool = False) -> None:
        self.ws = ws
        self.binary = binary
        self.ids = itertools.count(1)
        self.messages: list[dict[str, Any]] = []
        # Per frame received: (index in `messages` of its first message, messages, bytes).
        self.frames: list[tuple[int, int, int]] = []
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.offsets: dict[str, list[int]] = {}
        self.positions: dict[str, tuple[int, str]] = {}
        self.resyncs: list[dict[str, Any]] = []
        self._recover: dict[int, tuple[int, str] | None] = {}
        self.answer_pings = True
        self.changed = asyncio.Event()
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str, *, binary: bool = False, connect: bool = True,
                   **kwargs: Any) -> ProtoClient:
        sub = ["fanout.msgpack"] if binary else ["fanout.json"]
        ws = await websockets.connect(url, subprotocols=sub, max_size=None,  # type: ignore[arg-type]
                                      ping_interval=None, **kwargs)
        client = cls(ws, binary)
        if connect:
            reply = await client.request({"type": "connect", "name": "test"})
            assert reply["type"] == "connected", reply
        return client

    async def send(self, obj: dict[str, Any]) -> None:
        await self.ws.send(msgpack.packb(obj) if self.binary else json.dumps(obj))

    async def request(
        self, obj: dict[str, Any], timeout: float = 10.0, rid: int | None = None
    ) -> dict[str, Any]:
        rid = next(self.ids) if rid is None else rid
        fut = self.replies[rid] = asyncio.get_running_loop().create_future()
        await self.send({**obj, "id": rid})
        return await asyncio.wait_for(fut, timeout)

    async def subscribe(self, channel: str, *, recover: tuple[int, str] | None = None,
                        snapshot: bool = False) -> dict[str, Any]:
        req: dict[str, Any] = {"type": "subscribe", "channel": channel, "snapshot": snapshot}
        if recover is not None:
            req["recover"] = {"offset": recover[0], "epoch": recover[1]}
        rid = next(self.ids)
        self._recover[rid] = recover
        return await self.request(req, rid=rid)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
                items = msg if isinstance(msg, list) else [msg]
                size = len(raw.encode() if isinstance(raw, str) else raw)
                self.frames.append((len(self.messages), len(items), size))
                for m in items:
                    self._on_message(m)
        except websockets.ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if not self.closed.done():
                self.closed.set_result(
                    (rcvd.code, rcvd.reason) if rcvd else (None, "")
                )
            self.changed.set()

    def _on_message(self, m: dict[str, Any]) -> None:
        self.messages.append(m)
        kind = m.get("type")
        rid = m.get("id")
        if kind == "ping" and self.answer_pings:
            task = asyncio.create_task(self.send({"type": "pong"}))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "pub":
            ch = m["channel"]
            self.offsets.setdefault(ch, []).append(m["offset"])
            epoch = self.positions.get(ch, (0, ""))[1]
            self.positions[ch] = (m["offset"], epoch)
        elif kind == "subscribed":
            # Set the position here, in frame order: the replayed messages may follow the
            # reply in the same (coalesced) frame.
            recover = self._recover.pop(rid, None) if isinstance(rid, int) else None
            ch = m["channel"]
            self.positions[ch] = (
                recover[0] if m["recovered"] and recover else m["offset"], m["epoch"]
            )
            self.offsets.setdefault(ch, [])
        elif kind == "resync":
            self.resyncs.append(m)
            self.positions[m["channel"]] = (m["offset"], m["epoch"])
        if rid is not None and rid in self.replies and kind != "pub":
            fut = self.replies.pop(rid)
            if not fut.done():
                fut.set_result(m)
        self.changed.set()

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        await wait_until(self.changed, cond, timeout)

    def covered(self, channel: str) -> list[int]:
        """The offsets of `channel` received, plus those `gap` notices announced dropped,
        in arrival order: under the drop policy, every offset exactly once."""
        seen = list(self.offsets.get(channel, []))
        for m in self.messages:
            if m.get("type") == "gap" and m["channel"] == channel:
                seen += range(m["from"], m["to"] + 1)
        return seen

    async def watch_heartbeat(self, interval: float, timeout: float) -> float:
        """Return the moment (monotonic) the server is found silent: no ping within
        interval + timeout. Clients reconnect then; this one just reports it."""
        loop = asyncio.get_running_loop()
        seen = sum(m.get("type") == "ping" for m in self.messages)
        deadline = loop.time() + interval + timeout
        while True:
            count = sum(m.get("type") == "ping" for m in self.messages)
            if count > seen:
                seen, deadline = count, loop.time() + interval + timeout
            if loop.time() >= deadline:
                return time.monotonic()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), deadline - loop.time())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


# --- raw HTTP handshakes: what the edge answers before (or instead of) the upgrade -----------


@dataclass
class HttpAnswer:
    """The answer to a raw WebSocket handshake; after a 101 the connection stays open."""

    status: int
    headers: dict[str, str]  # lower-case names
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def body(self, timeout: float = 5.0) -> bytes:
        """The rest, up to the server's close."""
        return await asyncio.wait_for(self.reader.read(), timeout)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def upgrade_request(host: str, path: str = "/ws",
                    headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """A WebSocket handshake request (RFC 6455 4.1), as a browser would send it."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
             *(f"{name}: {value}" for name, value in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def http_upgrade(
    host: str, port: int, *, path: str = "/ws", headers: Sequence[tuple[str, str]] = (),
    local_addr: tuple[str, int] | None = None, timeout: float = 10.0,
) -> HttpAnswer:
    """Send a handshake over a plain socket (from `local_addr`, e.g. ("127.0.0.2", 0), to
    look like another client) and read the answer's status line and headers."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
        writer.write(upgrade_request(f"{host}:{port}", path, headers))
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.split("\r\n")
    answer: dict[str, str] = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        answer[name.strip().lower()] = value.strip()
    return HttpAnswer(int(status_line.split()[1]), answer, reader, writer)
