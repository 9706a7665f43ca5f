"""Framing: how encoded messages become WebSocket frames within the frame bounds.

Pure: no I/O. One rule (`split`) decides where a frame ends: before a part that would take
it over `max_messages` messages or `max_bytes` (the parts' sizes plus one separator each);
a part larger than that goes alone. Every path that makes frames uses it: a channel's
batch shared by its subscribers (`Batch`), a client's turn of several batches and replies
(`pack`), and the send queue's writer (`SendQueue.pop_parts`, then `coalesce`).

A server frame is not masked, so its bytes are the same for every client of a codec:
`Batch` encodes and frames a batch once per codec, however many clients take it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

from common import protocol
from common.protocol import Codec, Frame
from edge.wire import encode_frame

if TYPE_CHECKING:
    from common.broker import Publication


class Wire(NamedTuple):
    """Finished frames, ready to write: `data` holds `frames` frames carrying `messages`
    messages, `payload` bytes of them (frame headers not counted)."""

    data: bytes
    frames: int
    messages: int
    payload: int


class Chunk(NamedTuple):
    """Messages first..last (offsets) of one channel joined into `part`, within the frame
    bounds: a queue entry shared by every client of the channel."""

    part: Frame
    messages: int
    first: int
    last: int


def split(
    parts: Iterable[tuple[int, int]], max_bytes: int, max_messages: int
) -> Iterator[tuple[int, int]]:
    """The frames that `parts` (size, messages) make, in order: (parts, messages) of each.
    Lazy, so that a queue can take its first frame without reading the rest."""
    n = count = size = 0
    for part_size, part_count in parts:
        if n and (size + part_size > max_bytes or count + part_count > max_messages):
            yield n, count
            n = count = size = 0
        n += 1
        count += part_count
        size += part_size + 1
    if n:
        yield n, count


def join(frames: Sequence[Frame], codec: Codec) -> Frame:
    """Encoded messages as one part: JSON texts joined by commas, msgpack concatenated."""
    if codec is Codec.JSON:
        return ",".join(frames)  # type: ignore[arg-type]
    return b"".join(frames)  # type: ignore[arg-type]


def coalesce(frames: Sequence[Frame], codec: Codec, n: int | None = None) -> Frame:
    """One WebSocket frame for several messages: a JSON array, or a msgpack array, built by
    joining the already encoded messages (no re-encoding). A single message goes as is.
    `n` counts the messages when some of `frames` are chunks of several."""
    if n is None:
        n = len(frames)
    if n == 1:
        return frames[0]
    return protocol.array(frames, codec, n)


def pack(
    parts: Sequence[Frame], counts: Sequence[int], codec: Codec, max_bytes: int,
    max_messages: int,
) -> Wire:
    """Parts (messages, or chunks of `counts` messages), in order, as finished frames of at
    most `max_messages` messages and `max_bytes` each (a part larger than that goes alone)."""
    messages = sum(counts)
    if messages <= max_messages and sum(map(len, parts)) + len(parts) <= max_bytes:
        frame = coalesce(parts, codec, messages)  # the usual case: one frame
        return Wire(encode_frame(frame), 1, messages, len(frame))
    frames: list[bytes] = []
    payload = 0
    i = 0
    for n, count in split(zip(map(len, parts), counts, strict=True), max_bytes, max_messages):
        frame = coalesce(parts[i:i + n], codec, count)
        frames.append(encode_frame(frame))
        payload += len(frame)
        i += n
    return Wire(b"".join(frames), len(frames), messages, payload)


class Batch:
    """The messages one channel got in one event-loop turn, handed to every subscriber at
    once: joined and framed once per codec, so a client's cost is per batch, not per
    message. Every client of a node has the same frame bounds (the edge's config)."""

    __slots__ = ("_chunks", "_wire", "pubs")

    def __init__(self, pubs: list[Publication]) -> None:
        self.pubs = pubs
        self._chunks: dict[Codec, list[Chunk]] = {}
        self._wire: dict[Codec, Wire] = {}

    def wire(self, codec: Codec, max_bytes: int, max_messages: int) -> Wire:
        """All the batch's messages as finished frames (one per chunk), for clients that
        take the whole batch: the same bytes for every such client."""
        wire = self._wire.get(codec)
        if wire is None:
            # One frame per chunk, as split made them: packing the chunks again could join
            # two whose sum fits by pack's count (a separator per part) but not by split's.
            frames = [coalesce((c.part,), codec, c.messages)
                      for c in self.chunks(codec, max_bytes, max_messages)]
            wire = self._wire[codec] = Wire(
                b"".join(map(encode_frame, frames)), len(frames), len(self.pubs),
                sum(map(len, frames)),
            )
        return wire

    def chunks(
        self, codec: Codec, max_bytes: int, max_messages: int, start: int = 0
    ) -> list[Chunk]:
        """The messages from index `start` in chunks of one frame each."""
        if start == 0:
            cached = self._chunks.get(codec)
            if cached is not None:
                return cached
        pubs = self.pubs
        frames = [pubs[i].frame(codec) for i in range(start, len(pubs))]
        out: list[Chunk] = []
        i = 0
        for n, _ in split(((len(f), 1) for f in frames), max_bytes, max_messages):
            out.append(Chunk(join(frames[i:i + n], codec), n, pubs[start + i].offset,
                             pubs[start + i + n - 1].offset))
            i += n
        if start == 0:
            self._chunks[codec] = out
        return out
