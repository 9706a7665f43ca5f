"""A client's bounded send queue (edge/sendqueue.py): overflow policies, gap notices,
conflation, batching and coalescing.

Pure: no sockets, no Redis, no clock.
"""

from __future__ import annotations

import json
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import protocol
from common.protocol import Codec, Frame
from edge.pack import coalesce
from edge.sendqueue import Outcome, Policy, SendQueue, merge_json

CODECS = [Codec.JSON, Codec.MSGPACK]
BIG = 10**9


class Gauge:
    """The node's gauges, fed by `on_size`: the sum of all deltas must be the queue's size."""

    def __init__(self) -> None:
        self.messages = 0
        self.bytes = 0
        self.calls: list[tuple[int, int]] = []

    def __call__(self, messages: int, size: int) -> None:
        self.messages += messages
        self.bytes += size
        self.calls.append((messages, size))


def make(
    codec: Codec = Codec.JSON, max_messages: int = 1000, max_bytes: int = BIG
) -> tuple[SendQueue, Gauge]:
    gauge = Gauge()
    return SendQueue(codec, max_messages, max_bytes, gauge), gauge


def check_sizes(q: SendQueue, gauge: Gauge) -> None:
    """len, .bytes, the gauges and the live entries all agree."""
    alive = [e for e in q._entries or () if e.alive]
    assert (gauge.messages, gauge.bytes) == (len(q), q.bytes)
    assert len(q) == len(alive)
    assert q.bytes == sum(len(e.frame) for e in alive)
    assert len(q) >= 0
    assert q.bytes >= 0


def pub(
    codec: Codec, channel: str, offset: int, key: str, data: str, deleted: bool = False
) -> Frame:
    if codec is Codec.JSON:
        return protocol.pub_json(channel, offset, key, data, deleted)
    return protocol.pub_msgpack(channel, offset, key, data, deleted)


def push(
    q: SendQueue, channel: str, offset: int, data: str, policy: Policy, key: str = "",
    merge: bool = False, deleted: bool = False,
) -> Outcome:
    frame = pub(q.codec, channel, offset, key, data, deleted)
    return q.push(channel, offset, key, data, frame, policy, merge, deleted)


def decode(frame: Frame, codec: Codec) -> Any:
    if codec is Codec.JSON:
        assert isinstance(frame, str)
        return json.loads(frame)
    assert isinstance(frame, bytes)
    return msgpack.unpackb(frame, raw=False)


def gap_frame(codec: Codec, channel: str, first: int, last: int) -> Frame:
    return protocol.encode(protocol.gap(channel, first, last), codec)


def drain(q: SendQueue) -> list[Frame]:
    """Everything still to send, as the writer would get it (gap notices included)."""
    out: list[Frame] = []
    for _ in range(100_000):
        if not len(q) and not q.pending_gaps:
            return out
        out.extend(q.pop_batch(1000, BIG))
    raise AssertionError("the queue never drained")


def pub_msg(channel: str, offset: int, data: Any, key: str = "") -> dict[str, Any]:
    message: dict[str, Any] = {"type": "pub", "channel": channel, "offset": offset}
    if key:
        message["key"] = key
    message["data"] = data
    return message


