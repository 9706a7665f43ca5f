"""The central property: whatever the moments at which clients drop and come back, on
whichever edge, every client's offsets are contiguous, without a duplicate, up to the last
one published, while a publisher keeps publishing.

Run on one Valkey, and on the 3-master + 3-replica cluster (conftest's `redis_cluster`)
with one channel on every master, so that both edges' sharded pub/sub connections to all
shards, and recovery reads routed to every shard, are exercised at once."""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot

from common.broker.cluster import RedisClusterBroker
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import ClusterServer, EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

# One client's life: a list of sessions, each (edge index, ms to stay, drop abruptly?).
session_st = st.tuples(st.integers(0, 1), st.integers(0, 120), st.booleans())
schedule_st = st.lists(st.lists(session_st, min_size=1, max_size=5), min_size=6, max_size=12)

property_settings = settings(
    max_examples=int(os.environ.get("FANOUT_PROPERTY_EXAMPLES", "12")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


async def check_property(
    edges: list[EdgeServer], publisher: Publisher, channels: list[str],
    schedules: list[list[tuple[int, int, bool]]], seed: int,
) -> None:
    """Clients living by `schedules` (client i on channels[i % len(channels)]) while the
    publisher publishes batches over all `channels`; then every client's offsets are
    checked: contiguous from its first subscribe to the channel's last offset."""
    rng = random.Random(seed)
    publishing = asyncio.Event()
    publishing.set()
    last_published: dict[str, int] = {}

    async def publish() -> None:
        i = 0
        while publishing.is_set() or i < 50:
            batch = [UpstreamMessage(rng.choice(channels), {"i": i + k})
                     for k in range(rng.randint(1, 20))]
            for r in await publisher.publish_batch(batch):
                last_published[r.channel] = r.offset
            i += len(batch)
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def live(channel: str, schedule: list[tuple[int, int, bool]]) -> list[int]:
        received: list[int] = []
        position: tuple[int, str] | None = None
        start: int | None = None
        for edge_index, stay_ms, abrupt in schedule:
            client = await ProtoClient.open(edges[edge_index].url)
            reply = await client.subscribe(channel, recover=position)
            assert reply["type"] == "subscribed", reply
            if position is not None:
                assert reply["recovered"] is True, reply
            else:
                start = reply["offset"]
            await asyncio.sleep(stay_ms / 1000)
            assert not client.closed.done(), f"server closed the connection: {client.closed}"
            if abrupt:
                client.ws.transport.abort()
            await client.close()
            received += client.offsets[channel]
            position = client.positions[channel]
        # Come back once more and catch up with the end.
        client = await ProtoClient.open(edges[rng.randint(0, 1)].url)
        await client.subscribe(channel, recover=position)
        back.append(channel)
        if len(back) == len(schedules):
            all_back.set()
        await publisher_done.wait()
        last = last_published.get(channel, 0)
        await client.wait_for(lambda: client.positions[channel][0] >= last, 20)
        await client.close()
        assert start is not None
        return [start, *received, *client.offsets[channel]]

    publisher_done = asyncio.Event()
    back: list[str] = []  # clients through their schedule, subscribed for the last time
    all_back = asyncio.Event()
    pub_task = asyncio.create_task(publish())
    await asyncio.sleep(0.01)
    of_client = [channels[i % len(channels)] for i in range(len(schedules))]
    lives = [asyncio.create_task(live(ch, s)) for ch, s in zip(of_client, schedules, strict=True)]
    # Publishing goes on until every client is through its schedule (a client ends only
    # after publishing stops, so one that ended before failed).
    back_task = asyncio.create_task(all_back.wait())
    done, _ = await asyncio.wait([*lives, back_task], timeout=30,
                                 return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        t.result()  # raise early if a client failed
    assert back_task in done, f"only {len(back)} of {len(schedules)} clients came back"
    publishing.clear()
    await pub_task
    publisher_done.set()
    results = await asyncio.gather(*lives)
    for edge in edges:
        await edge.stop()
    assert sum(last_published.values()) >= 50
    for channel, (start, *offsets) in zip(of_client, results, strict=True):
        last = last_published.get(channel, 0)
        assert offsets == list(range(start + 1, last + 1)), (
            f"{channel} not contiguous: start={start} n={len(offsets)} last={last}"
        )


@property_settings
@given(schedules=schedule_st, seed=st.integers(0, 2**32))
async def test_clients_see_every_offset_once_across_reconnects(
    edge_factory: EdgeFactory, publisher: Publisher, schedules: list[list[tuple[int, int, bool]]],
    seed: int,
) -> None:
    edges = [await edge_factory(), await edge_factory()]
    # An exact-delivery channel: account channels never drop or conflate (policy disconnect).
    channel = f"account.P{os.urandom(4).hex()}.orders"
    await check_property(edges, publisher, [channel], schedules, seed)


@pytest.fixture
async def cluster_broker(
    redis_cluster: ClusterServer, key_prefix: str
) -> AsyncIterator[RedisClusterBroker]:
    broker = RedisClusterBroker.from_cluster_settings(
        redis_cluster.settings(key_prefix), socket_timeout=5.0)
    yield broker
    await broker.close()


async def channel_per_master(broker: RedisClusterBroker) -> list[str]:
    """One account channel on every master of the cluster's slot table, each channel's
    slot checked with CLUSTER KEYSLOT (the server's hash, not only redis-py's)."""
    cluster = broker.cluster
    await cluster.initialize()
    masters = {node.name for node in cluster.get_primaries()}
    assert len(masters) >= 3, masters
    by_master: dict[str, str] = {}
    tag = os.urandom(3).hex()
    i = 0
    while len(by_master) < len(masters):
        name = f"account.P{tag}x{i}.orders"
        i += 1
        key = broker.keys.meta(name)
        slot = key_slot(key.encode())
        assert await cluster.cluster_keyslot(key) == slot
        # Every key of the channel (its live channel too) hashes to that slot.
        assert key_slot(broker.keys.live(name).encode()) == slot
        owner = cluster.nodes_manager.get_node_from_slot(slot).name
        by_master.setdefault(owner, name)
    assert set(by_master) == masters
    return list(by_master.values())


@property_settings
@given(schedules=schedule_st, seed=st.integers(0, 2**32))
async def test_clients_see_every_offset_once_across_reconnects_on_a_cluster(
    edge_factory: EdgeFactory, redis_cluster: ClusterServer, cluster_broker: RedisClusterBroker,
    key_prefix: str, schedules: list[list[tuple[int, int, bool]]], seed: int,
) -> None:
    settings_ = redis_cluster.settings(key_prefix)
    # No per-address limit: every test client comes from 127.0.0.1.
    edges = [await edge_factory(redis=settings_, max_connections_per_ip=0) for _ in range(2)]
    channels = await channel_per_master(cluster_broker)
    await check_property(edges, Publisher(cluster_broker), channels, schedules, seed)
