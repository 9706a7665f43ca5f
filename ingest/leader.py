"""Leader election with fencing: one ingest worker per feed holds the upstream and publishes.

Workers of one feed compete for a lease in the broker (Redis: `<prefix>:lease:{<feed>}`, set
if absent with a TTL, by acquire.lua). Each acquisition increments the feed's fence counter
(`<prefix>:fence:{<feed>}`): the winner's **fencing token** is higher than every earlier
leader's. The leader renews the lease every ttl/3 (renew.lua: only if it still holds it)
and publishes with a `Fence`: its token and its lease deadline on the server's clock.
publish.lua writes nothing for a token lower than one that has already published to the
channel, nor once the server's clock is past the deadline.

A leader also stops by its own monotonic clock: its term is valid until `sent + ttl - guard`,
`sent` being when it sent the last successful acquire or renew (the lease, set later on the
server, expires no earlier than `sent + ttl`). A renewal that is refused ends the term at
once; one that fails (Redis error, timeout) is retried until the term's validity runs out,
and then the term ends. A standby retries every ttl/3, or as soon as the holder's lease
expires if that is sooner. Releasing on a clean shutdown lets a standby take over at once.

docs/architecture.md ("Leader election and fencing") states what the combination guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from common.aio import raise_if_cancelling, wait_event
from common.broker import Broker, BrokerUnavailable, Fence

Clock = Callable[[], float]

BROKER_ERRORS = (BrokerUnavailable, OSError, TimeoutError)


class NotLeader(Exception):
    """This process is not (or no longer) the leader: it must not publish."""


class LeaderMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.leader = Gauge(
            "fanout_ingest_leader", "1 while this process holds its feed's lease, else 0.",
            registry=registry,
        )
        self.changes = Counter(
            "fanout_ingest_leader_changes",
            "Leadership changes of this process (became leader, or stopped being leader).",
            registry=registry,
        )
        self.renewals = Counter(
            "fanout_ingest_lease_renewals", "Lease renewals that succeeded.", registry=registry
        )
        self.renewal_failures = Counter(
            "fanout_ingest_lease_renewal_failures",
            "Lease renewals that failed: Redis error, timeout, or the lease no longer ours.",
            registry=registry,
        )


@dataclass(eq=False)
class Term:
    """One period of leadership. `ended` is set when it ends, `reason` says why: `lost` (a
    renewal was refused), `expired` (no renewal in time), `fenced`, `released`, `shutdown`."""

    token: int
    owner: str
    valid_until: float  # monotonic clock: publish only before this
    deadline_ms: int  # server clock, ms: the publish script refuses writes from then on
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str = ""

    @property
    def holder(self) -> str:
        """The lease's value while this term holds it."""
        return f"{self.token}:{self.owner}"

    async def wait_ended(self) -> str:
        await self.ended.wait()
        return self.reason