# --- control frames and sizes --------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_control_frames_always_queue_even_over_both_bounds(codec: Codec) -> None:
    q, gauge = make(codec, max_messages=1, max_bytes=10)
    frames = [protocol.encode(protocol.pong(i), codec) for i in range(5)]
    for frame in frames:
        q.push_control(frame)
    assert len(q) == 5
    assert q.bytes == sum(len(f) for f in frames)
    assert q.bytes > 10
    check_sizes(q, gauge)
    # Publications are refused meanwhile, but control frames still queue.
    assert push(q, "trades.A", 1, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    q.push_control(frames[0])
    assert len(q) == 6
    check_sizes(q, gauge)
    assert q.pop_batch(100, BIG) == [*frames, frames[0]]
    check_sizes(q, gauge)


def test_control_frame_does_not_announce_pending_gaps() -> None:
    q, gauge = make(max_messages=1)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.DROPPED
    ping = protocol.encode(protocol.ping(), Codec.JSON)
    q.push_control(ping)
    assert q.pending_gaps
    assert len(q) == 2
    assert q.pop_batch(1, BIG) == [pub(Codec.JSON, "trades.A", 1, "", "1")]
    assert q.pop_batch(1, BIG) == [ping]
    # Now empty: the gap is announced.
    assert not q.pending_gaps
    assert q.pop_batch(1, BIG) == [gap_frame(Codec.JSON, "trades.A", 2, 2)]
    check_sizes(q, gauge)


def test_json_size_is_characters_not_utf8_bytes() -> None:
    q, _ = make(Codec.JSON)
    data = '"€€€é"'
    frame = pub(Codec.JSON, "trades.A", 1, "", data)
    assert q.push("trades.A", 1, "", data, frame, Policy.DISCONNECT) is Outcome.QUEUED
    assert isinstance(frame, str)
    assert q.bytes == len(frame)
    assert q.bytes != len(frame.encode())


def test_msgpack_size_is_bytes() -> None:
    q, _ = make(Codec.MSGPACK)
    frame = pub(Codec.MSGPACK, "trades.A", 1, "", '"€€€é"')
    assert q.push("trades.A", 1, "", '"€€€é"', frame, Policy.DISCONNECT) is Outcome.QUEUED
    assert q.bytes == len(frame)


@pytest.mark.parametrize("codec", CODECS)
def test_on_size_deltas_are_exact_through_push_pop_conflate_clear(codec: Codec) -> None:
    q, gauge = make(codec)
    control = protocol.encode(protocol.ping(), codec)
    q.push_control(control)
    assert gauge.calls == [(1, len(control))]
    check_sizes(q, gauge)

    f1 = pub(codec, "quotes.A", 1, "", '{"bid":1,"ask":2}')
    outcome = q.push("quotes.A", 1, "", '{"bid":1,"ask":2}', f1, Policy.CONFLATE, merge=True)
    assert outcome is Outcome.QUEUED
    assert gauge.calls[-1] == (1, len(f1))
    check_sizes(q, gauge)

    # merged: the new frame is re-encoded with every field, and has another size
    f2 = pub(codec, "quotes.A", 2, "", '{"bid":100000}')
    merged2 = pub(codec, "quotes.A", 2, "", '{"bid":100000,"ask":2}')
    outcome = q.push("quotes.A", 2, "", '{"bid":100000}', f2, Policy.CONFLATE, merge=True)
    assert outcome is Outcome.CONFLATED
    assert gauge.calls[-2:] == [(-1, -len(f1)), (1, len(merged2))]
    assert len(q) == 2
    check_sizes(q, gauge)

    merged = pub(codec, "quotes.A", 3, "", '{"bid":100000,"ask":7}')
    f3 = pub(codec, "quotes.A", 3, "", '{"ask":7}')
    outcome = q.push("quotes.A", 3, "", '{"ask":7}', f3, Policy.CONFLATE, merge=True)
    assert outcome is Outcome.CONFLATED
    assert gauge.calls[-2:] == [(-1, -len(merged2)), (1, len(merged))]
    check_sizes(q, gauge)

    f4 = pub(codec, "trades.A", 1, "", '"t"')
    assert q.push("trades.A", 1, "", '"t"', f4, Policy.DROP) is Outcome.QUEUED
    check_sizes(q, gauge)
    assert q.bytes == len(control) + len(merged) + len(f4)
    assert len(q) == 3

    n = len(gauge.calls)
    assert q.pop_batch(1, BIG) == [control]
    assert gauge.calls[n:] == [(-1, -len(control))]
    check_sizes(q, gauge)

    q.clear()
    assert len(q) == 0
    assert q.bytes == 0
    assert (gauge.messages, gauge.bytes) == (0, 0)
    check_sizes(q, gauge)
    assert q.pop_batch(10, BIG) == []

    # a fresh queue after clear counts from zero again
    q.push_control(control)
    check_sizes(q, gauge)
    assert (gauge.messages, gauge.bytes) == (1, len(control))


@pytest.mark.parametrize("policy", [Policy.DISCONNECT, Policy.DROP])
def test_refused_push_changes_nothing(policy: Policy) -> None:
    q, gauge = make(max_messages=1)
    assert push(q, "trades.A", 1, "1", policy) is Outcome.QUEUED
    calls = list(gauge.calls)
    size = q.bytes
    expected = Outcome.OVERFLOW if policy is Policy.DISCONNECT else Outcome.DROPPED
    assert push(q, "trades.A", 2, "2", policy) is expected
    assert gauge.calls == calls
    assert (len(q), q.bytes) == (1, size)
    check_sizes(q, gauge)


def test_clear_forgets_pending_gaps_and_conflation() -> None:
    q, gauge = make(max_messages=1)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.DROPPED
    assert push(q, "quotes.A", 1, "{}", Policy.CONFLATE, key="k") is Outcome.QUEUED
    q.clear()
    assert not q.pending_gaps
    assert q.pop_batch(10, BIG) == []
    assert push(q, "quotes.A", 2, "{}", Policy.CONFLATE, key="k") is Outcome.QUEUED
    check_sizes(q, gauge)
    assert len(q) == 1


# --- DISCONNECT ----------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_disconnect_overflows_exactly_past_max_messages(codec: Codec) -> None:
    q, gauge = make(codec, max_messages=3)
    for offset in (1, 2, 3):
        assert push(q, "trades.A", offset, "1", Policy.DISCONNECT) is Outcome.QUEUED
    assert push(q, "trades.A", 4, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    assert push(q, "trades.B", 1, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    assert len(q) == 3
    assert not q.pending_gaps
    check_sizes(q, gauge)
    q.pop_batch(1, BIG)
    assert push(q, "trades.A", 4, "1", Policy.DISCONNECT) is Outcome.QUEUED
    assert push(q, "trades.A", 5, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    check_sizes(q, gauge)


@pytest.mark.parametrize("codec", CODECS)
def test_disconnect_overflows_exactly_past_max_bytes(codec: Codec) -> None:
    size = len(pub(codec, "trades.A", 1, "", '"x"'))
    # Exactly room for two: the bound is inclusive.
    q, gauge = make(codec, max_bytes=2 * size)
    assert push(q, "trades.A", 1, '"x"', Policy.DISCONNECT) is Outcome.QUEUED
    assert push(q, "trades.A", 2, '"x"', Policy.DISCONNECT) is Outcome.QUEUED
    assert q.bytes == 2 * size
    assert push(q, "trades.A", 3, '"x"', Policy.DISCONNECT) is Outcome.OVERFLOW
    check_sizes(q, gauge)
    # One byte less: the second one overflows.
    q, gauge = make(codec, max_bytes=2 * size - 1)
    assert push(q, "trades.A", 1, '"x"', Policy.DISCONNECT) is Outcome.QUEUED
    assert push(q, "trades.A", 2, '"x"', Policy.DISCONNECT) is Outcome.OVERFLOW
    assert (len(q), q.bytes) == (1, size)
    check_sizes(q, gauge)


def test_disconnect_single_frame_larger_than_max_bytes_overflows_on_empty_queue() -> None:
    q, _ = make(max_bytes=20)
    assert push(q, "trades.A", 1, '"' + "x" * 40 + '"', Policy.DISCONNECT) is Outcome.OVERFLOW
    assert len(q) == 0


def test_disconnect_control_frames_count_toward_the_bounds() -> None:
    q, _ = make(max_messages=2)
    q.push_control(protocol.encode(protocol.ping(), Codec.JSON))
    assert push(q, "trades.A", 1, "1", Policy.DISCONNECT) is Outcome.QUEUED
    assert push(q, "trades.A", 2, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    ping = protocol.encode(protocol.ping(), Codec.JSON)
    q, _ = make(max_bytes=len(ping) + 5)
    q.push_control(ping)
    assert push(q, "trades.A", 1, "1", Policy.DISCONNECT) is Outcome.OVERFLOW


# --- DROP ----------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_drop_gap_announced_when_queue_empties(codec: Codec) -> None:
    q, gauge = make(codec, max_messages=2)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 3, "3", Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.A", 4, "4", Policy.DROP) is Outcome.DROPPED
    assert q.pending_gaps
    assert (len(q), q.bytes) == (2, len(pub(codec, "trades.A", 1, "", "1")) * 2)
    check_sizes(q, gauge)

    # Partially popped: not empty, nothing announced yet.
    assert q.pop_batch(1, BIG) == [pub(codec, "trades.A", 1, "", "1")]
    assert q.pending_gaps
    assert len(q) == 1
    # Emptied: the gap goes in right away, for the next pop.
    assert q.pop_batch(10, BIG) == [pub(codec, "trades.A", 2, "", "2")]
    assert not q.pending_gaps
    assert len(q) == 1
    check_sizes(q, gauge)
    out = q.pop_batch(10, BIG)
    assert out == [gap_frame(codec, "trades.A", 3, 4)]
    assert decode(out[0], codec) == {"type": "gap", "channel": "trades.A", "from": 3, "to": 4}
    assert q.pop_batch(10, BIG) == []
    check_sizes(q, gauge)


@pytest.mark.parametrize("codec", CODECS)
def test_drop_gap_goes_right_before_the_next_accepted_message_of_its_channel(
    codec: Codec,
) -> None:
    q, gauge = make(codec, max_messages=2)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.B", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.A", 3, "3", Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.B", 2, "2", Policy.DROP) is Outcome.DROPPED
    assert q.pop_batch(1, BIG) == [pub(codec, "trades.A", 1, "", "1")]
    # room for one: B's next message goes in after B's gap notice; A's gap waits
    assert push(q, "trades.B", 3, "3", Policy.DROP) is Outcome.QUEUED
    assert q.pending_gaps
    assert len(q) == 3  # B1, gap B 2..2, B3 (the notice may pass the bound)
    check_sizes(q, gauge)
    assert push(q, "trades.A", 4, "4", Policy.DROP) is Outcome.DROPPED
    assert q.pop_batch(2, BIG) == [
        pub(codec, "trades.B", 1, "", "1"),
        gap_frame(codec, "trades.B", 2, 2),
    ]
    assert push(q, "trades.A", 5, "5", Policy.DROP) is Outcome.QUEUED
    assert not q.pending_gaps
    assert drain(q) == [
        pub(codec, "trades.B", 3, "", "3"),
        gap_frame(codec, "trades.A", 2, 4),
        pub(codec, "trades.A", 5, "", "5"),
    ]
    check_sizes(q, gauge)


def test_drop_gaps_of_several_channels_all_announced_when_empty() -> None:
    q, gauge = make(max_messages=1)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.B", 7, "1", Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.C", 3, "1", Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.B", 8, "1", Policy.DROP) is Outcome.DROPPED
    assert q.pop_batch(10, BIG) == [pub(Codec.JSON, "trades.A", 1, "", "1")]
    assert not q.pending_gaps
    assert len(q) == 2
    out = q.pop_batch(10, BIG)
    assert sorted(map(str, out)) == sorted(
        [gap_frame(Codec.JSON, "trades.B", 7, 8), gap_frame(Codec.JSON, "trades.C", 3, 3)]
    )
    check_sizes(q, gauge)


def test_drop_by_bytes_then_a_smaller_message_fits_after_its_gap() -> None:
    small = pub(Codec.JSON, "trades.A", 1, "", "1")
    q, gauge = make(max_bytes=2 * len(small) + 5)
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.QUEUED
    assert push(q, "trades.A", 2, '"' + "x" * 40 + '"', Policy.DROP) is Outcome.DROPPED
    assert push(q, "trades.A", 3, "3", Policy.DROP) is Outcome.QUEUED
    assert drain(q) == [
        small,
        gap_frame(Codec.JSON, "trades.A", 2, 2),
        pub(Codec.JSON, "trades.A", 3, "", "3"),
    ]
    check_sizes(q, gauge)


def test_drop_pop_batch_on_empty_queue_with_pending_gap_returns_the_notice() -> None:
    q, _ = make(max_bytes=30)
    assert push(q, "trades.A", 1, '"' + "x" * 40 + '"', Policy.DROP) is Outcome.DROPPED
    assert len(q) == 0
    assert q.pending_gaps
    # The writer wakes up and pops until it gets nothing.
    assert q.pop_batch(10, BIG) == [gap_frame(Codec.JSON, "trades.A", 1, 1)]


CHANNELS = ("trades.A", "trades.B", "trades.C")

drop_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 2), st.integers(0, 30)),
        st.tuples(st.just("pop"), st.integers(1, 4), st.integers(1, 300)),
        st.tuples(st.just("control"), st.just(0), st.just(0)),
    ),
    max_size=80,
)


@given(
    codec=st.sampled_from(CODECS),
    max_messages=st.integers(1, 5),
    max_bytes=st.integers(40, 300),
    ops=drop_ops,
)
@settings(max_examples=400, deadline=None)
def test_drop_property_pubs_and_gaps_cover_every_offset_once_in_order(
    codec: Codec, max_messages: int, max_bytes: int, ops: list[tuple[str, int, int]]
) -> None:
    q, gauge = make(codec, max_messages, max_bytes)
    next_offset = dict.fromkeys(CHANNELS, 1)
    dropped: dict[str, set[int]] = {c: set() for c in CHANNELS}
    queued: dict[str, set[int]] = {c: set() for c in CHANNELS}
    received: list[Frame] = []
    control = protocol.encode(protocol.ping(), codec)

    def pop(limit: int, limit_bytes: int) -> None:
        before = len(q)
        pending = q.pending_gaps
        out = q.pop_batch(limit, limit_bytes)
        if before:
            assert out
        elif not pending:
            assert out == []
        assert len(out) <= limit
        if len(out) > 1:
            assert sum(len(f) for f in out) <= limit_bytes
        received.extend(out)

    for op, a, b in ops:
        if op == "push":
            channel = CHANNELS[a]
            offset = next_offset[channel]
            next_offset[channel] += 1
            data = json.dumps("x" * b)
            frame = pub(codec, channel, offset, "", data)
            full = len(q) >= max_messages or q.bytes + len(frame) > max_bytes
            outcome = q.push(channel, offset, "", data, frame, Policy.DROP)
            if full:
                assert outcome is Outcome.DROPPED
                dropped[channel].add(offset)
            else:
                assert outcome is Outcome.QUEUED
                queued[channel].add(offset)
        elif op == "pop":
            pop(a, b)
        else:
            q.push_control(control)
        check_sizes(q, gauge)

    received.extend(drain(q))
    assert len(q) == 0
    assert not q.pending_gaps
    check_sizes(q, gauge)

    messages = [decode(f, codec) for f in received]
    assert sum(m["type"] == "ping" for m in messages) == sum(op == "control" for op, _, _ in ops)
    for channel in CHANNELS:
        covered: list[int] = []
        got_pubs: set[int] = set()
        announced: set[int] = set()
        for m in messages:
            if m.get("channel") != channel:
                continue
            if m["type"] == "pub":
                covered.append(m["offset"])
                got_pubs.add(m["offset"])
            else:
                assert m["type"] == "gap"
                assert set(m) == {"type", "channel", "from", "to"}
                assert m["from"] <= m["to"]
                covered.extend(range(m["from"], m["to"] + 1))
                announced.update(range(m["from"], m["to"] + 1))
        assert covered == list(range(1, next_offset[channel]))
        assert got_pubs == queued[channel]
        assert announced == dropped[channel]


# --- CONFLATE ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_conflate_replaces_the_queued_value_of_the_same_key(codec: Codec) -> None:
    q, gauge = make(codec)
    assert push(q, "depth.A", 1, '{"p":1}', Policy.CONFLATE, key="k") is Outcome.QUEUED
    assert push(q, "depth.A", 2, '{"p":2}', Policy.CONFLATE, key="k") is Outcome.CONFLATED
    assert push(q, "depth.A", 3, '{"p":3}', Policy.CONFLATE, key="k") is Outcome.CONFLATED
    assert len(q) == 1
    final = pub(codec, "depth.A", 3, "k", '{"p":3}')
    assert q.bytes == len(final)
    check_sizes(q, gauge)
    assert q.pop_batch(10, BIG) == [final]
    check_sizes(q, gauge)


@pytest.mark.parametrize("codec", CODECS)
def test_conflate_replacement_goes_to_the_back_offsets_stay_increasing(codec: Codec) -> None:
    q, gauge = make(codec)
    assert push(q, "depth.A", 1, "1", Policy.CONFLATE, key="a") is Outcome.QUEUED
    assert push(q, "depth.A", 2, "2", Policy.CONFLATE, key="b") is Outcome.QUEUED
    assert push(q, "depth.A", 3, "3", Policy.CONFLATE, key="a") is Outcome.CONFLATED
    assert push(q, "depth.A", 4, "4", Policy.CONFLATE, key="c") is Outcome.QUEUED
    assert push(q, "depth.A", 5, "5", Policy.CONFLATE, key="b") is Outcome.CONFLATED
    out = drain(q)
    assert out == [
        pub(codec, "depth.A", 3, "a", "3"),
        pub(codec, "depth.A", 4, "c", "4"),
        pub(codec, "depth.A", 5, "b", "5"),
    ]
    offsets = [decode(f, codec)["offset"] for f in out]
    assert offsets == sorted(offsets)
    check_sizes(q, gauge)


@pytest.mark.parametrize("codec", CODECS)
def test_conflate_merge_keeps_the_latest_value_of_every_field(codec: Codec) -> None:
    q, gauge = make(codec)
    updates = ['{"bid":1,"ask":2,"last":3}', '{"bid":4}', '{"ask":5,"size":6}', '{"bid":7}']
    for i, data in enumerate(updates, 1):
        outcome = push(q, "quotes.A", i, data, Policy.CONFLATE, merge=True)
        assert outcome is (Outcome.QUEUED if i == 1 else Outcome.CONFLATED)
        check_sizes(q, gauge)
    assert len(q) == 1
    (frame,) = q.pop_batch(10, BIG)
    assert decode(frame, codec) == pub_msg(
        "quotes.A", 4, {"bid": 7, "ask": 5, "last": 3, "size": 6}
    )
    check_sizes(q, gauge)


def test_conflate_merged_frame_is_this_clients_encoding_msgpack() -> None:
    q, _ = make(Codec.MSGPACK)
    push(q, "quotes.A", 1, '{"bid":1.5,"ask":2,"sym":"MNQ"}', Policy.CONFLATE, "k", merge=True)
    push(q, "quotes.A", 2, '{"ask":2.25,"note":"é"}', Policy.CONFLATE, "k", merge=True)
    (frame,) = q.pop_batch(10, BIG)
    assert isinstance(frame, bytes)
    assert msgpack.unpackb(frame, raw=False) == pub_msg(
        "quotes.A", 2, {"bid": 1.5, "ask": 2.25, "sym": "MNQ", "note": "é"}, key="k"
    )
    assert frame == protocol.pub_msgpack(
        "quotes.A", 2, "k", '{"bid":1.5,"ask":2.25,"sym":"MNQ","note":"é"}'
    )


def test_conflate_without_merge_replaces_whole_value() -> None:
    q, _ = make()
    push(q, "quotes.A", 1, '{"bid":1,"ask":2}', Policy.CONFLATE)
    push(q, "quotes.A", 2, '{"bid":3}', Policy.CONFLATE)
    assert [json.loads(f) for f in q.pop_batch(10, BIG)] == [pub_msg("quotes.A", 2, {"bid": 3})]


@pytest.mark.parametrize("codec", CODECS)
def test_conflate_deleted_replaces_without_merging(codec: Codec) -> None:
    q, _ = make(codec)
    push(q, "depth.A", 1, '{"price":1,"size":5}', Policy.CONFLATE, "L1", merge=True)
    deleted = pub(codec, "depth.A", 2, "L1", '{"size":0}', deleted=True)
    outcome = q.push("depth.A", 2, "L1", '{"size":0}', deleted, Policy.CONFLATE, True, True)
    assert outcome is Outcome.CONFLATED
    out = q.pop_batch(10, BIG)
    assert out == [deleted]
    message = decode(out[0], codec)
    assert message["deleted"] is True
    assert message["data"] == {"size": 0}


def test_conflate_different_keys_and_channels_do_not_conflate() -> None:
    q, gauge = make()
    assert push(q, "depth.A", 1, "1", Policy.CONFLATE, key="a") is Outcome.QUEUED
    assert push(q, "depth.A", 2, "2", Policy.CONFLATE, key="b") is Outcome.QUEUED
    assert push(q, "depth.B", 1, "3", Policy.CONFLATE, key="a") is Outcome.QUEUED
    assert push(q, "depth.A", 3, "4", Policy.CONFLATE, key="") is Outcome.QUEUED
    assert len(q) == 4
    check_sizes(q, gauge)
    assert len(drain(q)) == 4


@pytest.mark.parametrize("merge", [False, True])
def test_conflate_popped_entry_is_no_longer_conflatable(merge: bool) -> None:
    q, gauge = make()
    assert push(q, "quotes.A", 1, '{"bid":1}', Policy.CONFLATE, merge=merge) is Outcome.QUEUED
    assert push(q, "quotes.A", 2, '{"ask":2}', Policy.CONFLATE, merge=merge) is Outcome.CONFLATED
    first = q.pop_batch(10, BIG)
    assert len(first) == 1
    assert push(q, "quotes.A", 3, '{"last":3}', Policy.CONFLATE, merge=merge) is Outcome.QUEUED
    assert len(q) == 1
    # Not merged with what was already sent: the client has that.
    assert q.pop_batch(10, BIG) == [pub(Codec.JSON, "quotes.A", 3, "", '{"last":3}')]
    # Both remain conflatable from here on.
    assert push(q, "quotes.A", 4, '{"bid":4}', Policy.CONFLATE, merge=merge) is Outcome.QUEUED
    assert push(q, "quotes.A", 5, '{"ask":5}', Policy.CONFLATE, merge=merge) is Outcome.CONFLATED
    check_sizes(q, gauge)


def test_conflate_entry_popped_in_a_partial_batch_only() -> None:
    q, _ = make()
    push(q, "depth.A", 1, "1", Policy.CONFLATE, key="a")
    push(q, "depth.A", 2, "2", Policy.CONFLATE, key="b")
    assert q.pop_batch(1, BIG) == [pub(Codec.JSON, "depth.A", 1, "a", "1")]
    assert push(q, "depth.A", 3, "3", Policy.CONFLATE, key="a") is Outcome.QUEUED
    assert push(q, "depth.A", 4, "4", Policy.CONFLATE, key="b") is Outcome.CONFLATED
    assert drain(q) == [
        pub(Codec.JSON, "depth.A", 3, "a", "3"),
        pub(Codec.JSON, "depth.A", 4, "b", "4"),
    ]


def test_conflate_tombstones_are_compacted_for_a_client_that_never_reads() -> None:
    q, gauge = make()
    longest = 0
    last: dict[str, Frame] = {}
    for i in range(100_000):
        key = f"k{i % 10}"
        data = str(i)
        frame = pub(Codec.JSON, "depth.A", i + 1, key, data)
        outcome = q.push("depth.A", i + 1, key, data, frame, Policy.CONFLATE)
        assert outcome is (Outcome.QUEUED if i < 10 else Outcome.CONFLATED)
        last[key] = frame
        longest = max(longest, len(q._entries or ()))
    assert longest <= 128
    assert len(q) == 10
    assert q.bytes == sum(len(f) for f in last.values())
    check_sizes(q, gauge)
    out = drain(q)
    assert out == [last[f"k{i % 10}"] for i in range(99_990, 100_000)]
    assert q._latest == {}  # sent entries are not retained by the per-key index
    assert not q._entries  # emptied, and let go


def test_conflate_merge_tombstones_are_compacted_too() -> None:
    q, gauge = make(Codec.MSGPACK)
    for i in range(5_000):
        push(q, "quotes.A", i + 1, json.dumps({f"f{i % 3}": i}), Policy.CONFLATE,
             key=f"k{i % 7}", merge=True)
        assert len(q._entries or ()) <= 128
    assert len(q) == 7
    check_sizes(q, gauge)
    values = {m["key"]: m["data"] for m in (decode(f, Codec.MSGPACK) for f in drain(q))}
    expected: dict[str, dict[str, int]] = {}
    for i in range(5_000):
        expected.setdefault(f"k{i % 7}", {})[f"f{i % 3}"] = i
    assert values == expected


def test_conflate_overflow_only_for_a_new_key_at_twice_max_messages() -> None:
    q, gauge = make(max_messages=2)
    for i in range(4):  # up to twice the bound: new keys still queue
        assert push(q, "depth.A", i + 1, "1", Policy.CONFLATE, key=f"k{i}") is Outcome.QUEUED
    assert len(q) == 4
    calls = list(gauge.calls)
    assert push(q, "depth.A", 5, "1", Policy.CONFLATE, key="k4") is Outcome.OVERFLOW
    assert push(q, "depth.B", 1, "1", Policy.CONFLATE, key="k0") is Outcome.OVERFLOW
    assert gauge.calls == calls
    assert len(q) == 4
    # A known key still conflates, however full.
    assert push(q, "depth.A", 6, "2", Policy.CONFLATE, key="k0") is Outcome.CONFLATED
    assert len(q) == 4
    check_sizes(q, gauge)
    assert len(q.pop_batch(1, BIG)) == 1
    assert push(q, "depth.A", 7, "1", Policy.CONFLATE, key="k4") is Outcome.QUEUED
    assert push(q, "depth.A", 8, "1", Policy.CONFLATE, key="k5") is Outcome.OVERFLOW
    check_sizes(q, gauge)


def test_conflate_control_frames_count_toward_twice_the_bound() -> None:
    q, _ = make(max_messages=1)
    q.push_control(protocol.encode(protocol.ping(), Codec.JSON))
    assert push(q, "depth.A", 1, "1", Policy.CONFLATE, key="a") is Outcome.QUEUED
    assert push(q, "depth.A", 2, "1", Policy.CONFLATE, key="b") is Outcome.OVERFLOW


def test_conflate_overflow_by_bytes_once_past_twice_max_bytes() -> None:
    size = len(pub(Codec.JSON, "depth.A", 1, "k0", '"x"'))
    q, gauge = make(max_bytes=2 * size - 1)  # twice the bound = 4 * size - 2
    for i in range(3):  # the queue plus the new frame stay within twice the bound
        assert push(q, "depth.A", i + 1, '"x"', Policy.CONFLATE, key=f"k{i}") is Outcome.QUEUED
    assert q.bytes == 3 * size
    # over twice the bound (a large reply): a new key cannot be kept bounded by conflation
    q.push_control(json.dumps({"type": "pong", "pad": "x" * (2 * size)}))
    assert q.bytes > 2 * q.max_bytes
    calls = list(gauge.calls)
    assert push(q, "depth.A", 4, '"x"', Policy.CONFLATE, key="k3") is Outcome.OVERFLOW
    assert gauge.calls == calls
    assert push(q, "depth.A", 5, '"y"', Policy.CONFLATE, key="k0") is Outcome.CONFLATED
    assert len(q) == 4
    check_sizes(q, gauge)


def test_conflate_new_key_never_takes_the_queue_past_twice_max_bytes() -> None:
    q, _ = make(max_bytes=1024)
    for i in range(15):  # ~1.5x the bound
        push(q, "depth.A", i + 1, json.dumps("x" * 60), Policy.CONFLATE, key=f"k{i}")
    assert q.max_bytes < q.bytes <= 2 * q.max_bytes
    huge = json.dumps("x" * 100_000)
    outcome = push(q, "depth.A", 16, huge, Policy.CONFLATE, key="new")
    assert outcome is Outcome.OVERFLOW  # actual: QUEUED, with ~100 KB queued for a 1 KB bound
    assert q.bytes <= 2 * q.max_bytes


FIELDS = ("bid", "ask", "last", "size")
conflate_ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("push"),
            st.integers(0, 1),  # channel
            st.integers(0, 3),  # key
            st.dictionaries(st.sampled_from(FIELDS), st.integers(-1000, 1000), min_size=1),
            st.booleans(),  # deleted (keyed channels, without merge)
        ),
        st.tuples(
            st.just("pop"), st.integers(1, 4), st.integers(1, 400), st.just({}), st.just(False)
        ),
    ),
    max_size=80,
)


