"""The broker in one process, with the Redis broker's semantics: offsets, epochs,
idempotency, fences, if_changed, snapshot modes, history trimming by length and age, TTLs,
live messages delivered in order from the event loop, leases.

For pure tests of the hub and the ingest path. What Redis does to a node that tests need to
provoke, it does on request: `disconnect_live`/`restore_live` (the pub/sub connection lost
and back: what was published meanwhile is lost, every channel is resubscribed),
`drop_live` (lost live messages: a gap), `half_open` (probes fail), `wipe` (the store
restarted empty: new epochs), `expire_meta`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from common.broker.base import LiveListener
from common.broker.keys import idempotency_bucket
from common.broker.types import (
    BrokerUnavailable,
    Fence,
    HistoryRead,
    HistoryResult,
    LeaseGrant,
    LeaseRenewal,
    Publication,
    PublishReply,
    PublishRequest,
    PublishStatus,
    RebaseReply,
    RebaseStatus,
    SnapshotWant,
    new_epoch,
)


@dataclass
class _Entry:
    offset: int
    key: str
    data: str
    deleted: bool
    ms: int  # when published (store clock)


@dataclass
class _Channel:
    epoch: str | None = None
    top: int = 0
    fence: int = 0
    meta_expires: float = float("inf")
    stream: list[_Entry] = field(default_factory=list)
    stream_expires: float = float("inf")
    snapshot: dict[str, str] = field(default_factory=dict)
    snap_expires: float = float("inf")


class MemoryBroker:
    """See the module docstring. `clock`: the store's wall clock (s), for TTLs and the
    lease/fence deadlines; tests may move it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._channels: dict[str, _Channel] = {}
        # (channel, time bucket) -> (message id -> "<epoch>:<offset>", expires at): as
        # publish.lua's idempotency hashes (common/broker/keys.py).
        self._idem: dict[tuple[str, int], tuple[dict[str, str], float]] = {}
        self._leases: dict[str, tuple[str, float]] = {}  # feed -> (value, expires at)
        self._fences: dict[str, int] = {}
        self._lives: list[MemoryLive] = []
        self.available = True  # False: every call raises BrokerUnavailable
        self.published = 0

    # --- test controls -------------------------------------------------------------------

    def wipe(self) -> None:
        """Lose everything, as a restart without persistence does."""
        self._channels.clear()
        self._idem.clear()
        self._leases.clear()
        self._fences.clear()

    def expire_meta(self, channel: str) -> None:
        """The channel's state expired (no publish for its TTL)."""
        self._channels.pop(channel, None)

    def drop_live(self, channel: str, count: int = 1) -> None:
        """The next `count` live messages of `channel` reach no connection."""
        for live in self._lives:
            live.drops[channel] = live.drops.get(channel, 0) + count

    def disconnect_live(self) -> None:
        """Every live connection drops; messages published until `restore_live` are lost."""
        for live in self._lives:
            live.down = True
            live._lose(ConnectionError("connection lost (simulated)"))

    def restore_live(self) -> None:
        for live in self._lives:
            live._restore()

    def half_open(self, on: bool = True) -> None:
        """Live connections stay "up" but deliver nothing, probes included."""
        for live in self._lives:
            live.half_open = on

    def lives(self) -> list[MemoryLive]:
        return list(self._lives)

    # --- internals -----------------------------------------------------------------------

    def _check(self) -> None:
        if not self.available:
            raise BrokerUnavailable("memory broker unavailable (simulated)")

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _channel(self, name: str) -> _Channel:
        """The channel's state with expired parts removed (as Redis expires keys)."""
        now = self.clock()
        ch = self._channels.get(name)
        if ch is None:
            ch = self._channels[name] = _Channel()
        if now >= ch.meta_expires:
            ch.epoch, ch.top, ch.fence, ch.meta_expires = None, 0, 0, float("inf")
        if now >= ch.stream_expires:
            ch.stream, ch.stream_expires = [], float("inf")
        if now >= ch.snap_expires:
            ch.snapshot, ch.snap_expires = {}, float("inf")
        return ch

    # --- ingest --------------------------------------------------------------------------

    async def publish(
        self, batch: Sequence[PublishRequest], fence: Fence | None = None, *,
        meta_ttl: int, idempotency_ttl: int,
    ) -> list[PublishReply]:
        self._check()
        await asyncio.sleep(0)  # a round trip
        self._check()
        epoch = new_epoch()
        return [self._publish_one(req, epoch, fence, meta_ttl, idempotency_ttl)
                for req in batch]

    def _publish_one(
        self, req: PublishRequest, new: str, fence: Fence | None, meta_ttl: int,
        idem_ttl: int,
    ) -> PublishReply:
        now_s = self.clock()
        now = int(now_s * 1000)
        ch = self._channel(req.channel)
        token: int | None = None
        if fence is not None:
            token = fence.token
            if token < ch.fence:
                return PublishReply(0, str(ch.fence), PublishStatus.FENCED)
            if fence.deadline_ms is not None and now >= fence.deadline_ms:
                return PublishReply(0, "", PublishStatus.EXPIRED)
        epoch = ch.epoch
        bucket = idempotency_bucket(idem_ttl, now_s)
        if req.msg_id and epoch is not None:
            for b in (bucket, bucket - 1):
                ids = self._idem.get((req.channel, b))
                prev = ids[0].get(req.msg_id) if ids is not None and ids[1] > now_s else None
                if prev is not None:
                    e, _, o = prev.rpartition(":")
                    if e == epoch:
                        if token is not None and token > ch.fence:
                            ch.fence = token
                        return PublishReply(int(o), epoch, PublishStatus.DUPLICATE)
        if req.if_changed:
            if epoch is not None:
                same = self._unchanged(ch, req)
            else:
                same = req.snapshot_mode == "keyed" and req.delete
            if same:
                if epoch is None:
                    return PublishReply(0, "", PublishStatus.UNCHANGED)
                if token is not None and token > ch.fence:
                    ch.fence = token
                return PublishReply(ch.top, epoch, PublishStatus.UNCHANGED)
        if epoch is None:
            epoch = ch.epoch = new
            ch.top, ch.fence, ch.stream, ch.snapshot = 0, 0, [], {}
            self._idem.pop((req.channel, bucket), None)
            self._idem.pop((req.channel, bucket - 1), None)
        ch.top += 1
        offset = ch.top
        if token is not None and token > ch.fence:
            ch.fence = token
        ch.stream.append(_Entry(offset, req.key, req.data, req.delete, now))
        if len(ch.stream) > req.max_length:
            del ch.stream[: len(ch.stream) - req.max_length]
        cutoff = now - req.max_age_ms
        if ch.stream and ch.stream[0].ms < cutoff:
            keep = 0
            while keep < len(ch.stream) and ch.stream[keep].ms < cutoff:
                keep += 1
            del ch.stream[:keep]
        ch.stream_expires = now_s + req.max_age_ms / 1000
        self._update_snapshot(ch, req)
        ch.meta_expires = ch.snap_expires = now_s + meta_ttl
        if req.msg_id:
            ids = self._idem.get((req.channel, bucket))
            known = ids[0] if ids is not None and ids[1] > now_s else {}
            known[req.msg_id] = f"{epoch}:{offset}"
            self._idem[(req.channel, bucket)] = (known, now_s + 2 * idem_ttl)
        self.published += 1
        pub = Publication(req.channel, epoch, offset, req.key, req.data, req.delete,
                          req.received_ms / 1000 if req.received_ms else 0.0)
        for live in self._lives:
            live._publish(pub)
        return PublishReply(offset, epoch, PublishStatus.PUBLISHED)

    @staticmethod
    def _unchanged(ch: _Channel, req: PublishRequest) -> bool:
        mode = req.snapshot_mode
        if mode == "none":
            return False
        if mode == "keyed" and req.delete:
            return req.key not in ch.snapshot
        old = ch.snapshot.get(req.key)
        if old is None:
            return False
        if old == req.data:
            return True
        if mode != "merge":
            return False
        prev, cur = _object(old), _object(req.data)
        if prev is None or cur is None:
            return False
        return all(k in prev and _same(prev[k], v) for k, v in cur.items())

    @staticmethod
    def _update_snapshot(ch: _Channel, req: PublishRequest) -> None:
        mode = req.snapshot_mode
        if mode == "none":
            return
        if mode == "keyed":
            if req.delete:
                ch.snapshot.pop(req.key, None)
            else:
                ch.snapshot[req.key] = req.data
            return
        if mode == "merge":
            old = ch.snapshot.get(req.key)
            prev, cur = (_object(old), _object(req.data)) if old is not None else (None, None)
            if prev is not None and cur is not None:
                prev.update(cur)
                ch.snapshot[req.key] = json.dumps(prev, separators=(",", ":"),
                                                  ensure_ascii=False)
                return
        ch.snapshot[req.key] = req.data

    async def rebase(
        self, channel: str, old_epoch: str, token: int | None, *, meta_ttl: int
    ) -> RebaseReply:
        self._check()
        await asyncio.sleep(0)
        ch = self._channel(channel)
        if token is not None and token < ch.fence:
            return RebaseReply("", RebaseStatus.FENCED)
        if ch.epoch != old_epoch:
            return RebaseReply(ch.epoch or "", RebaseStatus.NOT_NEEDED)
        ch.epoch = new_epoch()
        ch.stream = []
        ch.meta_expires = self.clock() + meta_ttl
        return RebaseReply(ch.epoch, RebaseStatus.REBASED)

    async def snapshot(self, channel: str) -> dict[str, str]:
        self._check()
        await asyncio.sleep(0)
        return dict(self._channel(channel).snapshot)

    # --- the edge ------------------------------------------------------------------------

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        self._check()
        await asyncio.sleep(0)  # a round trip: live messages may overtake it
        self._check()
        return self.history_now(channel, since, snapshot, epoch=epoch, until=until,
                                limit=limit, meta_ttl=meta_ttl)

    async def history_many(
        self, reads: Sequence[HistoryRead], *, limit: int, meta_ttl: int,
    ) -> list[HistoryResult | BrokerUnavailable]:
        """`history` for each read in turn (a subclass's `history`, a test's, applies)."""
        return [await self.history(r.channel, r.since, r.snapshot, epoch=r.epoch,
                                   until=r.until, limit=limit, meta_ttl=meta_ttl)
                for r in reads]

    def history_now(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        """`history` without the round trip (what the store holds this instant)."""
        ch = self._channel(channel)
        if ch.epoch is None:
            ch.epoch, ch.top, ch.stream, ch.snapshot = new_epoch(), 0, [], {}
            ch.meta_expires = self.clock() + meta_ttl
        top = ch.top
        first = ch.stream[0].offset if ch.stream else top + 1
        recoverable = False
        entries: list[Publication] = []
        if ((epoch == "" or epoch == ch.epoch) and 0 <= since <= top and since + 1 >= first
                and top - since <= limit):
            recoverable = True
            last = top if until is None else min(until, top)
            entries = [Publication(channel, ch.epoch, e.offset, e.key, e.data, e.deleted)
                       for e in ch.stream if since < e.offset <= last]
        snap: dict[str, str] = {}
        if snapshot == "1" or (snapshot == "r" and not recoverable):
            snap = dict(ch.snapshot)
        return HistoryResult(ch.epoch, top, first, recoverable, entries, snap)

    def live(self, listener: LiveListener, node_id: str) -> MemoryLive:
        live = MemoryLive(self, listener, node_id)
        self._lives.append(live)
        return live

    # --- leader election -----------------------------------------------------------------

    def _lease(self, feed: str) -> tuple[str, float] | None:
        held = self._leases.get(feed)
        if held is not None and self.clock() >= held[1]:
            del self._leases[feed]
            return None
        return held

    async def acquire(self, feed: str, owner: str, ttl_ms: int) -> LeaseGrant:
        self._check()
        await asyncio.sleep(0)
        now = self.clock()
        held = self._lease(feed)
        if held is not None and not held[0].endswith(":" + owner):
            return LeaseGrant(0, int(now * 1000), int((held[1] - now) * 1000), held[0])
        token = self._fences[feed] = self._fences.get(feed, 0) + 1
        self._leases[feed] = (f"{token}:{owner}", now + ttl_ms / 1000)
        return LeaseGrant(token, int(now * 1000), ttl_ms, "")

    async def renew(self, feed: str, holder: str, ttl_ms: int) -> LeaseRenewal:
        self._check()
        await asyncio.sleep(0)
        now = self.clock()
        held = self._lease(feed)
        if held is not None and held[0] == holder:
            self._leases[feed] = (holder, now + ttl_ms / 1000)
            return LeaseRenewal(True, int(now * 1000), "")
        return LeaseRenewal(False, int(now * 1000), held[0] if held else "")

    async def release(self, feed: str, holder: str, fence_floor: int = 0) -> bool:
        self._check()
        await asyncio.sleep(0)
        held = self._lease(feed)
        released = held is not None and held[0] == holder
        if released:
            del self._leases[feed]
        if fence_floor > self._fences.get(feed, 0):
            self._fences[feed] = fence_floor
        return released

    def lease_holder(self, feed: str) -> str | None:
        held = self._lease(feed)
        return held[0] if held else None

    # --- health --------------------------------------------------------------------------

    async def ping(self) -> bool:
        self._check()
        return True

    async def close(self) -> None:
        for live in list(self._lives):
            await live.close()


class MemoryLive:
    """A live connection of the memory broker: publications reach the listener from the
    event loop (call_soon), in publish order, as pub/sub messages would. It never calls
    `LiveListener.pace`: there is no socket in which held-back messages would gather, so
    holding a delivery would only add latency (pure tests see the hub unpaced)."""

    def __init__(self, broker: MemoryBroker, listener: LiveListener, node_id: str) -> None:
        self.broker = broker
        self.listener = listener
        self.node_id = node_id
        self.channels: set[str] = set()
        self.drops: dict[str, int] = {}
        self.half_open = False
        self.down = False  # disconnect_live until restore_live
        self.lost = 0  # times the connection was lost
        self._connected = asyncio.Event()
        self._started = False
        self._closed = False
        self._generation = 0  # connections so far: callbacks of an older one are dropped

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._started = True
        self._connect()

    async def close(self) -> None:
        self._closed = True
        self._connected.clear()
        if self in self.broker._lives:
            self.broker._lives.remove(self)

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        if self.connected:
            # Confirmed before any message of the channel, as Redis does.
            self._soon(self.listener.on_subscribed, channel)
            await asyncio.sleep(0)  # the SUBSCRIBE's round trip

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)

    async def probe(self, timeout: float) -> bool:
        if not self.connected or self.half_open or not self.broker.available:
            await asyncio.sleep(min(timeout, 0.01))
            return False
        await asyncio.sleep(0)
        return True

    def reconnect(self) -> None:
        """Drop the connection; it comes back at once unless the broker keeps it down."""
        self._lose(ConnectionError("liveness probe failed"))
        if not self.down:
            self._soon_any(self._connect)

    # --- the simulated connection --------------------------------------------------------

    def _connect(self) -> None:
        if self._closed or self.down or self.connected:
            return
        self._generation += 1
        self.half_open = False
        self._connected.set()
        names = list(self.channels)
        self.listener.on_connected(len(names))
        for name in names:
            self._soon(self.listener.on_subscribed, name)

    def _lose(self, error: BaseException) -> None:
        if self.connected:
            self._connected.clear()
            self._generation += 1
            self.lost += 1
            self.listener.on_lost(error, 0.0)

    def _restore(self) -> None:
        self.down = False
        if self._started:
            self._soon_any(self._connect)

    def _publish(self, pub: Publication) -> None:
        if not self.connected or self.half_open or pub.channel not in self.channels:
            return
        drops = self.drops.get(pub.channel)
        if drops:
            self.drops[pub.channel] = drops - 1
            return
        self._soon(self.listener.on_publication, pub)

    def _soon(self, fn: Callable[[Any], None], arg: Any) -> None:
        generation = self._generation

        def run() -> None:
            if self._generation == generation and self.connected:
                fn(arg)

        asyncio.get_running_loop().call_soon(run)

    def _soon_any(self, fn: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_soon(fn)


def _object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if value == []:
        return {}  # Lua's cjson decodes [] and {} alike: a table that is not an array
    return value if isinstance(value, dict) else None


def _same(a: Any, b: Any) -> bool:
    """JSON equality as publish.lua's `same` (key order does not matter; true is not 1)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)
