"""The node-wide hub: one broker subscription per channel, shared by all local subscribers.

Ordering guarantees live here. For each channel the hub keeps `last`, the offset up to
which it has dispatched every message, so what it hands to subscribers is gapless:

* a live message whose offset is not `last + 1` makes the hub read the missing range from
  the stream (a *fill*), holding later live messages back until the fill is done;
* a message of another epoch, or a gap the stream no longer covers, makes it *resync* every
  subscriber of the channel from the snapshot;
* after the live connection was lost, each channel is filled from the stream, since
  pub/sub drops whatever was published while nobody listened.

A fill also checks that the stream still holds what the hub delivered: after a failover
to a replica that lacked the last writes (asynchronous replication), the stream's `top`
is below `last`, or the entry at `last` is another message, in the same epoch. The hub
then gives the channel a new epoch (`Broker.rebase`: clients holding positions of the
lost history are not told later that they recovered) and resyncs every subscriber.

The message store is reached only through the broker (common/broker/): history reads, the
live connection and its liveness probe.

A client joining a channel is first registered as *pending* (live messages are buffered
for it), then the history after its position is read, and the two are merged by offset
with no await in between: nothing published during the subscribe is lost or doubled.

Most subscribes need no read at all. Every publication the hub dispatches also goes into
the channel's *recent window* (the last `window_messages` of them, at most `window_bytes`):
a run of consecutive offsets ending at `last`, in the channel's epoch. A client whose
`{offset, epoch}` lies in it (from the window's first offset - 1 up to `last`) is answered
from memory, synchronously, with no await between taking the window and registering the
subscriber: what follows `last` reaches it through the ordinary dispatch. So is a subscribe
with neither recovery nor snapshot (its position is `last`). Only when the channel is
*live and contiguous here*: confirmed by pub/sub, the live connection up, no repair under
way (a repair means `last` may be behind or of a stale epoch). Whatever moves `last` other
than by one (a resync, an epoch change) empties the window, so it never spans a gap.

Reads that are needed are shared: a subscriber waiting for a read with the same arguments
already under way takes its result, but only if that read was *issued after the subscriber
was registered as pending*. The merge relies on this: everything dispatched before the
registration was published before the read ran, so it is in the read's result; everything
after is in the subscriber's buffer. A later subscriber waits for the next read instead
(reads of one key follow each other; each serves everyone registered before it began).
Reads of subscribes are admitted by a `Gate` (edge/admission.py): a bounded number at once,
a bounded queue, and beyond it `unavailable` with an advised retry delay.

A channel whose last subscriber left lingers for `linger` seconds, subscribed and keeping
its window, so that clients that come back (a reconnect) are recovered from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from common import protocol
from common.aio import raise_if_cancelling
from common.broker import (
    Broker,
    BrokerUnavailable,
    HistoryRead,
    HistoryResult,
    Live,
    Publication,
    SnapshotWant,
)
from common.channels import Channel
from common.errors import CloseCode, Disconnect, Unavailable
from common.protocol import Codec, Frame, Position
from edge.admission import Gate
from edge.pack import Batch
from edge.stats import EdgeStats

# A window entry's cost in its byte bound, on top of its payload (the object, its fields).
WINDOW_OVERHEAD = 100

# A flush cheaper than this (s) never paces the live reader (`Hub.pace`): under light load
# nothing waits.
PACE_MIN_COST = 0.001

# A broker read's arguments: channel, since, snapshot, epoch, until.
ReadKey = tuple[str, int, SnapshotWant, str, int | None]


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




@dataclass(eq=False, slots=True)
class Subscription:
    """One client's subscription to one channel."""

    session: Subscriber
    channel: str
    last: int = -1  # highest offset delivered (or covered by the snapshot)
    epoch: str = ""
    # While pending: the index in its channel's `held` (absolute, `ChannelState.held_start`
    # counted) of the first publication dispatched after it registered.
    mark: int = 0
    seq: int = 0  # when it was registered as pending (Hub._seq): which reads it may share

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
class Joined:
    """The outcome of a subscribe: the channel's position, whether the client's own was
    recovered, the snapshot to send (None: none), and the publications that follow the
    reply."""

    epoch: str
    offset: int
    recovered: bool
    snapshot: dict[str, Any] | None
    replay: list[Publication]


