"""The node-wide hub: one Redis subscription per channel, shared by all local subscribers.

Ordering guarantees live here. For each channel the hub keeps `last`, the offset up to
which it has dispatched every message, so what it hands to subscribers is gapless:

* a live message whose offset is not `last + 1` makes the hub read the missing range from
  the stream (a *fill*), holding later live messages back until the fill is done;
* a message of another epoch, or a gap the stream no longer covers, makes it *resync* every
  subscriber of the channel from the snapshot;
* after the pub/sub connection was lost, each channel is filled from the stream, since
  Redis pub/sub drops whatever was published while nobody listened.

A client joining a channel is first registered as *pending* (live messages are buffered
for it), then the history after its position is read, and the two are merged by offset
with no await in between: nothing published during the subscribe is lost or doubled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from common import protocol
from common.aio import raise_if_cancelling, wait_event
from common.channels import Channel
from common.errors import CloseCode, Disconnect, Unavailable
from common.keys import Keys
from common.protocol import Codec, Frame, Position
from common.scripts import register
from edge.pack import Batch
from edge.stats import EdgeStats

# Most history entries history.lua returns itself; more are read with a plain XRANGE.
INLINE_HISTORY = 100


class Subscriber(Protocol):
    """What the hub needs of a client session: it hands over what a channel got, in offset
    order, and never awaits the session."""

    codec: Codec  # a resync is encoded once per codec for the channel's subscribers

    def deliver(self, channel: str, batch: Batch, start: int) -> None:
        """The batch's publications from index `start` (those before it the subscriber
        already has). Called during the hub's turn; `end_turn` follows."""
        ...

    def end_turn(self) -> None:
        """Called once per turn on each subscriber `deliver` was called on, after every
        channel of the turn was delivered: a subscriber of 30 busy channels can write what
        it got in one system call, not 30."""
        ...

    def resynced(self, channel: str, frame: Frame) -> None:
        """The channel's history was lost: `frame` is its resync push; what the subscriber
        holds for the channel (gaps, throttled values) belongs to the old state."""
        ...

    def fail(self, exc: Disconnect) -> None:
        """End the subscriber's connection (the hub cannot keep its stream gapless)."""
        ...


class Publication:
    """A live or historical message of one channel, encoded for clients at most once per
    codec however many clients receive it."""

    __slots__ = ("_json", "_msgpack", "channel", "data", "deleted", "epoch", "key", "offset",
                 "received")

    def __init__(
        self, channel: str, epoch: str, offset: int, key: str, data: str, deleted: bool = False,
        received: float = 0.0,
    ) -> None:
        self.channel = channel
        self.epoch = epoch
        self.offset = offset
        self.key = key
        self.data = data
        self.deleted = deleted
        self.received = received  # upstream receive time (wall clock, s) of a live one; 0
        self._json: str | None = None
        self._msgpack: bytes | None = None

    def frame(self, codec: Codec) -> Frame:
        if codec is Codec.JSON:
            if self._json is None:
                self._json = protocol.pub_json(
                    self.channel, self.offset, self.key, self.data, self.deleted
                )
            return self._json
        if self._msgpack is None:
            self._msgpack = protocol.pub_msgpack(
                self.channel, self.offset, self.key, self.data, self.deleted
            )
        return self._msgpack


@dataclass(eq=False, slots=True)
class Subscription:
    """One client's subscription to one channel."""

    session: Subscriber
    channel: str
    last: int = -1  # highest offset delivered (or covered by the snapshot)
    epoch: str = ""
    buffer: list[Publication] | None = field(default_factory=list)  # while pending

    def deliver(self, batch: Batch) -> None:
        pubs = batch.pubs
        start = 0
        if pubs[0].offset != self.last + 1:  # rare: some were already replayed to it
            while start < len(pubs) and pubs[start].offset <= self.last:
                start += 1
            if start == len(pubs):
                return
            if pubs[start].offset != self.last + 1:
                # The hub dispatches gaplessly, so this cannot happen; if it does, the client
                # reconnects and recovers rather than silently missing messages.
                self.session.fail(Disconnect(CloseCode.INSUFFICIENT_STATE, "gap in channel"))
                return
        self.last = pubs[-1].offset
        self.session.deliver(self.channel, batch, start)


