"""Framing (edge/pack.py): where frames end, by bytes and by count, for both codecs; and
that it is the same arithmetic the three packers had before they became one (the old
`Batch.chunks`/`Batch.wire` of the hub and `Session._pack` are kept here as oracles)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol
from common.broker import Publication
from common.protocol import Codec, Frame
from edge.pack import Batch, Chunk, Wire, coalesce, join, pack, split
from edge.wire import encode_frame

CODECS = [Codec.JSON, Codec.MSGPACK]


def pubs_of(sizes: list[int], first: int = 1) -> list[Publication]:
    return [Publication("trades.ES", "e", first + i, f"k{i % 3}", '"' + "x" * n + '"')
            for i, n in enumerate(sizes)]


# --- the old implementations (before edge/pack.py), as oracles ---------------------------

def old_chunks(pubs: list[Publication], codec: Codec, max_bytes: int, max_messages: int,
               start: int = 0) -> list[tuple[Frame, int, int, int]]:
    out: list[tuple[Frame, int, int, int]] = []
    frames: list[Frame] = []
    size = 0
    first = 0
    for i in range(start, len(pubs)):
        frame = pubs[i].frame(codec)
        if frames and (size + len(frame) > max_bytes or len(frames) >= max_messages):
            out.append((join(frames, codec), len(frames), first, pubs[i - 1].offset))
            frames, size = [], 0
        if not frames:
            first = pubs[i].offset
        frames.append(frame)
        size += len(frame) + 1
    if frames:
        out.append((join(frames, codec), len(frames), first, pubs[-1].offset))
    return out


def old_wire(pubs: list[Publication], codec: Codec, max_bytes: int, max_messages: int
             ) -> Wire:
    chunks = old_chunks(pubs, codec, max_bytes, max_messages)
    frames = [coalesce([part], codec, count) for part, count, _, _ in chunks]
    return Wire(b"".join(encode_frame(f) for f in frames), len(frames),
                sum(count for _, count, _, _ in chunks), sum(len(f) for f in frames))


def old_pack(parts: list[Frame], counts: list[int], codec: Codec, max_bytes: int,
             max_messages: int) -> Wire:
    messages = sum(counts)
    if messages <= max_messages and sum(map(len, parts)) + len(parts) <= max_bytes:
        frame = coalesce(parts, codec, messages)
        return Wire(encode_frame(frame), 1, messages, len(frame))
    frames: list[bytes] = []
    payload = 0
    group: list[Frame] = []
    count = size = 0
    for part, n in zip(parts, counts, strict=True):
        if group and (size + len(part) > max_bytes or count + n > max_messages):
            frame = coalesce(group, codec, count)
            frames.append(encode_frame(frame))
            payload += len(frame)
            group, count, size = [], 0, 0
        group.append(part)
        count += n
        size += len(part) + 1
    frame = coalesce(group, codec, count)
    frames.append(encode_frame(frame))
    payload += len(frame)
    return Wire(b"".join(frames), len(frames), messages, payload)


# --- split: the one rule ------------------------------------------------------------------

def test_split_by_count() -> None:
    assert list(split([(1, 1)] * 7, 1000, 3)) == [(3, 3), (3, 3), (1, 1)]


def test_split_by_bytes_counts_one_separator_per_part() -> None:
    # Parts of 10: two take 10 + 1 + 10 = 21 bytes of a frame.
    assert list(split([(10, 1)] * 4, 21, 100)) == [(2, 2), (2, 2)]
    assert list(split([(10, 1)] * 4, 20, 100)) == [(1, 1)] * 4


def test_split_chunks_count_their_messages_and_an_oversized_part_goes_alone() -> None:
    assert list(split([(5, 3), (5, 3), (5, 1)], 100, 6)) == [(2, 6), (1, 1)]
    assert list(split([(500, 1), (5, 1), (5, 1)], 100, 10)) == [(1, 1), (2, 2)]


def test_split_is_lazy_and_empty_input_makes_no_frame() -> None:
    assert list(split([], 10, 10)) == []

    def parts() -> Iterator[tuple[int, int]]:
        yield (5, 1)
        yield (5, 1)
        raise AssertionError("read past the first frame")

    assert next(split(parts(), 5, 10)) == (1, 1)


# --- Batch: chunks and wire ---------------------------------------------------------------

@pytest.mark.parametrize("codec", CODECS)
def test_batch_chunks_split_by_bytes_and_keep_order(codec: Codec) -> None:
    pubs = pubs_of([50] * 20, first=10)  # two-digit offsets: every frame the same size
    size = len(pubs[0].frame(codec))
    batch = Batch(pubs)
    chunks = batch.chunks(codec, 3 * size + 2, 1000)
    assert batch.chunks(codec, 3 * size + 2, 1000) is chunks  # joined once, for everyone
    assert [c.messages for c in chunks] == [3] * 6 + [2]
    assert [(c.first, c.last) for c in chunks][:2] == [(10, 12), (13, 15)]
    for c in chunks:
        assert c.part == join([p.frame(codec) for p in pubs[c.first - 10:c.last - 9]], codec)


@pytest.mark.parametrize("codec", CODECS)
def test_batch_chunks_split_by_count_from_a_start(codec: Codec) -> None:
    pubs = pubs_of([1] * 10)
    chunks = Batch(pubs).chunks(codec, 10_000, 4, start=3)
    assert [(c.messages, c.first, c.last) for c in chunks] == [(4, 4, 7), (3, 8, 10)]


def test_batch_wire_is_the_frames_a_client_decodes() -> None:
    pubs = pubs_of([20] * 9)
    wire = Batch(pubs).wire(Codec.JSON, 10_000, 4)
    assert (wire.frames, wire.messages) == (3, 9)
    decoded: list[dict[str, object]] = []
    data = wire.data
    headers = 0
    while data:
        assert data[0] == 0x81  # final text frame
        n, head = data[1], 2
        if n == 126:
            n, head = int.from_bytes(data[2:4], "big"), 4
        message = json.loads(data[head:head + n])
        decoded += message if isinstance(message, list) else [message]  # 1: not an array
        data = data[head + n:]
        headers += head
    assert [m["offset"] for m in decoded] == list(range(1, 10))
    assert wire.payload == len(wire.data) - headers

    single = Batch(pubs_of([20])).wire(Codec.MSGPACK, 10_000, 4)
    assert msgpack.unpackb(single.data[2:])["offset"] == 1 and single.frames == 1


def test_pack_turn_of_chunks_and_replies() -> None:
    codec = Codec.JSON
    chunk = join([p.frame(codec) for p in pubs_of([1, 1, 1])], codec)
    ping = protocol.encode(protocol.ping(), codec)
    wire = pack([chunk, ping, chunk], [3, 1, 3], codec, 10_000, 4)
    assert (wire.frames, wire.messages) == (2, 7)  # 3 + 1, then 3: a chunk is not split


# --- the same as before ---------------------------------------------------------------

sizes = st.lists(st.integers(0, 120), min_size=1, max_size=40)
bounds = st.tuples(st.integers(1, 600), st.integers(1, 12))


@given(codec=st.sampled_from(CODECS), sizes=sizes, bounds=bounds, start=st.integers(0, 39))
@settings(max_examples=300, deadline=None)
def test_batch_chunks_and_wire_equal_the_old_ones(
    codec: Codec, sizes: list[int], bounds: tuple[int, int], start: int
) -> None:
    max_bytes, max_messages = bounds
    pubs = pubs_of(sizes)
    start = min(start, len(pubs) - 1)
    batch = Batch(pubs)
    assert [tuple(c) for c in batch.chunks(codec, max_bytes, max_messages, start)] == \
        old_chunks(pubs, codec, max_bytes, max_messages, start)
    assert batch.wire(codec, max_bytes, max_messages) == \
        old_wire(pubs, codec, max_bytes, max_messages)


@given(codec=st.sampled_from(CODECS), sizes=sizes, bounds=bounds,
       counts=st.lists(st.integers(1, 5), min_size=40, max_size=40))
@settings(max_examples=300, deadline=None)
def test_pack_equals_the_old_session_pack(
    codec: Codec, sizes: list[int], bounds: tuple[int, int], counts: list[int]
) -> None:
    max_bytes, max_messages = bounds
    parts = [p.frame(codec) for p in pubs_of(sizes)]
    counts = counts[:len(parts)]
    assert pack(parts, counts, codec, max_bytes, max_messages) == \
        old_pack(parts, counts, codec, max_bytes, max_messages)


def test_chunk_is_a_tuple_of_part_messages_first_last() -> None:
    part, messages, first, last = Chunk("x", 1, 2, 2)
    assert (part, messages, first, last) == ("x", 1, 2, 2)
