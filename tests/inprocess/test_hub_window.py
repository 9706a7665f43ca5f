"""Recovery from memory, shared reads and the recovery gate (edge/hub.py, edge/admission.py),
against the in-memory broker. Broker history reads are counted: a subscribe the hub can
answer from what it holds must cost none, identical concurrent reads must cost one, and the
merge of replay and live messages must stay gapless and duplicate-free whichever path a
subscribe took."""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import AsyncIterator, Sequence

import pytest

from common.broker import BrokerUnavailable, HistoryRead, HistoryResult, SnapshotWant
from common.broker.memory import MemoryBroker
from common.errors import Unavailable
from common.protocol import Position
from edge.admission import Gate
from edge.hub import Hub
from tests.inprocess.test_hub_memory import (
    CH,
    TTL,
    FakeSession,
    join,
    make_hub,
    publish,
    reached,
    settle,
    until,
)


class CountingBroker(MemoryBroker):
    """Counts history reads; while `hold` is set, reads wait until it is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int, str]] = []
        self.batches: list[int] = []  # reads per history_many call
        self.hold = False
        self.released = asyncio.Event()

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        self.reads.append((channel, since, snapshot))
        if self.hold:
            await self.released.wait()
        return await super().history(channel, since, snapshot, epoch=epoch, until=until,
                                     limit=limit, meta_ttl=meta_ttl)

    async def history_many(
        self, reads: Sequence[HistoryRead], *, limit: int, meta_ttl: int,
    ) -> list[HistoryResult | BrokerUnavailable]:
        self.batches.append(len(reads))
        return await super().history_many(reads, limit=limit, meta_ttl=meta_ttl)

    def let_go(self) -> None:
        self.hold = False
        self.released.set()


@pytest.fixture
def broker() -> CountingBroker:
    return CountingBroker()


@pytest.fixture
async def hub(broker: CountingBroker) -> AsyncIterator[Hub]:
    hub = make_hub(broker, probe_interval=0.02, probe_timeout=0.05)
    await hub.start()
    await until(lambda: hub.ready)
    yield hub
    await hub.close()


async def epoch_of(broker: MemoryBroker, channel: str = CH) -> str:
    return broker.history_now(channel, -1, "0", limit=1, meta_ttl=TTL).epoch


async def holding(hub: Hub, broker: CountingBroker, channel: str = CH) -> FakeSession:
    """A subscriber that makes the hub hold `channel`, and waits until the hub has
    dispatched the channel's top."""
    s = FakeSession()
    await join(hub, s, channel)
    return s


async def caught_up(hub: Hub, broker: MemoryBroker, channel: str = CH) -> None:
    top = broker.history_now(channel, -1, "0", limit=1, meta_ttl=TTL).top
    await until(lambda: hub.channels[channel].last == top)
    await settle()


# --- from memory ---------------------------------------------------------------------------


async def test_a_position_in_the_window_is_recovered_without_a_broker_read(
    hub: Hub, broker: CountingBroker
) -> None:
    await holding(hub, broker)
    await publish(broker, CH, *range(1, 21))
    await caught_up(hub, broker)
    epoch = await epoch_of(broker)
    reads = len(broker.reads)
    s = FakeSession()
    reply = await join(hub, s, recover=Position(12, epoch))
    assert len(broker.reads) == reads  # no round trip
    assert reply["recovered"] is True and reply["offset"] == 20 and "snapshot" not in reply
    assert s.offsets() == list(range(13, 21))
    await publish(broker, CH, 21, 22)
    await until(lambda: s.offsets()[-1:] == [22])
    await settle()
    assert s.offsets() == list(range(13, 23)) and s.failed is None
    assert hub.stats.subscribe_sources["memory"] == 1
    assert hub.stats.subscribes_recovered == 1 and hub.stats.messages_recovered == 8


