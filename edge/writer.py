"""Writing to one client: straight to the socket while it keeps up, else through its
bounded send queue, drained by the writer task (`run`).

Direct writes (edge/wire.py) go past the queue only when it is empty: the writer pops
parts only when the transport takes them at once, so an empty queue means nothing is in
flight and nothing can be reordered. During the hub's turn, what a client takes directly
(batches of several channels, and replies queued meanwhile) is held until `end_turn` and
written in one system call.

Holds nothing of the session (no callbacks): a reference back would make every session a
reference cycle, freed only by the garbage collector's rare full collections.
"""

from __future__ import annotations

import asyncio

from starlette.websockets import WebSocket, WebSocketDisconnect

from common.config import EdgeConfig
from common.protocol import Codec, Frame
from edge.pack import Batch, Wire, coalesce, pack
from edge.sendqueue import SendQueue
from edge.stats import EdgeStats
from edge.wire import RawWebSocket, encode_frame
from edge.wsprotocol import LightEvent


class Writer:
    __slots__ = ("_direct", "_out", "_raw", "_wakeup", "codec", "delay", "max_bytes",
                 "max_messages", "queue", "stats", "ws")

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
        self._wakeup = LightEvent()  # asyncio.Event's deque is ~0.8 KiB per connection
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
        self.queue.lagging = lagging
        self._direct = None if lagging or self.delay else self._raw
        if not lagging:
            self._wakeup.set()

    def wake(self) -> None:
        """Something was queued: the writer task drains it."""
        self._wakeup.set()

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
        self._wakeup.set()

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
        self._wakeup.set()

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

    async def run(self) -> None:
        """Drain the queue, everything pending coalesced into one frame (up to the frame
        bounds): a frame costs about the same CPU whatever it holds, so a client that
        falls behind costs less per message, not more. Writes wait while the socket's
        write buffer is over its high-water mark; meanwhile the queue's policy applies."""
        queue = self.queue
        stats = self.stats
        codec = self.codec
        max_messages = self.max_messages
        max_bytes = self.max_bytes
        delay = self.delay
        raw = self._raw
        send = self.ws.send
        kind = "text" if codec is Codec.JSON else "bytes"
        while True:
            await self._wakeup.wait()
            if delay:
                await asyncio.sleep(delay)
            self._wakeup.clear()
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
                    await send({"type": "websocket.send", kind: frame})
                stats.writes += 1
                stats.frames_sent += 1
                stats.messages_sent += count
                stats.bytes_sent += len(frame)
