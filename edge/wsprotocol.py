"""uvicorn's websockets-sansio protocol, with two faults of its own fixed for the edge.

1. **Failing a connection loses the close frame.** When websockets' parser refuses what a
   client sent (a frame over ``max_message_size``: 1009; broken framing, a bad opcode, an
   unmasked frame: 1002), uvicorn writes the close frame and closes the socket at once.
   If the client's data is still arriving (the rest of a 200 KB frame, or frames sent right
   after it), the socket is closed with unread data in its receive buffer, and the kernel
   answers with a TCP reset instead of a FIN (RFC 1122 4.2.2.13). A client that gets the
   reset before it has read the close frame loses it and sees 1006, not 1009. Here, as
   RFC 6455 7.1.7 and websockets itself do it: write the close frame, half-close (FIN),
   and keep reading (websockets discards it) until the client closes its side, or
   ``close_timeout`` (10 s) passes.

   Frames parsed together with the one that failed the connection get nothing more (a
   ping's pong would follow the end of data), and the application's sends after it end
   as for a lost connection, not with uvicorn's RuntimeError. Pings are not answered on a
   connection already lost either (a burst of them made asyncio log a warning each).

2. **A text frame that is not UTF-8** made uvicorn log a ``UnicodeDecodeError`` traceback
   (``logger.exception``) for every such frame, and close with 1007. It is an undecodable
   frame like any other (docs/protocol.md): close with 3500 ``malformed frame``, logged at
   debug level, no traceback; the client gets the close frame as in 1.

3. **Memory per connection.** uvicorn gives every connection an ``asyncio.Queue`` (three
   deques and an Event's deque, ~3 KiB) for the application's receive events and an
   ``asyncio.Event`` (a deque, ~0.8 KiB) for write backpressure; at 10,000 idle connections
   that is ~37 MiB of empty deques. `LightQueue` and `LightEvent` do the same with a list,
   and a waiter future only while someone waits. The handshake's request and response
   (headers, ~3 KiB, also held by websockets' parser) are emptied once the connection is
   accepted.

`RawWebSocket` (edge/wire.py) works on this protocol as on uvicorn's: it is a subclass.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generic, TypeVar

from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from common.errors import CloseCode

log = logging.getLogger("fanout.edge.ws")

INVALID_UTF8_REASON = "malformed frame: text is not UTF-8"
FAILED = "fanout.failed"  # in a disconnect event: the server failed the connection, not the peer

T = TypeVar("T")


class LightEvent:
    """`asyncio.Event`'s interface (`is_set`, `set`, `clear`, `wait`) without its deque:
    waiters are kept in a list that exists only while someone waits."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if self._value:
            return
        self._value = True
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            if not fut.done():
                fut.set_result(None)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(fut)
        try:
            await fut
            return True
        finally:
            waiters = self._waiters
            if waiters is not None and fut in waiters:
                waiters.remove(fut)
                if not waiters:
                    self._waiters = None


class LightQueue(Generic[T]):
    """The part of `asyncio.Queue` uvicorn's protocol uses (`put_nowait`, `get`, `empty`,
    `qsize`), unbounded, with a list instead of three deques. Its items are few: uvicorn
    pauses reading while one is queued."""

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._getters: list[asyncio.Future[None]] | None = None

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        getters = self._getters
        if getters:
            fut = getters.pop(0)
            if not getters:
                self._getters = None
            if not fut.done():
                fut.set_result(None)

    async def get(self) -> T:
        while not self._items:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if self._getters is None:
                self._getters = []
            self._getters.append(fut)
            try:
                await fut
            except BaseException:
                getters = self._getters
                if getters is not None and fut in getters:
                    getters.remove(fut)
                    if not getters:
                        self._getters = None
                elif self._items:  # woken, then cancelled: pass the wake-up on
                    self._wake_next()
                raise
        return self._items.pop(0)

    def _wake_next(self) -> None:
        getters = self._getters
        if getters:
            fut = getters.pop(0)
            if not getters:
                self._getters = None
            if not fut.done():
                fut.set_result(None)


class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):
    _failed = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LightQueue()  # type: ignore[assignment]
        writable = LightEvent()
        writable.set()
        self.writable = writable  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Reference cycles that would keep a closed connection's objects until a full
        # garbage collection, rare with the edge's thresholds (edge/server.py), instead of
        # freeing them now: websockets keeps the parser's exception, whose traceback holds
        # the parser; asyncio's socket transport keeps a bound method of its own (its read
        # callback), and with it the socket object and buffers, once the connection is lost.
        if self.conn.parser_exc is not None:
            self.conn.parser_exc.__traceback__ = None
        # (asyncio's transport only: uvloop's is a C object, without that attribute.)
        state = getattr(self.transport, "__dict__", None) or {}
        if state.get("_read_ready_cb") is not None:
            state["_read_ready_cb"] = None

    def data_received(self, data: bytes) -> None:
        if self._failed:
            # Read on until the client's EOF, so that closing never resets the connection;
            # websockets discards it all (RFC 6455 7.1.7: no more processing).
            self.conn.receive_data(data)
            return
        super().data_received(data)

    def handle_ping(self) -> None:
        # No pong after the end of data (a ping parsed with the frame that failed the
        # connection), nor after the connection was lost: a batch of pings from a client
        # that reset the connection made asyncio log "socket.send() raised exception".
        if self._failed or self.transport.is_closing():
            return
        super().handle_ping()

    async def send(self, message: Any) -> None:
        if self._failed and message["type"] == "websocket.send":
            raise ClientDisconnected()  # as for a connection lost (uvicorn: a RuntimeError)
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # The handshake's request and response, and the scope's copy of the request
            # headers, are never read again (uvicorn keeps them for the connection's life;
            # the edge reads the headers only for admission, before the upgrade): ~3 KiB
            # per connection.
            # websockets' parser (a generator) keeps the request in a local variable for
            # the connection's life too: its headers (~2.5 KiB) are emptied in place.
            request, response = self.request, self.response
            if request is not None:
                request.headers.clear()
            if response is not None:
                response.headers.clear()
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
            self.scope["headers"] = []

    def handle_parser_exception(self) -> None:
        """websockets refused a frame and queued its close frame (1009, 1002, ...)."""
        self._fail_connection()

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text" and not self.close_sent:
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.frames = []
                log.debug("text frame is not UTF-8 client=%s", self.client)
                self.conn.fail(int(CloseCode.BAD_REQUEST), INVALID_UTF8_REASON)
                self._fail_connection()
                return
            self.frames = []
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()
            return
        super().send_receive_event_to_app()

    def _fail_connection(self) -> None:
        close = self.conn.close_sent
        code, reason = (close.code, close.reason) if close is not None else (1006, "")
        event: Any = {"type": "websocket.disconnect", "code": code, "reason": reason, FAILED: True}
        self.queue.put_nowait(event)
        self.close_sent = True
        self._failed = True
        self.stop_keepalive()
        transport = self.transport
        for chunk in self.conn.data_to_send():
            if chunk:
                transport.write(chunk)
            elif transport.can_write_eof():  # websockets' end of data: half-close
                transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(self.close_timeout, transport.close)