def default_owner() -> str:
    """This process's id in the lease: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Leader:
    """Campaigns for `feed`'s lease and holds it while it can. Run `run()` as a task.

    `is_leader` is set while a term lasts; `elected()` waits for one. `fence()` is what to
    publish with, and raises `NotLeader` once the term has ended or its validity ran out.
    `step_down()` ends the term (after a `FencedOut`, say) and goes back to campaigning.
    Cancelling `run()` ends the term and releases the lease: stop publishing first.
    """

    def __init__(
        self,
        broker: Broker,
        feed: str,
        logger: logging.Logger,
        metrics: LeaderMetrics | None = None,
        *,
        ttl: float = 5.0,
        owner: str | None = None,
        clock: Clock = time.monotonic,
        on_elected: Callable[[Term], Any] | None = None,
        on_lost: Callable[[Term], Any] | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl!r}")
        self.broker = broker
        self.feed = feed
        self.log = logger
        self.metrics = metrics or LeaderMetrics(CollectorRegistry())
        self.ttl = ttl
        self.ttl_ms = max(1, round(ttl * 1000))
        self.owner = owner or default_owner()
        self.renew_interval = ttl / 3  # a leader renews this often
        self.retry_interval = ttl / 3  # a standby tries at least this often
        self.renew_retry = ttl / 10  # after a failed renewal
        self.guard = ttl / 5  # a term ends this long before its lease can expire
        self.clock = clock
        self.on_elected = on_elected
        self.on_lost = on_lost
        self.is_leader = asyncio.Event()
        self.term: Term | None = None
        self._fence_floor = 0
        self._last_holder: str | None = None

    # --- what the worker uses ----------------------------------------------------------

    @property
    def token(self) -> int | None:
        """The fencing token of the current term, None while standby."""
        return self.term.token if self.term is not None else None

    async def elected(self) -> Term:
        """Wait until this process leads; the current term."""
        while True:
            await self.is_leader.wait()
            if self.term is not None:
                return self.term

    def valid(self) -> bool:
        """Whether this process may publish now (ends an expired term as a side effect)."""
        term = self.term
        if term is None:
            return False
        if self.clock() >= term.valid_until:
            self._end(term, "expired")
            return False
        return True

    def fence(self) -> Fence:
        """What to publish with now. Raises NotLeader unless a term is valid."""
        if not self.valid():
            raise NotLeader(self.feed)
        term = self.term
        assert term is not None
        return Fence(term.token, term.deadline_ms)

    def step_down(self, reason: str, fence_floor: int = 0) -> None:
        """End the current term now (the lease is released by `run`, which then campaigns
        again). `fence_floor`: a channel fence seen above our token; the fence counter is
        raised to it on release, so that the next token is higher (repairs a lost counter)."""
        self._fence_floor = max(self._fence_floor, fence_floor)
        if self.term is not None:
            self._end(self.term, reason)

    # --- the campaign ------------------------------------------------------------------

    async def run(self) -> None:
        """Campaign, hold, repeat; until cancelled (which ends the term and releases)."""
        try:
            while True:
                term = await self._campaign()
                await self._hold(term)
                await self._give_up(term)
        finally:
            current = self.term
            if current is not None:
                self._end(current, "shutdown")
                with contextlib.suppress(*BROKER_ERRORS):
                    await asyncio.wait_for(self._give_up(current), self.retry_interval)

    async def _campaign(self) -> Term:
        failures = 0
        while True:
            sent = self.clock()
            try:
                grant = await asyncio.wait_for(
                    self.broker.acquire(self.feed, self.owner, self.ttl_ms), self.retry_interval
                )
            except BROKER_ERRORS as exc:
                raise_if_cancelling()
                failures += 1
                delay = min(self.retry_interval, 0.05 * 2**min(failures, 10))
                self.log.warning("lease acquire failed feed=%s error=%r retry_in=%.2f",
                                 self.feed, exc, delay)
                await asyncio.sleep(random.uniform(delay / 2, delay))
                continue
            raise_if_cancelling()
            failures = 0
            token, now_ms, ttl_ms, holder = grant.token, grant.now_ms, grant.ttl_ms, grant.holder
            if token > 0:
                term = Term(token, self.owner, sent + self.ttl - self.guard,
                            now_ms + ttl_ms - round(self.guard * 1000))
                self._begin(term)
                return term
            if holder != self._last_holder:
                self.log.info("standby feed=%s holder=%s lease_ms=%d", self.feed, holder, ttl_ms)
                self._last_holder = holder
            # Try again when the holder's lease would expire, or every retry_interval.
            delay = self.retry_interval if ttl_ms < 0 else min(ttl_ms / 1000, self.retry_interval)
            await asyncio.sleep(delay + random.uniform(0.0, 0.02))

    async def _hold(self, term: Term) -> None:
        """Renew the lease until the term ends."""
        next_renewal = self.clock() + self.renew_interval
        while not term.ended.is_set():
            now = self.clock()
            if now >= term.valid_until:
                self._end(term, "expired")
                return
            wait = min(next_renewal, term.valid_until) - now
            if wait > 0:
                await wait_event(term.ended, wait)
                continue
            sent = self.clock()
            try:
                renewal = await asyncio.wait_for(
                    self.broker.renew(self.feed, term.holder, self.ttl_ms),
                    max(term.valid_until - sent, 0.001),
                )
            except BROKER_ERRORS as exc:
                raise_if_cancelling()
                self.metrics.renewal_failures.inc()
                self.log.warning(
                    "lease renewal failed feed=%s token=%d error=%r valid_for=%.2f",
                    self.feed, term.token, exc, term.valid_until - self.clock(),
                )
                next_renewal = self.clock() + self.renew_retry
                continue
            raise_if_cancelling()
            if term.ended.is_set():
                return
            if not renewal.renewed:
                self.metrics.renewal_failures.inc()
                self.log.warning("lease renewal refused feed=%s token=%d holder=%s",
                                 self.feed, term.token, renewal.holder or "none")
                self._end(term, "lost")
                return
            self.metrics.renewals.inc()
            term.valid_until = sent + self.ttl - self.guard
            term.deadline_ms = renewal.now_ms + self.ttl_ms - round(self.guard * 1000)
            next_renewal = sent + self.renew_interval

    async def _give_up(self, term: Term) -> None:
        """Release the lease if it is still ours (compare and delete), raising the fence
        counter to any floor seen. Failures are logged: the lease then simply expires."""
        floor, self._fence_floor = self._fence_floor, 0
        try:
            released = await asyncio.wait_for(
                self.broker.release(self.feed, term.holder, floor),
                self.retry_interval,
            )
        except BROKER_ERRORS as exc:
            self._fence_floor = max(self._fence_floor, floor)
            self.log.warning("lease release failed feed=%s token=%d error=%r",
                             self.feed, term.token, exc)
            return
        if released:
            self.log.info("lease released feed=%s token=%d", self.feed, term.token)

    # --- transitions -------------------------------------------------------------------

    def _begin(self, term: Term) -> None:
        self.term = term
        self._last_holder = None
        self.is_leader.set()
        self.metrics.leader.set(1)
        self.metrics.changes.inc()
        self.log.info("leader elected feed=%s token=%d owner=%s ttl=%.2f",
                      self.feed, term.token, term.owner, self.ttl)
        if self.on_elected is not None:
            self.on_elected(term)

    def _end(self, term: Term, reason: str) -> None:
        if term.ended.is_set():
            return
        term.reason = reason
        term.ended.set()
        if self.term is term:
            self.term = None
            self.is_leader.clear()
            self.metrics.leader.set(0)
            self.metrics.changes.inc()
        level = logging.INFO if reason in ("shutdown", "released") else logging.WARNING
        self.log.log(level, "leadership ended feed=%s token=%d reason=%s",
                     self.feed, term.token, reason)
        if self.on_lost is not None:
            self.on_lost(term)