async def test_an_up_to_date_position_and_a_plain_subscribe_cost_no_read(
    hub: Hub, broker: CountingBroker
) -> None:
    await holding(hub, broker)
    await publish(broker, CH, 1, 2, 3)
    await caught_up(hub, broker)
    reads = len(broker.reads)
    up_to_date, plain = FakeSession(), FakeSession()
    r1 = await join(hub, up_to_date, recover=Position(3, await epoch_of(broker)))
    r2 = await join(hub, plain)
    assert len(broker.reads) == reads
    assert r1["recovered"] is True and r1["offset"] == 3 and up_to_date.offsets() == []
    assert r2["recovered"] is False and r2["offset"] == 3 and "snapshot" not in r2
    await publish(broker, CH, 4)
    await until(lambda: up_to_date.offsets() == [4] and plain.offsets() == [4])


async def test_a_snapshot_or_a_position_outside_the_window_reads_the_broker(
    hub: Hub, broker: CountingBroker
) -> None:
    await holding(hub, broker)
    await publish(broker, CH, *range(1, 101))  # the window holds the last 64: 37..100
    await caught_up(hub, broker)
    epoch = await epoch_of(broker)
    assert hub.channels[CH].recent[0].offset == 37
    reads = len(broker.reads)
    old, edge_of_window, snap = FakeSession(), FakeSession(), FakeSession()
    assert (await join(hub, old, recover=Position(35, epoch)))["recovered"] is True
    assert len(broker.reads) == reads + 1 and old.offsets() == list(range(36, 101))
    assert (await join(hub, edge_of_window, recover=Position(36, epoch)))["recovered"] is True
    assert len(broker.reads) == reads + 1 and edge_of_window.offsets() == list(range(37, 101))
    assert (await join(hub, snap, snapshot=True))["snapshot"] == {"": {"o": 100}}
    assert len(broker.reads) == reads + 2


async def test_another_epoch_or_a_position_ahead_reads_the_broker(
    hub: Hub, broker: CountingBroker
) -> None:
    await holding(hub, broker)
    await publish(broker, CH, 1, 2, 3)
    await caught_up(hub, broker)
    epoch = await epoch_of(broker)
    reads = len(broker.reads)
    other = await join(hub, FakeSession(), recover=Position(2, "other"))
    assert other["recovered"] is False and len(broker.reads) == reads + 1
    ahead = await join(hub, FakeSession(), recover=Position(5, epoch))
    assert len(broker.reads) == reads + 2 and ahead["offset"] == 3


async def test_the_window_is_bounded_by_count_and_bytes(broker: CountingBroker) -> None:
    hub = make_hub(broker, window_messages=10, window_bytes=100 + 3 * 109)
    await hub.start()
    try:
        await holding(hub, broker)
        await publish(broker, CH, *range(1, 31))  # {"o": NN} is 9 characters
        await caught_up(hub, broker)
        state = hub.channels[CH]
        assert [p.offset for p in state.recent] == [28, 29, 30]
        assert state.recent_bytes == 3 * 109 and hub.stats.window_messages == 3
    finally:
        await hub.close()
    off = make_hub(broker, window_messages=0)
    await off.start()
    try:
        await holding(off, broker)
        await publish(broker, CH, 31)
        await caught_up(off, broker)
        assert not off.channels[CH].recent
        reads = len(broker.reads)
        await join(off, FakeSession(), recover=Position(30, await epoch_of(broker)))
        assert len(broker.reads) == reads + 1
    finally:
        await off.close()


async def test_a_new_epoch_empties_the_window(hub: Hub, broker: CountingBroker) -> None:
    s = await holding(hub, broker)
    await publish(broker, CH, 1, 2, 3)
    await caught_up(hub, broker)
    old = await epoch_of(broker)
    broker.wipe()
    await publish(broker, CH, 1)  # another epoch: the hub resyncs
    await until(lambda: len(s.resyncs()) == 1 and hub.channels[CH].repair is None)
    state = hub.channels[CH]
    assert state.epoch != old and all(p.epoch == state.epoch for p in state.recent)
    reads = len(broker.reads)
    late = FakeSession()
    reply = await join(hub, late, recover=Position(2, old))
    assert reply["recovered"] is False and len(broker.reads) == reads + 1


