"""Application pings (edge/heartbeat.py) with a scripted clock and sleep: a pong in time
keeps the connection, a missing one ends it with 3005, and the lag is the time to the
pong."""

from __future__ import annotations

import asyncio

from common.errors import CloseCode, Disconnect
from common.protocol import Frame
from edge.heartbeat import Heartbeat, Target, Timers
from edge.tcpinfo import acked_bytes


class Clock:
    """Time that passes only when the heartbeat's timer fires (`run`); the heartbeat's
    `Timers`, with one entry at a time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []  # the delay of every timer, in order
        self.due: tuple[float, Target] | None = None

    def __call__(self) -> float:
        return self.now

    def schedule(self, delay: float, target: Target) -> None:
        assert self.due is None, "one timer at a time"
        self.sleeps.append(delay)
        self.due = (delay, target)

    def run(self, limit: int = 20) -> bool:
        """Fire timers in order, at most `limit`: whether one is still pending for a
        running heartbeat (one that goes on pinging)."""
        fired = 0
        while self.due is not None and fired < limit:
            delay, target = self.due
            self.due = None
            self.now += delay
            fired += 1
            target.fire()
        return self.due is not None


def make(clock: Clock, interval: float = 10.0, timeout: float = 4.0) -> Heartbeat:
    return Heartbeat(interval, timeout, clock=clock, timers=clock,
                     uniform=lambda lo, hi: lo)


def test_missing_pong_fails_with_no_pong_after_the_timeout() -> None:
    clock = Clock()
    hb = make(clock)
    sent: list[Frame] = []
    failed: list[Disconnect] = []
    hb.start("ping", sent.append, failed.append)
    assert not clock.run()  # stopped: closed
    assert sent == ["ping"]
    assert clock.sleeps == [5.0, 4.0]  # a random point of the first interval, the timeout
    assert [f.code for f in failed] == [CloseCode.NO_PONG]


def test_pongs_keep_it_going_and_measure_the_lag() -> None:
    clock = Clock()
    hb = make(clock)
    lags: list[float | None] = []
    failed: list[Disconnect] = []

    def send(frame: Frame) -> None:
        clock.now += 1.5  # the client answers 1.5 s after the ping was sent
        lags.append(hb.pong())

    hb.start("ping", send, failed.append)
    assert clock.run()  # still pinging
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


class Acks:
    """The bytes a client's TCP acknowledged, as edge/tcpinfo.py reads them: grows by
    `rate` per second of the clock while the client reads."""

    def __init__(self, clock: Clock, rate: float) -> None:
        self.clock = clock
        self.rate = rate
        self.start = clock.now

    def __call__(self) -> int:
        return int((self.clock.now - self.start) * self.rate)


def test_a_client_still_reading_is_behind_not_dead() -> None:
    """Its ping waits behind a backlog it reads slowly: at max_lag it is behind (its
    queue's policy applies), at the pong timeout it is waited for, and its late pong
    ends that."""
    clock = Clock()
    hb = Heartbeat(10.0, 4.0, max_lag=1.0, clock=clock, timers=clock,
                   uniform=lambda lo, hi: lo)
    acks = Acks(clock, 1000.0)
    behind: list[float] = []
    failed: list[Disconnect] = []
    lags: list[float | None] = []
    pinged: list[float] = []

    def on_behind() -> None:
        behind.append(clock.now)
        if len(behind) == 3:  # it reaches the ping 9 s after it was sent, and answers
            clock.now += 1.0
            lags.append(hb.pong())

    hb.start("ping", lambda f: pinged.append(clock.now), failed.append, on_behind, acks)
    assert clock.run()  # still pinging
    assert failed == []
    assert pinged[0] == 105.0
    # behind at max_lag (106), at the timeout (109), again a timeout later (113) ...
    assert behind[:3] == [106.0, 109.0, 113.0]
    assert lags == [9.0]  # ... then its pong, 9 s after the ping
    assert clock.sleeps[:5] == [5.0, 1.0, 3.0, 4.0, 4.0]
    # The pong came during the third wait (105 + 1 + 3 + 4 + 4 = 117, plus the pong's 1 s):
    # 12 s waited, past the interval, so the next ping goes at once.
    assert pinged[1] == 118.0


def test_a_client_that_takes_nothing_is_dead() -> None:
    """No pong and no byte acknowledged since the ping: 3003 at the pong timeout, and not
    `behind` (a dead client is no slow consumer)."""
    clock = Clock()
    hb = Heartbeat(10.0, 4.0, max_lag=1.0, clock=clock, timers=clock,
                   uniform=lambda lo, hi: lo)
    behind: list[float] = []
    failed: list[Disconnect] = []
    hb.start("ping", lambda f: None, failed.append, lambda: behind.append(clock.now),
                 Acks(clock, 0.0))
    assert not clock.run()  # stopped: closed
    assert behind == []
    assert [f.code for f in failed] == [CloseCode.NO_PONG]
    assert clock.sleeps == [5.0, 1.0, 3.0]


def test_a_client_that_stops_reading_is_closed_one_timeout_later() -> None:
    """It read for a while after the ping, then nothing: waited for while it read, 3003
    after a whole timeout without a byte."""
    clock = Clock()
    hb = Heartbeat(10.0, 4.0, max_lag=1.0, clock=clock, timers=clock,
                   uniform=lambda lo, hi: lo)

    def progress() -> int:  # reads from the ping (105) until 110, then nothing
        return int((min(clock.now, 110.0) - 105.0) * 1000)

    failed: list[Disconnect] = []
    hb.start("ping", lambda f: None, failed.append, lambda: None, progress)
    assert not clock.run()  # stopped: closed
    assert [f.code for f in failed] == [CloseCode.NO_PONG]
    # 109: took data since the ping, waited for; 113: took data since 109 (until 110),
    # waited for; 117: nothing for a whole timeout.
    assert clock.now == 117.0


def test_without_kernel_counts_the_ping_alone_decides() -> None:
    """Where the kernel does not say (progress None): behind at max_lag, 3003 at the
    timeout, as before."""
    clock = Clock()
    hb = Heartbeat(10.0, 4.0, max_lag=1.0, clock=clock, timers=clock,
                   uniform=lambda lo, hi: lo)
    behind: list[float] = []
    failed: list[Disconnect] = []
    hb.start("ping", lambda f: None, failed.append, lambda: behind.append(clock.now),
                 lambda: None)
    assert not clock.run()  # stopped: closed
    assert behind == [106.0]
    assert [f.code for f in failed] == [CloseCode.NO_PONG]


def test_stop_ends_it_and_lets_the_callbacks_go() -> None:
    """The session stops its heartbeat when it ends: no ping after that, and nothing of the
    session is held by the heartbeat (no reference cycle)."""
    clock = Clock()
    hb = make(clock)
    sent: list[Frame] = []
    hb.start("ping", sent.append, lambda d: None)
    assert clock.due is not None
    hb.stop()
    clock.run()  # the pending entry fires and finds it stopped
    assert sent == []
    assert clock.due is None
    assert hb._send is None and hb._fail is None


class Recorder:
    def __init__(self, log: list[tuple[str, float]], name: str,
                 loop: asyncio.AbstractEventLoop, fail: bool = False) -> None:
        self.log = log
        self.name = name
        self.loop = loop
        self.fail = fail

    def fire(self) -> None:
        self.log.append((self.name, self.loop.time()))
        if self.fail:
            raise RuntimeError("boom")


async def test_timers_fire_in_order_on_one_loop_timer() -> None:
    """Every heartbeat of a loop shares one timer: entries fire in time order, none early,
    and one that raises does not stop the others."""
    loop = asyncio.get_running_loop()
    timers = Timers(loop)
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        log: list[tuple[str, float]] = []
        start = loop.time()
        timers.schedule(0.06, Recorder(log, "c", loop))
        timers.schedule(0.02, Recorder(log, "a", loop, fail=True))
        timers.schedule(0.04, Recorder(log, "b", loop))
        timers.schedule(0.04, Recorder(log, "b2", loop))  # same time: scheduled order
        while len(log) < 4:
            await asyncio.sleep(0.01)
    finally:
        loop.set_exception_handler(None)
    assert [name for name, _ in log] == ["a", "b", "b2", "c"]
    for (name, at), delay in zip(log, (0.02, 0.04, 0.04, 0.06), strict=True):
        assert at >= start + delay - 0.002, name
    assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)
    assert len(timers) == 0


def test_the_acked_count_of_a_closed_socket_is_unknown_not_an_error() -> None:
    """A heartbeat may ask a connection closed but not yet cleaned up: asyncio's socket then
    raises OSError, uvloop's ValueError (descriptor -1); both mean "the kernel does not
    say", not a traceback per connection (a reconnect storm logged thousands)."""

    class Closed:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def getsockopt(self, *args: object) -> bytes:
            raise self.exc

    assert acked_bytes(Closed(ValueError("negative file descriptor"))) is None
    assert acked_bytes(Closed(OSError(9, "bad file descriptor"))) is None
