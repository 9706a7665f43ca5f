"""The hub against the in-memory broker: ordering, gap fill, resync, epoch changes, the
live connection lost and back, resubscribes, concurrent subscribes. No Redis, no sockets:
the memory broker delivers live messages from the event loop as pub/sub would, and loses
them, drops the connection or wipes its state on request."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from common import protocol
from common.broker import (
    BrokerUnavailable,
    HistoryResult,
    Publication,
    PublishRequest,
    SnapshotWant,
)
from common.broker.memory import MemoryBroker
from common.channels import parse_channel
from common.errors import Disconnect, Unavailable
from common.protocol import Codec, Frame, Position
from edge.hub import Hub
from edge.pack import Batch
from edge.stats import EdgeStats

CH = "quotes.MNQ"
LOG = logging.getLogger("test.hub")
TTL = 3600


class FakeSession:
    """A subscriber that records what it is sent, decoded."""

    codec = Codec.JSON

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.failed: Disconnect | None = None

    def enqueue(self, frame: Frame) -> None:
        self.frames.append(frame)

    def resynced(self, channel: str, frame: Frame) -> None:
        self.frames.append(frame)

    def deliver(self, channel: str, batch: Batch, start: int) -> None:
        self.frames += [pub.frame(self.codec) for pub in batch.pubs[start:]]

    def end_turn(self) -> None:
        pass

    def fail(self, exc: Disconnect) -> None:
        self.failed = exc

    def messages(self, channel: str | None = None) -> list[dict[str, object]]:
        out = [json.loads(f) for f in self.frames]
        return [m for m in out if channel is None or m.get("channel") == channel]

    def offsets(self, channel: str = CH) -> list[int]:
        return [int(m["offset"]) for m in self.messages(channel)  # type: ignore[call-overload]
                if m["type"] == "pub"]

    def resyncs(self, channel: str = CH) -> list[dict[str, object]]:
        return [m for m in self.messages(channel) if m["type"] == "resync"]


async def publish(
    broker: MemoryBroker, channel: str, *values: int, max_length: int = 1000,
    key: str = "", delete: bool = False,
) -> list[int]:
    """Publish {"o": value} for each value; the offsets."""
    replies = await broker.publish(
        [PublishRequest(channel, json.dumps({"o": v}), key, max_length=max_length,
                        snapshot_mode="keyed" if key else "last", delete=delete)
         for v in values],
        meta_ttl=TTL, idempotency_ttl=TTL,
    )
    return [r.offset for r in replies]


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.001)


def resynced(s: FakeSession) -> Callable[[], bool]:
    return lambda: len(s.resyncs()) == 1


def reached(s: FakeSession, offset: int, start: int) -> Callable[[], bool]:
    return lambda: start == offset or s.offsets()[-1:] == [offset]


async def settle() -> None:
    """Let what is scheduled run (live messages, the hub's end-of-turn flush, repairs)."""
    for _ in range(20):
        await asyncio.sleep(0)


def make_hub(broker: MemoryBroker, **kwargs: Any) -> Hub:
    """A hub with the edge's recent window (every test here runs with it, as edges do)."""
    kwargs.setdefault("window_messages", 64)
    kwargs.setdefault("window_bytes", 16_384)
    return Hub(broker, EdgeStats(), LOG, node_id="n", **kwargs)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def hub(broker: MemoryBroker) -> AsyncIterator[Hub]:
    hub = make_hub(broker, probe_interval=0.02, probe_timeout=0.05)
    await hub.start()
    await until(lambda: hub.ready)
    yield hub
    await hub.close()


async def join(
    hub: Hub, session: FakeSession, channel: str = CH, recover: Position | None = None,
    snapshot: bool = False,
) -> dict[str, object]:
    """Subscribe as a session does: the reply and replay go out before any live message."""
    _, joined = await hub.subscribe(session, parse_channel(channel), recover, snapshot)
    reply: dict[str, object] = protocol.subscribed(
        1, channel, joined.epoch, joined.offset, joined.recovered, joined.snapshot, "all"
    )
    session.enqueue(json.dumps(reply))
    for pub in joined.replay:
        session.enqueue(pub.frame(Codec.JSON))
    return reply


# --- ordering ----------------------------------------------------------------------------


async def test_live_messages_arrive_in_order_after_the_reply(
    hub: Hub, broker: MemoryBroker
) -> None:
    await publish(broker, CH, 1, 2)
    s = FakeSession()
    reply = await join(hub, s)
    assert reply["offset"] == 2 and reply["recovered"] is False
    await publish(broker, CH, *range(3, 30))
    await until(lambda: s.offsets() == list(range(3, 30)))
    assert s.messages()[0]["type"] == "subscribed"
    assert hub.stats.live_messages == 27 and s.failed is None


async def test_a_batch_of_one_turn_is_one_batch_per_channel(
    hub: Hub, broker: MemoryBroker
) -> None:
    batches: list[list[int]] = []
    s = FakeSession()
    await join(hub, s)
    original = s.deliver

    def deliver(channel: str, batch: Batch, start: int) -> None:
        batches.append([p.offset for p in batch.pubs[start:]])
        original(channel, batch, start)

    s.deliver = deliver  # type: ignore[method-assign]
    await publish(broker, CH, *range(1, 11))
    await until(lambda: len(s.offsets()) == 10)
    assert batches == [list(range(1, 11))]


async def test_fields_of_a_publication_pass_through(hub: Hub, broker: MemoryBroker) -> None:
    s = FakeSession()
    await join(hub, s, "depth.NQ")
    await publish(broker, "depth.NQ", 5, key="bid:1")
    await publish(broker, "depth.NQ", 6, key="bid:1", delete=True)
    await until(lambda: len(s.offsets("depth.NQ")) == 2)
    pubs = [m for m in s.messages("depth.NQ") if m["type"] == "pub"]
    assert pubs[0]["key"] == "bid:1" and pubs[0]["data"] == {"o": 5}
    assert pubs[1].get("deleted") is True


async def test_a_fresh_subscribe_with_snapshot_gets_the_state(
    hub: Hub, broker: MemoryBroker
) -> None:
    await publish(broker, "depth.ES", 1, key="a")
    await publish(broker, "depth.ES", 2, key="b")
    reply = await join(hub, FakeSession(), "depth.ES", snapshot=True)
    assert reply["offset"] == 2 and reply["snapshot"] == {"a": {"o": 1}, "b": {"o": 2}}


# --- recovery on subscribe ---------------------------------------------------------------


async def test_a_subscribe_recovers_what_it_missed(hub: Hub, broker: MemoryBroker) -> None:
    await publish(broker, CH, *range(1, 11))
    epoch = (await broker.history(CH, -1, "0", limit=10, meta_ttl=TTL)).epoch
    s = FakeSession()
    reply = await join(hub, s, recover=Position(4, epoch))
    assert reply["recovered"] is True and reply["offset"] == 10
    assert s.offsets() == list(range(5, 11))
    assert hub.stats.subscribes_recovered == 1 and hub.stats.messages_recovered == 6


async def test_a_subscribe_from_another_epoch_gets_the_snapshot(
    hub: Hub, broker: MemoryBroker
) -> None:
    await publish(broker, CH, 1, 2, 3)
    s = FakeSession()
    reply = await join(hub, s, recover=Position(2, "old"))
    assert reply["recovered"] is False and reply["snapshot"] == {"": {"o": 3}}
    assert s.offsets() == [] and hub.stats.subscribes_not_recovered == 1


async def test_a_position_older_than_the_history_is_not_recovered(
    hub: Hub, broker: MemoryBroker
) -> None:
    await publish(broker, CH, *range(1, 21), max_length=5)  # holds 16..20
    epoch = (await broker.history(CH, -1, "0", limit=10, meta_ttl=TTL)).epoch
    reply = await join(hub, FakeSession(), recover=Position(10, epoch))
    assert reply["recovered"] is False and reply["offset"] == 20


class RacingBroker(MemoryBroker):
    """Publishes `during` while a history read is under way: some before the read sees
    the channel, some after (they reach the hub live, overlapping the history)."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[int] = []
        self.after: list[int] = []

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        before, after, self.before, self.after = self.before, self.after, [], []
        if before:
            await publish(self, channel, *before)
        result = self.history_now(channel, since, snapshot, epoch=epoch, until=until,
                                  limit=limit, meta_ttl=meta_ttl)
        if after:
            await publish(self, channel, *after)
            await settle()  # they reach the hub live before this read's reply
        return result


async def test_live_messages_during_the_history_read_are_merged_once() -> None:
    broker = RacingBroker()
    hub = make_hub(broker)
    await hub.start()
    try:
        await publish(broker, CH, 1, 2, 3, 4)
        epoch = (await broker.history(CH, -1, "0", limit=10, meta_ttl=TTL)).epoch
        broker.before, broker.after = [5, 6], [7, 8]  # history read at top 6
        s = FakeSession()
        reply = await join(hub, s, recover=Position(2, epoch))
        assert reply["recovered"] is True
        assert s.offsets() == [3, 4, 5, 6, 7, 8]
        await publish(broker, CH, 9)
        await until(lambda: s.offsets()[-1:] == [9])
        await settle()
        assert s.offsets() == list(range(3, 10)) and s.failed is None
    finally:
        await hub.close()


# --- gaps and resyncs --------------------------------------------------------------------


async def test_a_lost_live_message_is_filled_from_history_once(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    await publish(broker, CH, 1, 2)
    broker.drop_live(CH, 3)  # 3..5 never arrive live
    await publish(broker, CH, 3, 4, 5, 6, 7)
    await until(lambda: s.offsets()[-1:] == [7])
    await settle()
    assert s.offsets() == list(range(1, 8))
    assert hub.stats.gaps_filled == 1 and hub.stats.resyncs == 0


async def test_messages_arriving_during_a_fill_are_held_back_and_released_in_order(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    broker.drop_live(CH, 2)
    await publish_unavailable(broker, 1, 2, 3)  # 3 arrives alone: a fill starts, and waits
    await until(lambda: hub.channels[CH].repair is not None)
    await publish_unavailable(broker, 4, 5)  # during the fill
    await settle()
    assert s.offsets() == []
    broker.available = True
    await until(lambda: s.offsets()[-1:] == [5])
    await settle()
    assert s.offsets() == [1, 2, 3, 4, 5]


async def test_a_gap_the_history_no_longer_holds_resyncs(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    await publish(broker, CH, 1, max_length=3)
    broker.drop_live(CH, 10)
    await publish(broker, CH, *range(2, 13), max_length=3)  # history keeps 10..12
    await until(lambda: len(s.resyncs()) == 1)
    resync = s.resyncs()[0]
    assert resync["offset"] == 12 and resync["snapshot"] == {"": {"o": 12}}
    await publish(broker, CH, 13, max_length=3)
    await until(lambda: s.offsets()[-1:] == [13])
    assert s.offsets() == [1, 13] and hub.stats.resyncs == 1


async def test_a_new_epoch_resyncs_every_subscriber(hub: Hub, broker: MemoryBroker) -> None:
    a, b = FakeSession(), FakeSession()
    first = await join(hub, a)
    await join(hub, b)
    await publish(broker, CH, 1, 2)
    await until(lambda: b.offsets() == [1, 2])
    broker.wipe()  # the store restarted empty: the next publish starts a new epoch
    await publish(broker, CH, 7)
    for s in (a, b):
        await until(resynced(s))
        resync = s.resyncs()[0]
        assert resync["epoch"] != first["epoch"] and resync["offset"] == 1
        assert s.offsets() == [1, 2]  # offset 1 of the new epoch came with the resync
    await publish(broker, CH, 8)
    await until(lambda: a.offsets()[-1:] == [2] and b.offsets()[-1:] == [2])
    assert hub.stats.resyncs == 1


async def test_a_rebase_resyncs(hub: Hub, broker: MemoryBroker) -> None:
    s = FakeSession()
    reply = await join(hub, s)
    await publish(broker, CH, 1, 2, 3)
    await until(lambda: s.offsets() == [1, 2, 3])
    rebased = await broker.rebase(CH, str(reply["epoch"]), None, meta_ttl=TTL)
    await publish(broker, CH, 4)
    await until(lambda: len(s.resyncs()) == 1)
    assert s.resyncs()[0]["epoch"] == rebased.epoch
    await settle()
    assert s.offsets() == [1, 2, 3]  # 4 is in the resync's offset


async def test_a_fill_while_the_broker_fails_is_retried(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    broker.drop_live(CH, 1)
    await publish(broker, CH, 1, 2)
    broker.available = False
    await asyncio.sleep(0.1)  # the fill fails and is retried with backoff
    assert s.offsets() == [] and hub.channels[CH].repair is not None
    broker.available = True
    await until(lambda: s.offsets() == [1, 2])


async def test_a_message_of_an_old_epoch_after_a_resync_is_ignored(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    await publish(broker, CH, 1)
    await until(lambda: s.offsets() == [1])
    state = hub.channels[CH]
    old = state.epoch
    broker.wipe()
    await publish(broker, CH, 2)
    await until(lambda: len(s.resyncs()) == 1)
    assert state.epoch != old
    await settle()
    assert hub.stats.resyncs == 1 and s.failed is None


# --- the live connection lost and back -----------------------------------------------------


async def test_after_a_reconnect_every_channel_is_filled_from_history(
    hub: Hub, broker: MemoryBroker
) -> None:
    channels = [f"quotes.R{i}" for i in range(5)]
    s = FakeSession()
    for ch in channels:
        await join(hub, s, ch)
        await publish(broker, ch, 1)
    await until(lambda: all(s.offsets(ch) == [1] for ch in channels))
    broker.disconnect_live()
    assert not hub.ready and hub.stats.pubsub_reconnects == 1
    for ch in channels:
        await publish(broker, ch, 2, 3)  # lost: nobody listens
    await settle()
    assert all(s.offsets(ch) == [1] for ch in channels)
    broker.restore_live()
    await until(lambda: all(s.offsets(ch) == [1, 2, 3] for ch in channels))
    await until(lambda: hub.ready)
    for ch in channels:
        await publish(broker, ch, 4)
    await until(lambda: all(s.offsets(ch) == [1, 2, 3, 4] for ch in channels))
    assert hub.stats.gaps_filled == len(channels) and hub.stats.resyncs == 0


async def test_a_reconnect_during_a_fill_reads_the_history_again(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    broker.drop_live(CH, 1)
    broker.available = False  # the fill waits
    await publish_unavailable(broker, 1, 2)
    await until(lambda: hub.channels[CH].repair is not None)
    broker.disconnect_live()
    broker.available = True
    await publish(broker, CH, 3)  # lost with the connection
    broker.restore_live()
    await until(lambda: s.offsets() == [1, 2, 3])
    await publish(broker, CH, 4)
    await until(lambda: s.offsets() == [1, 2, 3, 4])


async def publish_unavailable(broker: MemoryBroker, *values: int) -> None:
    """Publish while the broker refuses its clients (the writer is not one of them)."""
    broker.available = True
    await publish(broker, CH, *values)
    broker.available = False


async def test_a_half_open_connection_is_noticed_by_the_probe_and_replaced(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    await join(hub, s)
    broker.half_open()
    await publish(broker, CH, 1, 2)  # swallowed by the half-open connection
    await until(lambda: hub.stats.pubsub_reconnects == 1)
    await until(lambda: s.offsets() == [1, 2])
    await until(lambda: hub.ready)


async def test_not_ready_while_the_connection_is_down(hub: Hub, broker: MemoryBroker) -> None:
    broker.disconnect_live()
    assert not hub.ready
    await asyncio.sleep(0.05)
    assert not hub.ready
    broker.restore_live()
    await until(lambda: hub.ready)


# --- subscribe, resubscribe, unsubscribe -------------------------------------------------


async def test_resubscribing_recovers_what_was_missed_between(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    reply = await join(hub, s)
    await publish(broker, CH, 1, 2)
    await until(lambda: s.offsets() == [1, 2])
    hub.unsubscribe(s, CH)
    await publish(broker, CH, 3, 4)
    await settle()
    assert s.offsets() == [1, 2]
    again = await join(hub, s, recover=Position(2, str(reply["epoch"])))
    assert again["recovered"] is True
    await publish(broker, CH, 5)
    await until(lambda: s.offsets() == [1, 2, 3, 4, 5])


async def test_the_last_unsubscribe_drops_the_channel_and_its_live_subscription(
    hub: Hub, broker: MemoryBroker
) -> None:
    a, b = FakeSession(), FakeSession()
    await join(hub, a)
    await join(hub, b)
    (live,) = broker.lives()
    hub.unsubscribe(a, CH)
    assert CH in hub.channels and CH in live.channels
    await publish(broker, CH, 1)
    await until(lambda: b.offsets() == [1])
    assert a.offsets() == []
    hub.unsubscribe(b, CH)
    assert CH not in hub.channels and CH not in live.channels
    assert hub.stats.subscriptions == 0 and hub.stats.channels == 0
    await publish(broker, CH, 2)
    await settle()
    assert b.offsets() == [1] and hub.stats.live_messages == 1
    hub.unsubscribe(b, CH)  # again: nothing to do


async def test_a_failed_subscribe_leaves_no_channel(hub: Hub, broker: MemoryBroker) -> None:
    broker.available = False
    with pytest.raises(Unavailable):
        await join(hub, FakeSession())
    assert CH not in hub.channels
    broker.available = True
    assert (await join(hub, FakeSession()))["type"] == "subscribed"


async def test_concurrent_subscribes_during_publishes_lose_and_double_nothing(
    hub: Hub, broker: MemoryBroker
) -> None:
    rng = random.Random(7)
    total = 400
    done = asyncio.Event()

    async def publisher() -> None:
        for v in range(1, total + 1):
            await publish(broker, CH, v)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        done.set()

    sessions: list[tuple[FakeSession, int]] = []

    async def subscriber(i: int) -> None:
        await asyncio.sleep(rng.random() * 0.01)
        s = FakeSession()
        if i % 3 == 0 and sessions:
            reply = await join(hub, s)
        else:
            reply = await join(hub, s, snapshot=i % 2 == 0)
        sessions.append((s, int(reply["offset"])))  # type: ignore[call-overload]

    task = asyncio.create_task(publisher())
    await asyncio.gather(*(subscriber(i) for i in range(30)))
    await done.wait()
    await task
    for s, start in sessions:
        await until(reached(s, total, start))
        assert s.offsets() == list(range(start + 1, total + 1)), start
        assert s.failed is None


async def test_subscribes_to_a_channel_no_one_published_agree_with_its_first_publish(
    hub: Hub, broker: MemoryBroker
) -> None:
    s = FakeSession()
    reply = await join(hub, s, "trades.NEW")
    assert reply["offset"] == 0
    await publish(broker, "trades.NEW", 1)
    await until(lambda: s.offsets("trades.NEW") == [1])
    assert s.resyncs("trades.NEW") == []  # the same epoch: created by the subscribe


class SlowBroker(MemoryBroker):
    """History reads wait until `go` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        await self.go.wait()
        return await super().history(channel, since, snapshot, epoch=epoch, until=until,
                                     limit=limit, meta_ttl=meta_ttl)


async def test_a_subscribe_cancelled_during_its_history_read_leaves_no_channel() -> None:
    broker = SlowBroker()
    hub = make_hub(broker)
    await hub.start()
    try:
        task = asyncio.create_task(join(hub, FakeSession()))
        await until(lambda: CH in hub.channels)
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert CH not in hub.channels and CH not in broker.lives()[0].channels
        broker.go.set()
        assert (await join(hub, FakeSession()))["type"] == "subscribed"
    finally:
        await hub.close()


async def test_close_stops_the_live_connection(broker: MemoryBroker) -> None:
    hub = make_hub(broker)
    await hub.start()
    await until(lambda: hub.ready)
    await hub.close()
    assert broker.lives() == [] and not hub.ready


async def test_the_broker_errors_are_its_own(broker: MemoryBroker) -> None:
    broker.available = False
    with pytest.raises(BrokerUnavailable):
        await broker.history(CH, -1, "0", limit=1, meta_ttl=TTL)


# --- the store lost what was delivered (an asynchronous replica promoted) ----------------


def lose_tail(broker: MemoryBroker, channel: str, keep: int) -> None:
    """The store comes back without the writes after offset `keep`, in the same epoch (a
    replica promoted before it had the master's last writes)."""
    ch = broker._channels[channel]
    ch.stream = [e for e in ch.stream if e.offset <= keep]
    ch.top = keep
    ch.snapshot = {"": json.dumps({"o": keep})}


@pytest.mark.parametrize("republished", [0, 4], ids=["top-below-last", "other-messages"])
async def test_a_fill_that_finds_delivered_messages_lost_rebases_and_resyncs(
    hub: Hub, broker: MemoryBroker, republished: int
) -> None:
    """After the live connection was lost, the stream no longer holds what the hub
    delivered: its top is below it, or (a new publisher went on in the same epoch) other
    messages are at those offsets. Every subscriber is resynced into a new epoch, and a
    client back with a position of the lost history is not told it recovered."""
    s = FakeSession()
    reply = await join(hub, s)
    old = str(reply["epoch"])
    await publish(broker, CH, 1, 2, 3, 4, 5)
    await until(lambda: s.offsets() == [1, 2, 3, 4, 5])
    broker.disconnect_live()
    lose_tail(broker, CH, 3)
    if republished:  # offsets 4..7 again, other messages, in the old epoch
        assert await publish(broker, CH, *range(40, 40 + republished)) == [4, 5, 6, 7]
    broker.restore_live()
    await until(resynced(s))
    resync = s.resyncs()[0]
    top = 3 + republished
    assert resync["epoch"] != old and resync["offset"] == top
    assert hub.stats.lost_writes == 1
    assert (await broker.history(CH, -1, "0", limit=10, meta_ttl=TTL)).epoch == resync["epoch"]
    await settle()
    assert s.offsets() == [1, 2, 3, 4, 5]  # nothing of the other history without a resync
    assert await publish(broker, CH, 9) == [top + 1]
    await until(lambda: s.offsets()[-1:] == [top + 1])
    late = FakeSession()
    back = await join(hub, late, recover=Position(5, old))
    assert back["recovered"] is False and back["epoch"] == resync["epoch"]


async def test_a_fill_that_finds_the_same_message_at_last_fills(
    hub: Hub, broker: MemoryBroker
) -> None:
    """The check compares the message at `last`: a plain lost connection fills."""
    s = FakeSession()
    await join(hub, s)
    await publish(broker, CH, 1, 2)
    await until(lambda: s.offsets() == [1, 2])
    broker.disconnect_live()
    await publish(broker, CH, 3, 4)
    broker.restore_live()
    await until(lambda: s.offsets() == [1, 2, 3, 4])
    assert hub.stats.lost_writes == 0 and hub.stats.resyncs == 0


async def test_a_message_of_the_old_epoch_held_back_during_a_resync_is_dropped(
    hub: Hub, broker: MemoryBroker
) -> None:
    """A live message of the old epoch that arrives while the channel resyncs (a publisher
    that had not seen the rebase yet) is stale once the resync read has been issued after
    it: it is dropped, not resynced for again and again."""
    s = FakeSession()
    reply = await join(hub, s)
    old = str(reply["epoch"])
    await publish(broker, CH, 1, 2)
    await until(lambda: s.offsets() == [1, 2])
    new = (await broker.rebase(CH, old, None, meta_ttl=TTL)).epoch
    broker.available = False  # the resync's read fails and is retried
    await publish_unavailable(broker, 3)
    await until(lambda: hub.channels[CH].repair is not None)
    hub.on_publication(Publication(CH, old, 3, "", '{"o":30}'))
    broker.available = True
    await until(lambda: hub.channels[CH].repair is None)
    await settle()
    assert [m["epoch"] for m in s.resyncs()] == [new]
    assert hub.stats.resyncs == 1 and hub.channels[CH].epoch == new
    assert await publish(broker, CH, 4) == [4]
    await until(lambda: s.offsets() == [1, 2, 4])


async def test_a_fill_whose_message_at_last_was_trimmed_still_fills(
    hub: Hub, broker: MemoryBroker
) -> None:
    """Nothing to compare when the entry at `last` is trimmed away but the ones after it
    are kept: the fill goes on as before the check (no resync, no rebase)."""
    s = FakeSession()
    await join(hub, s)
    await publish(broker, CH, 1, 2, 3, max_length=2)
    await until(lambda: s.offsets() == [1, 2, 3])
    broker.disconnect_live()
    await publish(broker, CH, 4, 5, max_length=2)  # the stream keeps 4 and 5 only
    broker.restore_live()
    await until(lambda: s.offsets() == [1, 2, 3, 4, 5])
    assert hub.stats.lost_writes == 0 and hub.stats.resyncs == 0
