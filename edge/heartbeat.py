"""Application pings (browsers cannot see protocol pings): a client that does not answer
one within `pong_timeout` is disconnected (3005, no_pong), and the time to its pong is how
far behind the client is (fanout_edge_client_lag_seconds: the ping waits behind whatever
its socket and queue still hold).

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
    __slots__ = ("_clock", "_sleep", "_uniform", "interval", "sent", "timeout")

    def __init__(
        self, interval: float, timeout: float, *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
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
                  fail: Callable[[Disconnect], None]) -> None:
        """Ping every `interval` until a pong is missing. The first ping comes at a random
        point of the interval so that clients that reconnected together do not ping in
        lockstep. (The callbacks are arguments, not attributes: held by the session, this
        object must not hold the session.)"""
        interval = self.interval
        timeout = self.timeout
        await self._sleep(self._uniform(interval / 2, interval))
        while True:
            self.sent = self._clock()
            send(ping)
            await self._sleep(timeout)
            if self.sent is not None:
                fail(Disconnect(CloseCode.NO_PONG, "no pong"))
                return
            await self._sleep(max(interval - timeout, 0.0))