@given(codec=st.sampled_from(CODECS), merge=st.booleans(), ops=conflate_ops)
@settings(max_examples=400, deadline=None)
def test_conflate_property_slow_client_ends_with_latest_value_of_every_key(
    codec: Codec, merge: bool, ops: list[tuple[str, int, int, dict[str, int], bool]]
) -> None:
    channels = ("quotes.A", "quotes.B")
    # 2 channels x 4 keys never reach twice 4 messages: no OVERFLOW in this property.
    q, gauge = make(codec, max_messages=4, max_bytes=BIG)
    offsets = dict.fromkeys(channels, 0)
    reference: dict[tuple[str, str], dict[str, int]] = {}
    state: dict[tuple[str, str], dict[str, int]] = {}
    pending: set[tuple[str, str]] = set()  # keys with a queued, unsent value
    last_seen = dict.fromkeys(channels, 0)

    def receive(frames: list[Frame]) -> None:
        for frame in frames:
            m = decode(frame, codec)
            assert m["type"] == "pub"
            channel, key = m["channel"], m.get("key", "")
            assert m["offset"] > last_seen[channel]
            last_seen[channel] = m["offset"]
            pending.discard((channel, key))
            if m.get("deleted"):
                state.pop((channel, key), None)
            elif merge:
                state[channel, key] = {**state.get((channel, key), {}), **m["data"]}
            else:
                state[channel, key] = m["data"]

    for op, a, b, fields, deleted in ops:
        if op == "pop":
            before = len(q)
            out = q.pop_batch(a, b)
            if before:
                assert 1 <= len(out) <= a
            else:
                assert out == []
            if len(out) > 1:
                assert sum(len(f) for f in out) <= b
            receive(out)
        else:
            channel, key = channels[a], f"k{b}"
            deleted = deleted and not merge
            offsets[channel] += 1
            data = json.dumps(fields)
            frame = pub(codec, channel, offsets[channel], key, data, deleted)
            outcome = q.push(
                channel, offsets[channel], key, data, frame, Policy.CONFLATE, merge, deleted
            )
            expected = Outcome.CONFLATED if (channel, key) in pending else Outcome.QUEUED
            assert outcome is expected
            pending.add((channel, key))
            if deleted:
                reference.pop((channel, key), None)
            elif merge:
                reference[channel, key] = {**reference.get((channel, key), {}), **fields}
            else:
                reference[channel, key] = fields
        assert len(q) == len(pending)
        check_sizes(q, gauge)

    receive(drain(q))
    assert not pending
    assert q._latest == {}
    assert state == reference
    check_sizes(q, gauge)


