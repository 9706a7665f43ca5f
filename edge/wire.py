"""Writing WebSocket data frames straight to the connection's transport.

Why: fanning one message out to 500 sockets through ``WebSocket.send`` costs a coroutine
chain per client (Starlette's checks, uvicorn's ASGI ``send``, websockets' frame
serializer) on top of the write itself. A server frame is not masked, so the bytes of a
frame are the same for every client of a codec: the hub builds them once per batch and
each client's cost is one ``transport.write``.

`RawWebSocket` is that fast path, for the edge's lean WebSocket protocol (edge/leanws.py,
which negotiates no extension) and for uvicorn's ``websockets-sansio`` protocol (the one
the edge falls back to, see edge/server.py) when no extension (permessage-deflate) was
negotiated: there the library must compress. Anything else (another ASGI server,
Starlette's test client) gets None and the session sends through ``WebSocket.send``.
Frames are written whole, in one ``write`` each, so they never interleave with the
library's own frames (pongs, the close frame), which uvicorn also writes whole.

The edge's ASGI dispatcher (edge/app.py `EdgeApp`) keeps the server's own ``send`` in the
scope (`RAW_SEND`) for the connection's life: the protocol object is its ``__self__``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import Scope

try:  # uvicorn is a dependency, but its protocol modules are internals: degrade, never fail
    from uvicorn.protocols.websockets.websockets_sansio_impl import (
        WebSocketsSansIOProtocol as _SansIO,
    )
except ImportError:  # pragma: no cover
    _SansIO = None  # type: ignore[assignment,misc]

from edge.leanws import LeanWebSocket

RAW_SEND = "fanout.raw_send"  # scope key

OP_TEXT = 0x1
OP_BINARY = 0x2


def frame_header(opcode: int, length: int) -> bytes:
    """The header of a final, unmasked frame (RFC 6455 5.2) carrying `length` bytes."""
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length))
    if length < 0x10000:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


def encode_frame(payload: str | bytes) -> bytes:
    """A whole data frame: text for a str (JSON), binary for bytes (msgpack)."""
    if isinstance(payload, str):
        data = payload.encode()
        return frame_header(OP_TEXT, len(data)) + data
    return frame_header(OP_BINARY, len(payload)) + payload


class RawWebSocket:
    """Direct writes to one uvicorn websockets-sansio connection."""

    __slots__ = ("_proto", "_transport", "_writable")

    def __init__(self, proto: Any) -> None:
        self._proto = proto
        self._transport: asyncio.Transport = proto.transport
        self._writable: asyncio.Event = proto.writable

    @classmethod
    def attach(cls, scope: Scope) -> RawWebSocket | None:
        """The fast path for this connection, or None if it cannot have one."""
        proto = getattr(scope.get(RAW_SEND), "__self__", None)
        if isinstance(proto, LeanWebSocket):
            return cls(proto)  # the edge's own path: never an extension
        if _SansIO is None or not isinstance(proto, _SansIO):
            return None
        conn = getattr(proto, "conn", None)
        if conn is None or getattr(conn, "extensions", None):
            return None  # compression negotiated: frames must go through the library
        if not all(hasattr(proto, a) for a in ("transport", "writable", "close_sent",
                                               "disconnected")):
            return None  # pragma: no cover - a uvicorn we do not know
        return cls(proto)

    @property
    def ready(self) -> bool:
        """A write goes out now: open, not closing, and under the write buffer's high-water
        mark (above it the transport paused us; the session's queue takes over)."""
        return self._writable.is_set() and not self.closed

    @property
    def closed(self) -> bool:
        proto = self._proto
        return bool(proto.close_sent or proto.disconnected or self._transport.is_closing())

    async def wait_writable(self) -> None:
        """Until the transport's buffer drained below its low-water mark (or the connection
        was lost: uvicorn sets the event then too)."""
        await self._writable.wait()

    def write(self, data: bytes) -> None:
        """Whole frames only (see the module doc)."""
        self._transport.write(data)