async def test_during_a_repair_subscribes_read_the_broker(
    hub: Hub, broker: CountingBroker
) -> None:
    await holding(hub, broker)
    await publish(broker, CH, 1, 2)
    await caught_up(hub, broker)
    epoch = await epoch_of(broker)
    broker.hold = True
    broker.drop_live(CH, 1)
    await publish(broker, CH, 3, 4)  # 3 lost: a fill starts and waits
    await until(lambda: hub.channels[CH].repair is not None)
    s = FakeSession()
    task = asyncio.create_task(join(hub, s, recover=Position(2, epoch)))
    await until(lambda: len(broker.reads) >= 3)  # the fill's read, then this subscribe's
    broker.let_go()
    reply = await task
    assert reply["recovered"] is True
    await publish(broker, CH, 5)
    await until(lambda: s.offsets()[-1:] == [5])
    await settle()
    assert s.offsets() == [3, 4, 5]


async def test_a_lingering_channel_recovers_a_returning_client_from_memory(
    broker: CountingBroker,
) -> None:
    hub = make_hub(broker, linger=0.3)
    await hub.start()
    try:
        s = await holding(hub, broker, "account.42.orders")
        await publish(broker, "account.42.orders", 1, 2, 3)
        await until(lambda: s.offsets("account.42.orders") == [1, 2, 3])
        epoch = await epoch_of(broker, "account.42.orders")
        hub.unsubscribe(s, "account.42.orders")
        assert "account.42.orders" in hub.channels  # lingers, still subscribed
        await publish(broker, "account.42.orders", 4)  # while nobody is subscribed
        await caught_up(hub, broker, "account.42.orders")
        reads = len(broker.reads)
        back = FakeSession()
        reply = await join(hub, back, "account.42.orders", recover=Position(3, epoch))
        assert reply["recovered"] is True and len(broker.reads) == reads
        assert back.offsets("account.42.orders") == [4]
        hub.unsubscribe(back, "account.42.orders")
        await until(lambda: "account.42.orders" not in hub.channels, timeout=3.0)
        assert "account.42.orders" not in broker.lives()[0].channels
    finally:
        await hub.close()


# --- shared reads --------------------------------------------------------------------------


async def test_identical_concurrent_reads_are_done_once(broker: CountingBroker) -> None:
    hub = make_hub(broker)
    await hub.start()
    try:
        await publish(broker, CH, *range(1, 11))
        epoch = await epoch_of(broker)
        broker.hold = True
        sessions = [FakeSession() for _ in range(50)]
        tasks = [asyncio.create_task(join(hub, s, recover=Position(4, epoch)))
                 for s in sessions]
        await until(lambda: len(broker.reads) == 1)
        await settle()
        broker.let_go()
        replies = await asyncio.gather(*tasks)
        assert len(broker.reads) == 1
        assert all(r["recovered"] is True for r in replies)
        assert all(s.offsets() == list(range(5, 11)) for s in sessions)
        assert hub.stats.subscribe_sources == {"memory": 0, "shared": 49, "broker": 1}
        await publish(broker, CH, 11)
        await until(lambda: all(s.offsets()[-1:] == [11] for s in sessions))
    finally:
        await hub.close()


