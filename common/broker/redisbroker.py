"""The broker on Redis (or Valkey): Lua scripts over streams and hashes, pub/sub for live
messages. Key names: common/broker/keys.py; scripts and their arguments:
common/broker/scripts.py; the live-message codec: common/broker/live.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError, ResponseError

from common.aio import wait_event
from common.broker.base import LiveListener
from common.broker.client import redis_client
from common.broker.keys import Keys
from common.broker.live import decode_live
from common.broker.scripts import (
    HISTORY_INLINE_ARG,
    Script,
    acquire_call,
    group_publishes,
    history_call,
    publish_call,
    rebase_call,
    register,
    release_call,
    renew_call,
    source,
)
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
from common.config import RedisSettings

_STATUSES = tuple(PublishStatus)  # by the number publish.lua returns
assert all(s == n for n, s in enumerate(_STATUSES))

# Most history entries history.lua returns itself; more are read with a plain XRANGE.
INLINE_HISTORY = 100
# Most channels in one SUBSCRIBE or UNSUBSCRIBE command (a storm's of one turn).
SUBSCRIBE_BATCH = 1000


@contextlib.asynccontextmanager
async def _unavailable() -> AsyncIterator[None]:
    """Redis's and the socket's errors as the broker's own."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable(repr(exc)) from exc