# --- pop_batch -----------------------------------------------------------------------------


def five(q: SendQueue) -> list[Frame]:
    frames = []
    for i in range(1, 6):
        push(q, "trades.A", i, '"x"', Policy.DISCONNECT)
        frames.append(pub(q.codec, "trades.A", i, "", '"x"'))
    return frames


@pytest.mark.parametrize("codec", CODECS)
def test_pop_batch_respects_max_messages_oldest_first(codec: Codec) -> None:
    q, gauge = make(codec)
    frames = five(q)
    assert q.pop_batch(2, BIG) == frames[:2]
    assert q.pop_batch(2, BIG) == frames[2:4]
    assert q.pop_batch(2, BIG) == frames[4:]
    assert q.pop_batch(2, BIG) == []
    check_sizes(q, gauge)


@pytest.mark.parametrize("codec", CODECS)
def test_pop_batch_respects_max_bytes(codec: Codec) -> None:
    q, gauge = make(codec)
    frames = five(q)
    size = len(frames[0])
    # The bound counts a separator per part, as a frame joining them has (edge/pack.py).
    assert q.pop_batch(100, 2 * size + 1) == frames[:2]  # inclusive
    assert q.pop_batch(100, 2 * size) == frames[2:3]
    assert q.pop_batch(100, 3 * size + 2) == frames[3:]
    check_sizes(q, gauge)


