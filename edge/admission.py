"""Admission of a new connection, decided before the WebSocket upgrade.

A handshake is refused with an HTTP answer instead of ``101 Switching Protocols``:

- **403** when its Origin is not allowed (`FANOUT_ALLOWED_ORIGINS`, or no Origin with
  `FANOUT_ALLOW_NO_ORIGIN=false`);
- **503** with ``Retry-After`` (5-10 s, random: refused clients do not come back in step)
  when the edge holds `FANOUT_MAX_CONNECTIONS` connections, or the client's address holds
  `FANOUT_MAX_CONNECTIONS_PER_IP` of them;
- **503** with ``Retry-After`` (1-3 s, random) when new connections arrive faster than
  `FANOUT_CONNECTION_RATE` per second beyond a burst of `FANOUT_CONNECTION_BURST` (a mass
  reconnect is spread over a few seconds rather than taken all at once).

Past the upgrade, `Gate` bounds the expensive part of a reconnect, its recovering subscribes'
broker reads (edge/hub.py): beyond the bound a subscribe gets ``unavailable`` with a
server-advised ``retry_after_ms``.

Why HTTP answers and not an accepted connection closed at once with 3502/3503: a refusal
then costs no upgrade, no session and no frames, which is the point when someone opens
thousands of connections; a proxy or a load balancer understands a 503; the Retry-After
reaches every non-browser client. A browser's script cannot see the status (the socket just
fails, 1006), and fanout.js reconnects with its capped, jittered backoff: the right thing
for a limit that frees up as others leave. 3503 is a "do not reconnect" code, which would
be wrong for a full edge.

Counting is exact: a slot is taken synchronously (one event loop, no await between the check
and the count) when the server's protocol has the request head, and given back once, when
that connection's transport is lost, whatever ended it (edge/handshake.py holds the slot).
What is counted is admitted connections, from their request head to their TCP close; TCP
connections that never send a whole request are the handshake deadline's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import resource
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from common.admission import ClientAddresses, OriginPolicy, limit_key, parse_networks
from common.config import EdgeConfig
from edge.limits import TokenBucket
from edge.stats import EdgeStats

RETRY_AFTER = 5  # s: a limit's Retry-After is uniform in [RETRY_AFTER, 2 * RETRY_AFTER]
# s: a connection over the new-connection rate is told to come back in [1, 3] s: the rate
# frees up within a second, and the jitter spreads a burst over the next few.
RATE_RETRY_AFTER = (1, 3)
MAX_ADVICE = 30.0  # s: the longest delay a Gate advises
LOG_EVERY = 10.0  # s: at most one log line per refusal reason in this long
FD_RESERVE = 64  # descriptors beyond the connections: Redis, listening socket, files


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str  # the metric label: origin, total_limit, ip_limit
    status: int  # HTTP status: 403 or 503
    message: str  # the answer's body, for humans
    retry_after: int | None = None  # s, the Retry-After header


class ConnectionLimiter:
    """Open connections in total and per key (a client address); `max_*` 0 = no limit."""

    __slots__ = ("by_key", "max_per_key", "max_total", "total")

    def __init__(self, max_total: int, max_per_key: int) -> None:
        self.max_total = max_total
        self.max_per_key = max_per_key
        self.total = 0
        self.by_key: dict[str, int] = {}

    def try_acquire(self, key: str) -> str | None:
        """Count one more connection of `key`; or the reason it is over a limit."""
        if self.max_total and self.total >= self.max_total:
            return "total_limit"
        n = self.by_key.get(key, 0)
        if self.max_per_key and n >= self.max_per_key:
            return "ip_limit"
        self.total += 1
        self.by_key[key] = n + 1
        return None

    def release(self, key: str) -> None:
        self.total -= 1
        n = self.by_key[key] - 1
        if n:
            self.by_key[key] = n
        else:
            del self.by_key[key]


class Slot:
    """An admitted connection's place in the limiter; `release` gives it back, once."""

    __slots__ = ("_limiter", "address", "key")

    def __init__(self, limiter: ConnectionLimiter | None, address: str, key: str) -> None:
        self._limiter = limiter
        self.address = address  # the client's, for logs
        self.key = key

    def release(self) -> None:
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter.release(self.key)