@dataclass(frozen=True, slots=True)
class HistoryResult:
    epoch: str
    top: int
    first: int
    recoverable: bool
    entries: list[Publication]
    snapshot: dict[str, str]


@dataclass(frozen=True, slots=True)
class Joined:
    """The outcome of a subscribe: the channel's position, whether the client's own was
    recovered, the snapshot to send (None: none), and the publications that follow the
    reply."""

    epoch: str
    offset: int
    recovered: bool
    snapshot: dict[str, Any] | None
    replay: list[Publication]


class ChannelState:
    __slots__ = (
        "active",
        "backlog",
        "confirmed",
        "epoch",
        "last",
        "name",
        "outbox",
        "pending",
        "recheck",
        "repair",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.active: dict[Subscriber, Subscription] = {}
        self.pending: list[Subscription] = []
        self.last: int | None = None
        self.epoch: str | None = None
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.repair: asyncio.Task[None] | None = None  # a fill or resync under way
        self.backlog: list[Publication] = []  # live messages held back during a repair
        self.recheck = False  # pub/sub reconnected during a repair: read history once more
        self.outbox: list[Publication] = []  # dispatched this turn, not yet delivered

    @property
    def empty(self) -> bool:
        return not self.active and not self.pending


class Hub:
    def __init__(
        self,
        redis: Redis,
        pubsub_factory: Callable[[], PubSub],
        keys: Keys,
        stats: EdgeStats,
        logger: logging.Logger,
        *,
        node_id: str,
        recovery_limit: int = 10_000,
        meta_ttl: int = 30 * 86_400,
        subscribe_timeout: float = 5.0,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        inline_history: int = INLINE_HISTORY,
    ) -> None:
        self.redis = redis
        # The same connections, but XRANGE replies as Redis sent them: redis-py would turn
        # every entry into a tuple and a dict first (a third of a 10,000-entry read).
        self._ranges = Redis(connection_pool=redis.connection_pool)
        self._ranges.set_response_callback("XRANGE", _as_sent)
        self.inline_history = inline_history
        self._pubsub_factory = pubsub_factory
        self.keys = keys
        self.stats = stats
        self.log = logger
        self.node_id = node_id
        self.recovery_limit = recovery_limit
        self.meta_ttl = meta_ttl
        self.subscribe_timeout = subscribe_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.channels: dict[str, ChannelState] = {}
        self._history = register(redis, "history")
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._probe_channel = keys.probe(node_id)
        self._probe_seen = asyncio.Event()
        self._connected = asyncio.Event()
        self.live_ok = False  # the pub/sub connection answered the last liveness probe
        self._reconnect = False
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        self._to_flush: list[ChannelState] = []
        self._flush_handle: asyncio.Handle | None = None

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name="hub-reader")
        self._prober = asyncio.create_task(self._probe_loop(), name="hub-prober")

    async def close(self) -> None:
        self._closing = True
        for task in (self._reader, self._prober):
            if task is not None:
                task.cancel()
        for state in self.channels.values():
            if state.repair is not None:
                state.repair.cancel()
        for task in (self._reader, self._prober):
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    @property
    def ready(self) -> bool:
        return self._connected.is_set() and self.live_ok

    # --- subscribe / unsubscribe ---------------------------------------------------------

    async def subscribe(
        self, session: Subscriber, channel: Channel, recover: Position | None,
        want_snapshot: bool,
    ) -> tuple[Subscription, Joined]:
        """Join `channel`; the caller sends its reply then `Joined.replay`, in order and
        before any later live message (by queueing them synchronously after this returns:
        live messages are delivered at the end of a loop turn)."""
        name = channel.name
        sub = Subscription(session, name)
        state = self.channels.get(name)
        created = state is None
        if state is None:
            state = self.channels[name] = ChannelState(name)
            self.stats.channels = len(self.channels)
        # Pending before the first await: a subscribe that ends early (cancelled) drops a
        # state it created, which would otherwise stay, never confirmed, and make every
        # later subscribe of the channel on this node wait out the timeout.
        state.pending.append(sub)
        try:
            if created and self._pubsub is not None:
                await self._redis_subscribe(name)
            # Not `wait_for`, and a cancel that redis-py swallowed raised again (common/aio.py):
            # a subscribe cancelled (its session ending) must never register a subscriber,
            # which nothing would remove again (it held the session and its socket).
            async with asyncio.timeout(self.subscribe_timeout):
                await asyncio.shield(state.confirmed)
            if recover is not None:
                result = await self.read_history(name, recover.offset, "r", recover.epoch)
            else:
                result = await self.read_history(name, -1, "1" if want_snapshot else "0")
            raise_if_cancelling()
        except BaseException as exc:
            state.pending.remove(sub)
            self._maybe_drop(state)
            if not isinstance(exc, Exception):
                raise
            self.log.warning("subscribe failed channel=%s error=%r", name, exc)
            raise Unavailable("channel temporarily unavailable, retry") from None
        # From here on no await: the merge below must see a consistent buffer.
        state.pending.remove(sub)
        buffered = sub.buffer or []
        sub.buffer = None
        recovered = False
        replay: list[Publication] = []
        if recover is not None and result.recoverable and recover.epoch == result.epoch:
            recovered = True
            replay = result.entries
            sub.last = recover.offset
        else:
            sub.last = result.top
        sub.epoch = result.epoch
        last = result.top
        for pub in buffered:
            if pub.epoch == result.epoch and pub.offset > last:
                replay.append(pub)
                last = pub.offset
        # Contiguity check: everything replayed must follow the position without a hole.
        expected = sub.last + 1
        for pub in replay:
            if pub.offset != expected:
                self.log.error("recovery not contiguous channel=%s", name)
                self._maybe_drop(state)
                raise Unavailable("recovery failed, retry")
            expected += 1
        if replay:
            sub.last = replay[-1].offset
        if state.last is None:
            state.last = sub.last
            state.epoch = result.epoch
        state.active[session] = sub
        if state.epoch != result.epoch and state.repair is None:
            # The channel's epoch changed while this subscribe read history (either side may
            # be the stale one): resync the channel's subscribers, this one included.
            self._start_repair(state, None, resync=True)
        self.stats.subscriptions += 1
        snapshot = None
        if (recover is not None and not recovered) or (recover is None and want_snapshot):
            snapshot = protocol.snapshot_object(result.snapshot)
        if recover is None:
            self.stats.subscribes_fresh += 1
        elif recovered:
            self.stats.subscribes_recovered += 1
            self.stats.messages_recovered += len(replay)
        else:
            self.stats.subscribes_not_recovered += 1
        return sub, Joined(result.epoch, result.top, recovered, snapshot, replay)

    def unsubscribe(self, session: Subscriber, name: str) -> None:
        state = self.channels.get(name)
        sub = state.active.pop(session, None) if state is not None else None
        if state is None or sub is None:
            return
        self.stats.subscriptions -= 1
        self._maybe_drop(state)

    def _maybe_drop(self, state: ChannelState) -> None:
        if not state.empty or self.channels.get(state.name) is not state:
            return
        del self.channels[state.name]
        self.stats.channels = len(self.channels)
        if state.repair is not None:
            state.repair.cancel()
        if self._pubsub is not None:
            task = asyncio.create_task(self._redis_unsubscribe(state.name))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _redis_subscribe(self, name: str) -> None:
        assert self._pubsub is not None
        try:
            await self._pubsub.subscribe(self.keys.live(name))
        except Exception as exc:  # the reader notices the broken connection and resubscribes
            self.log.warning("redis subscribe failed channel=%s error=%r", name, exc)

    async def _redis_unsubscribe(self, name: str) -> None:
        if name in self.channels or self._pubsub is None:
            return  # resubscribed meanwhile
        with contextlib.suppress(Exception):
            await self._pubsub.unsubscribe(self.keys.live(name))

    # --- history -------------------------------------------------------------------------

    async def read_history(
        self, name: str, since: int, snapshot: str, epoch: str = "",
        until: int | None = None,
    ) -> HistoryResult:
        """Position, entries after `since` up to `until` (None: the channel's top) if
        `epoch` is current (or ""), and the snapshot when `snapshot` is "1" (always) or "r"
        (only if not recoverable).

        history.lua returns up to `inline_history` entries itself; more (a client far
        behind) are read with XRANGE in a second round trip, which costs Redis a fraction
        of what the same entries cost through Lua. That read is checked against the first
        (same epoch, exactly the offsets since + 1 ... end); if the channel changed in
        between (trimmed, or a new epoch), everything is read again at once by the
        script."""
        keys = [self.keys.meta(name), self.keys.stream(name), self.keys.snapshot(name)]
        args: list[str | int] = [
            since, self.recovery_limit, snapshot, new_epoch(), self.meta_ttl, epoch,
            self.inline_history, "" if until is None else until,
        ]
        result = await self._read_history(name, keys, args)
        end = result.top if until is None else min(until, result.top)
        if result.recoverable and end - since > self.inline_history:
            entries = await self._read_range(name, result.epoch, since, end)
            if entries is not None:
                return replace(result, entries=entries)
            self.log.info("history changed between reads channel=%s: reading again", name)
            args[6] = ""  # no inline limit: one atomic read
            result = await self._read_history(name, keys, args)
        return result

    async def _read_history(
        self, name: str, keys: list[str], args: list[str | int]
    ) -> HistoryResult:
        epoch, top, first, recoverable, flat, snap = await self._history(keys=keys, args=args)
        entries = [
            Publication(name, epoch, int(flat[i]), flat[i + 1], flat[i + 3], flat[i + 2] == "1")
            for i in range(0, len(flat), 4)
        ]
        if isinstance(snap, dict):  # RESP3 may already give a map
            snap_map = dict(snap)
        else:
            snap_map = {snap[i]: snap[i + 1] for i in range(0, len(snap), 2)}
        return HistoryResult(epoch, int(top), int(first), bool(recoverable), entries, snap_map)

    async def _read_range(
        self, name: str, epoch: str, since: int, end: int
    ) -> list[Publication] | None:
        """The entries since + 1 ... end of `epoch`, or None if the stream no longer holds
        exactly those (trimmed meanwhile, or the channel has another epoch now)."""
        async with self._ranges.pipeline(transaction=True) as pipe:
            pipe.hget(self.keys.meta(name), "epoch")
            pipe.execute_command(
                "XRANGE", self.keys.stream(name), f"{since + 1}-0", f"{end}-0"
            )
            current, rows = await pipe.execute()
        if current != epoch or len(rows) != end - since:
            return None
        entries: list[Publication] = []
        append = entries.append
        offset = since
        for entry_id, fields in rows:  # fields: d <data> k <key> t <ms> x <deleted>
            offset += 1
            if entry_id != f"{offset}-0":
                return None
            append(Publication(name, epoch, offset, fields[3], fields[1],
                               len(fields) > 7 and fields[7] == "1"))
        return entries

    # --- live messages -------------------------------------------------------------------

    def _on_live(self, name: str, payload: str) -> None:
        state = self.channels.get(name)
        if state is None:
            return
        epoch, offset, deleted, key, received, data = payload.split("\n", 5)
        pub = Publication(name, epoch, int(offset), key, data, deleted == "1",
                          int(received) / 1000 if received else 0.0)
        self.stats.live_messages += 1
        if state.repair is not None:
            state.backlog.append(pub)
            return
        self._dispatch(state, pub)

    def _dispatch(self, state: ChannelState, pub: Publication) -> None:
        """Hand `pub` to the channel's subscribers if it is the next one; else repair."""
        if state.epoch is None:
            state.epoch = pub.epoch
        if pub.epoch != state.epoch:
            self._start_repair(state, pub, resync=True)
            return
        if state.last is not None:
            if pub.offset <= state.last:
                return
            if pub.offset != state.last + 1:
                self._start_repair(state, pub, resync=False)
                return
        state.last = pub.offset
        for sub in state.pending:
            if sub.buffer is not None:
                sub.buffer.append(pub)
        if state.active:
            if not state.outbox:
                self._to_flush.append(state)
                if self._flush_handle is None:
                    self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            state.outbox.append(pub)

    def _flush(self) -> None:
        """Deliver what each channel got during this event-loop turn, as one batch per
        channel; then end the turn once for each subscriber delivered to (see
        `Subscriber.end_turn`)."""
        self._flush_handle = None
        states, self._to_flush = self._to_flush, []
        turn: dict[Subscriber, None] = {}
        delivered: list[tuple[str, list[Publication]]] = []
        try:
            for state in states:
                if state.outbox:
                    delivered.append((state.name, state.outbox))
                    self._flush_channel(state, turn)
        finally:
            for session in turn:
                session.end_turn()
        # Written to every client that keeps up (the direct path); slower clients get it from
        # their writers later, which fanout_edge_client_lag_seconds shows.
        now = time.time()
        for name, pubs in delivered:
            hist = self.stats.delivery_histogram(name.partition(".")[0])
            for pub in pubs:
                if pub.received:
                    hist.observe(max(now - pub.received, 0.0))

    def _flush_channel(self, state: ChannelState, turn: dict[Subscriber, None]) -> None:
        """Hand the channel's outbox to its subscribers as one batch; each one delivered to
        is added to `turn`."""
        if not state.outbox:
            return
        batch = Batch(state.outbox)
        state.outbox = []
        first, last = batch.pubs[0].offset - 1, batch.pubs[-1].offset
        name = state.name
        for sub in list(state.active.values()):
            session = sub.session
            turn[session] = None
            if sub.last == first:  # the usual case, inlined: one call per pair, not two
                sub.last = last
                session.deliver(name, batch, 0)
            else:
                sub.deliver(batch)

    def _start_repair(self, state: ChannelState, pub: Publication | None, resync: bool) -> None:
        if pub is not None:
            state.backlog.append(pub)
        if state.repair is None:
            state.repair = asyncio.create_task(self._repair(state, resync))

    async def _repair(self, state: ChannelState, resync: bool) -> None:
        """Fill a gap from the stream, or resync everyone from the snapshot; then release the
        live messages held back meanwhile."""
        delay = 0.05
        try:
            while self.channels.get(state.name) is state:
                try:
                    if not resync and state.last is not None:
                        result = await self.read_history(
                            state.name, state.last, "0", state.epoch or ""
                        )
                        if result.recoverable and result.epoch == state.epoch:
                            self.stats.gaps_filled += 1
                            for pub in result.entries:
                                self._dispatch(state, pub)
                        else:
                            resync = True
                            continue
                    else:
                        result = await self.read_history(state.name, -1, "1")
                        self._resync(state, result)
                except (OSError, RedisError, TimeoutError) as exc:
                    self.log.warning("repair failed channel=%s error=%r", state.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                # Release the backlog; a new gap or epoch change in it repairs again.
                backlog, state.backlog = state.backlog, []
                for i, pub in enumerate(backlog):
                    if pub.epoch != state.epoch:
                        resync = True
                    elif state.last is not None and pub.offset > state.last + 1:
                        resync = False
                    else:
                        self._dispatch(state, pub)
                        continue
                    state.backlog = backlog[i:] + state.backlog
                    break
                else:
                    if not state.recheck:
                        return
                    # The pub/sub connection came back during this repair: messages
                    # published while it was down may be past what was read. Read again.
                    state.recheck = False
                    resync = False
        finally:
            state.repair = None

    def _resync(self, state: ChannelState, result: HistoryResult) -> None:
        self.log.info(
            "resync channel=%s epoch=%s offset=%d subscribers=%d",
            state.name, result.epoch, result.top, len(state.active),
        )
        self.stats.resyncs += 1
        turn: dict[Subscriber, None] = {}
        self._flush_channel(state, turn)  # what came before the resync goes out before it
        for session in turn:
            session.end_turn()
        state.epoch = result.epoch
        state.last = result.top
        message = protocol.resync(
            state.name, result.epoch, result.top, protocol.snapshot_object(result.snapshot)
        )
        frames: dict[Codec, Frame] = {}
        for sub in state.active.values():
            codec = sub.session.codec
            frame = frames.get(codec)
            if frame is None:
                frame = frames[codec] = protocol.encode(message, codec)
            sub.last = result.top
            sub.epoch = result.epoch
            sub.session.resynced(state.name, frame)

    # --- the pub/sub connection ----------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = 0.1
        live_prefix = self.keys.live_prefix()
        while not self._closing:
            pubsub = self._pubsub = self._pubsub_factory()
            self._reconnect = False
            try:
                names = list(self.channels)
                await pubsub.subscribe(self._probe_channel, *(self.keys.live(n) for n in names))
                self._connected.set()
                self.log.info("pubsub connected channels=%d", len(names))
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=False, timeout=1.0)
                    if self._reconnect:
                        raise ConnectionError("liveness probe failed")
                    if msg is None:
                        continue
                    delay = 0.1
                    kind = msg["type"]
                    ch: str = msg["channel"]
                    if kind == "message":
                        if ch.startswith(live_prefix):
                            self._on_live(self.keys.channel_of_live(ch), msg["data"])
                        elif ch == self._probe_channel:
                            self._probe_seen.set()
                    elif kind == "subscribe" and ch.startswith(live_prefix):
                        self._on_confirmed(self.keys.channel_of_live(ch))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._connected.clear()
                self.live_ok = False
                self.stats.pubsub_reconnects += 1
                self.log.warning("pubsub connection lost error=%r retry_in=%.2f", exc, delay)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                self._pubsub = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _on_confirmed(self, name: str) -> None:
        state = self.channels.get(name)
        if state is None:
            return
        if not state.confirmed.done():
            state.confirmed.set_result(None)
        elif state.active:
            # Resubscribed after a lost connection: messages published meanwhile are only
            # in the stream.
            if state.repair is None:
                self._start_repair(state, None, resync=False)
            else:
                state.recheck = True

    async def _probe_loop(self) -> None:
        """Publish to ourselves and expect it back: catches a half-open pub/sub socket that
        a PING-based health check would miss."""
        while True:
            await self._connected.wait()
            self._probe_seen.clear()
            try:
                await self.redis.publish(self._probe_channel, str(time.time()))
                if not await wait_event(self._probe_seen, self.probe_timeout):
                    raise TimeoutError("probe message not seen")
                self.live_ok = True
            except Exception as exc:
                self.live_ok = False
                self.log.warning("pubsub probe failed error=%r", exc)
                self._reconnect = True  # the reader reconnects within a second
            await asyncio.sleep(self.probe_interval if self.live_ok else 0.5)


def new_epoch() -> str:
    return os.urandom(6).hex()


def _as_sent(response: Any, **options: Any) -> Any:
    return response
