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

The clock, the sleep and the random source are injected so that the loop is testable
without waiting.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable

from common.errors import CloseCode, Disconnect
from common.protocol import Frame


class Heartbeat:
    __slots__ = ("_clock", "_sleep", "_uniform", "interval", "max_lag", "sent", "timeout")

    def __init__(
        self, interval: float, timeout: float, *,
        max_lag: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.max_lag = max_lag  # 0: never `behind`
        self.sent: float | None = None  # clock time of the unanswered ping
        self._clock = clock
        self._sleep = sleep
        self._uniform = uniform

    def pong(self) -> float | None:
        """The client answered: the seconds since the ping, if one was unanswered."""
        if self.sent is None:
            return None
        lag = self._clock() - self.sent
        self.sent = None
        return lag

    async def run(self, ping: Frame, send: Callable[[Frame], None],
                  fail: Callable[[Disconnect], None],
                  behind: Callable[[], None] | None = None,
                  progress: Callable[[], int | None] | None = None) -> None:
        """Ping every `interval` until a pong is missing and the client takes no data. The
        first ping comes at a random point of the interval so that clients that reconnected
        together do not ping in lockstep. (The callbacks are arguments, not attributes:
        held by the session, this object must not hold the session.)"""
        interval = self.interval
        timeout = self.timeout
        sleep = self._sleep
        lag_at = self.max_lag if behind is not None and 0 < self.max_lag < timeout else 0.0
        await sleep(self._uniform(interval / 2, interval))
        while True:
            self.sent = self._clock()
            mark = progress() if progress is not None else None
            send(ping)
            if lag_at:
                await sleep(lag_at)
                if self.sent is not None and behind is not None:
                    now = progress() if progress is not None else None
                    # Took data since the ping (or nobody can tell): behind, not dead.
                    if mark is None or now is None or now > mark:
                        behind()
                await sleep(timeout - lag_at)
            else:
                await sleep(timeout)
            waited = timeout
            while self.sent is not None:
                now = progress() if progress is not None else None
                if mark is None or now is None or now <= mark:
                    fail(Disconnect(CloseCode.NO_PONG, "no pong"))
                    return
                # Still reading: slow, not dead. Its pong comes once it reaches the ping.
                mark = now
                if behind is not None and self.max_lag:
                    behind()
                await sleep(timeout)
                waited += timeout
            await sleep(max(interval - waited, 0.0))
