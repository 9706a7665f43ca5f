"""Application pings (edge/heartbeat.py) with a scripted clock and sleep: a pong in time
keeps the connection, a missing one ends it with 3005, and the lag is the time to the
pong."""

from __future__ import annotations

import pytest

from common.errors import CloseCode, Disconnect
from common.protocol import Frame
from edge.heartbeat import Heartbeat


class Stop(Exception):
    """Ends a heartbeat that would otherwise ping forever."""


class Clock:
    """Time that passes only when the heartbeat sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if len(self.sleeps) > 20:
            raise Stop


def make(clock: Clock, interval: float = 10.0, timeout: float = 4.0) -> Heartbeat:
    return Heartbeat(interval, timeout, clock=clock, sleep=clock.sleep,
                     uniform=lambda lo, hi: lo)


async def test_missing_pong_fails_with_no_pong_after_the_timeout() -> None:
    clock = Clock()
    hb = make(clock)
    sent: list[Frame] = []
    failed: list[Disconnect] = []
    await hb.run("ping", sent.append, failed.append)
    assert sent == ["ping"]
    assert clock.sleeps == [5.0, 4.0]  # a random point of the first interval, the timeout
    assert [f.code for f in failed] == [CloseCode.NO_PONG]


async def test_pongs_keep_it_going_and_measure_the_lag() -> None:
    clock = Clock()
    hb = make(clock)
    lags: list[float | None] = []
    failed: list[Disconnect] = []

    def send(frame: Frame) -> None:
        clock.now += 1.5  # the client answers 1.5 s after the ping was sent
        lags.append(hb.pong())

    with pytest.raises(Stop):
        await hb.run("ping", send, failed.append)
    assert failed == []
    assert lags[:3] == [1.5, 1.5, 1.5]
    assert clock.sleeps[:5] == [5.0, 4.0, 6.0, 4.0, 6.0]  # timeout, then the interval's rest


def test_a_pong_without_a_ping_measures_nothing() -> None:
    clock = Clock()
    hb = make(clock)
    assert hb.pong() is None
    hb.sent = clock.now
    clock.now += 0.25
    assert hb.pong() == 0.25
    assert hb.pong() is None