class Admission:
    """The edge's admission decisions and their counts."""

    def __init__(
        self,
        config: EdgeConfig,
        stats: EdgeStats,
        logger: logging.Logger,
        rand: Callable[[int, int], int] = random.randint,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.stats = stats
        self.log = logger
        self.origins = OriginPolicy(config.allowed_origins, config.allow_no_origin)
        self.addresses = ClientAddresses(parse_networks(config.trusted_proxies))
        self.limiter = ConnectionLimiter(config.max_connections, config.max_connections_per_ip)
        self._rand = rand
        self._clock = clock
        # New connections per second (FANOUT_CONNECTION_RATE; None: no limit).
        self.rate = (TokenBucket(config.connection_rate, config.connection_burst, clock())
                     if config.connection_rate > 0 else None)
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def warn_at_start(self) -> None:
        """What an operator should know about these settings, once, at start."""
        if self.origins.allows_any:
            self.log.warning("any web page may connect (no FANOUT_ALLOWED_ORIGINS): set it to "
                             "the origins of your application's pages")
        limit = self.config.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if limit and soft != resource.RLIM_INFINITY and soft < limit + FD_RESERVE:
            self.log.warning(
                "the descriptor limit (ulimit -n %d) is below FANOUT_MAX_CONNECTIONS=%d plus "
                "%d: connections beyond it fail to be accepted instead of getting a 503",
                soft, limit, FD_RESERVE)

    def admit(self, headers: Iterable[tuple[bytes, bytes]],
              client: tuple[str, int] | None) -> Slot | Refusal:
        """Decide a WebSocket handshake from its request headers (lower-case names) and the
        socket's peer; an admitted one holds a slot until `Slot.release`."""
        origins: list[str] = []
        forwarded: list[str] = []
        for name, value in headers:
            if name == b"origin":
                origins.append(value.decode("latin-1"))
            elif name == b"x-forwarded-for":
                forwarded.append(value.decode("latin-1"))
        address = self.addresses.resolve(client[0] if client else None, forwarded)
        # Browsers send one Origin; two are nobody's to choose between.
        origin = origins[0] if len(origins) == 1 else (None if not origins else "")
        if not self.origins.allows(origin):
            self.note("origin", address,
                      "no origin" if origin is None else f"origin={origin[:100]!r}")
            return Refusal("origin", 403, "origin not allowed")
        if self.rate is not None and not self.rate.take(self._clock()):
            self.note("connection_rate", address)
            self.stats.count_admission("connection", "deferred")
            return Refusal("connection_rate", 503, "busy, retry shortly",
                           self._rand(*RATE_RETRY_AFTER))
        key = limit_key(address)
        reason = self.limiter.try_acquire(key)
        if reason is None:
            self.stats.count_admission("connection", "admitted")
            return Slot(self.limiter, address, key)
        self.note(reason, address)
        message = ("too many connections from your address" if reason == "ip_limit"
                   else "server full")
        return Refusal(reason, 503, message, self._rand(RETRY_AFTER, 2 * RETRY_AFTER))

    def handshake_timed_out(self, peer: tuple[str, int] | None) -> None:
        """A TCP connection sent no whole request in time (edge/handshake.py closes it)."""
        self.note("handshake_timeout", peer[0] if peer else "unknown")

    def note(self, reason: str, address: str, detail: str = "") -> None:
        """Count a refusal; log it, but at most once per `LOG_EVERY` per reason (a flood
        must not flood the log too), saying how many went unlogged."""
        self.stats.count_refused(reason)
        now = self._clock()
        last = self._logged_at.get(reason)
        if last is not None and now - last < LOG_EVERY:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._logged_at[reason] = now
        unlogged = self._unlogged.pop(reason, 0)
        self.log.warning("connection refused reason=%s client=%s%s unlogged_since_last=%d",
                         reason, address, f" {detail}" if detail else "", unlogged)


# --- load admission: work that costs the edge (or Redis) a lot, bounded -------------------


class Gate:
    """At most `limit` holders at once (0: no limit) and at most `queue` waiting for a place
    (first come, first served); a caller beyond both is *deferred*: told to come back later
    (`retry_after`), so that a burst is spread in time instead of piling up.

    Used for the broker reads of recovering subscribes and of `history` requests
    (edge/hub.py): a mass reconnect then costs a slower recovery, never a Redis connection
    pool that times out for everyone. Counts go to `EdgeStats.count_admission(kind, ...)`.
    """

    __slots__ = ("_bucket_at", "_clock", "_deferred", "_deferred_before", "_left", "_rand",
                 "_told_busy", "_waiters", "busy_at", "held", "kind", "limit", "on_busy",
                 "queue", "rate", "retry", "stats")

    def __init__(self, kind: str, limit: int, queue: int, retry: float, stats: EdgeStats,
                 rand: Callable[[float, float], float] = random.uniform,
                 clock: Callable[[], float] = time.monotonic,
                 on_busy: Callable[[bool], None] | None = None, busy_at: int = 1) -> None:
        self.kind = kind  # the metric label: recovery
        # Told True when `busy_at` places are held and False once none is (edge/gcpolicy.py:
        # fewer collector passes while a storm's reads run, not for a trickle of them).
        self.on_busy = on_busy
        self.busy_at = busy_at
        self._told_busy = False
        self.limit = limit
        self.queue = queue
        self.retry = retry  # s: the shortest delay a deferred caller is advised
        self.stats = stats
        self._rand = rand
        self._clock = clock
        self.held = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Throughput, for the advice: places given back per second (a moving average over
        # one-second buckets), and the callers deferred in this bucket and the last one.
        self.rate = 0.0
        self._left = 0
        self._deferred = 0
        self._deferred_before = 0
        self._bucket_at = clock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _tick(self) -> None:
        now = self._clock()
        elapsed = now - self._bucket_at
        if elapsed >= 1.0:
            current = self._left / elapsed
            self.rate = current if not self.rate else 0.5 * self.rate + 0.5 * current
            self._left = 0
            self._deferred_before = self._deferred if elapsed < 2.0 else 0
            self._deferred = 0
            self._bucket_at = now

    def retry_after(self) -> float:
        """The delay (s) to advise a deferred caller: uniform over the time the gate needs
        to work through what is ahead (the queue, and the callers deferred in the last
        second or two, who come back too) at its recent rate, at least `retry`, at most
        `MAX_ADVICE`. Callers deferred together thus come back spread over the time the
        edge can serve them, not in one wave that is deferred again."""
        self._tick()
        self._deferred += 1
        backlog = len(self._waiters) + self._deferred + self._deferred_before
        # Before a rate is known: a read takes a few ms, so a place serves ~20 per second.
        rate = max(self.rate, 20.0 * (self.limit or 1))
        drain = min(backlog / rate, MAX_ADVICE)
        return self._rand(self.retry, max(self.retry * 2, self.retry + drain))

    async def enter(self) -> bool:
        """Take a place, waiting in the queue if need be; False: deferred (no place taken).
        A caller cancelled while waiting takes no place either."""
        if not self.limit or (self.held < self.limit and not self._waiters):
            self.held += 1
            if self.held == self.busy_at and self.on_busy is not None and not self._told_busy:
                self._told_busy = True
                self.on_busy(True)
            self.stats.count_admission(self.kind, "admitted")
            return True
        if len(self._waiters) >= self.queue:
            self.stats.count_admission(self.kind, "deferred")
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a place just as it was cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        self.stats.count_admission(self.kind, "admitted")
        return True

    def leave(self) -> None:
        """Give a place back; the first waiter (if any) takes it over."""
        self._left += 1
        self._tick()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place passes on: `held` stays
                return
        self.held -= 1
        if self.held == 0 and self._told_busy:
            self._told_busy = False
            if self.on_busy is not None:
                self.on_busy(False)