class RedisBroker:
    """The broker on one Redis client (`redis`, decode_responses=True). Live connections
    come from `pubsub_factory` (default: the same client's)."""

    def __init__(
        self,
        redis: Redis | RedisCluster,
        keys: Keys | None = None,
        *,
        pubsub_factory: Callable[[], PubSub] | None = None,
        inline_history: int = INLINE_HISTORY,
        logger: logging.Logger | None = None,
        owned: Sequence[Redis] = (),
        ranges: Redis | RedisCluster | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.log = logger or logging.getLogger("fanout.broker")
        # `ranges`: a client whose XRANGE replies come as Redis sent them (the cluster
        # broker's). Default: the same connections with that callback; redis-py would turn
        # every entry into a tuple and a dict first (a third of a 10,000-entry read).
        if ranges is None:
            assert isinstance(redis, Redis)
            ranges = Redis(connection_pool=redis.connection_pool)
            ranges.set_response_callback("XRANGE", _as_sent)
        self._ranges = ranges
        self.inline_history = inline_history
        self._pubsub_factory: Callable[[], Any] = pubsub_factory or redis.pubsub
        self._publish = register(redis, "publish")
        self._rebase = register(redis, "rebase")
        self._history = register(redis, "history")
        self._acquire = register(redis, "acquire")
        self._renew = register(redis, "renew")
        self._release = register(redis, "release")
        self._owned = list(owned)

    @classmethod
    def from_settings(
        cls, settings: RedisSettings, *, socket_timeout: float, live: bool = False,
        logger: logging.Logger | None = None,
    ) -> RedisBroker:
        """A broker with clients of its own (closed by `close`). With `live`, pub/sub gets
        a connection of its own with no read timeout: it blocks in reads by design.
        In Redis Cluster mode (`settings.is_cluster`), a RedisClusterBroker."""
        if settings.is_cluster:
            from common.broker.cluster import RedisClusterBroker

            return RedisClusterBroker.from_cluster_settings(
                settings, socket_timeout=socket_timeout, logger=logger)
        redis = redis_client(
            settings, decode_responses=True, socket_timeout=socket_timeout,
            socket_connect_timeout=5.0, health_check_interval=0,
        )
        owned = [redis]
        factory = None
        if live:
            pubsub_client: Redis = Redis.from_url(
                settings.url, decode_responses=True, socket_connect_timeout=5.0,
                socket_keepalive=True,
            )
            owned.append(pubsub_client)
            factory = pubsub_client.pubsub
        return cls(redis, Keys(settings.key_prefix), pubsub_factory=factory, logger=logger,
                   owned=owned)

    async def close(self) -> None:
        for client in self._owned:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> bool:
        async with _unavailable():
            return bool(await self.redis.ping())

    # --- ingest --------------------------------------------------------------------------

    async def publish(
        self, batch: Sequence[PublishRequest], fence: Fence | None = None, *,
        meta_ttl: int, idempotency_ttl: int,
    ) -> list[PublishReply]:
        """One publish.lua call per channel (see `group_publishes`), all in one write
        (`_pipelined`); replies in batch order. Calls that come back NOSCRIPT ran nothing:
        the script is loaded and they are sent again, in order."""
        epoch = new_epoch()  # used only by a channel that has no epoch yet
        calls = group_publishes(batch)
        now = time.time()  # picks the idempotency bucket, the same for the whole batch
        script = self._publish
        packed = [script.pack(*publish_call(self.keys, call, batch, epoch, fence,
                                            meta_ttl=meta_ttl, idempotency_ttl=idempotency_ttl,
                                            now=now))
                  for call in calls]
        replies: list[PublishReply | None] = [None] * len(batch)
        todo = list(range(len(calls)))
        status = _STATUSES
        async with _unavailable():
            for attempt in range(2):
                raw = await self._pipelined(b"".join([packed[c] for c in todo]), len(todo))
                again = []
                for c, reply in zip(todo, raw, strict=True):
                    if script.missing(reply) and attempt == 0:
                        again.append(c)
                        continue
                    if isinstance(reply, Exception):
                        raise reply
                    j = 0
                    for i in calls[c].indexes:
                        replies[i] = PublishReply(reply[j], _text(reply[j + 1]),
                                                  status[reply[j + 2]])
                        j += 3
                if not again:
                    break
                self.log.info("publish script not on the server: loading it calls=%d",
                              len(again))
                await script.load()
                todo = again
        assert all(r is not None for r in replies)
        return replies  # type: ignore[return-value]

    async def _run_calls(
        self, script: Script, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """`run_scripts` on one server, without redis-py's pipeline: each call packed in
        one C call (`Script.pack`) and all sent in one write (`_pipelined`). A storm's
        thousands of history reads spent a fifth of the edge's CPU in the pipeline's
        per-argument encoding. The replies in call order, errors as values; calls answered
        NOSCRIPT are sent again once after loading the script. (The cluster broker
        overrides this: its pipeline sends each node its calls.)"""
        packed = [script.pack(keys, args) for keys, args in calls]
        out: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            raw = await self._pipelined(b"".join([packed[i] for i in todo]), len(todo))
            again = []
            for i, reply in zip(todo, raw, strict=True):
                out[i] = reply
                if script.missing(reply):
                    again.append(i)
            if not again or attempt == 1:
                break
            self.log.info("script not on the server: loading it script=%s calls=%d",
                          script.name, len(again))
            await script.load()
            todo = again
        return out

    async def _pipelined(self, packed: bytes, count: int) -> list[Any]:
        """Send `count` commands packed as RESP (`packed`) in one write on one pooled
        connection and read their replies, an error reply as its exception. Not redis-py's
        pipeline, which would encode every argument again in Python. No retry: a broken
        connection raises (the caller retries the batch; ids make that idempotent), and a
        connection left with unread replies (an error, a cancellation) is dropped."""
        redis = self.redis
        assert isinstance(redis, Redis)  # RedisClusterBroker has a publish of its own
        pool = redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(packed)
            replies: list[Any] = []
            for _ in range(count):
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
            return replies
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)

    async def rebase(
        self, channel: str, old_epoch: str, token: int | None, *, meta_ttl: int
    ) -> RebaseReply:
        keys, args = rebase_call(self.keys, channel, old_epoch, new_epoch(), token,
                                 meta_ttl=meta_ttl)
        async with _unavailable():
            raw = await self._rebase(keys=keys, args=args)
        return RebaseReply(_text(raw[0]), RebaseStatus(int(raw[1])))

    async def snapshot(self, channel: str) -> dict[str, str]:
        async with _unavailable():
            raw = await self.redis.hgetall(self.keys.snapshot(channel))
        return {_text(k): _text(v) for k, v in raw.items()}

    # --- history -------------------------------------------------------------------------

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        """history.lua returns up to `inline_history` entries itself; more (a client far
        behind) are read with XRANGE in a second round trip, which costs Redis a fraction
        of what the same entries cost through Lua. That read is checked against the first
        (same epoch, exactly the offsets since + 1 ... end); if the channel changed in
        between (trimmed, or a new epoch), everything is read again at once by the
        script."""
        keys, args = history_call(
            self.keys, channel, since, snapshot, new_epoch(), limit=limit, meta_ttl=meta_ttl,
            epoch=epoch, inline=self.inline_history, until=until,
        )
        async with _unavailable():
            result = self._history_result(channel, await self._history(keys=keys, args=args))
            return await self._complete(result, channel, since, until, keys, args)

    async def history_many(
        self, reads: Sequence[HistoryRead], *, limit: int, meta_ttl: int,
    ) -> list[HistoryResult | BrokerUnavailable]:
        """One history.lua call per read, all in one pipeline (a cluster's: redis-py sends
        each node its calls at once). Calls that came back NOSCRIPT ran nothing: the
        script is loaded (on every master) and they are sent again. A read with more than
        `inline_history` entries is completed as `history` does, with a round trip of its
        own (a client far behind: rare in a storm, where most are a few messages back)."""
        epoch = new_epoch()
        calls = [history_call(self.keys, r.channel, r.since, r.snapshot, epoch, limit=limit,
                              meta_ttl=meta_ttl, epoch=r.epoch, inline=self.inline_history,
                              until=r.until) for r in reads]
        out: list[HistoryResult | BrokerUnavailable] = []
        async with _unavailable():
            raw = await self._run_calls(self._history, calls)
            for read, reply in zip(reads, raw, strict=True):
                if isinstance(reply, BaseException):
                    out.append(BrokerUnavailable(repr(reply)))
                else:
                    out.append(self._history_result(read.channel, reply))
            for i, result in enumerate(out):
                if isinstance(result, HistoryResult):
                    read = reads[i]
                    out[i] = await self._complete(result, read.channel, read.since, read.until,
                                                  *calls[i])
        return out

    async def _complete(
        self, result: HistoryResult, channel: str, since: int, until: int | None,
        keys: list[str], args: list[str | int],
    ) -> HistoryResult:
        """A history.lua result with the entries beyond its inline limit read by XRANGE
        (see `history`)."""
        end = result.top if until is None else min(until, result.top)
        if result.recoverable and end - since > self.inline_history:
            entries = await self._read_range(channel, result.epoch, since, end)
            if entries is not None:
                return replace(result, entries=entries)
            self.log.info("history changed between reads channel=%s: reading again",
                          channel)
            args = list(args)
            args[HISTORY_INLINE_ARG] = ""  # no inline limit: one atomic read
            result = self._history_result(channel, await self._history(keys=keys, args=args))
        return result

    @staticmethod
    def _history_result(name: str, raw: Any) -> HistoryResult:
        epoch, top, first, recoverable, flat, snap = raw
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

    def live(self, listener: LiveListener, node_id: str) -> RedisLive:
        return RedisLive(self, listener, node_id)

    # --- leader election -----------------------------------------------------------------

    async def acquire(self, feed: str, owner: str, ttl_ms: int) -> LeaseGrant:
        keys, args = acquire_call(self.keys, feed, owner, ttl_ms)
        async with _unavailable():
            raw = await self._acquire(keys=keys, args=args)
        return LeaseGrant(int(raw[0]), int(raw[1]), int(raw[2]), _text(raw[3]))

    async def renew(self, feed: str, holder: str, ttl_ms: int) -> LeaseRenewal:
        keys, args = renew_call(self.keys, feed, holder, ttl_ms)
        async with _unavailable():
            raw = await self._renew(keys=keys, args=args)
        return LeaseRenewal(bool(int(raw[0])), int(raw[1]), _text(raw[2]))

    async def release(self, feed: str, holder: str, fence_floor: int = 0) -> bool:
        keys, args = release_call(self.keys, feed, holder, fence_floor)
        async with _unavailable():
            return bool(int(await self._release(keys=keys, args=args)))


class RedisLive:
    """One pub/sub connection: live messages of the subscribed channels, and this node's
    probe channel. Reconnects with backoff and resubscribes every channel."""

    def __init__(self, broker: RedisBroker, listener: LiveListener, node_id: str) -> None:
        self.broker = broker
        self.keys = broker.keys
        self.listener = listener
        self.log = broker.log
        self.channels: set[str] = set()
        self._probe_channel = self.keys.probe(node_id)
        self._probe_seen = asyncio.Event()
        self._connected = asyncio.Event()
        self._pubsub: PubSub | None = None
        self._reader: asyncio.Task[None] | None = None
        self._wake = ReaderWake()
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        self._to_subscribe: list[str] = []  # this turn's new channels
        self._to_unsubscribe: list[str] = []  # this turn's dropped channels

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name="broker-live-reader")

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def subscribe(self, channel: str) -> None:
        """Queued for this turn's SUBSCRIBE (`_send_subscribes`): a storm's thousands of
        new channels cost a command per turn, not one each. Returns at once: what the
        caller waits for is the confirmation (`LiveListener.on_subscribed`), which follows
        the send; a send that fails is retried by the reader's reconnect."""
        self.channels.add(channel)
        if self._pubsub is None:
            return  # the reader subscribes every channel as it connects
        self._to_subscribe.append(channel)
        if len(self._to_subscribe) == 1:
            asyncio.get_running_loop().call_soon(self._send_subscribes)

    def _send_subscribes(self) -> None:
        names, self._to_subscribe = self._to_subscribe, []
        # Not the ones unsubscribed meanwhile (the reader subscribes every channel as it
        # connects: none are lost if the connection went).
        self._send_batched("SUBSCRIBE", [n for n in names if n in self.channels])

    def unsubscribe(self, channel: str) -> None:
        """Queued for this turn's UNSUBSCRIBE: channels dropped together (lingering ones
        whose clients went elsewhere) cost one command, not a task and a command each."""
        self.channels.discard(channel)
        if self._pubsub is None:
            return
        self._to_unsubscribe.append(channel)
        if len(self._to_unsubscribe) == 1:
            asyncio.get_running_loop().call_soon(self._send_unsubscribes)

    def _send_unsubscribes(self) -> None:
        names, self._to_unsubscribe = self._to_unsubscribe, []
        # Not those subscribed again meanwhile.
        self._send_batched("UNSUBSCRIBE",
                           [n for n in dict.fromkeys(names) if n not in self.channels])

    def _send_batched(self, command: str, names: list[str]) -> None:
        """`command` for `names`, SUBSCRIBE_BATCH channels per command, packed in C and
        written in one go on the pub/sub connection (redis-py's `PubSub.subscribe`
        normalizes and encodes every name in Python, and retries by reconnecting behind the
        reader). Their confirmations are handled by the reader. A connection that broke is
        the reader's to notice: it resubscribes every channel as it reconnects."""
        pubsub = self._pubsub
        conn = None if pubsub is None else pubsub.connection
        if not names or conn is None:
            return
        live = self.keys.live
        todo = [live(n) for n in names]
        packed = b"".join(
            pack_command((command, *todo[i:i + SUBSCRIBE_BATCH]))
            for i in range(0, len(todo), SUBSCRIBE_BATCH))
        task = asyncio.create_task(self._write(conn, command, packed, len(names)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _write(self, conn: Any, command: str, packed: bytes, count: int) -> None:
        try:
            await conn.send_packed_command(packed, check_health=False)
        except Exception as exc:
            self.log.warning("redis %s failed channels=%d error=%r", command.lower(), count,
                             exc)

    async def probe(self, timeout: float) -> bool:
        self._probe_seen.clear()
        try:
            async with _unavailable():
                await self.broker.redis.publish(self._probe_channel, str(time.time()))
        except BrokerUnavailable as exc:
            self.log.warning("pubsub probe failed error=%r", exc)
            return False
        return await wait_event(self._probe_seen, timeout)

    def reconnect(self) -> None:
        self._wake.wake()  # the reader drops this connection now and reconnects

    async def _read_loop(self) -> None:
        delay = 0.1
        keys = self.keys
        live_prefix = keys.live_prefix()
        channel_of_live = keys.channel_of_live
        listener = self.listener
        on_publication = listener.on_publication
        pace = listener.pace
        probe_channel = self._probe_channel
        wake = self._wake
        wake.task = asyncio.current_task()
        while not self._closing:
            pubsub = self._pubsub = self.broker._pubsub_factory()
            error: Exception
            try:
                names = list(self.channels)
                await pubsub.subscribe(self._probe_channel, *(keys.live(n) for n in names))
                self._connected.set()
                listener.on_connected(len(names))
                read = pubsub_reader(pubsub)
                while True:
                    reply = await read()
                    delay = 0.1
                    hold = pace()
                    if hold > 0:  # the listener's flushes are expensive: let more gather
                        await asyncio.sleep(hold)
                    kind = reply[0] if isinstance(reply, list) and len(reply) == 3 else None
                    if kind == "message":
                        ch: str = reply[1]
                        data: str = reply[2]
                    elif kind == "subscribe":  # a storm's new channels: thousands of them
                        if reply[1].startswith(live_prefix):
                            listener.on_subscribed(channel_of_live(reply[1]))
                        continue
                    elif kind == "unsubscribe":
                        continue
                    else:  # anything else (a pong, another kind of reply): redis-py decides
                        msg = await pubsub.handle_message(reply, ignore_subscribe_messages=False)
                        if msg is None:
                            continue
                        ch = msg["channel"]
                        if msg["type"] != "message":
                            if msg["type"] == "subscribe" and ch.startswith(live_prefix):
                                listener.on_subscribed(channel_of_live(ch))
                            continue
                        data = msg["data"]
                    if ch.startswith(live_prefix):
                        for pub in decode_live(channel_of_live(ch), data):
                            on_publication(pub)
                    elif ch == probe_channel:
                        self._probe_seen.set()
            except asyncio.CancelledError:
                if not wake.woken(self._closing):
                    raise
                error = ConnectionError("liveness probe failed")
            except Exception as exc:
                error = exc
            self._connected.clear()
            listener.on_lost(error, delay)
            try:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                self._pubsub = None
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if not wake.woken(self._closing):
                    raise
            delay = min(delay * 2, 5.0)


class ReaderWake:
    """Wakes a pub/sub reader blocked in a read (no per-read timeout, no polling): `wake`
    cancels its task; the reader, catching the CancelledError, asks `woken` whether that
    was this wake (then it drops its connection and reconnects) or a real cancellation."""

    __slots__ = ("_pending", "task")

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self._pending = False

    def wake(self) -> None:
        task = self.task
        if task is None or task.done() or self._pending:
            return
        self._pending = True
        task.cancel()

    def woken(self, closing: bool) -> bool:
        """In the reader's `except CancelledError`: True if the cancellation was `wake`'s
        (and it is undone), False if it must propagate."""
        if closing or not self._pending:
            return False
        self._pending = False
        task = self.task
        if task is not None:
            task.uncancel()
        return True


async def run_scripts(
    client: Redis | RedisCluster, name: str, sha: str,
    calls: Sequence[tuple[list[str], list[Any]]], log: logging.Logger, attempts: int = 2,
) -> list[Any]:
    """Each call as EVALSHA of script `name` (lua/<name>.lua, `sha`), all in one
    non-transactional pipeline (a cluster's: redis-py sends each node its calls at once).
    Calls answered NOSCRIPT ran nothing (a restarted server, or a promoted replica: SCRIPT
    LOAD is not replicated): the script is loaded (a cluster's `script_load` goes to every
    master) and they are sent again, up to `attempts` sends in all. The replies in call
    order, errors as values (a NoScriptError where the last send still got one)."""
    out: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(attempts):
        pipe = client.pipeline(transaction=False)
        for i in todo:
            keys, args = calls[i]
            pipe.evalsha(sha, len(keys), *keys, *args)
        raw = await pipe.execute(raise_on_error=False)
        again = []
        for i, reply in zip(todo, raw, strict=True):
            out[i] = reply
            if isinstance(reply, NoScriptError):
                again.append(i)
        if not again or attempt == attempts - 1:
            break
        log.info("script not on the server: loading it script=%s calls=%d", name, len(again))
        sha = await client.script_load(source(name))
        todo = again
    return out


def pubsub_reader(pubsub: PubSub) -> Callable[[], Awaitable[Any]]:
    """The next reply of a subscribed pub/sub connection, read straight from its parser:
    no per-read timer (blocks until a reply), no retry wrapper, no per-message telemetry
    or handler lookup (`PubSub.get_message` does all that per message). A broken
    connection raises (ConnectionError) rather than reconnecting behind the caller's back:
    the caller resubscribes and reports the loss. A `-ERR`/`-MOVED` reply raises
    ResponseError, as `get_message` would."""
    conn = pubsub.connection
    if conn is None:
        raise ConnectionError("pubsub not connected")
    read_response = conn.read_response

    def read() -> Awaitable[Any]:
        return read_response(timeout=math.inf, disconnect_on_error=False, push_request=True)

    return read


def _text(value: str | bytes | int) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def _as_sent(response: Any, **options: Any) -> Any:
    return response
