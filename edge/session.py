"""One client connection: reads requests, answers them, and writes from a bounded queue.

The hub never awaits a client: it calls `enqueue`, which appends to this session's queue
(or ends the session if the queue is over its bounds) and wakes the session's own writer
task. So a client that stops reading delays nobody but itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from common import protocol
from common.config import EdgeConfig
from common.errors import (
    AlreadySubscribed,
    BadRequest,
    CloseCode,
    Disconnect,
    InternalError,
    NotSubscribed,
    RequestError,
    TooManySubscriptions,
)
from common.protocol import Codec, Frame
from edge.hub import Hub
from edge.stats import EdgeStats

_CLOSE_REASONS = {
    CloseCode.SHUTDOWN: "shutdown",
    CloseCode.SLOW_CONSUMER: "slow_consumer",
    CloseCode.INSUFFICIENT_STATE: "insufficient_state",
    CloseCode.NO_PONG: "no_pong",
    CloseCode.SERVER_ERROR: "server_error",
    CloseCode.CONNECT_TIMEOUT: "connect_timeout",
    CloseCode.BAD_REQUEST: "bad_request",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.CONNECTION_LIMIT: "connection_limit",
}


# Closes fanout does not choose itself: uvicorn's (1009 oversized frame, 1012 shutdown).
_PEER_CLOSE_REASONS = {1009: "message_too_big", 1012: "shutdown"}


class Session:
    def __init__(
        self,
        ws: WebSocket,
        hub: Hub,
        config: EdgeConfig,
        stats: EdgeStats,
        logger: logging.Logger,
        codec: Codec,
        client_id: str,
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.config = config
        self.stats = stats
        self.log = logger
        self.codec = codec
        self.client_id = client_id
        self.subscriptions: set[str] = set()
        self._subscribing: dict[str, asyncio.Task[None]] = {}
        self._queue: deque[Frame] = deque()
        self._queue_bytes = 0
        self._wakeup = asyncio.Event()
        self._done = asyncio.Event()
        self._close: Disconnect | None = None
        self._awaiting_pong = False
        self._peer_close_code = 1005

    # --- called by the hub (synchronous, never blocks) -----------------------------------

    def enqueue(self, frame: Frame, force: bool = False) -> None:
        """Queue a frame for this client; over the queue's bounds the client is closed as a
        slow consumer. `force` skips the bounds: for a subscribe's reply and replay, which
        the recovery limit bounds already and which a client must get whole."""
        if self._close is not None:
            return
        size = len(frame)
        if not force and (
            len(self._queue) >= self.config.queue_max_messages
            or self._queue_bytes + size > self.config.queue_max_bytes
        ):
            self.fail(Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer"))
            return
        self._queue.append(frame)
        self._queue_bytes += size
        self.stats.queue_messages += 1
        self.stats.queue_bytes += size
        self._wakeup.set()

    def fail(self, exc: Disconnect) -> None:
        """End the session with `exc`'s close code (from any task)."""
        if self._close is None:
            self._close = exc
            self._done.set()

    # --- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        self.stats.connections += 1
        self.stats.connections_total += 1
        tasks = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._write_loop()),
            asyncio.create_task(self._done.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, Disconnect):
                    self.fail(exc)
                elif exc is not None and not isinstance(exc, WebSocketDisconnect | OSError):
                    self.log.error("session error client=%s error=%r", self.client_id, exc,
                                   exc_info=exc)
                    self.fail(Disconnect(CloseCode.SERVER_ERROR, "internal error"))
        finally:
            tasks += self._subscribing.values()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    await task
            for name in self.subscriptions:
                self.hub.unsubscribe(self, name)
            self.subscriptions.clear()
            self.stats.queue_messages -= len(self._queue)
            self.stats.queue_bytes -= self._queue_bytes
            self._queue.clear()
            self.stats.connections -= 1
            close = self._close
            if close is not None:
                reason = _CLOSE_REASONS.get(close.code, "other")
            else:
                reason = _PEER_CLOSE_REASONS.get(self._peer_close_code, "client_closed")
            self.stats.count_disconnect(reason)
            if close is not None:
                self.log.info("disconnect client=%s code=%d reason=%s",
                              self.client_id, close.code, close.reason)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.ws.close(int(close.code), close.reason), 2.0)

    async def _receive(self) -> Frame | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self._peer_close_code = int(message.get("code") or 1005)
            return None
        self.stats.frames_received += 1
        text = message.get("text")
        if text is not None:
            return str(text)
        data: bytes = message.get("bytes") or b""
        return data

    async def _read_loop(self) -> None:
        try:
            first = await asyncio.wait_for(self._receive(), self.config.connect_timeout)
        except TimeoutError:
            raise Disconnect(CloseCode.CONNECT_TIMEOUT, "no connect in time") from None
        if first is None:
            return
        obj = protocol.decode_frame(first, self.codec)
        try:
            command = protocol.parse_command(obj)
        except RequestError as exc:
            raise Disconnect(CloseCode.BAD_REQUEST, f"bad connect: {exc.message}") from None
        if not isinstance(command, protocol.Connect):
            raise Disconnect(CloseCode.BAD_REQUEST, "first message must be connect")
        self.enqueue(protocol.encode(protocol.connected(
            command.id, self.client_id, self.config.ping_interval, self.config.pong_timeout
        ), self.codec))
        pinger = asyncio.create_task(self._ping_loop())
        try:
            while True:
                frame = await self._receive()
                if frame is None:
                    return
                await self._handle(protocol.decode_frame(frame, self.codec))
        finally:
            pinger.cancel()

    async def _handle(self, obj: dict[str, Any]) -> None:
        try:
            command = protocol.parse_command(obj)
            if isinstance(command, protocol.Subscribe):
                # Subscribes wait on Redis: run them beside the reader, so that a pong or
                # another request is not stuck behind them.
                self._start_subscribe(command)
                return
            reply = await self._execute(command)
        except RequestError as exc:
            self._reply_error(obj, exc)
            return
        if reply is not None:
            self.enqueue(protocol.encode(reply, self.codec))

    def _reply_error(self, obj: dict[str, Any], exc: RequestError) -> None:
        self.stats.count_error(exc.code)
        self.enqueue(protocol.encode(protocol.error(protocol.request_id_of(obj), exc), self.codec))

    def _start_subscribe(self, command: protocol.Subscribe) -> None:
        name = command.channel.name
        if name in self.subscriptions or name in self._subscribing:
            raise AlreadySubscribed(f"already subscribed to {name}")
        if len(self.subscriptions) + len(self._subscribing) >= self.config.max_subscriptions:
            raise TooManySubscriptions(
                f"at most {self.config.max_subscriptions} subscriptions per connection"
            )
        task = asyncio.create_task(self._subscribe(command))
        self._subscribing[name] = task
        task.add_done_callback(lambda _: self._subscribing.pop(name, None))

    async def _execute(self, command: protocol.Command) -> dict[str, Any] | None:
        if isinstance(command, protocol.Unsubscribe):
            name = command.channel.name
            pending = self._subscribing.get(name)
            if pending is not None:
                await asyncio.wait([pending])  # unsubscribe what that subscribe gives
            if name not in self.subscriptions:
                raise NotSubscribed(f"not subscribed to {name}")
            self.subscriptions.discard(name)
            self.hub.unsubscribe(self, name)
            return protocol.unsubscribed(command.id, name)
        if isinstance(command, protocol.Pong):
            self._awaiting_pong = False
            return None
        if isinstance(command, protocol.Ping):
            return protocol.pong(command.id)
        if isinstance(command, protocol.Connect):
            raise BadRequest("already connected")
        raise InternalError("unhandled command")

    async def _subscribe(self, command: protocol.Subscribe) -> None:
        name = command.channel.name
        try:
            _, joined = await self.hub.subscribe(
                self, command.channel, command.recover, command.snapshot, command.id
            )
        except RequestError as exc:
            self.stats.count_error(exc.code)
            self.enqueue(protocol.encode(protocol.error(command.id, exc), self.codec))
            return
        # No await between the hub's merge and these enqueues: the reply and the replay go
        # out before any live message that follows them.
        self.subscriptions.add(name)
        self.enqueue(protocol.encode(joined.reply, self.codec), force=True)
        for pub in joined.replay:
            self.enqueue(pub.frame(self.codec), force=True)

    async def _write_loop(self) -> None:
        queue = self._queue
        stats = self.stats
        send = self.ws.send
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while queue:
                frame = queue.popleft()
                size = len(frame)
                self._queue_bytes -= size
                stats.queue_messages -= 1
                stats.queue_bytes -= size
                if isinstance(frame, str):
                    await send({"type": "websocket.send", "text": frame})
                else:
                    await send({"type": "websocket.send", "bytes": frame})
                stats.frames_sent += 1
                stats.messages_sent += 1
                stats.bytes_sent += size

    async def _ping_loop(self) -> None:
        """Application pings (browsers cannot see protocol pings). The first one comes at a
        random point of the interval so that clients that reconnected together do not
        ping in lockstep."""
        interval = self.config.ping_interval
        timeout = self.config.pong_timeout
        await asyncio.sleep(random.uniform(interval / 2, interval))
        ping = protocol.encode(protocol.ping(), self.codec)
        while True:
            self._awaiting_pong = True
            self.enqueue(ping)
            await asyncio.sleep(timeout)
            if self._awaiting_pong:
                self.fail(Disconnect(CloseCode.NO_PONG, "no pong"))
                return
            await asyncio.sleep(max(interval - timeout, 0.0))
