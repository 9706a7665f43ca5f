"""Writing to one client: straight to the socket while it keeps up, else through its
bounded send queue, drained by a writer task that exists only while the queue has
something to send (`wake` starts it, it ends when the queue is empty): an idle connection
has none (a task and its frames are ~1 KiB per connection).

Direct writes (edge/wire.py) go past the queue only when it is empty: the writer pops
parts only when the transport takes them at once, so an empty queue means nothing is in
flight and nothing can be reordered. During the hub's turn, what a client takes directly
(batches of several channels, and replies queued meanwhile) is held until `end_turn` and
written in one system call.

Holds one callback of the session's, `on_error` (how a failed write ends the session), and
lets it go in `close`, which the session's cleanup always calls: a reference back kept
after that would make every session a reference cycle, freed only by the garbage
collector's rare full collections.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.websockets import WebSocket, WebSocketDisconnect

from common.config import EdgeConfig
from common.protocol import Codec, Frame
from edge.pack import Batch, Wire, coalesce, pack
from edge.sendqueue import SendQueue
from edge.stats import EdgeStats
from edge.wire import RawWebSocket, encode_frame


class Writer:
    __slots__ = ("_closed", "_direct", "_out", "_raw", "_task", "codec", "delay", "max_bytes",
                 "max_messages", "on_error", "queue", "stats", "ws")

    def __init__(self, ws: WebSocket, codec: Codec, config: EdgeConfig, stats: EdgeStats
                 ) -> None:
        self.ws = ws
        self.codec = codec
        self.stats = stats
        self.max_bytes = config.max_frame_bytes
        self.max_messages = config.max_frame_messages
        self.delay = config.write_delay
        self.queue = SendQueue(
            # The stats' method, not one of the session's (see the module doc).
            codec, config.queue_max_messages, config.queue_max_bytes, stats.count_queue
        )
        # The writer task, while the queue has something to send (`wake`, `_drain`).
        self._task: asyncio.Task[None] | None = None
        # Called with what ended a writer task (a lost connection, a bug): set by the
        # session, dropped by `close`.
        self.on_error: Callable[[BaseException], None] | None = None
        self._closed = False
        # Direct writes to the transport (edge/wire.py), when the server allows them...
        self._raw = RawWebSocket.attach(ws.scope) if config.direct_write else None
        # ... and past the queue when it is empty, unless the writer is to wait and gather.
        self._direct = self._raw if not config.write_delay else None
        # This turn's batches (and replies) for a client writing directly, written together
        # when the hub's turn ends (`end_turn`).
        self._out: list[Batch | Frame] | None = None

    @property
    def lagging(self) -> bool:
        return self.queue.lagging

    def lag(self, lagging: bool) -> None:
        """The client is (no longer) behind in time (edge/heartbeat.py). While it is,
        everything goes through the queue, whose policy treats it as full for
        publications; when it catches up, the writer announces what was dropped."""
        if self._out is not None:
            self.end_turn()  # what this turn took goes out first, and is not lost
        self.queue.lagging = lagging
        self._direct = None if lagging or self.delay else self._raw
        if not lagging:
            self.wake()

    def wake(self) -> None:
        """Something was queued: a writer task drains it (started unless one runs: it
        writes after the current turn of the loop, so what the turn queued goes in one
        frame)."""
        if self._task is None and not self._closed:
            self._task = task = asyncio.get_running_loop().create_task(self._drain())
            task.add_done_callback(self._drained)

    def close(self) -> asyncio.Task[None] | None:
        """The session ends: no more writes; the running writer task, if any, cancelled
        (returned, for the caller to wait for); the session's callback dropped."""
        self._closed = True
        self.on_error = None
        task = self._task
        if task is not None:
            task.cancel()
        return task

    def _drained(self, task: asyncio.Task[None]) -> None:
        if self._task is task:
            self._task = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            on_error = self.on_error
            if on_error is not None:
                on_error(exc)
            # Its traceback holds the task's frames (and this writer): not kept.
            exc.__traceback__ = None

    def send(self, frame: Frame) -> None:
        """A control frame (a reply, a ping, a resync): direct if the client keeps up,
        else queued (never dropped nor conflated)."""
        raw = self._direct
        if raw is not None and not self.queue.busy:
            out = self._out
            if out is not None:  # during the hub's turn, after this turn's batches
                out.append(frame)
                return
            if raw.ready:
                self._write_now(raw, encode_frame(frame), 1, 1, len(frame))
                return
        self.queue.push_control(frame)
        self.wake()

    def send_all(self, frames: list[Frame]) -> None:
        """Control messages that belong together, in order (a subscribe's reply and the
        publications it replays), packed into as few frames as the frame bounds allow, as
        live traffic is: a client that keeps up gets them in one socket write (a replay of
        10,000 messages in about 20 frames, not 10,000); otherwise the writer coalesces
        them from the queue. Nothing sent after this (a live message) can pass them."""
        raw = self._direct
        if raw is not None and not self.queue.busy:
            out = self._out
            if out is not None:  # during the hub's turn, after this turn's batches
                out.extend(frames)
                return
            if raw.ready:
                self._write_now(raw, *pack(frames, [1] * len(frames), self.codec,
                                           self.max_bytes, self.max_messages))
                return
        push = self.queue.push_control
        for frame in frames:
            push(frame)
        self.wake()

    def hold(self) -> None:
        """What is sent from now until the end of this event-loop turn goes out in one
        write (packed as `end_turn` packs a hub turn), if the client keeps up: a client's
        20 resubscribes arrive together and are answered together, one system call and
        one frame instead of one each."""
        if self._out is not None or self.queue.busy:
            return
        raw = self._direct
        if raw is not None and raw.ready:
            self._out = []
            asyncio.get_running_loop().call_soon(self.end_turn)

    def take(self, batch: Batch) -> bool:
        """Take a whole batch directly, if the client keeps up: written at `end_turn`,
        with the batch's shared frames (one channel) or packed with the turn's others.
        False: the caller queues it."""
        if self.queue.busy:
            return False
        out = self._out
        if out is not None:  # another channel of this turn (the hot path of a watchlist)
            out.append(batch)
            return True
        raw = self._direct
        if raw is not None and raw.ready:
            self._out = [batch]
            return True
        return False

    def end_turn(self) -> None:
        """The end of the hub's turn: what this client took, in one write. One batch (one
        channel) goes as the batch's shared frames; several channels' batches (and replies
        sent meanwhile) are packed into as few frames as the frame bounds allow, so a
        watchlist client gets one frame per turn, not one per channel."""
        out, self._out = self._out, None
        raw = self._direct
        if not out or raw is None or raw.closed:
            return
        first = out[0]
        if len(out) == 1 and isinstance(first, Batch):
            self._write_now(raw, *first.wire(self.codec, self.max_bytes, self.max_messages))
        else:
            self._write_now(raw, *self._combine(out))

    def _combine(self, items: list[Batch | Frame]) -> Wire:
        """Batches and control frames, in order, as finished frames within the bounds."""
        codec = self.codec
        parts: list[Frame] = []
        counts: list[int] = []
        for item in items:
            if isinstance(item, Batch):
                for chunk in item.chunks(codec, self.max_bytes, self.max_messages):
                    parts.append(chunk.part)
                    counts.append(chunk.messages)
            else:
                parts.append(item)
                counts.append(1)
        return pack(parts, counts, codec, self.max_bytes, self.max_messages)

    def _write_now(self, raw: RawWebSocket, data: bytes, frames: int, messages: int,
                   payload: int) -> None:
        """Straight to the socket: nothing is queued before it and the transport takes it
        without blocking, so no writer task needs to wake up."""
        raw.write(data)
        stats = self.stats
        stats.writes += 1
        stats.frames_sent += frames
        stats.frames_direct += frames
        stats.messages_sent += messages
        stats.bytes_sent += payload

    async def _drain(self) -> None:
        """Drain the queue, everything pending coalesced into one frame (up to the frame
        bounds): a frame costs about the same CPU whatever it holds, so a client that
        falls behind costs less per message, not more. Writes wait while the socket's
        write buffer is over its high-water mark; meanwhile the queue's policy applies.
        Ends when the queue is empty (the next `wake` starts another)."""
        queue = self.queue
        stats = self.stats
        codec = self.codec
        max_messages = self.max_messages
        max_bytes = self.max_bytes
        raw = self._raw
        if self.delay:
            await asyncio.sleep(self.delay)
        while queue.busy:
            if raw is not None:
                if not raw.ready:
                    if raw.closed:
                        raise WebSocketDisconnect(1006)
                    await raw.wait_writable()
                    continue
                parts, count = queue.pop_parts(max_messages, max_bytes)
                if not parts:
                    break
                frame = coalesce(parts, codec, count)
                raw.write(encode_frame(frame))
            else:
                parts, count = queue.pop_parts(max_messages, max_bytes)
                if not parts:
                    break
                frame = coalesce(parts, codec, count)
                kind = "text" if codec is Codec.JSON else "bytes"
                await self.ws.send({"type": "websocket.send", kind: frame})
            stats.writes += 1
            stats.frames_sent += 1
            stats.messages_sent += count
            stats.bytes_sent += len(frame)