async def test_publications_during_pending_reads_are_held_once_for_every_waiter(
    broker: CountingBroker,
) -> None:
    """Subscribers waiting for reads, registered at different points of a live channel:
    each gets exactly what follows its position, and the hub keeps what was dispatched
    meanwhile once (a storm puts thousands of waiters on a busy channel: a copy each made
    every publication cost one append per waiter), and nothing once none waits."""
    hub = make_hub(broker, window_messages=0)  # no window: every recovery reads
    await hub.start()
    try:
        await publish(broker, CH, *range(1, 6))
        epoch = await epoch_of(broker)
        holder = FakeSession()
        await join(hub, holder)  # the channel is held and live
        broker.hold = True
        waiters: list[tuple[FakeSession, int, asyncio.Task[dict[str, object]]]] = []
        top = 5
        for round_ in range(5):
            for position in (1, 3, top - 1):
                s = FakeSession()
                task = asyncio.create_task(join(hub, s, recover=Position(position, epoch)))
                waiters.append((s, position, task))
            await until(lambda: len(hub.channels[CH].pending) == len(waiters))
            top = (await publish(broker, CH, 100 + round_, 200 + round_))[-1]
            await until(reached(holder, top, -1))
        state = hub.channels[CH]
        # Dispatched since the first waiter registered: 10 publications, held once.
        assert [p.offset for p in state.held] == list(range(6, top + 1))
        broker.let_go()
        replies = await asyncio.gather(*(task for _, _, task in waiters))
        assert all(r["recovered"] is True for r in replies)
        await publish(broker, CH, 999)
        top += 1
        for s, position, _ in waiters:
            await until(reached(s, top, position))
            assert s.offsets() == list(range(position + 1, top + 1)), position
            assert s.failed is None
        assert not state.pending and state.held == []
    finally:
        await hub.close()


async def test_a_read_issued_before_a_subscriber_registered_is_not_shared_with_it(
    broker: CountingBroker,
) -> None:
    """The late subscriber's buffer lacks what was dispatched between the read and its
    registration: sharing the read would leave a hole (or a wrong snapshot)."""
    hub = make_hub(broker, window_messages=0)  # no window: the late one must read
    await hub.start()
    try:
        first = FakeSession()
        await join(hub, first)  # the channel is held and live
        broker.hold = True
        a = FakeSession()
        task_a = asyncio.create_task(join(hub, a, snapshot=True))
        await until(lambda: len(broker.reads) == 2)
        await publish(broker, CH, 1, 2)  # after a's read was issued
        await until(lambda: first.offsets() == [1, 2])
        b = FakeSession()
        task_b = asyncio.create_task(join(hub, b, snapshot=True))
        await settle()
        broker.let_go()
        ra, rb = await task_a, await task_b
        assert len(broker.reads) == 3  # b did not take a's read
        assert rb["offset"] == 2 and rb["snapshot"] == {"": {"o": 2}} and b.offsets() == []
        await publish(broker, CH, 3)
        await until(lambda: a.offsets()[-1:] == [3] and b.offsets() == [3])
        assert a.offsets() == list(range(int(ra["offset"]) + 1, 4))  # type: ignore[call-overload]
    finally:
        await hub.close()


async def test_concurrent_recoveries_during_publishes_are_gapless(
    broker: CountingBroker,
) -> None:
    """Clients recovering from random positions while the channel is published to, some
    from the window, some sharing reads, some reading: each gets every offset once."""
    hub = make_hub(broker, window_messages=16, linger=1.0)
    await hub.start()
    rng = random.Random(11)
    total = 300
    try:
        await publish(broker, CH, 1)
        epoch = await epoch_of(broker)
        done = asyncio.Event()

        async def publisher() -> None:
            for v in range(2, total + 1):
                await publish(broker, CH, v)
                if rng.random() < 0.4:
                    await asyncio.sleep(0)
            done.set()

        results: list[tuple[FakeSession, int]] = []

        async def client() -> None:
            await asyncio.sleep(rng.random() * 0.02)
            top = broker.history_now(CH, -1, "0", limit=1, meta_ttl=TTL).top
            position = max(top - rng.choice((0, 0, 1, 3, 10, 40)), 0)
            s = FakeSession()
            reply = await join(hub, s, recover=Position(position, epoch))
            assert reply["recovered"] is True
            results.append((s, position))

        task = asyncio.create_task(publisher())
        await asyncio.gather(*(client() for _ in range(60)))
        await done.wait()
        await task
        for s, position in results:
            await until(reached(s, total, position))
            await settle()
            assert s.offsets() == list(range(position + 1, total + 1)), position
            assert s.failed is None
        sources = hub.stats.subscribe_sources
        assert sources["memory"] > 0 and sum(sources.values()) == 60
    finally:
        await hub.close()


