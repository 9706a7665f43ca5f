"""The hub's pacing of the live reader (`Hub.pace`): after a flush that cost `c`, the reader
holds its next reply `c * (1/share - 1)` minus the time since the flush ended, at most
`live_coalesce_max`, once per flush; cheap flushes (< 1 ms) and a share of 1 never pace; a
busy recovery gate halves the share. The clock is injected and each delivery advances it,
so a flush's cost is exact; the flush runs as it does live (scheduled by the dispatch)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from common.broker import Publication
from common.broker.memory import MemoryBroker
from common.errors import Disconnect
from common.protocol import Codec, Frame
from edge.admission import Gate
from edge.hub import ChannelState, Hub, Subscription
from edge.pack import Batch
from edge.stats import EdgeStats

CH = "quotes.MNQ"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CostlySession:
    """A subscriber whose delivery takes `cost` seconds of the injected clock."""

    codec = Codec.JSON

    def __init__(self, clock: Clock, cost: float) -> None:
        self.clock = clock
        self.cost = cost
        self.offsets: list[int] = []

    def deliver(self, channel: str, batch: Batch, start: int) -> None:
        self.offsets += [p.offset for p in batch.pubs[start:]]
        self.clock.now += self.cost

    def end_turn(self) -> None:
        pass

    def resynced(self, channel: str, frame: Frame) -> None:
        raise AssertionError("no resync expected")

    def fail(self, exc: Disconnect) -> None:
        raise AssertionError(f"no failure expected: {exc!r}")


class Setup:
    def __init__(self, share: float, cap: float = 0.05, cost: float = 0.004) -> None:
        self.clock = Clock()
        self.stats = EdgeStats()
        self.gate = Gate("recovery", 1, 10, 0.5, self.stats)
        self.hub = Hub(MemoryBroker(), self.stats, logging.getLogger("test.pace"),
                       node_id="n", gate=self.gate, live_share=share,
                       live_coalesce_max=cap, clock=self.clock)
        self.session = CostlySession(self.clock, cost)
        state = self.hub.channels[CH] = ChannelState(CH)
        state.epoch, state.last = "e", 0
        state.active[self.session] = Subscription(self.session, CH, last=0, epoch="e")
        self.offset = 0

    async def flush(self, messages: int = 1) -> None:
        """Live messages as the reader hands them over, then the turn's flush."""
        for _ in range(messages):
            self.offset += 1
            self.hub.on_publication(Publication(CH, "e", self.offset, "", "{}"))
        assert self.hub.pace() == 0.0  # nothing flushed yet: the dispatch only scheduled
        await asyncio.sleep(0)  # the flush (call_soon) runs


async def test_after_an_expensive_flush_the_reader_waits_once() -> None:
    s = Setup(share=0.5, cost=0.004)
    await s.flush(3)
    assert s.session.offsets == [1, 2, 3]
    s.clock.now += 0.001  # the next reply arrives 1 ms after the flush ended
    assert s.hub.pace() == pytest.approx(0.003)  # 4 ms * (1/0.5 - 1) - 1 ms
    assert s.hub.pace() == 0.0  # once per flush
    assert s.hub.pace() == 0.0
    assert s.stats.live_paced == 1
    assert s.stats.live_paced_seconds == pytest.approx(0.003)
    await s.flush()
    assert s.hub.pace() == pytest.approx(0.004)  # the next flush: asked at once
    assert s.stats.live_paced == 2
    assert s.stats.live_paced_seconds == pytest.approx(0.007)


async def test_the_share_sets_the_wait() -> None:
    s = Setup(share=0.25, cost=0.002)
    await s.flush()
    assert s.hub.pace() == pytest.approx(0.006)  # 2 ms * (4 - 1)
    s = Setup(share=0.8, cost=0.008)
    await s.flush()
    assert s.hub.pace() == pytest.approx(0.002)  # 8 ms * (1.25 - 1)


async def test_a_cheap_flush_never_paces() -> None:
    s = Setup(share=0.1, cost=0.0009)
    await s.flush(5)
    assert s.hub.pace() == 0.0
    assert s.stats.live_paced == 0 and s.stats.live_paced_seconds == 0.0


async def test_no_wait_once_the_loop_did_enough_else() -> None:
    s = Setup(share=0.5, cost=0.004)
    await s.flush()
    s.clock.now += 0.004  # as long as the flush took: the share is kept already
    assert s.hub.pace() == 0.0
    await s.flush()
    s.clock.now += 0.0035
    assert s.hub.pace() == pytest.approx(0.0005)
    assert s.stats.live_paced == 1


async def test_the_wait_is_capped() -> None:
    s = Setup(share=0.5, cap=0.05, cost=0.2)
    await s.flush()
    assert s.hub.pace() == 0.05
    s = Setup(share=0.5, cap=0.0, cost=0.2)
    await s.flush()
    assert s.hub.pace() == 0.0  # a cap of 0: never paced
    assert s.stats.live_paced == 0


async def test_a_busy_recovery_gate_halves_the_share() -> None:
    s = Setup(share=0.5, cost=0.004)
    assert await s.gate.enter()  # a recovering subscribe's read under way
    await s.flush()
    assert s.hub.pace() == pytest.approx(0.012)  # share 0.25: 4 ms * (4 - 1)
    s.gate.leave()
    await s.flush()
    assert s.hub.pace() == pytest.approx(0.004)  # share 0.5 again


async def test_a_share_of_one_never_paces() -> None:
    s = Setup(share=1.0, cost=0.5)
    assert await s.gate.enter()  # not even under recovery pressure
    await s.flush()
    assert s.hub.pace() == 0.0
    assert s.stats.live_paced == 0
