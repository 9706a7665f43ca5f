"""A WebSocket client that reads slowly: a raw socket with a small receive buffer, from
which it takes `chunk` bytes every `period` seconds, answering pings as it reaches them
(as a real slow client does: its pong waits behind its backlog). Frames go through
websockets' sans-I/O protocol; nothing is read ahead into user space, so the backlog stays
in the kernel's buffers and the edge.

Each publication's data carries `t`, the publisher's `time.monotonic()` (same process):
`lag` is the largest `arrival - t` seen, how far behind the client was.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri


class SlowReader:
    def __init__(self, sock: socket.socket, proto: ClientProtocol, chunk: int,
                 period: float) -> None:
        self.sock = sock
        self.proto = proto
        self.chunk = chunk
        self.period = period  # 0: read as fast as it can
        self.messages: list[dict[str, Any]] = []
        self.offsets: dict[str, list[int]] = {}
        self.data: dict[str, list[dict[str, Any]]] = {}
        self.lag = 0.0
        self.pongs = 0
        self.changed = asyncio.Event()
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future())
        self._reader: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, url: str, *, rcvbuf: int = 4096, chunk: int = 2048,
                   period: float = 0.02) -> SlowReader:
        loop = asyncio.get_running_loop()
        host, port = url.split("//")[1].split("/")[0].split(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        proto = ClientProtocol(parse_uri(url), subprotocols=[Subprotocol("fanout.json")],
                               max_size=None)
        proto.send_request(proto.connect())
        client = cls(sock, proto, chunk, period)
        await client._flush()
        while True:  # the handshake, read at full speed
            data = await loop.sock_recv(sock, 65536)
            if not data:
                raise ConnectionError("closed during the handshake")
            proto.receive_data(data)
            events = proto.events_received()
            if events:
                response = events[0]
                assert isinstance(response, Response) and proto.state is State.OPEN, response
                for event in events[1:]:
                    client._on_frame(event)
                break
        client._reader = asyncio.create_task(client._read())
        return client

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.proto.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def send(self, obj: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(obj).encode())
        await self._flush()

    async def request(self, obj: dict[str, Any], kind: str, timeout: float = 30.0
                      ) -> dict[str, Any]:
        """Send `obj` and wait for the first message of type `kind` after it."""
        start = len(self.messages)
        await self.send(obj)
        async with asyncio.timeout(timeout):
            while True:
                for m in self.messages[start:]:
                    if m.get("type") == kind:
                        return m
                self.changed.clear()
                await self.changed.wait()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await loop.sock_recv(self.sock, self.chunk)
                if not data:
                    self.proto.receive_eof()
                else:
                    self.proto.receive_data(data)
                for event in self.proto.events_received():
                    self._on_frame(event)
                await self._flush()
                self.changed.set()
                if not data or self.proto.state is State.CLOSED:
                    break
                if self.period:
                    await asyncio.sleep(self.period)
        except OSError:
            pass
        finally:
            rcvd = self.proto.close_rcvd
            if not self.closed.done():
                self.closed.set_result((rcvd.code, rcvd.reason) if rcvd else (None, ""))
            self.changed.set()

    def _on_frame(self, frame: Any) -> None:
        if frame.opcode is not Opcode.TEXT:
            return
        msg = json.loads(frame.data)
        now = time.monotonic()
        for m in msg if isinstance(msg, list) else [msg]:
            self.messages.append(m)
            kind = m.get("type")
            if kind == "ping":
                self.proto.send_text(b'{"type":"pong"}')
                self.pongs += 1
            elif kind == "pub":
                self.offsets.setdefault(m["channel"], []).append(m["offset"])
                self.data.setdefault(m["channel"], []).append(m["data"])
                sent = m["data"].get("t") if isinstance(m["data"], dict) else None
                if isinstance(sent, float):
                    self.lag = max(self.lag, now - sent)

    def covered(self, channel: str) -> list[int]:
        """Offsets of `channel` received plus those `gap` notices said were dropped."""
        seen = list(self.offsets.get(channel, []))
        for m in self.messages:
            if m.get("type") == "gap" and m["channel"] == channel:
                seen += range(m["from"], m["to"] + 1)
        return seen

    async def wait_for(self, cond: Any, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not cond():
                self.changed.clear()
                if cond():
                    return
                await self.changed.wait()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.proto.state is State.OPEN:
                self.proto.send_close(1000)
                await self._flush()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self.sock.close()
