"""fanout on a real 3-master + 3-replica Valkey cluster (tests/integration/conftest.py's
`redis_cluster`): edges subscribed to channels on every shard while a publisher keeps
publishing, through a master's failover (kill -9) and through resharding (the slots of
live channels migrated to another master). Every client's offsets must be contiguous
with no duplicate, up to the last one published, or broken only by an explicit resync.

Run `pytest -s tests/integration/test_cluster.py` to see the measured times to resume.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from common.broker.cluster import ClusterLive, RedisClusterBroker
from common.broker.keys import Keys
from fanout.embedded import EmbeddedValkeyCluster
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import ClusterServer, EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

PER_SHARD = 2  # channels per master
CLIENTS_PER_EDGE = 3
CROWD = int(os.environ.get("CLUSTER_TEST_CROWD", "500"))  # clients of the node-added test


@dataclass
class Load:
    """A publisher that keeps publishing one message to every channel per batch, retrying
    a batch the cluster did not take (a failover in progress)."""

    publisher: Publisher
    channels: list[str]
    last: dict[str, int] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)  # the epoch of `last`
    failures: list[float] = field(default_factory=list)  # monotonic times of failed batches
    # monotonic times of each successful batch (to measure the time to resume)
    successes: list[float] = field(default_factory=list)
    running: bool = True
    # Cleared: the load stops between batches (`hold`) until set again.
    go: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.go.set()

    async def hold(self) -> None:
        """Stop publishing after the batch under way (if any) is done."""
        self.go.clear()
        await asyncio.wait_for(self.idle.wait(), 30)

    async def run(self) -> None:
        i = 0
        while self.running:
            if not self.go.is_set():
                self.idle.set()
                await self.go.wait()
                self.idle.clear()
            batch = [UpstreamMessage(ch, {"i": i}) for ch in self.channels]
            try:
                results = await asyncio.wait_for(self.publisher.publish_batch(batch), 10)
            except Exception:
                self.failures.append(time.monotonic())
                await asyncio.sleep(0.05)
                continue
            for r in results:
                self.last[r.channel] = r.offset
                self.epochs[r.channel] = r.epoch
            self.successes.append(time.monotonic())
            i += 1
            await asyncio.sleep(0.005)

    def resumed_after(self, moment: float) -> float:
        """From `moment` to the first batch taken after the last one that failed."""
        last_failure = max([t for t in self.failures if t > moment], default=moment)
        later = [t for t in self.successes if t > last_failure]
        assert later, "publishing never resumed"
        return later[0] - moment


def reached(client: ProtoClient, marks: dict[str, int]) -> bool:
    """The client has got past `marks` (channel -> offset) on every channel of it."""
    return all(client.positions.get(ch, (0, ""))[0] > mark for ch, mark in marks.items())


def check_offsets(client: ProtoClient, channel: str, last: int) -> int:
    """Contiguous, no duplicate, from the subscribe's offset to `last`, except where a
    resync (an epoch change: the new master had lost acknowledged writes) restarts the
    sequence. The number of resyncs."""
    pos: int | None = None
    resyncs = 0
    for m in client.messages:
        if m.get("channel") != channel:
            continue
        kind = m.get("type")
        if kind == "subscribed":
            pos = m["offset"]
        elif kind == "resync":
            pos = m["offset"]
            resyncs += 1
        elif kind == "pub":
            assert pos is not None
            assert m["offset"] == pos + 1, (
                f"{channel}: offset {m['offset']} after {pos} (resyncs {resyncs})")
            pos = m["offset"]
    assert pos == last, f"{channel}: ended at {pos}, last published {last}"
    return resyncs


def spread_channels(cluster: EmbeddedValkeyCluster, keys: Keys) -> list[str]:
    """PER_SHARD account channels on every master."""
    by_master: dict[int, list[str]] = {m: [] for m in cluster.masters()}
    i = 0
    tag = os.urandom(3).hex()
    while any(len(v) < PER_SHARD for v in by_master.values()):
        name = f"account.P{tag}x{i}.orders"
        i += 1
        owner = cluster.master_of(keys.meta(name))
        if len(by_master[owner]) < PER_SHARD:
            by_master[owner].append(name)
    return [ch for names in by_master.values() for ch in names]


@pytest.fixture
def embedded(redis_cluster: ClusterServer) -> EmbeddedValkeyCluster:
    if redis_cluster.embedded is None:
        pytest.skip("REDIS_CLUSTER_URL: these tests kill nodes and move slots")
    return redis_cluster.embedded


@pytest.fixture
async def cluster_publisher(
    redis_cluster: ClusterServer, key_prefix: str
) -> AsyncIterator[Publisher]:
    broker = RedisClusterBroker.from_cluster_settings(
        redis_cluster.settings(key_prefix), socket_timeout=5.0)
    yield Publisher(broker)
    await broker.close()


async def start_edges(
    edge_factory: EdgeFactory, redis_cluster: ClusterServer, key_prefix: str
) -> list[EdgeServer]:
    settings = redis_cluster.settings(key_prefix)
    # No per-address limit: every test client comes from 127.0.0.1.
    return [await edge_factory(redis=settings, max_connections_per_ip=0)
            for _ in range(2)]


async def subscribe_all(edges: list[EdgeServer], channels: list[str]) -> list[ProtoClient]:
    clients = []
    for edge in edges:
        for _ in range(CLIENTS_PER_EDGE):
            client = await ProtoClient.open(edge.url)
            for ch in channels:
                reply = await client.subscribe(ch)
                assert reply["type"] == "subscribed", reply
            clients.append(client)
    return clients


async def finish(load: Load, task: asyncio.Task[None], clients: list[ProtoClient],
                 channels: list[str]) -> int:
    """Stop publishing, wait for every client to reach the last offsets, check them all;
    the number of resyncs seen."""
    load.running = False
    await task
    for client in clients:
        last = {ch: load.last[ch] - 1 for ch in channels}
        await client.wait_for(functools.partial(reached, client, last), 30)
    resyncs = sum(check_offsets(c, ch, load.last[ch]) for c in clients for ch in channels)
    for client in clients:
        assert not client.closed.done(), client.closed
        await client.close()
    return resyncs


async def test_channels_on_every_shard_reach_every_edge(
    redis_cluster: ClusterServer, edge_factory: EdgeFactory, cluster_publisher: Publisher,
    key_prefix: str, embedded: EmbeddedValkeyCluster,
) -> None:
    channels = spread_channels(embedded, Keys(key_prefix))
    edges = await start_edges(edge_factory, redis_cluster, key_prefix)
    clients = await subscribe_all(edges, channels)
    load = Load(cluster_publisher, channels)
    task = asyncio.create_task(load.run())
    await asyncio.sleep(0.5)
    assert await finish(load, task, clients, channels) == 0
    assert all(load.last[ch] > 10 for ch in channels)
    for edge in edges:  # one sharded pub/sub connection per master
        live = edge.edge.hub.live  # type: ignore[union-attr]
        assert isinstance(live, ClusterLive) and len(live.shards) == len(embedded.masters())


async def test_master_failover_under_load(
    redis_cluster: ClusterServer, edge_factory: EdgeFactory, cluster_publisher: Publisher,
    key_prefix: str, embedded: EmbeddedValkeyCluster,
) -> None:
    keys = Keys(key_prefix)
    channels = spread_channels(embedded, keys)
    edges = await start_edges(edge_factory, redis_cluster, key_prefix)
    clients = await subscribe_all(edges, channels)
    load = Load(cluster_publisher, channels)
    task = asyncio.create_task(load.run())
    await clients[0].wait_for(lambda: len(clients[0].offsets.get(channels[0], [])) > 20)
    victim = embedded.master_of(keys.meta(channels[0]))
    on_victim = [ch for ch in channels if embedded.master_of(keys.meta(ch)) == victim]
    killed_at = time.monotonic()
    embedded.kill(victim)
    await asyncio.to_thread(embedded.wait_healthy, 60.0)
    failed_over = time.monotonic() - killed_at
    assert victim not in embedded.masters()
    # Publishing resumes; every client gets new messages of the failed-over channels.
    marks = {ch: load.last[ch] for ch in on_victim}
    for client in clients:
        await client.wait_for(functools.partial(reached, client, marks), 30)
    delivered = time.monotonic() - killed_at
    resumed = load.resumed_after(killed_at)
    resyncs = await finish(load, task, clients, channels)
    print(f"\nfailover: cluster healthy after {failed_over:.2f} s, publishing resumed "
          f"{resumed:.2f} s, every client had new messages {delivered:.2f} s after the kill; "
          f"failed batches {len(load.failures)}, resyncs {resyncs}")


async def test_resharding_under_load(
    redis_cluster: ClusterServer, edge_factory: EdgeFactory, cluster_publisher: Publisher,
    key_prefix: str, embedded: EmbeddedValkeyCluster,
) -> None:
    keys = Keys(key_prefix)
    channels = spread_channels(embedded, keys)
    edges = await start_edges(edge_factory, redis_cluster, key_prefix)
    clients = await subscribe_all(edges, channels)
    load = Load(cluster_publisher, channels)
    task = asyncio.create_task(load.run())
    await clients[0].wait_for(lambda: len(clients[0].offsets.get(channels[0], [])) > 20)
    masters = embedded.masters()
    # One channel of each master goes to the next master.
    moved = channels[::PER_SHARD]
    for ch in moved:
        src = embedded.master_of(keys.meta(ch))
        dest = masters[(masters.index(src) + 1) % len(masters)]
        before = load.last[ch]
        await asyncio.to_thread(embedded.migrate_slot, embedded.keyslot(keys.meta(ch)), dest)
        assert embedded.master_of(keys.meta(ch)) == dest
        for client in clients:
            await client.wait_for(functools.partial(reached, client, {ch: before + 5}), 30)
    await asyncio.to_thread(embedded.wait_healthy, 60.0)
    resyncs = await finish(load, task, clients, channels)
    assert resyncs == 0  # a migration loses nothing
    print(f"\nresharding: {len(moved)} channels' slots moved, failed batches "
          f"{len(load.failures)}, resyncs {resyncs}")


async def test_a_node_added_and_slots_rebalanced_while_clients_stay_subscribed(
    redis_cluster: ClusterServer, edge_factory: EdgeFactory, cluster_publisher: Publisher,
    key_prefix: str, embedded: EmbeddedValkeyCluster,
) -> None:
    keys = Keys(key_prefix)
    channels = spread_channels(embedded, keys)
    edges = await start_edges(edge_factory, redis_cluster, key_prefix)
    # Many clients: 3 per edge on every channel, and CROWD more on one channel each.
    clients = await subscribe_all(edges, channels)
    crowd: list[ProtoClient] = []
    for i in range(CROWD):
        client = await ProtoClient.open(edges[i % 2].url)
        reply = await client.subscribe(channels[i % len(channels)])
        assert reply["type"] == "subscribed", reply
        crowd.append(client)
    load = Load(cluster_publisher, channels)
    task = asyncio.create_task(load.run())
    await clients[0].wait_for(lambda: len(clients[0].offsets.get(channels[0], [])) > 20)
    old = embedded.masters()
    new = await asyncio.to_thread(embedded.add_node)
    # Rebalance: one channel's slot of every old master moves to the new one.
    moved = channels[::PER_SHARD]
    origin = {ch: embedded.master_of(keys.meta(ch)) for ch in moved}
    for ch in moved:
        await asyncio.to_thread(embedded.migrate_slot, embedded.keyslot(keys.meta(ch)), new)
    await asyncio.to_thread(embedded.wait_healthy, 60.0)
    assert set(embedded.masters()) == {*old, new}
    marks = {ch: load.last[ch] for ch in moved}
    for client in clients:
        await client.wait_for(functools.partial(reached, client, marks), 30)
    for edge in edges:
        live = edge.edge.hub.live  # type: ignore[union-attr]
        assert isinstance(live, ClusterLive) and len(live.shards) == 4
    resyncs = await finish(load, task, clients, channels)
    for i, client in enumerate(crowd):
        ch = channels[i % len(channels)]
        await client.wait_for(
            functools.partial(reached, client, {ch: load.last[ch] - 1}), 30)
        resyncs += check_offsets(client, ch, load.last[ch])
        assert not client.closed.done(), client.closed
        await client.close()
    assert resyncs == 0
    # Back to three shards for the other tests (the new node stays, empty).
    for ch in moved:
        await asyncio.to_thread(embedded.migrate_slot, embedded.keyslot(keys.meta(ch)),
                                origin[ch])
    await asyncio.to_thread(embedded.wait_healthy, 60.0)


def walk(client: ProtoClient, channel: str) -> tuple[int, list[tuple[str, int, object]]]:
    """The client's resyncs of `channel`, and the publications it got after the last
    one (or after its subscribe if none): (epoch, offset, data)."""
    resyncs = 0
    epoch = ""
    tail: list[tuple[str, int, object]] = []
    for m in client.messages:
        if m.get("channel") != channel:
            continue
        kind = m.get("type")
        if kind in ("subscribed", "resync"):
            epoch = m["epoch"]
            tail = []
            resyncs += kind == "resync"
        elif kind == "pub":
            tail.append((epoch, m["offset"], m["data"]))
    return resyncs, tail


@pytest.mark.parametrize("publisher_after", ["same", "new"])
async def test_failover_that_loses_acknowledged_writes(
    redis_cluster: ClusterServer, edge_factory: EdgeFactory, cluster_publisher: Publisher,
    key_prefix: str, embedded: EmbeddedValkeyCluster, publisher_after: str,
) -> None:
    """A master acknowledges (and the edges deliver) a burst its replica never gets: the
    replica is stopped and its replication link closed. The master is killed, the replica
    resumed and promoted without the burst: the channel's offsets go back in its epoch.
    Every client must get an explicit resync (a reconnecting one `recovered: false`), and
    never a gap or, without a resync, other data under offsets it already has.

    `same`: the publisher that got the burst's offsets goes on (it notices them go back and
    rebases). `new`: another one, which never saw them, goes on (a new ingest leader): only
    the edges, which delivered them, can notice."""
    keys = Keys(key_prefix)
    channels = spread_channels(embedded, keys)
    victim = embedded.master_of(keys.meta(channels[0]))
    on_victim = [ch for ch in channels if embedded.master_of(keys.meta(ch)) == victim]
    replica = embedded.replicas_of(victim)[0]
    edges = await start_edges(edge_factory, redis_cluster, key_prefix)
    clients = await subscribe_all(edges, channels)
    load = Load(cluster_publisher, channels)
    task = asyncio.create_task(load.run())
    await clients[0].wait_for(lambda: len(clients[0].offsets.get(channels[0], [])) > 20)
    # Clients that leave before the failover and come back after it with their position.
    leavers = []
    for edge in edges:
        leaver = await ProtoClient.open(edge.url)
        for ch in on_victim:
            assert (await leaver.subscribe(ch))["type"] == "subscribed"
        leavers.append(leaver)

    # From here on what the victim acknowledges exists only on the victim.
    embedded.pause_node(replica)
    try:
        embedded.call(victim, "CLIENT", "KILL", "TYPE", "replica")
        cut = {ch: load.last[ch] for ch in on_victim}
        burst = 20
        async with asyncio.timeout(30):
            while any(load.last[ch] < cut[ch] + burst for ch in on_victim):
                await asyncio.sleep(0.01)
        acked = {ch: load.last[ch] for ch in on_victim}
        for client in clients + leavers:  # delivered, not only acknowledged
            await client.wait_for(functools.partial(
                reached, client, {ch: acked[ch] - 1 for ch in on_victim}), 30)
        held = [{ch: leaver.positions[ch] for ch in on_victim} for leaver in leavers]
        for leaver in leavers:
            await leaver.close()
        # Held over the failover, so that what the promoted replica lacks can be checked
        # before anything is published on it.
        await load.hold()
        killed_at = time.monotonic()
        embedded.kill(victim)
    finally:
        embedded.resume_node(replica)
    if publisher_after == "new":
        load.publisher = Publisher(cluster_publisher.broker)
    # Automatic failover: the replica is promoted once the masters agree the victim
    # failed (cluster-node-timeout); TAKEOVER only if that does not happen in time.
    how = "automatic"
    try:
        await asyncio.to_thread(
            embedded.wait_until, lambda: embedded.role(replica) == "master", 20.0,
            f"replica {replica} to be promoted")
    except TimeoutError:
        how = "takeover"
        embedded.call(replica, "CLUSTER", "FAILOVER", "TAKEOVER")
    promoted = time.monotonic() - killed_at
    await asyncio.to_thread(embedded.wait_healthy, 60.0)
    healthy = time.monotonic() - killed_at
    assert embedded.master_of(keys.meta(on_victim[0])) == replica
    # The promoted replica lacks the burst: the channel's offsets went back (in the same
    # epoch, unless an edge that resubscribed meanwhile noticed and rebased it: a rebase
    # keeps `top`).
    lost = {}
    for ch in on_victim:
        top = int(embedded.call(replica, "HGET", keys.meta(ch), "top"))
        assert top < acked[ch], (ch, top, acked[ch])
        lost[ch] = acked[ch] - top

    # Publishing resumes, past the offsets lost: every client gets new messages in the
    # channel's current epoch.
    released = time.monotonic()
    load.go.set()
    async with asyncio.timeout(30):
        while any(load.last[ch] <= acked[ch] + 5 for ch in on_victim):
            await asyncio.sleep(0.01)
    marks = {ch: load.last[ch] for ch in on_victim}

    def caught_up(client: ProtoClient) -> bool:
        for ch, offset in marks.items():
            at, at_epoch = client.positions.get(ch, (0, ""))
            if at_epoch != load.epochs[ch] or at < offset:
                return False
        return True

    for client in clients:
        await client.wait_for(functools.partial(caught_up, client), 30)
    delivered = time.monotonic() - released
    since_kill = time.monotonic() - killed_at

    # A client back with its pre-failover position is not told it recovered: on the
    # edges that knew the channel, and on one that did not.
    fresh = await edge_factory(redis=redis_cluster.settings(key_prefix),
                               max_connections_per_ip=0)
    for url, positions in [(edges[0].url, held[0]), (edges[1].url, held[1]),
                           (fresh.url, held[0])]:
        back = await ProtoClient.open(url)
        for ch in on_victim:
            reply = await back.subscribe(ch, recover=positions[ch])
            assert reply["type"] == "subscribed", reply
            assert not reply["recovered"], (ch, positions[ch], reply)
        await back.close()

    load.running = False
    await task
    final = {ch: (load.last[ch], load.epochs[ch]) for ch in channels}
    for client in clients:
        await client.wait_for(functools.partial(
            reached, client, {ch: final[ch][0] - 1 for ch in channels}), 30)
    resyncs = sum(check_offsets(c, ch, load.last[ch]) for c in clients for ch in channels)
    # Every client got (at least) one resync on each channel that lost writes, and what it
    # got after its last one is what the stream holds now, offset by offset.
    broker = cluster_publisher.broker
    for ch in on_victim:
        first = (await broker.history(ch, -1, "0", limit=0, meta_ttl=3600)).first
        history = await broker.history(ch, first - 1, "0", limit=100_000, meta_ttl=3600)
        assert history.recoverable and history.entries
        truth = {p.offset: json.loads(p.data) for p in history.entries}
        assert history.epoch == final[ch][1]
        for client in clients:
            count, tail = walk(client, ch)
            assert count >= 1, f"{ch}: no resync after {lost[ch]} writes were lost"
            for epoch, offset, data in tail:
                if epoch == history.epoch and offset in truth:
                    assert data == truth[offset], (ch, epoch, offset, data, truth[offset])
    for client in clients:
        assert not client.closed.done(), client.closed
        await client.close()
    detected = 0
    for edge in edges:
        hub = edge.edge.hub
        assert hub is not None
        detected += hub.stats.lost_writes
    print(f"\nlost writes ({publisher_after} publisher): replica promoted ({how}) "
          f"{promoted:.2f} s after the kill, cluster healthy {healthy:.2f} s; publishing "
          f"released, every client past the lost offsets in the current epoch "
          f"{delivered:.2f} s later ({since_kill:.2f} s after the kill); lost per channel "
          f"{sorted(lost.values())}; clients "
          f"{len(clients)}, channels that lost writes {len(on_victim)}, resyncs {resyncs} "
          f"(all contiguous otherwise); publisher rebases {load.publisher.rebased}, "
          f"edge detections {detected}")


async def test_a_publish_batch_goes_to_every_master_at_once(
    redis_cluster: ClusterServer, key_prefix: str, embedded: EmbeddedValkeyCluster,
) -> None:
    """One batch over channels of every master is sent to the masters concurrently (one
    pipeline each), not one master after the other: with the first master's writes paused
    (CLIENT PAUSE WRITE), the others' channels are published while the batch still waits
    for it; each channel's messages keep their order."""
    keys = Keys(key_prefix)
    channels = spread_channels(embedded, keys)
    first = embedded.master_of(keys.meta(channels[0]))
    # The stalled master's channels first: a sequential sender would wait on it first.
    channels.sort(key=lambda ch: embedded.master_of(keys.meta(ch)) != first)
    others = [ch for ch in channels if embedded.master_of(keys.meta(ch)) != first]
    broker = RedisClusterBroker.from_cluster_settings(
        redis_cluster.settings(key_prefix), socket_timeout=30.0)
    publisher = Publisher(broker)
    try:
        await publisher.publish_batch([UpstreamMessage(ch, {"n": 0}) for ch in channels])

        def top(ch: str) -> int:
            master = embedded.master_of(keys.meta(ch))
            return int(embedded.call(master, "HGET", keys.meta(ch), "top") or 0)

        embedded.call(first, "CLIENT", "PAUSE", 30_000, "WRITE")
        try:
            batch = [UpstreamMessage(ch, {"n": n}) for n in (1, 2) for ch in channels]
            task = asyncio.create_task(publisher.publish_batch(batch))
            await asyncio.to_thread(
                embedded.wait_until, lambda: all(top(ch) == 3 for ch in others), 10.0,
                "the other masters' channels to be published")
            assert not task.done()
            assert all(top(ch) == 1 for ch in channels if ch not in others)
        finally:
            embedded.call(first, "CLIENT", "UNPAUSE")
        results = await asyncio.wait_for(task, 10)
        assert [r.offset for r in results] == [2] * len(channels) + [3] * len(channels)
        for ch in channels:
            history = await broker.history(ch, 0, "0", limit=10, meta_ttl=3600)
            assert [json.loads(p.data)["n"] for p in history.entries] == [0, 1, 2]
    finally:
        await broker.close()
