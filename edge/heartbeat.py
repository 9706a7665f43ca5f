"""Application pings (browsers cannot see protocol pings): a client that does not answer
one within `pong_timeout` and takes no data meanwhile is dead (3003, no_pong); the time to
its pong is how far behind the client is (fanout_edge_client_lag_seconds: the ping waits
behind whatever its socket and queue still hold).

Slow is not dead. A client reading slowly answers late because its ping waits behind its
backlog, wherever that sits (the send queue, the transport, the kernel's buffers on either
side), yet its TCP keeps acknowledging data as it reads; a dead one (frozen, gone, a
network path that drops everything) acknowledges nothing. So, with `progress` (the bytes
the client's TCP acknowledged, edge/tcpinfo.py):

* a ping unanswered after `max_lag` while the client took data since it was sent means the
  client is at least `max_lag` behind: `behind()` (the session applies its queue's overflow
  policy, as for a full queue, until the pong: edge/session.py);
* at `pong_timeout` without a pong, a client that took data in the last `pong_timeout` is
  waited for another `pong_timeout` (and is behind); one that took none is closed with
  3003. Without `progress` (a platform that does not say) the ping alone decides, as
  before: behind at `max_lag`, closed at `pong_timeout`.

It runs on one loop timer for all connections (`Timers`), not as a task per connection.
The clock, the timers and the random source are injected so that it is testable without
waiting.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from common.errors import CloseCode, Disconnect
from common.protocol import Frame


class Target(Protocol):
    def fire(self) -> None: ...


class Scheduler(Protocol):
    def schedule(self, delay: float, target: Target) -> None:
        """Call `target.fire()` in `delay` seconds (no cancel: a stopped target ignores
        it)."""


class Timers:
    """Every heartbeat of one event loop on one loop timer: a heap of (when, seq, target)
    entries (~0.1 KiB each) and the loop's timer for the earliest, instead of a
    `TimerHandle`, its context and a bound method per connection (~0.5 KiB)."""

    __slots__ = ("__weakref__", "_at", "_handle", "_heap", "_loop", "_seq")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, Target]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf  # when `_handle` fires
        self._seq = 0  # ties never compare targets

    def schedule(self, delay: float, target: Target) -> None:
        when = self._loop.time() + delay
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, target))
        if when < self._at:
            self._arm(when)

    def __len__(self) -> int:
        return len(self._heap)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = when
        self._handle = self._loop.call_at(when, self._run)

    def _run(self) -> None:
        self._handle = None
        self._at = math.inf
        heap = self._heap
        # The loop runs a timer up to its clock's resolution early: what is due by then
        # is due now.
        now = self._loop.time() + 0.001
        while heap and heap[0][0] <= now:
            target = heapq.heappop(heap)[2]
            try:
                target.fire()
            except Exception as exc:  # one heartbeat's fault must not stop the others
                self._loop.call_exception_handler({
                    "message": "heartbeat failed", "exception": exc,
                })
        if heap and self._handle is None:
            self._arm(heap[0][0])


_TIMERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Timers] = (
    weakref.WeakKeyDictionary()
)


def loop_timers() -> Timers:
    """The running loop's `Timers` (made on first use)."""
    loop = asyncio.get_running_loop()
    timers = _TIMERS.get(loop)
    if timers is None:
        timers = _TIMERS[loop] = Timers(loop)
    return timers


# What the heartbeat waits for next.
_STOPPED, _PING, _LAG, _CHECK = range(4)