def test_pop_batch_always_returns_one_frame_even_larger_than_max_bytes() -> None:
    q, gauge = make()
    small = pub(Codec.JSON, "trades.A", 1, "", "1")
    big = pub(Codec.JSON, "trades.A", 2, "", json.dumps("x" * 500))
    push(q, "trades.A", 1, "1", Policy.DISCONNECT)
    push(q, "trades.A", 2, json.dumps("x" * 500), Policy.DISCONNECT)
    push(q, "trades.A", 3, "3", Policy.DISCONNECT)
    # the big one does not join a batch that would pass max_bytes
    assert q.pop_batch(100, len(small) + len(big) - 1) == [small]
    # alone, it goes even though larger than max_bytes, and nothing after it
    assert q.pop_batch(100, 10) == [big]
    assert q.pop_batch(100, 1) == [pub(Codec.JSON, "trades.A", 3, "", "3")]
    assert q.pop_batch(100, 1) == []
    check_sizes(q, gauge)


def test_pop_batch_skips_tombstones_which_count_for_nothing() -> None:
    q, gauge = make()
    for i in range(4):
        push(q, "depth.A", i + 1, "1", Policy.CONFLATE, key=f"k{i}")
    for i in range(3):  # k0, k1, k2 become tombstones at the front
        push(q, "depth.A", i + 5, json.dumps("x" * 100), Policy.CONFLATE, key=f"k{i}")
    assert len(q._entries or ()) == 7
    assert len(q) == 4
    k3 = pub(Codec.JSON, "depth.A", 4, "k3", "1")
    assert q.pop_batch(1, len(k3)) == [k3]
    out = q.pop_batch(2, BIG)
    assert out == [
        pub(Codec.JSON, "depth.A", 5, "k0", json.dumps("x" * 100)),
        pub(Codec.JSON, "depth.A", 6, "k1", json.dumps("x" * 100)),
    ]
    assert len(q) == 1
    check_sizes(q, gauge)
    assert len(q.pop_batch(5, BIG)) == 1
    assert q.pop_batch(5, BIG) == []
    assert not q._entries