class Flight:
    """A broker read under way, shared by the subscribers registered before it began."""

    __slots__ = ("seq", "task")

    def __init__(self, task: asyncio.Future[HistoryResult], seq: int) -> None:
        self.task = task  # resolved by the batch it went out with (Hub._read_batch)
        self.seq = seq  # Hub._seq when it was issued


class _Served(Exception):
    """A pending subscriber was joined from memory while it waited for a read."""

    def __init__(self, joined: Joined) -> None:
        super().__init__()
        self.joined = joined


class ChannelState:
    __slots__ = (
        "active",
        "backlog",
        "confirmed",
        "epoch",
        "held",
        "held_start",
        "last",
        "linger",
        "name",
        "outbox",
        "pending",
        "recent",
        "recent_bytes",
        "recent_max",
        "recheck",
        "repair",
        "tail",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.active: dict[Subscriber, Subscription] = {}
        # Registered, waiting for a read (insertion order: the oldest first). What is
        # dispatched meanwhile is kept once in `held`, not once per pending subscriber: a
        # storm puts thousands of them on a busy channel, and a copy each made every
        # publication cost as many appends.
        self.pending: dict[Subscription, None] = {}
        self.held: list[Publication] = []
        self.held_start = 0  # the absolute index of held[0]
        self.last: int | None = None
        self.epoch: str | None = None
        self.tail: Publication | None = None  # the publication at `last`, if known
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.repair: asyncio.Task[None] | None = None  # a fill or resync under way
        self.backlog: list[Publication] = []  # live messages held back during a repair
        self.recheck = False  # pub/sub reconnected during a repair: read history once more
        self.outbox: list[Publication] = []  # dispatched this turn, not yet delivered
        # The recent window: consecutive offsets ending at `last`, in `epoch`.
        self.recent: deque[Publication] = deque()
        self.recent_bytes = 0
        self.recent_max = 0  # the window's length: at most the namespace's history length
        self.linger: asyncio.TimerHandle | None = None  # no subscriber: dropped when it fires

    @property
    def empty(self) -> bool:
        return not self.active and not self.pending


async def wait_shared(shared: asyncio.Future[None], timeout: float) -> None:
    """Until `shared` (a future many wait for) is done, at most `timeout` s (TimeoutError).
    Cancelling this waiter leaves `shared` alone. What `asyncio.timeout` around
    `asyncio.shield` does, with one future and one timer per waiter instead of a timeout
    context, a shield future and their callbacks: a storm's new channels wait for their
    SUBSCRIBE's confirmation by the ten thousand."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def done(_: object) -> None:
        if not waiter.done():
            waiter.set_result(None)

    def expired() -> None:
        if not waiter.done():
            waiter.set_exception(TimeoutError())

    shared.add_done_callback(done)
    timer = loop.call_later(timeout, expired)
    try:
        await waiter
    finally:
        timer.cancel()
        shared.remove_done_callback(done)


class Hub:
    def __init__(
        self,
        broker: Broker,
        stats: EdgeStats,
        logger: logging.Logger,
        *,
        node_id: str,
        recovery_limit: int = 10_000,
        meta_ttl: int = 30 * 86_400,
        subscribe_timeout: float = 5.0,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        window_messages: int = 0,
        window_bytes: int = 0,
        linger: float = 0.0,
        gate: Gate | None = None,
        live_share: float = 1.0,
        live_coalesce_max: float = 0.05,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.broker = broker
        self.stats = stats
        self.log = logger
        self.node_id = node_id
        self.recovery_limit = recovery_limit
        self.meta_ttl = meta_ttl
        self.subscribe_timeout = subscribe_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.channels: dict[str, ChannelState] = {}
        self.live: Live = broker.live(self, node_id)
        self._prober: asyncio.Task[None] | None = None
        self.live_ok = False  # the live connection answered the last liveness probe
        self._to_flush: list[ChannelState] = []
        self._flush_handle: asyncio.Handle | None = None
        self.window_messages = window_messages
        self.window_bytes = window_bytes
        self.linger = linger
        # None: subscribes' reads are not bounded (tests; the app always passes one).
        self.gate = gate
        self._seq = 0  # counts registrations of subscribers (Subscription.seq)
        self._flights: dict[ReadKey, Flight] = {}
        # This turn's subscribe reads, sent together at its end (`_send_reads`).
        self._reads: list[tuple[ReadKey, asyncio.Future[HistoryResult]]] = []
        self._read_batches: set[asyncio.Task[None]] = set()
        # Pacing the live reader (`pace`): the share of the loop's time live flushes may
        # take (1: never pace), the longest a reply is held, and the last flush's cost (s,
        # 0 once `pace` used it) and end (clock time).
        self.live_share = live_share
        self.live_coalesce_max = live_coalesce_max
        self._clock = clock
        self._flush_cost = 0.0
        self._flush_ended = 0.0

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        await self.live.start()
        self._prober = asyncio.create_task(self._probe_loop(), name="hub-prober")

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
        for state in self.channels.values():
            if state.repair is not None:
                state.repair.cancel()
            if state.linger is not None:
                state.linger.cancel()
        for flight in list(self._flights.values()):
            flight.task.cancel()
        for task in list(self._read_batches):
            task.cancel()
        if self._prober is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._prober
        await self.live.close()

    @property
    def ready(self) -> bool:
        return self.live.connected and self.live_ok

    # --- subscribe / unsubscribe ---------------------------------------------------------

    def subscribe_now(
        self, session: Subscriber, channel: Channel, recover: Position | None,
        want_snapshot: bool,
    ) -> tuple[Subscription, Joined] | None:
        """Join `channel` from memory, synchronously, if the hub can (most subscribes of a
        reconnect storm: see the module's docstring); None: `subscribe` it. The caller
        sends the reply and the replay before returning to the loop."""
        state = self.channels.get(channel.name)
        if state is None:
            return None
        sub = Subscription(session, channel.name)
        joined = self._join_from_memory(state, sub, recover, want_snapshot)
        return None if joined is None else (sub, joined)

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
        if state is not None:
            joined = self._join_from_memory(state, sub, recover, want_snapshot)
            if joined is not None:
                return sub, joined
        created = state is None
        gate = self.gate
        slot = False  # holding a place in the gate until the new channel is confirmed
        if state is None:
            # A new channel costs a SUBSCRIBE and its confirmation on the pub/sub connection
            # before its read: admitted like the read (a storm onto an edge that holds none
            # of its clients' channels would otherwise time them all out).
            if gate is not None:
                if not await gate.enter():
                    raise Unavailable("edge busy recovering, retry", gate.retry_after())
                raise_if_cancelling()
                state = self.channels.get(name)  # another subscribe may have made it
                created = state is None
                if created:
                    slot = True
                else:
                    gate.leave()
            if state is None:
                state = self.channels[name] = ChannelState(name)
                # Never more than Redis keeps (the namespace's history): recovery from
                # memory gives what a read would, not more.
                state.recent_max = min(self.window_messages, channel.spec.history_length)
                self.stats.channels = len(self.channels)
        self._keep(state)
        # Pending before the first await: a subscribe that ends early (cancelled) drops a
        # state it created, which would otherwise stay, never confirmed, and make every
        # later subscribe of the channel on this node wait out the timeout.
        sub.mark = state.held_start + len(state.held)
        state.pending[sub] = None
        self._seq += 1
        sub.seq = self._seq
        try:
            if created:
                await self.live.subscribe(name)
            # Not `wait_for`, and a cancel that redis-py swallowed raised again (common/aio.py):
            # a subscribe cancelled (its session ending) must never register a subscriber,
            # which nothing would remove again (it held the session and its socket).
            if not state.confirmed.done():
                await wait_shared(state.confirmed, self.subscribe_timeout)
            if slot:
                slot = False
                assert gate is not None
                gate.leave()
            if recover is not None:
                key: ReadKey = (name, recover.offset, "r", recover.epoch, None)
            else:
                key = (name, -1, "1" if want_snapshot else "0", "", None)
            result = await self._shared_read(state, sub, key, recover, want_snapshot)
            raise_if_cancelling()
        except BaseException as exc:
            if slot:
                assert gate is not None
                gate.leave()
            self._unpend(state, sub)
            self._maybe_drop(state)
            if not isinstance(exc, Exception):
                raise
            if isinstance(exc, _Served):
                return sub, exc.joined
            if isinstance(exc, Unavailable):
                raise
            self.log.warning("subscribe failed channel=%s error=%r", name, exc)
            raise Unavailable("channel temporarily unavailable, retry") from None
        # From here on no await: the merge below must see a consistent buffer.
        buffered = self._unpend(state, sub)
        recovered = False
        replay: list[Publication] = []
        if recover is not None and result.recoverable and recover.epoch == result.epoch:
            recovered = True
            replay = list(result.entries)  # a shared result's list is not this one's to extend
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
            state.tail = replay[-1] if replay else None
            # The window starts as what this subscriber replays, ending at `last`.
            self._clear_window(state)
            for pub in replay:
                self._remember(state, pub)
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

    @staticmethod
    def _unpend(state: ChannelState, sub: Subscription) -> list[Publication]:
        """`sub` is pending no more: what was dispatched since it registered. `held` is cut
        to what the oldest pending subscriber still needs (amortized: when that is at least
        half of it)."""
        del state.pending[sub]
        held = state.held
        buffered = held[sub.mark - state.held_start:]
        if not state.pending:
            state.held_start += len(held)
            state.held = []
        else:
            oldest = next(iter(state.pending))
            done = oldest.mark - state.held_start
            if done * 2 >= len(held) and done:
                del held[:done]
                state.held_start += done
        return buffered

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
        if (self.linger > 0 and state.linger is None and state.confirmed.done()
                and state.last is not None):
            # Kept a while, live, for clients that come back (recovered from the window).
            state.linger = asyncio.get_running_loop().call_later(
                self.linger, self._linger_ended, state)
            return
        self._drop(state)

    def _linger_ended(self, state: ChannelState) -> None:
        state.linger = None
        if state.empty and self.channels.get(state.name) is state:
            self._drop(state)

    def _keep(self, state: ChannelState) -> None:
        """A subscriber arrives: a lingering channel is kept."""
        if state.linger is not None:
            state.linger.cancel()
            state.linger = None

    def _drop(self, state: ChannelState) -> None:
        if state.linger is not None:
            state.linger.cancel()
            state.linger = None
        self._clear_window(state)
        del self.channels[state.name]
        self.stats.channels = len(self.channels)
        if state.repair is not None:
            state.repair.cancel()
        self.live.unsubscribe(state.name)

    # --- from memory ---------------------------------------------------------------------

    def _join_from_memory(
        self, state: ChannelState, sub: Subscription, recover: Position | None,
        want_snapshot: bool,
    ) -> Joined | None:
        """Join `sub` from what the hub holds, with no broker read and no await; None if
        it cannot (see the module's docstring): the caller reads."""
        last, epoch = state.last, state.epoch
        if (last is None or epoch is None or state.repair is not None or state.recheck
                or not state.confirmed.done() or not self.live.connected):
            return None
        if recover is None:
            if want_snapshot:
                return None
            replay: list[Publication] = []
        else:
            recent = state.recent
            first = recent[0].offset if recent else last + 1
            if (recover.epoch != epoch or not first - 1 <= recover.offset <= last
                    or last - recover.offset > self.recovery_limit):
                return None
            skip = recover.offset - first + 1  # entries the client already has
            replay = [recent[i] for i in range(skip, len(recent))] if skip else list(recent)
        self._keep(state)
        sub.last = last
        sub.epoch = epoch
        state.active[sub.session] = sub
        stats = self.stats
        stats.subscriptions += 1
        stats.subscribe_sources["memory"] += 1
        if recover is None:
            stats.subscribes_fresh += 1
        else:
            stats.subscribes_recovered += 1
            stats.messages_recovered += len(replay)
        return Joined(epoch, last, recover is not None, None, replay)

    def _remember(self, state: ChannelState, pub: Publication) -> None:
        """Add the publication just dispatched (offset `last`) to the channel's window."""
        recent = state.recent
        recent.append(pub)
        state.recent_bytes += len(pub.data) + WINDOW_OVERHEAD
        self.stats.window_messages += 1
        while len(recent) > state.recent_max or state.recent_bytes > self.window_bytes:
            old = recent.popleft()
            state.recent_bytes -= len(old.data) + WINDOW_OVERHEAD
            self.stats.window_messages -= 1
            if not recent:
                break

    def _clear_window(self, state: ChannelState) -> None:
        self.stats.window_messages -= len(state.recent)
        state.recent.clear()
        state.recent_bytes = 0

    # --- shared reads --------------------------------------------------------------------

    async def _shared_read(
        self, state: ChannelState, sub: Subscription, key: ReadKey,
        recover: Position | None, want_snapshot: bool,
    ) -> HistoryResult:
        """The read `key` for a pending subscriber: shared with an identical one issued
        after the subscriber was registered, or issued now (through the gate). Raises
        `_Served` when, while it waited, the channel became servable from memory."""
        while True:
            flight = self._flights.get(key)
            if flight is not None:
                if sub.seq <= flight.seq:
                    self.stats.subscribe_sources["shared"] += 1
                    return await asyncio.shield(flight.task)
                # Issued before this subscriber registered: its result may lack what was
                # dispatched in between. Wait for it to end, then look again.
                await asyncio.wait([flight.task])
                self._try_memory(state, sub, recover, want_snapshot)
                continue
            gate = self.gate
            if gate is not None:
                if not await gate.enter():
                    raise Unavailable("edge busy recovering, retry", gate.retry_after())
                if key in self._flights:  # one began while this waited
                    gate.leave()
                    continue
                try:
                    self._try_memory(state, sub, recover, want_snapshot)
                except _Served:
                    gate.leave()
                    raise
            task = self._read_soon(key)
            self._flights[key] = flight = Flight(task, self._seq)
            task.add_done_callback(functools.partial(self._landed, key, flight))
            self.stats.subscribe_sources["broker"] += 1
            return await asyncio.shield(task)

    def _try_memory(self, state: ChannelState, sub: Subscription, recover: Position | None,
                    want_snapshot: bool) -> None:
        """While a pending subscriber waited, the channel may have become servable from
        memory (an earlier subscriber's read set `last`): join it so (raises `_Served`)."""
        if state.last is None:
            return
        joined = self._join_from_memory(state, sub, recover, want_snapshot)
        if joined is not None:
            raise _Served(joined)

    def _landed(self, key: ReadKey, flight: Flight, _: object = None) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if self.gate is not None:
            self.gate.leave()
        if not flight.task.cancelled():
            flight.task.exception()  # retrieved: its waiters (if any) got it

    def _read_soon(self, key: ReadKey) -> asyncio.Future[HistoryResult]:
        """The read `key`, sent with the others of this turn in one broker call."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[HistoryResult] = loop.create_future()
        self._reads.append((key, future))
        if len(self._reads) == 1:
            loop.call_soon(self._send_reads)
        return future

    def _send_reads(self) -> None:
        reads, self._reads = self._reads, []
        task = asyncio.create_task(self._read_batch(reads), name="hub-reads")
        self._read_batches.add(task)
        task.add_done_callback(self._read_batches.discard)

    async def _read_batch(
        self, reads: list[tuple[ReadKey, asyncio.Future[HistoryResult]]]
    ) -> None:
        """One `history_many` for a turn's reads; each future gets its read's outcome."""
        reads = [r for r in reads if not r[1].done()]  # cancelled (the hub closing)
        if not reads:
            return
        self.stats.history_reads += len(reads)
        self.stats.history_batches += 1
        try:
            results: list[HistoryResult | BrokerUnavailable] = await self.broker.history_many(
                [HistoryRead(*key) for key, _ in reads], limit=self.recovery_limit,
                meta_ttl=self.meta_ttl)
        except BaseException as exc:
            for _, future in reads:
                if not future.done():
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(reads, results, strict=True):
            if not future.done():
                if isinstance(result, HistoryResult):
                    future.set_result(result)
                else:
                    future.set_exception(result)

    # --- history -------------------------------------------------------------------------

    async def client_history(
        self, name: str, since: int, epoch: str, until: int,
    ) -> HistoryResult:
        """A client's `history` request: a read admitted by the gate like a subscribe's
        (Unavailable with an advised delay beyond it)."""
        gate = self.gate
        if gate is not None and not await gate.enter():
            raise Unavailable("edge busy recovering, retry", gate.retry_after())
        try:
            return await self.read_history(name, since, "0", epoch, until)
        finally:
            if gate is not None:
                gate.leave()

    async def read_history(
        self, name: str, since: int, snapshot: SnapshotWant, epoch: str = "",
        until: int | None = None,
    ) -> HistoryResult:
        """Position, entries after `since` up to `until` (None: the channel's top) if
        `epoch` is current (or ""), and the snapshot when `snapshot` is "1" (always) or "r"
        (only if not recoverable)."""
        self.stats.history_reads += 1
        return await self.broker.history(
            name, since, snapshot, epoch=epoch, until=until, limit=self.recovery_limit,
            meta_ttl=self.meta_ttl,
        )

    # --- live messages -------------------------------------------------------------------

    def on_publication(self, pub: Publication) -> None:
        """A live message from the broker (the hot path)."""
        state = self.channels.get(pub.channel)
        if state is None:
            return
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
        state.tail = pub
        if state.recent_max:
            self._remember(state, pub)
        if state.pending:
            state.held.append(pub)
        if state.active:
            if not state.outbox:
                self._to_flush.append(state)
                if self._flush_handle is None:
                    self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)
            state.outbox.append(pub)

    def _flush(self) -> None:
        """Deliver what each channel got during this event-loop turn, as one batch per
        channel; then end the turn once for each subscriber delivered to (see
        `Subscriber.end_turn`). Its duration is recorded for `pace`."""
        started = self._clock()
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
        ended = self._clock()
        self._flush_cost = ended - started
        self._flush_ended = ended

    def pace(self) -> float:
        """Seconds the live reader holds its next reply (`LiveListener.pace`), so that live
        flushes take at most `live_share` of the loop's time: after a flush that cost `c`
        (at least PACE_MIN_COST), `c * (1/share - 1)` minus the time since it ended, at most
        `live_coalesce_max`; once per flush, then 0 until the next one. What Redis sends
        meanwhile is read and flushed in one turn: fewer, fuller frames, one write per
        client per flush, and the loop's time left to handshakes and resubscribes.

        While the recovery gate holds or queues reads (subscribes recovering from Redis: a
        reconnect storm), live flushes get half the share. Subscribes served from memory do
        not enter the gate and do not lower it. A share of 1 never paces, gate or not."""
        cost = self._flush_cost
        if cost < PACE_MIN_COST:  # also 0: no flush since the last call
            return 0.0
        self._flush_cost = 0.0
        share = self.live_share
        if share >= 1.0:
            return 0.0
        gate = self.gate
        if gate is not None and (gate.held or gate.waiting):
            share /= 2
        hold = min(cost * (1.0 / share - 1.0) - (self._clock() - self._flush_ended),
                   self.live_coalesce_max)
        if hold <= 0.0:
            return 0.0
        self.stats.live_paced += 1
        self.stats.live_paced_seconds += hold
        return hold

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
                # Held-back messages received before the read is issued were published
                # before it ran: one of another epoch than the read's is of an older one.
                before = len(state.backlog)
                try:
                    if not resync and state.last is not None:
                        result = await self._fill_read(state)
                        if result is None:  # the stream lost what was delivered
                            await self._rebase(state)
                            resync = True
                            continue
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
                except (BrokerUnavailable, OSError, TimeoutError) as exc:
                    self.log.warning("repair failed channel=%s error=%r", state.name, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                # Release the backlog; a new gap or epoch change in it repairs again.
                backlog, state.backlog = state.backlog, []
                for i, pub in enumerate(backlog):
                    if pub.epoch != state.epoch:
                        if i < before:
                            continue  # stale (resyncing for it again would never end)
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

    async def _fill_read(self, state: ChannelState) -> HistoryResult | None:
        """The stream after `last`, for a fill; None if, in the same epoch, it no longer
        holds what the hub delivered: its top is below `last`, or the entry at `last` (read
        too, when the hub knows what it delivered there) is another message."""
        name, last, epoch, tail = state.name, state.last, state.epoch or "", state.tail
        assert last is not None
        known = tail is not None and tail.offset == last and last > 0
        result = await self.read_history(name, last - 1 if known else last, "0", epoch)
        if result.epoch != epoch:
            return result  # a new epoch: the caller resyncs
        if result.top < last:
            self._lost(state, result, f"top {result.top} below {last}")
            return None
        if not known:
            return result
        assert tail is not None
        if not result.recoverable:
            # The entry at `last` is trimmed away (or more than the limit is missing):
            # nothing to compare; read as a plain fill would.
            return await self.read_history(name, last, "0", epoch)
        entries = result.entries
        head = entries[0] if entries else None
        if head is None or head.offset != last or (head.key, head.data, head.deleted) != (
                tail.key, tail.data, tail.deleted):
            self._lost(state, result, f"another message at {last}")
            return None
        return dataclasses.replace(result, entries=entries[1:])  # from `last + 1`

    def _lost(self, state: ChannelState, result: HistoryResult, what: str) -> None:
        self.stats.lost_writes += 1
        self.log.error(
            "stream lost delivered messages: Redis lost acknowledged writes channel=%s "
            "epoch=%s last=%d top=%d found=%s subscribers=%d", state.name, state.epoch,
            state.last, result.top, what, len(state.active))

    async def _rebase(self, state: ChannelState) -> None:
        """A new epoch for a channel whose stream lost what was delivered (if it is still
        in the hub's epoch: another edge, or the publisher, may have done it)."""
        if state.epoch:
            reply = await self.broker.rebase(state.name, state.epoch, None,
                                             meta_ttl=self.meta_ttl)
            self.log.info("channel rebased channel=%s old_epoch=%s epoch=%s status=%s",
                          state.name, state.epoch, reply.epoch, reply.status.name)

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
        state.tail = None
        self._clear_window(state)
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

    # --- the live connection (LiveListener) ---------------------------------------------

    def on_connected(self, channels: int) -> None:
        self.log.info("pubsub connected channels=%d", channels)

    def on_lost(self, error: BaseException, retry_in: float) -> None:
        self.live_ok = False
        self.stats.pubsub_reconnects += 1
        self.log.warning("pubsub connection lost error=%r retry_in=%.2f", error, retry_in)

    def on_subscribed(self, name: str) -> None:
        state = self.channels.get(name)
        if state is None:
            return
        if not state.confirmed.done():
            state.confirmed.set_result(None)
        elif state.active or state.linger is not None:
            # Resubscribed after a lost connection: messages published meanwhile are only
            # in the stream (a lingering channel too: its window must reach the top).
            if state.repair is None:
                self._start_repair(state, None, resync=False)
            else:
                state.recheck = True

    async def _probe_loop(self) -> None:
        """Publish to ourselves and expect it back: catches a half-open pub/sub socket that
        a PING-based health check would miss."""
        while True:
            await self.live.wait_connected()
            try:
                self.live_ok = await self.live.probe(self.probe_timeout)
                if not self.live_ok:
                    raise TimeoutError("probe message not seen")
            except Exception as exc:
                self.live_ok = False
                self.log.warning("pubsub probe failed error=%r", exc)
                self.live.reconnect()
            await asyncio.sleep(self.probe_interval if self.live_ok else 0.5)