class Heartbeat:
    """One connection's pings: a state and one entry at a time in the loop's `Timers`,
    not a task of its own (a task and its coroutine frames, ~1 KiB per connection).
    `start` begins it; `stop` ends it and drops the callbacks (they are the session's:
    held here only while it runs, so no reference cycle outlives the session)."""

    __slots__ = ("_behind", "_clock", "_fail", "_lag_at", "_mark", "_next", "_ping",
                 "_progress", "_send", "_timers", "_uniform", "_waited", "interval",
                 "max_lag", "sent", "timeout")

    def __init__(
        self, interval: float, timeout: float, *,
        max_lag: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        timers: Scheduler | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.max_lag = max_lag  # 0: never `behind`
        self.sent: float | None = None  # clock time of the unanswered ping
        self._clock = clock
        self._timers = timers  # None: the running loop's (`loop_timers`), at `start`
        self._uniform = uniform
        self._next = _STOPPED
        self._ping: Frame = ""
        self._send: Callable[[Frame], None] | None = None
        self._fail: Callable[[Disconnect], None] | None = None
        self._behind: Callable[[], None] | None = None
        self._progress: Callable[[], int | None] | None = None
        self._lag_at = 0.0
        self._mark: int | None = None  # the client's acknowledged bytes when last looked
        self._waited = 0.0  # s since the unanswered ping

    def pong(self) -> float | None:
        """The client answered: the seconds since the ping, if one was unanswered."""
        if self.sent is None:
            return None
        lag = self._clock() - self.sent
        self.sent = None
        return lag

    def start(self, ping: Frame, send: Callable[[Frame], None],
              fail: Callable[[Disconnect], None],
              behind: Callable[[], None] | None = None,
              progress: Callable[[], int | None] | None = None) -> None:
        """Ping every `interval` until a pong is missing and the client takes no data. The
        first ping comes at a random point of the interval so that clients that reconnected
        together do not ping in lockstep."""
        if self._timers is None:
            self._timers = loop_timers()
        self._ping, self._send, self._fail = ping, send, fail
        self._behind, self._progress = behind, progress
        self._lag_at = (self.max_lag if behind is not None and 0 < self.max_lag < self.timeout
                        else 0.0)
        self._after(self._uniform(self.interval / 2, self.interval), _PING)

    def stop(self) -> None:
        """No more pings; the session's callbacks are let go (no reference cycle left).
        The pending timer entry, if any, finds it stopped."""
        self._next = _STOPPED
        self._send = self._fail = self._behind = self._progress = None

    def fire(self) -> None:
        """The timer is due (called by `Timers`)."""
        step = self._next
        if step == _PING:
            self._send_ping()
        elif step == _LAG:
            self._lag_check()
        elif step == _CHECK:
            self._check()

    def _after(self, delay: float, step: int) -> None:
        assert self._timers is not None
        self._next = step
        self._timers.schedule(delay, self)

    def _acked(self) -> int | None:
        progress = self._progress
        return progress() if progress is not None else None

    def _send_ping(self) -> None:
        send = self._send
        if send is None:  # stopped
            return
        self.sent = self._clock()
        self._mark = self._acked()
        send(self._ping)
        self._waited = self.timeout
        if self._lag_at:
            self._after(self._lag_at, _LAG)
        else:
            self._after(self.timeout, _CHECK)

    def _lag_check(self) -> None:
        """`max_lag` after the ping, unanswered: behind if the client took data since."""
        if self._send is None:
            return
        behind = self._behind
        if self.sent is not None and behind is not None:
            now = self._acked()
            mark = self._mark
            # Took data since the ping (or nobody can tell): behind, not dead.
            if mark is None or now is None or now > mark:
                behind()
        self._after(self.timeout - self._lag_at, _CHECK)

    def _check(self) -> None:
        """A `timeout` since the ping (or the last check): answered, reading, or dead."""
        if self._send is None:
            return
        if self.sent is None:
            self._after(max(self.interval - self._waited, 0.0), _PING)
            return
        now = self._acked()
        mark = self._mark
        if mark is None or now is None or now <= mark:
            fail = self._fail
            self.stop()
            if fail is not None:
                fail(Disconnect(CloseCode.NO_PONG, "no pong"))
            return
        # Still reading: slow, not dead. Its pong comes once it reaches the ping.
        self._mark = now
        if self._behind is not None and self.max_lag:
            self._behind()
        self._waited += self.timeout
        self._after(self.timeout, _CHECK)
