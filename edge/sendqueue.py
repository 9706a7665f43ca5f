"""A client's bounded send queue and its overflow policies. Pure: no I/O, no clock.

The hub pushes publications (already encoded once for everyone); the session's writer pops
everything pending at once, up to the frame bounds (edge/pack.py), and coalesces it into
one frame. What happens when a client
does not keep up is decided per channel namespace:

* ``disconnect``: the queue is over its bounds → the caller closes the connection with
  3001 (reconnect and recover from the last offset). Nothing is ever dropped silently.
* ``conflate``: a queued, unsent message of the same channel and key is replaced by the
  newer one (merged field by field for partial updates such as quotes), so a slow client
  gets fewer but current values. The replaced entry becomes a tombstone and the new one
  goes to the back: offsets stay increasing per channel.
* ``drop``: over the bounds, new messages are dropped and the client gets a ``gap`` notice
  naming exactly the offsets it missed, placed where they would have been.

A client found `lagging` (edge/heartbeat.py: its ping unanswered for ``max_lag`` while it
still reads, its backlog maybe in the kernel's buffers rather than here) is treated as
over the bounds for publications until it answers; its gap notices wait until then (or the
channel's next queued message), so that it gets one per range rather than one per batch.

Sizes are ``len()`` of the encoded frame: bytes for msgpack, characters for JSON text.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from enum import IntEnum, StrEnum

from common import protocol
from common.protocol import Codec, Frame
from edge.pack import split


class Policy(StrEnum):
    DISCONNECT = "disconnect"
    CONFLATE = "conflate"
    DROP = "drop"


class Outcome(IntEnum):
    QUEUED = 0
    CONFLATED = 1  # queued, replacing an older queued value of the same key
    DROPPED = 2  # not queued; a gap notice will tell the client
    OVERFLOW = 3  # not queued; the client must be disconnected


class Entry:
    """One queued message, or a *chunk*: several messages of one channel already joined
    (shared by every client of the channel; see `Batch` in the hub)."""

    __slots__ = ("alive", "channel", "count", "data", "frame", "key", "offset", "size")

    def __init__(
        self, frame: Frame, channel: str | None = None, key: str = "", offset: int = 0,
        data: str | None = None, count: int = 1,
    ) -> None:
        self.frame = frame
        self.count = count
        self.size = len(frame)
        self.channel = channel
        self.key = key
        self.offset = offset
        self.data = data  # the JSON data, kept for merging conflated partial updates
        self.alive = True


def merge_json(old: str, new: str) -> str:
    """Fields of `new` over those of `old`, when both are JSON objects; else `new`."""
    try:
        a, b = json.loads(old), json.loads(new)
    except ValueError:
        return new
    if isinstance(a, dict) and isinstance(b, dict):
        a.update(b)
        return json.dumps(a, separators=(",", ":"), ensure_ascii=False)
    return new


class SendQueue:
    def __init__(
        self,
        codec: Codec,
        max_messages: int,
        max_bytes: int,
        on_size: Callable[[int, int], None] | None = None,
    ) -> None:
        self.codec = codec
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        # None while empty: an idle client's empty deque would be ~0.7 KiB (one block).
        self._entries: deque[Entry] | None = None
        self._alive = 0
        self._bytes = 0
        self._latest: dict[tuple[str, str], Entry] = {}  # conflatable entries by key
        self._gaps: dict[str, list[int]] = {}  # channel -> [from, to] dropped, not announced
        self._on_size = on_size  # (delta messages, delta bytes), for the node's gauges
        self.lagging = False  # the client is behind in time: full for publications

    def __len__(self) -> int:
        return self._alive

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def busy(self) -> bool:
        """Something to send: a queued message or a gap not yet announced."""
        return self._alive > 0 or bool(self._gaps)

    @property
    def pending_gaps(self) -> bool:
        return bool(self._gaps)

    def _full(self, size: int) -> bool:
        return (self._alive >= self.max_messages or self._bytes + size > self.max_bytes
                or self.lagging)

    def _count(self, messages: int, size: int) -> None:
        self._alive += messages
        self._bytes += size
        if self._on_size is not None:
            self._on_size(messages, size)

    def _append(self, entry: Entry) -> None:
        entries = self._entries
        if entries is None:
            entries = self._entries = deque()
        entries.append(entry)
        self._count(entry.count, entry.size)

    def _kill(self, entry: Entry) -> None:
        entry.alive = False
        self._count(-1, -entry.size)
        # Tombstones of a client that reads nothing would pile up: compact now and then.
        entries = self._entries
        if entries is not None and len(entries) > 64 and len(entries) > 2 * self._alive:
            self._entries = deque(e for e in entries if e.alive)

    def push_control(self, frame: Frame) -> None:
        """Replies, pings, resyncs, recovered messages: never dropped nor conflated (each is
        bounded by something else: a request, the ping interval, the recovery limit)."""
        self._append(Entry(frame))

    def push(
        self, channel: str, offset: int, key: str, data: str, frame: Frame, policy: Policy,
        merge: bool = False, deleted: bool = False,
    ) -> Outcome:
        """Queue one publication under `policy`. `frame` is its shared encoding; `merge`
        says that its data is a partial update to merge into a conflated older value."""
        if policy is Policy.CONFLATE:
            return self._conflate(channel, offset, key, data, frame, merge, deleted)
        size = len(frame)
        if self._full(size):
            if policy is Policy.DISCONNECT:
                return Outcome.OVERFLOW
            self._dropped(channel, offset, offset)
            return Outcome.DROPPED
        self._announce_gap(channel)
        self._append(Entry(frame, channel, key, offset))
        return Outcome.QUEUED

    def push_chunk(
        self, channel: str, first: int, last: int, part: Frame, count: int, policy: Policy
    ) -> Outcome:
        """Queue `count` messages (offsets first..last) joined into `part` (JSON texts joined
        by commas, or msgpack objects concatenated). All or nothing: over the bounds the
        whole chunk is dropped (one gap) or the client disconnected. Not conflatable: the
        caller sends messages one by one to a conflating client that is behind."""
        size = len(part)
        if self._full(size):
            if policy is Policy.DISCONNECT:
                return Outcome.OVERFLOW
            if policy is Policy.DROP:
                self._dropped(channel, first, last)
                return Outcome.DROPPED
        self._announce_gap(channel)
        self._append(Entry(part, channel, "", last, count=count))
        return Outcome.QUEUED

    def _dropped(self, channel: str, first: int, last: int) -> None:
        """Offsets first..last of `channel` were dropped: extend its pending gap notice."""
        gap = self._gaps.get(channel)
        if gap is None:
            self._gaps[channel] = [first, last]
        else:
            gap[1] = last

    def _conflate(
        self, channel: str, offset: int, key: str, data: str, frame: Frame, merge: bool,
        deleted: bool,
    ) -> Outcome:
        old = self._latest.get((channel, key))
        outcome = Outcome.QUEUED
        if old is not None and old.alive:
            self._kill(old)
            outcome = Outcome.CONFLATED
            if merge and old.data is not None and not deleted:
                data = merge_json(old.data, data)
                frame = self.encode_pub(channel, offset, key, data)
        elif self._full(len(frame)) and (
            self._alive >= 2 * self.max_messages
            or self._bytes + len(frame) > 2 * self.max_bytes
        ):
            # A new key on a queue far over its bounds: conflation cannot keep it bounded.
            return Outcome.OVERFLOW
        entry = Entry(frame, channel, key, offset, data if merge and not deleted else None)
        self._latest[(channel, key)] = entry
        self._append(entry)
        return outcome

    def encode_pub(self, channel: str, offset: int, key: str, data: str) -> Frame:
        """This client's own encoding of a publication whose data was merged for it."""
        if self.codec is Codec.JSON:
            return protocol.pub_json(channel, offset, key, data)
        return protocol.pub_msgpack(channel, offset, key, data)

    def _announce_gap(self, channel: str) -> None:
        gap = self._gaps.pop(channel, None)
        if gap is not None:
            self.push_control(protocol.encode(protocol.gap(channel, gap[0], gap[1]), self.codec))

    def pop_batch(self, max_messages: int, max_bytes: int) -> list[Frame]:
        """The next frames to send, oldest first: at least one if any, at most
        `max_messages` and (beyond the first) `max_bytes` in all. (Without chunks; the
        writer uses `pop_parts`.)"""
        return self.pop_parts(max_messages, max_bytes)[0]

    def pop_parts(self, max_messages: int, max_bytes: int) -> tuple[list[Frame], int]:
        """The next parts to send and how many messages they hold, oldest first: the first
        frame they make under the frame bounds (edge/pack.py `split`), at least one part
        if any."""
        if not self._alive and self._gaps and not self.lagging:
            self._announce_all_gaps()
        entries = self._entries
        out: list[Frame] = []
        if entries is None:
            return out, 0
        alive = (e for e in entries if e.alive)
        first = next(split(((e.size, e.count) for e in alive), max_bytes, max_messages), None)
        if first is not None:
            n, count = first
            latest = self._latest
            size = 0
            while len(out) < n:
                entry = entries.popleft()
                if not entry.alive:
                    continue
                entry.alive = False
                if entry.channel is not None and latest.get((entry.channel, entry.key)) is entry:
                    del latest[(entry.channel, entry.key)]
                out.append(entry.frame)
                size += entry.size
            self._count(-count, -size)
        else:
            count = 0
            entries.clear()  # only tombstones
        if not entries:
            self._entries = None
        if not self._alive and self._gaps and not self.lagging:
            self._announce_all_gaps()
        return out, count

    def _announce_all_gaps(self) -> None:
        """Everything before the drops went out: announce them now, not at the next push."""
        for channel in list(self._gaps):
            self._announce_gap(channel)

    def forget(self, channel: str) -> None:
        """Drop what is pending for `channel` beyond the queued frames: a gap not yet
        announced (after a resync or an unsubscribe it would name offsets that no longer
        mean anything to the client)."""
        self._gaps.pop(channel, None)

    def clear(self) -> None:
        if self._on_size is not None:
            self._on_size(-self._alive, -self._bytes)
        self._entries = None
        self._latest.clear()
        self._gaps.clear()
        self._alive = 0
        self._bytes = 0

