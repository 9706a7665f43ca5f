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
    failures: list[float] = field(default_factory=list)  # monotonic times of failed batches
    # monotonic times of each successful batch (to measure the time to resume)
    successes: list[float] = field(default_factory=list)
    running: bool = True

    async def run(self) -> None:
        i = 0
        while self.running:
            batch = [UpstreamMessage(ch, {"i": i}) for ch in self.channels]
            try:
                results = await asyncio.wait_for(self.publisher.publish_batch(batch), 10)
            except Exception:
                self.failures.append(time.monotonic())
                await asyncio.sleep(0.05)
                continue
            for r in results:
                self.last[r.channel] = r.offset
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