def test_pop_batch_interleaves_control_and_pubs_in_queue_order() -> None:
    q, gauge = make()
    ping = protocol.encode(protocol.ping(), Codec.JSON)
    pong = protocol.encode(protocol.pong(3), Codec.JSON)
    push(q, "trades.A", 1, "1", Policy.DROP)
    q.push_control(ping)
    push(q, "quotes.A", 1, "{}", Policy.CONFLATE)
    q.push_control(pong)
    push(q, "trades.A", 2, "2", Policy.DISCONNECT)
    assert q.pop_batch(100, BIG) == [
        pub(Codec.JSON, "trades.A", 1, "", "1"),
        ping,
        pub(Codec.JSON, "quotes.A", 1, "", "{}"),
        pong,
        pub(Codec.JSON, "trades.A", 2, "", "2"),
    ]
    check_sizes(q, gauge)


# --- coalesce ------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_coalesce_one_frame_goes_as_is(codec: Codec) -> None:
    frame = pub(codec, "trades.A", 1, "", '{"p":1}')
    assert coalesce([frame], codec) is frame


def test_coalesce_json_is_an_array_of_the_messages() -> None:
    frames = [
        pub(Codec.JSON, "trades.A", 1, "", '{"p":1.5,"s":"é"}'),
        gap_frame(Codec.JSON, "trades.A", 2, 4),
        protocol.encode(protocol.ping(), Codec.JSON),
        pub(Codec.JSON, "depth.A", 9, "k", "[1,2]", deleted=True),
    ]
    text = coalesce(frames, Codec.JSON)
    assert isinstance(text, str)
    assert json.loads(text) == [json.loads(f) for f in frames]
    assert len(text) == sum(len(f) for f in frames) + len(frames) + 1


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 65535, 65536])
def test_coalesce_msgpack_array_header_for_any_count(n: int) -> None:
    messages = [
        {"type": "pub", "channel": "trades.A", "offset": i, "data": i % 7} for i in range(n)
    ]
    frames: list[Frame] = [msgpack.packb(m, use_bin_type=True) for m in messages]
    out = coalesce(frames, Codec.MSGPACK)
    assert isinstance(out, bytes)
    decoded = msgpack.unpackb(out, raw=False)
    if n == 1:
        assert decoded == messages[0]
    else:
        assert decoded == messages
        header = {2: 1, 15: 1, 16: 3, 17: 3, 65535: 3, 65536: 5}[n]
        assert len(out) == sum(len(f) for f in frames) + header