# --- the recovery gate ---------------------------------------------------------------------


async def test_reads_beyond_the_gate_are_deferred_with_advice(broker: CountingBroker) -> None:
    hub = make_hub(broker)
    gate = Gate("recovery", 2, 1, 0.5, hub.stats, rand=lambda a, b: 0.75)
    hub.gate = gate
    await hub.start()
    try:
        channels = [f"quotes.C{i}" for i in range(4)]
        for c in channels:
            await publish(broker, c, 1)
        broker.hold = True
        tasks = [asyncio.create_task(join(hub, FakeSession(), c, snapshot=True))
                 for c in channels]
        # New channels pass the gate for their SUBSCRIBE, then again for their read.
        await until(lambda: len(broker.reads) == 2 and gate.waiting == 1)
        await settle()
        done = [t for t in tasks if t.done()]
        assert len(done) == 1
        with pytest.raises(Unavailable) as deferred:
            done[0].result()
        assert deferred.value.retry_after == 0.75
        broker.let_go()
        replies = await asyncio.gather(*(t for t in tasks if t not in done))
        assert all(r["snapshot"] == {"": {"o": 1}} for r in replies)
        assert gate.held == 0 and gate.waiting == 0
        assert hub.stats.admission[("recovery", "admitted")] == 6  # 3 SUBSCRIBEs, 3 reads
        assert hub.stats.admission[("recovery", "deferred")] == 1
        # The deferred one, retried, gets in.
        retried = await join(hub, FakeSession(), done_channel(channels, tasks, done),
                             snapshot=True)
        assert retried["snapshot"] == {"": {"o": 1}}
    finally:
        await hub.close()


def done_channel(channels: list[str], tasks: list[asyncio.Task[dict[str, object]]],
                 done: list[asyncio.Task[dict[str, object]]]) -> str:
    return channels[tasks.index(done[0])]


async def test_a_waiter_cancelled_in_the_gate_takes_no_place() -> None:
    from edge.stats import EdgeStats

    gate = Gate("recovery", 1, 5, 0.5, EdgeStats())
    assert await gate.enter()
    waiter = asyncio.create_task(gate.enter())
    await settle()
    assert gate.waiting == 1
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.leave()
    assert gate.held == 0 and gate.waiting == 0
    assert await gate.enter() and gate.held == 1


async def test_a_subscribe_cancelled_while_sharing_leaves_the_read_to_the_others(
    broker: CountingBroker,
) -> None:
    hub = make_hub(broker)
    await hub.start()
    try:
        await publish(broker, CH, 1, 2)
        broker.hold = True
        a, b = FakeSession(), FakeSession()
        ta = asyncio.create_task(join(hub, a, snapshot=True))
        tb = asyncio.create_task(join(hub, b, snapshot=True))  # both pending before the read
        await until(lambda: len(broker.reads) == 1)
        await settle()
        ta.cancel()  # the read's issuer goes away; b still shares it
        with pytest.raises(asyncio.CancelledError):
            await ta
        broker.let_go()
        reply = await tb
        assert reply["snapshot"] == {"": {"o": 2}} and len(broker.reads) == 1
        assert list(hub.channels[CH].active) == [b]
    finally:
        await hub.close()


