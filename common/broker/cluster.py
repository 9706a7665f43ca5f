"""The broker on Redis Cluster (or a Valkey cluster): the same scripts as RedisBroker, each
run on its channel's slot, and sharded pub/sub (SPUBLISH/SSUBSCRIBE) for live messages.

Client: redis-py's asyncio `RedisCluster` for commands and scripts. It routes by key slot,
follows MOVED/ASK (and refreshes its slot table after a failover), and `SCRIPT LOAD` goes
to every master. What it lacks here, and how it is covered:

- A script run in a pipeline that gets NOSCRIPT (a promoted replica has an empty script
  cache: script loads are not replicated) is not reloaded by redis-py; `publish` reloads
  the script on every master and runs exactly the commands that got NOSCRIPT again, in
  their order (NOSCRIPT means the script did not run).
- Its `ClusterPubSub` moves shard channels between nodes itself, without telling the
  caller when a channel was resubscribed: the edge would miss what was published in
  between. `ClusterLive` below therefore keeps one plain pub/sub connection per shard
  master, maps channels to shards from CLUSTER SLOTS, and reports every (re)subscription
  to the listener (`on_subscribed`), which gap-fills the channel from its stream.

All keys of one call share the channel's hash tag (keys.py), the live channel too, so
publish.lua's SPUBLISH stays in the script's slot; the leader lease and fence of a feed
share the feed's tag. Reads (history, snapshots) go to the channel's master: the client
is made without `read_from_replicas`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError

from common.aio import wait_event
from common.broker.base import LiveListener
from common.broker.keys import Keys
from common.broker.live import decode_live
from common.broker.redisbroker import (
    ReaderWake,
    RedisBroker,
    _as_sent,
    _text,
    _unavailable,
    pubsub_reader,
    run_scripts,
)
from common.broker.scripts import Script, group_publishes, publish_call
from common.broker.types import (
    BrokerUnavailable,
    Fence,
    PublishReply,
    PublishRequest,
    PublishStatus,
    new_epoch,
)
from common.config import CLUSTER_SCHEMES, RedisSettings, cluster_seeds

SLOTS = 16384
RECONCILE_INTERVAL = 5.0  # s between slot-table checks without a reason (a node added)
NOSCRIPT_RETRIES = 3


def cluster_client(settings: RedisSettings, **kwargs: Any) -> RedisCluster:
    """A RedisCluster client of the seed nodes in `settings.url`."""
    parts = urlsplit(settings.url)
    if parts.username:
        kwargs.setdefault("username", unquote(parts.username))
    if parts.password:
        kwargs.setdefault("password", unquote(parts.password))
    if parts.scheme in ("rediss", "rediss+cluster"):
        kwargs.setdefault("ssl", True)
    nodes = [ClusterNode(host, port) for host, port in cluster_seeds(settings.url)]
    return RedisCluster(startup_nodes=nodes, decode_responses=True,
                        max_connections=settings.max_connections, **kwargs)


class RedisClusterBroker(RedisBroker):
    """The broker on one RedisCluster client (decode_responses=True)."""

    def __init__(
        self,
        cluster: RedisCluster,
        keys: Keys | None = None,
        *,
        inline_history: int = 100,
        logger: logging.Logger | None = None,
        owned: Sequence[RedisCluster] = (),
        node_kwargs: dict[str, Any] | None = None,
    ) -> None:
        # XRANGE replies as sent (RedisBroker._read_range); nothing else reads streams here.
        cluster.set_response_callback("XRANGE", _as_sent)
        super().__init__(cluster, keys, inline_history=inline_history, logger=logger,
                         ranges=cluster)
        self.cluster = cluster
        self._cluster_owned = list(owned)
        # Connection options of the per-shard pub/sub connections (credentials, TLS).
        self.node_kwargs = dict(node_kwargs or {})

    @classmethod
    def from_cluster_settings(
        cls, settings: RedisSettings, *, socket_timeout: float,
        logger: logging.Logger | None = None,
    ) -> RedisClusterBroker:
        parts = urlsplit(settings.url)
        node_kwargs: dict[str, Any] = {}
        if parts.username:
            node_kwargs["username"] = unquote(parts.username)
        if parts.password:
            node_kwargs["password"] = unquote(parts.password)
        if parts.scheme in ("rediss", *CLUSTER_SCHEMES[1:]):
            node_kwargs["ssl"] = True
        client = cluster_client(settings, socket_timeout=socket_timeout,
                                socket_connect_timeout=5.0)
        return cls(client, Keys(settings.key_prefix), logger=logger, owned=[client],
                   node_kwargs=node_kwargs)

    async def close(self) -> None:
        for client in self._cluster_owned:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def ping(self) -> bool:
        async with _unavailable():
            return bool(await self.cluster.ping())

    async def publish(
        self, batch: Sequence[PublishRequest], fence: Fence | None = None, *,
        meta_ttl: int, idempotency_ttl: int,
    ) -> list[PublishReply]:
        """One publish.lua call per channel (`group_publishes`; a call's keys are in one
        slot), all in one pipeline: redis-py's ClusterPipeline sends each node its commands
        at once, in order (a channel's calls, all on one slot, keep theirs), to every node
        concurrently (a task per node, gathered: a slow master delays only its own
        channels' replies, test_cluster.py checks it), and then sends the commands that got
        MOVED/ASK again one by one, in order. A
        promoted replica has no scripts (SCRIPT LOAD is not replicated): the calls that got
        NOSCRIPT, which ran nothing, are sent again after loading it on every master."""
        epoch = new_epoch()
        calls = group_publishes(batch)
        args = [publish_call(self.keys, call, batch, epoch, fence, meta_ttl=meta_ttl,
                             idempotency_ttl=idempotency_ttl, sharded=True) for call in calls]
        async with _unavailable():
            raw = await run_scripts(self.cluster, "publish", self._publish.sha, args, self.log,
                                    attempts=NOSCRIPT_RETRIES)
        replies: list[PublishReply | None] = [None] * len(batch)
        for call, reply in zip(calls, raw, strict=True):
            if isinstance(reply, NoScriptError):
                raise BrokerUnavailable("NOSCRIPT after loading the publish script")
            if isinstance(reply, BaseException):
                raise BrokerUnavailable(repr(reply))
            for j, i in enumerate(call.indexes):
                replies[i] = PublishReply(int(reply[3 * j]), _text(reply[3 * j + 1]),
                                          PublishStatus(int(reply[3 * j + 2])))
        assert all(r is not None for r in replies)
        return replies  # type: ignore[return-value]

    async def _run_calls(
        self, script: Script, calls: Sequence[tuple[list[str], list[Any]]]
    ) -> list[Any]:
        """redis-py's cluster pipeline: it sends each node its calls at once."""
        return await run_scripts(self.cluster, script.name, script.sha, calls, self.log)

    def live(self, listener: LiveListener, node_id: str) -> ClusterLive:  # type: ignore[override]
        return ClusterLive(self, listener, node_id)


class _Shard:
    """One sharded pub/sub connection to one master (`address`, "host:port")."""

    def __init__(self, live: ClusterLive, address: str) -> None:
        self.live = live
        self.address = address
        self.channels: set[str] = set()  # the fanout channels routed here
        self.probe_channel = ""  # a probe channel in one of this master's slots
        self.probe_seen = asyncio.Event()
        self.pubsub: PubSub | None = None
        self.client: Redis | None = None
        self.connected = asyncio.Event()
        self.closing = False
        self.wake = ReaderWake()  # `wake.wake()`: drop the connection now, reconnect
        self.task: asyncio.Task[None] = asyncio.create_task(
            self._run(), name=f"broker-live-shard-{address}")
        self.wake.task = self.task

    async def close(self) -> None:
        self.closing = True
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self.task
        await self._drop()

    async def _drop(self) -> None:
        self.connected.clear()
        pubsub, client, self.pubsub, self.client = self.pubsub, self.client, None, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def send(self, command: str, channel: str) -> None:
        """SSUBSCRIBE or SUNSUBSCRIBE one live channel (one slot per command)."""
        pubsub = self.pubsub
        if pubsub is None or not self.connected.is_set():
            return  # sent with the others as the connection comes up
        try:
            if command == "SSUBSCRIBE":
                await pubsub.ssubscribe(channel)
            else:
                await pubsub.sunsubscribe(channel)
        except Exception as exc:  # the reader notices a broken connection
            self.live.log.warning("redis %s failed shard=%s error=%r",
                                  command.lower(), self.address, exc)

    async def _run(self) -> None:
        live = self.live
        listener = live.listener
        keys = live.keys
        live_prefix = keys.live_prefix()
        channel_of_live = keys.channel_of_live
        on_publication = listener.on_publication
        pace = listener.pace
        delay = 0.1
        host, _, port = self.address.rpartition(":")
        while not self.closing:
            error: Exception
            try:
                self.client = Redis(host=host, port=int(port), decode_responses=True,
                                    socket_connect_timeout=5.0, socket_keepalive=True,
                                    retry=Retry(NoBackoff(), 0),
                                    **live.broker.node_kwargs)
                pubsub = self.pubsub = self.client.pubsub()
                if self.probe_channel:
                    await pubsub.ssubscribe(self.probe_channel)
                sent: set[str] = set()
                while todo := self.channels - sent:  # channels routed here meanwhile too
                    for name in todo:
                        sent.add(name)
                        await pubsub.ssubscribe(keys.live(name))
                names = sent
                self.connected.set()
                listener.on_connected(len(names))
                read = pubsub_reader(pubsub)
                while True:
                    try:
                        reply = await read()
                    except ResponseError as exc:  # MOVED for an SSUBSCRIBE: not ours
                        live.on_redirect(self, str(exc))
                        continue
                    delay = 0.1
                    hold = pace()
                    if hold > 0:  # as RedisLive: the listener's flushes are expensive
                        await asyncio.sleep(hold)
                    if isinstance(reply, list) and len(reply) == 3 and reply[0] == "smessage":
                        ch: str = reply[1]
                        if ch.startswith(live_prefix):
                            for pub in decode_live(channel_of_live(ch), reply[2]):
                                on_publication(pub)
                        elif ch == self.probe_channel:
                            self.probe_seen.set()
                        continue
                    # Confirmations (rare): redis-py's own handling keeps its bookkeeping.
                    msg = await pubsub.handle_message(reply, ignore_subscribe_messages=False)  # type: ignore[no-untyped-call]
                    if msg is None:
                        continue
                    kind = msg["type"]
                    ch = msg["channel"]
                    if kind == "ssubscribe" and ch.startswith(live_prefix):
                        name = channel_of_live(ch)
                        if name in self.channels:
                            listener.on_subscribed(name)
                    elif kind == "sunsubscribe" and ch.startswith(live_prefix):
                        name = channel_of_live(ch)
                        if name in self.channels and not live.unsubscribing(name):
                            # Not asked for: the slot moved to another master.
                            live.on_moved_away(self, name)
            except asyncio.CancelledError:
                if not self.wake.woken(self.closing):
                    raise
                error = ConnectionError("liveness probe failed")
            except Exception as exc:
                error = exc
            self.connected.clear()
            if self.closing:
                return
            listener.on_lost(error, delay)
            try:
                await self._drop()
                live.on_shard_lost(self)
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                if not self.wake.woken(self.closing):
                    raise
            delay = min(delay * 2, 1.0)


class ClusterLive:
    """Sharded pub/sub over every master: one connection each (`_Shard`), channels routed
    by the slot of their live channel, following topology changes:

    - a connection lost (a master failed, or a probe failed): its channels are routed
      again from a fresh slot table (a failed-over master's channels go to the promoted
      replica) once the cluster has one;
    - `sunsubscribe` pushed by the server (the slot migrated away) or MOVED in reply to an
      SSUBSCRIBE: the channel is routed again (to the address MOVED names, or from a fresh
      table);
    - every RECONCILE_INTERVAL s the slot table is read again (a node added, slots moved
      while a connection missed it).

    Each (re)subscription is confirmed to the listener with `on_subscribed`, which
    gap-fills the channel from its stream (the contract of `LiveListener`)."""

    def __init__(self, broker: RedisClusterBroker, listener: LiveListener, node_id: str) -> None:
        self.broker = broker
        self.keys = broker.keys
        self.listener = listener
        self.log = broker.log
        self.node_id = node_id
        self.channels: set[str] = set()
        self.slots: list[str | None] = [None] * SLOTS
        self.shards: dict[str, _Shard] = {}
        self.route: dict[str, _Shard] = {}  # channel -> the shard it is subscribed on
        self._slot_of: dict[str, int] = {}
        self._pending_unsub: set[str] = set()
        self._wake = asyncio.Event()
        self._ready = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    # --- the Live interface ---------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._ready.is_set() and bool(self.shards) and all(
            s.connected.is_set() for s in self.shards.values())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reconcile_loop(), name="broker-live-topology")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for shard in list(self.shards.values()):
            await shard.close()
        self.shards.clear()

    async def wait_connected(self) -> None:
        while not self.connected:
            await self._ready.wait()
            for shard in list(self.shards.values()):
                await shard.connected.wait()

    async def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        self._pending_unsub.discard(channel)
        shard = self.route.get(channel)
        if shard is not None:
            await shard.send("SSUBSCRIBE", self.keys.live(channel))
            return
        shard = self._shard_for(channel)
        if shard is None:
            self._wake.set()  # no slot table yet: the topology loop routes it
            return
        self._assign(channel, shard)
        await shard.send("SSUBSCRIBE", self.keys.live(channel))

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        shard = self.route.pop(channel, None)
        if shard is None:
            return
        shard.channels.discard(channel)
        self._pending_unsub.add(channel)
        self._spawn(self._unsubscribe(shard, channel))

    async def _unsubscribe(self, shard: _Shard, channel: str) -> None:
        try:
            if channel not in self.channels:
                await shard.send("SUNSUBSCRIBE", self.keys.live(channel))
        finally:
            # The confirmation comes on the reader; a moment later it no longer matters.
            await asyncio.sleep(1.0)
            if channel not in self.channels:
                self._pending_unsub.discard(channel)

    def unsubscribing(self, channel: str) -> bool:
        return channel in self._pending_unsub

    async def probe(self, timeout: float) -> bool:
        """SPUBLISH to each shard connection's probe channel (routed by slot to that
        master) and expect every one back within `timeout`."""
        shards = [s for s in self.shards.values() if s.probe_channel]
        if not shards or not self.connected:
            return False
        for shard in shards:
            shard.probe_seen.clear()
        try:
            async with _unavailable():
                for shard in shards:
                    await self.broker.cluster.spublish(shard.probe_channel, str(time.time()))
        except BrokerUnavailable as exc:
            self.log.warning("pubsub probe failed error=%r", exc)
            return False
        seen = await asyncio.gather(*(wait_event(s.probe_seen, timeout) for s in shards))
        for shard, ok in zip(shards, seen, strict=True):
            if not ok:
                self.log.warning("pubsub probe not seen shard=%s", shard.address)
        return all(seen)

    def reconnect(self) -> None:
        for shard in self.shards.values():
            if not shard.probe_seen.is_set():
                shard.wake.wake()

    # --- topology -------------------------------------------------------------------------

    def _slot(self, channel: str) -> int:
        slot = self._slot_of.get(channel)
        if slot is None:
            slot = self._slot_of[channel] = key_slot(self.keys.live(channel).encode())
        return slot

    def _shard_for(self, channel: str) -> _Shard | None:
        address = self.slots[self._slot(channel)]
        return None if address is None else self.shards.get(address)

    def _assign(self, channel: str, shard: _Shard) -> None:
        self.route[channel] = shard
        shard.channels.add(channel)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def on_shard_lost(self, shard: _Shard) -> None:
        """A shard connection broke: its master may have failed over."""
        self._wake.set()

    def on_moved_away(self, shard: _Shard, channel: str) -> None:
        self.log.info("live channel moved away channel=%s shard=%s", channel, shard.address)
        self.route.pop(channel, None)
        shard.channels.discard(channel)
        self._wake.set()

    def on_redirect(self, shard: _Shard, error: str) -> None:
        """MOVED <slot> <host:port> (or ASK) in reply to an SSUBSCRIBE."""
        parts = error.split()
        if len(parts) == 3 and parts[0] in ("MOVED", "ASK") and parts[1].isdigit():
            slot, address = int(parts[1]), parts[2]
            if parts[0] == "MOVED":
                self.slots[slot] = address
            for name in [n for n in shard.channels if self._slot(n) == slot]:
                self.route.pop(name, None)
                shard.channels.discard(name)
            self.log.info("live channel redirected slot=%d to=%s", slot, address)
        else:
            self.log.warning("redis sharded pub/sub error shard=%s error=%s",
                             shard.address, error)
        self._wake.set()

    async def _read_slots(self) -> list[str | None] | None:
        """The slot table (slot -> master address) from the first node that answers:
        the known masters first, then the seeds."""
        candidates = list(self.shards) + [
            f"{n.host}:{n.port}" for n in self.broker.cluster.get_nodes()]
        seeds = [f"{n.host}:{n.port}"
                 for n in self.broker.cluster.nodes_manager.startup_nodes.values()]
        for address in dict.fromkeys(candidates + seeds):
            host, _, port = address.rpartition(":")
            client = Redis(host=host, port=int(port), decode_responses=True,
                           socket_connect_timeout=1.0, socket_timeout=2.0,
                           **self.broker.node_kwargs)
            try:
                ranges = await client.execute_command(  # type: ignore[no-untyped-call]
                    "CLUSTER SLOTS")
            except (RedisError, OSError):
                continue
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()
            table: list[str | None] = [None] * SLOTS
            for item in ranges:
                lo, hi, master = int(item[0]), int(item[1]), item[2]
                owner = f"{_text(master[0])}:{int(master[1])}"
                for slot in range(lo, hi + 1):
                    table[slot] = owner
            return table
        return None

    async def _reconcile_loop(self) -> None:
        delay = 0.1
        while not self._closing:
            self._wake.clear()
            try:
                await self._reconcile()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.warning("live topology check failed error=%r", exc)
                delay = min(delay * 2, 2.0)
            # Sooner while a shard is down: its master may be failing over.
            interval = RECONCILE_INTERVAL if self.connected else 0.5
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            await asyncio.sleep(delay)  # at most ~10 topology reads a second

    async def _reconcile(self) -> None:
        table = await self._read_slots()
        if table is None:
            raise ConnectionError("no cluster node answered CLUSTER SLOTS")
        # A node's view may lag a MOVED just seen; a MOVED that is wrong is corrected by
        # the next MOVED or the next read.
        self.slots = table
        masters = {a for a in table if a is not None}
        for address in masters - set(self.shards):
            self.shards[address] = _Shard(self, address)
        for address in set(self.shards) - masters:
            shard = self.shards.pop(address)
            for name in shard.channels:
                self.route.pop(name, None)
            self.log.info("live shard gone shard=%s channels=%d", address, len(shard.channels))
            self._spawn(shard.close())
        for address, shard in self.shards.items():
            slots = [s for s, a in enumerate(table) if a == address]
            if not shard.probe_channel or key_slot(shard.probe_channel.encode()) not in slots:
                shard.probe_channel = self._probe_channel(set(slots))
                self._spawn(shard.send("SSUBSCRIBE", shard.probe_channel))
        moves: list[tuple[_Shard, str]] = []
        for name in self.channels:
            target = self._shard_for(name)
            current = self.route.get(name)
            if target is None or target is current:
                continue
            if current is not None:
                current.channels.discard(name)
                self._spawn(current.send("SUNSUBSCRIBE", self.keys.live(name)))
            self._assign(name, target)
            moves.append((target, name))
        if moves:
            self.log.info("live channels routed to new shards channels=%d", len(moves))
        for shard, name in moves:
            await shard.send("SSUBSCRIBE", self.keys.live(name))
        self._ready.set()

    def _probe_channel(self, slots: set[int]) -> str:
        """A probe channel of this node in one of `slots`."""
        for i in range(SLOTS * 8):
            name = self.keys.shard_probe(self.node_id, i)
            if key_slot(name.encode()) in slots:
                return name
        raise RuntimeError("no probe channel found for a shard")