@pytest.mark.parametrize("codec", CODECS)
def test_pop_batch_then_coalesce_round_trip(codec: Codec) -> None:
    q, _ = make(codec, max_messages=3)
    for i in range(1, 6):
        push(q, "trades.A", i, json.dumps({"i": i}), Policy.DROP)
    push(q, "quotes.A", 1, '{"bid":1,"ask":2}', Policy.CONFLATE, merge=True)
    push(q, "quotes.A", 2, '{"bid":3}', Policy.CONFLATE, merge=True)
    first = decode(coalesce(q.pop_batch(100, BIG), codec), codec)
    assert first == [pub_msg("trades.A", i, {"i": i}) for i in (1, 2, 3)] + [
        pub_msg("quotes.A", 2, {"bid": 3, "ask": 2})
    ]
    second = decode(coalesce(q.pop_batch(100, BIG), codec), codec)
    assert second == {"type": "gap", "channel": "trades.A", "from": 4, "to": 5}


# --- merge_json ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('{"a":1,"b":2}', '{"b":3,"c":4}', {"a": 1, "b": 3, "c": 4}),
        ('{"a":{"x":1}}', '{"a":{"y":2}}', {"a": {"y": 2}}),  # nested objects replaced whole
        ('{"a":1}', "[1,2]", [1, 2]),
        ("[1]", '{"a":1}', {"a": 1}),
        ('{"a":1}', "5", 5),
        ("not json", '{"a":1}', {"a": 1}),
    ],
)
def test_merge_json(old: str, new: str, expected: Any) -> None:
    assert json.loads(merge_json(old, new)) == expected