async def test_while_the_live_connection_is_down_subscribes_read_the_broker(
    hub: Hub, broker: CountingBroker
) -> None:
    s = await holding(hub, broker)
    await publish(broker, CH, 1)
    await caught_up(hub, broker)
    epoch = await epoch_of(broker)
    broker.disconnect_live()
    await until(lambda: not hub.live.connected)
    reads = len(broker.reads)
    late = FakeSession()
    task = asyncio.create_task(join(hub, late, recover=Position(1, epoch)))
    await settle()
    assert len(broker.reads) == reads + 1  # not answered from a window that may be stale
    await publish(broker, CH, 2)  # published while the hub does not listen
    reply = await task
    assert reply["recovered"] is True
    broker.restore_live()  # each channel is filled from history: 2 reaches both
    await until(lambda: s.offsets()[-1:] == [2] and late.offsets()[-1:] == [2])
    assert late.offsets() == [2]


def test_the_advice_spreads_the_backlog_over_the_time_to_work_through_it() -> None:
    from edge.stats import EdgeStats

    now = [0.0]
    gate = Gate("recovery", 2, 0, 0.5, EdgeStats(), rand=lambda lo, hi: hi,
                clock=lambda: now[0])
    # No rate measured yet: assumed 20 per place per second (40/s).
    assert gate.retry_after() == 1.0  # at least 2 x retry
    for _ in range(99):
        gate.retry_after()
    assert gate.retry_after() == 0.5 + 101 / 40
    gate.held = 1000
    for _ in range(999):  # 1,000 places given back in one second: 1,000/s
        gate.leave()
    now[0] = 1.0
    gate.leave()  # the bucket closes
    assert gate.rate == 1000.0 and gate.held == 0
    # Ahead: the 100 deferred in the last bucket, and this one: 0.1 s at 1,000/s.
    assert gate.retry_after() == 1.0  # still at least 2 x retry
    for _ in range(1899):
        gate.retry_after()
    assert gate.retry_after() == 0.5 + 2002 / 1000  # 100 + 1 + 1,899 + 1 + this one
    now[0] = 10.0
    for _ in range(100_000):
        advice = gate.retry_after()
    assert advice == 0.5 + 30.0  # capped


def last_is(s: FakeSession, channel: str, offset: int) -> bool:
    return s.offsets(channel)[-1:] == [offset]


# --- batched reads -------------------------------------------------------------------------


async def test_a_storm_of_new_channels_is_read_in_few_broker_calls_and_stays_gapless(
    hub: Hub, broker: CountingBroker
) -> None:
    """200 subscribers recovering on 100 channels the hub does not hold, all at once, while
    every channel is published to: their reads go out together (a call per turn, not per
    read), and each subscriber gets every publication after its position exactly once."""
    names = [f"trades.B{i}" for i in range(100)]
    for name in names:
        await publish(broker, name, *range(1, 6))
    epochs = {name: await epoch_of(broker, name) for name in names}
    rng = random.Random(7)
    subs = [(FakeSession(), names[i % 100], rng.randint(0, 5)) for i in range(200)]
    tasks = [asyncio.create_task(join(hub, s, name, recover=Position(at, epochs[name])))
             for s, name, at in subs]
    for n in range(6, 12):  # live publications overlap the reads
        await publish(broker, names[n * 7 % 100], n)
        await asyncio.sleep(0)
    replies = await asyncio.gather(*tasks)
    assert all(r["recovered"] is True for r in replies)
    assert sum(broker.batches) == len(broker.reads) <= 200
    assert len(broker.batches) <= 3, broker.batches  # not one call per read
    for name in names:
        await publish(broker, name, 99)
    for s, name, at in subs:
        top = broker.history_now(name, -1, "0", limit=1, meta_ttl=TTL).top
        await until(functools.partial(last_is, s, name, top))
        assert s.offsets(name) == list(range(at + 1, top + 1)) and s.failed is None
    assert hub.stats.history_batches == len(broker.batches)
