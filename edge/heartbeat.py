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

It runs on loop timers, one pending per connection, not as a task per connection (see
`Heartbeat`). The clock, the timer and the random source are injected so that it is
testable without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Protocol

from common.errors import CloseCode, Disconnect
from common.protocol import Frame


class Timer(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, Callable[[], None]], Timer]


class Heartbeat:
    """One connection's pings as a chain of loop timers, one pending at a time (a
    `TimerHandle`, ~0.2 KiB), not a task of its own (a task and its coroutine frames,
    ~1 KiB per connection). `start` begins it; `stop` cancels its timer and drops the
    callbacks (they are the session's: held here only while it runs)."""

    __slots__ = ("_behind", "_clock", "_fail", "_lag_at", "_mark", "_ping", "_progress",
                 "_schedule", "_send", "_timer", "_uniform", "_waited", "interval",
                 "max_lag", "sent", "timeout")

    def __init__(
        self, interval: float, timeout: float, *,
        max_lag: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        schedule: Schedule | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.max_lag = max_lag  # 0: never `behind`
        self.sent: float | None = None  # clock time of the unanswered ping
        self._clock = clock
        self._schedule = schedule
        self._uniform = uniform
        self._timer: Timer | None = None
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
        if self._schedule is None:
            self._schedule = asyncio.get_running_loop().call_later
        self._ping, self._send, self._fail = ping, send, fail
        self._behind, self._progress = behind, progress
        self._lag_at = (self.max_lag if behind is not None and 0 < self.max_lag < self.timeout
                        else 0.0)
        self._after(self._uniform(self.interval / 2, self.interval), self._send_ping)

    def stop(self) -> None:
        """No more pings; the session's callbacks are let go (no reference cycle left)."""
        timer, self._timer = self._timer, None
        if timer is not None:
            timer.cancel()
        self._send = self._fail = self._behind = self._progress = None

    def _after(self, delay: float, callback: Callable[[], None]) -> None:
        assert self._schedule is not None
        self._timer = self._schedule(delay, callback)

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
            self._after(self._lag_at, self._lag_check)
        else:
            self._after(self.timeout, self._check)

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
        self._after(self.timeout - self._lag_at, self._check)

    def _check(self) -> None:
        """A `timeout` since the ping (or the last check): answered, reading, or dead."""
        if self._send is None:
            return
        if self.sent is None:
            self._after(max(self.interval - self._waited, 0.0), self._send_ping)
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
        self._after(self.timeout, self._check)