# --- chunks: a batch of one channel, joined once for all its subscribers --------------------


def test_chunk_counts_messages_and_coalesces_into_one_array() -> None:
    q = SendQueue(Codec.JSON, 100, 10_000)
    frames = [protocol.pub_json("trades.ES", o, "", f'{{"p":{o}}}') for o in (1, 2, 3)]
    assert q.push_chunk("trades.ES", 1, 3, ",".join(frames), 3, Policy.DROP) is Outcome.QUEUED
    q.push_control('{"type":"ping"}')
    assert len(q) == 4
    parts, count = q.pop_parts(100, 10_000)
    assert count == 4 and len(q) == 0
    assert json.loads(coalesce(parts, Codec.JSON, count)) == [
        *(json.loads(f) for f in frames), {"type": "ping"}
    ]


def test_chunk_over_the_bounds_is_dropped_whole_and_announced() -> None:
    q = SendQueue(Codec.JSON, 2, 10_000)
    q.push_control("{}")
    q.push_control("{}")
    part = ",".join(protocol.pub_json("trades.ES", o, "", "1") for o in (5, 6, 7))
    assert q.push_chunk("trades.ES", 5, 7, part, 3, Policy.DROP) is Outcome.DROPPED
    assert q.push_chunk("trades.ES", 8, 9, part, 2, Policy.DROP) is Outcome.DROPPED
    assert q.push_chunk("trades.ES", 5, 7, part, 3, Policy.DISCONNECT) is Outcome.OVERFLOW
    q.pop_parts(100, 10_000)
    parts, _ = q.pop_parts(100, 10_000)
    assert [json.loads(p) for p in parts] == [
        {"type": "gap", "channel": "trades.ES", "from": 5, "to": 9}
    ]


def test_batch_chunks_split_by_frame_size_and_keep_order() -> None:
    from common.broker import Publication
    from edge.pack import Batch

    data = '{"pad":"' + "x" * 50 + '"}'
    pubs = [Publication("trades.ES", "e", o, "", data) for o in range(1, 21)]
    batch = Batch(pubs)
    chunks = batch.chunks(Codec.JSON, 300, 1000)
    assert batch.chunks(Codec.JSON, 300, 1000) is chunks  # joined once, shared by every subscriber
    offsets: list[int] = []
    for part, count, first, last in chunks:
        messages = json.loads("[" + str(part) + "]")
        assert len(messages) == count and len(str(part)) <= 300
        assert [m["offset"] for m in messages] == list(range(first, last + 1))
        offsets += [m["offset"] for m in messages]
    assert offsets == list(range(1, 21))
    tail = batch.chunks(Codec.MSGPACK, 300, 1000, start=15)
    decoded: list[Any] = []
    for part, count, _, _ in tail:
        frame = coalesce([part], Codec.MSGPACK, count)  # a msgpack array of `count`
        decoded += msgpack.unpackb(frame) if count > 1 else [msgpack.unpackb(frame)]
    assert [m["offset"] for m in decoded] == [16, 17, 18, 19, 20]


# --- a lagging client (edge/heartbeat.py: behind in time, maybe with an empty queue) -------


@pytest.mark.parametrize("codec", CODECS)
def test_lagging_drops_with_an_empty_queue_and_announces_one_gap_when_caught_up(
    codec: Codec,
) -> None:
    q, gauge = make(codec)
    q.push_control(protocol.encode(protocol.ping(), codec))
    q.lagging = True
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.DROPPED
    # The queue drains (the ping goes out) while the client is still behind: no notice yet.
    assert q.pop_batch(10, BIG) == [protocol.encode(protocol.ping(), codec)]
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.DROPPED
    assert q.pop_batch(10, BIG) == []
    assert q.busy  # the writer must come back for the notice
    assert push(q, "trades.A", 3, "3", Policy.DROP) is Outcome.DROPPED
    q.lagging = False  # its pong: caught up
    assert q.pop_batch(10, BIG) == [gap_frame(codec, "trades.A", 1, 3)]  # one notice
    assert push(q, "trades.A", 4, "4", Policy.DROP) is Outcome.QUEUED
    assert q.pop_batch(10, BIG) == [pub(codec, "trades.A", 4, "", "4")]
    check_sizes(q, gauge)


def test_lagging_gap_goes_before_the_next_accepted_message_of_its_channel() -> None:
    q, _ = make()
    q.lagging = True
    assert push(q, "trades.A", 1, "1", Policy.DROP) is Outcome.DROPPED
    q.lagging = False
    assert push(q, "trades.A", 2, "2", Policy.DROP) is Outcome.QUEUED
    assert q.pop_batch(10, BIG) == [gap_frame(Codec.JSON, "trades.A", 1, 1),
                                    pub(Codec.JSON, "trades.A", 2, "", "2")]


def test_lagging_disconnect_overflows_with_an_empty_queue() -> None:
    q, _ = make()
    q.lagging = True
    assert push(q, "account.u.orders", 1, "1", Policy.DISCONNECT) is Outcome.OVERFLOW
    assert q.push_chunk("account.u.orders", 1, 2, '{"a":1},{"a":2}', 2,
                        Policy.DISCONNECT) is Outcome.OVERFLOW
    assert len(q) == 0


def test_lagging_conflate_keeps_the_latest_value_per_key() -> None:
    q, gauge = make(max_messages=2)
    q.lagging = True
    for i in range(1, 7):
        outcome = push(q, "quotes.A", i, json.dumps({"bid": i}), Policy.CONFLATE, merge=True)
        assert outcome is (Outcome.QUEUED if i == 1 else Outcome.CONFLATED)
    assert push(q, "quotes.B", 7, '{"bid":7}', Policy.CONFLATE) is Outcome.QUEUED
    assert [decode(f, Codec.JSON)["offset"] for f in q.pop_batch(10, BIG)] == [6, 7]
    check_sizes(q, gauge)
