"""A subscribe cancelled because its session ends leaves nothing behind in the hub, even
when a broker call swallowed the cancellation (redis-py 8 can; Python 3.11's `wait_for` can
too). Found by the live fuzzer: subscriptions of ended sessions stayed registered, holding
the session, its socket and its queue (the edge's RSS grew ~2 KB per fuzzed connection;
tests/support/fuzz_live.py now also checks that the edge holds nothing of ended clients)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common.broker import HistoryResult, LiveListener, SnapshotWant
from common.broker.memory import MemoryBroker, MemoryLive
from common.channels import parse_channel
from common.protocol import Position
from tests.inprocess.test_hub_memory import CH, FakeSession, make_hub


class SwallowingBroker(MemoryBroker):
    """History reads that swallow a cancel and return normally, as redis-py may."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = asyncio.Event()

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        self.reading.set()
        with contextlib.suppress(asyncio.CancelledError):  # the command returns after all
            await asyncio.sleep(0.05)
        return self.history_now(channel, since, snapshot, epoch=epoch, until=until,
                                limit=limit, meta_ttl=meta_ttl)


async def test_a_cancelled_subscribe_registers_nothing_when_redis_swallows_the_cancel() -> None:
    broker = SwallowingBroker()
    hub = make_hub(broker)
    await hub.start()
    try:
        task = asyncio.create_task(
            hub.subscribe(FakeSession(), parse_channel(CH), Position(2, "e"), False)
        )
        await broker.reading.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert CH not in hub.channels  # nobody left: the channel state is gone too
    finally:
        await hub.close()


class SlowSubscribeLive(MemoryLive):
    async def subscribe(self, channel: str) -> None:
        await asyncio.sleep(10)


class SlowSubscribeBroker(MemoryBroker):
    def live(self, listener: LiveListener, node_id: str) -> MemoryLive:
        live = SlowSubscribeLive(self, listener, node_id)
        self._lives.append(live)
        return live


async def test_a_subscribe_cancelled_during_its_redis_subscribe_leaves_no_channel() -> None:
    """The first subscribe of a channel creates its state and sends SUBSCRIBE; cancelled
    meanwhile, it must not leave behind a state that nothing will ever confirm (every later
    subscribe of the channel on this node would wait out the timeout)."""
    hub = make_hub(SlowSubscribeBroker())
    await hub.start()
    try:
        task = asyncio.create_task(
            hub.subscribe(FakeSession(), parse_channel(CH), None, False)
        )
        await asyncio.sleep(0.01)
        assert CH in hub.channels
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert CH not in hub.channels
    finally:
        await hub.close()
