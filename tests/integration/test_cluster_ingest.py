"""A real `fanout ingest` process (the simulated feed, leader lease and fencing) and a real
`fanout edge` process on the 3-master + 3-replica Valkey cluster (conftest's
`redis_cluster`), the feed's channels on every master: clients see contiguous offsets; then
kill -9 of the master that holds the lease key's slot: its replica is promoted, the worker
keeps (or wins back) the lease, publishing resumes, and every client's offsets stay
contiguous with no duplicate, or are broken only by an explicit resync.

Run `pytest -s tests/integration/test_cluster_ingest.py` to see the measured time to resume.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time

import httpx
import pytest

from common.broker.keys import Keys
from fanout.embedded import EmbeddedValkeyCluster
from tests.integration.conftest import ClusterServer
from tests.integration.test_cluster import check_offsets, reached
from tests.support.edgeproc import edge_process, ingest_process
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

FEED_ID = "simcluster"
RATE = 40  # messages/s per symbol
CLIENTS = 2


def symbols_on_every_master(cluster: EmbeddedValkeyCluster, keys: Keys) -> list[str]:
    """Symbols whose trades channel is on every master (one each), checked with the
    server's CLUSTER KEYSLOT and slot table."""
    masters = cluster.masters()
    chosen: dict[int, str] = {}
    tag = os.urandom(2).hex().upper()
    i = 0
    while len(chosen) < len(masters):
        symbol = f"Q{tag}X{i}"
        i += 1
        chosen.setdefault(cluster.master_of(keys.meta(f"trades.{symbol}")), symbol)
    return list(chosen.values())


def metric_value(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


async def test_ingest_process_on_a_cluster_through_the_lease_masters_failover(
    redis_cluster: ClusterServer, key_prefix: str,
) -> None:
    cluster = redis_cluster.embedded
    if cluster is None:
        pytest.skip("REDIS_CLUSTER_URL: this test kills a node")
    keys = Keys(key_prefix)
    symbols = symbols_on_every_master(cluster, keys)
    channels = [f"trades.{s}" for s in symbols] + [f"quotes.{s}" for s in symbols]
    assert {cluster.master_of(keys.meta(ch)) for ch in channels} == set(cluster.masters())
    env = {"FANOUT_SYMBOLS": ",".join(symbols), "FANOUT_RATE": str(RATE),
           "FANOUT_FEED_ID": FEED_ID, "FANOUT_LEASE_TTL": "2"}
    async with edge_process(redis_cluster.url, key_prefix) as edge:
        clients: list[ProtoClient] = []
        async with ingest_process(redis_cluster.url, key_prefix, **env) as ingest, \
                httpx.AsyncClient(base_url=ingest.http, timeout=5) as http:

            async def leader() -> float:
                return metric_value((await http.get("/metrics")).text, "fanout_ingest_leader")

            for _ in range(CLIENTS):
                client = await ProtoClient.open(edge.url)
                for ch in channels:
                    reply = await client.subscribe(ch)
                    assert reply["type"] == "subscribed", reply
                clients.append(client)
            # Flowing on every channel, every shard.
            for client in clients:
                await client.wait_for(functools.partial(flowing, client, channels), 30)
            assert await leader() == 1
            victim = cluster.master_of(keys.lease(FEED_ID))
            marks = {ch: max(c.positions[ch][0] for c in clients) for ch in channels}
            killed_at = time.monotonic()
            cluster.kill(victim)
            # Every client gets messages past the marks on every channel: publishing
            # resumed on all shards, the failed-over one too.
            for client in clients:
                await client.wait_for(functools.partial(reached, client, marks), 60)
            resumed = time.monotonic() - killed_at
            await asyncio.to_thread(cluster.wait_healthy, 60.0)
            assert victim not in cluster.masters()
            async with asyncio.timeout(30):
                while await leader() != 1:
                    await asyncio.sleep(0.1)
            # And it goes on: more on every channel.
            marks = {ch: max(c.positions[ch][0] for c in clients) + 3 for ch in channels}
            for client in clients:
                await client.wait_for(functools.partial(reached, client, marks), 30)
        # The ingest process has stopped: the top of every channel, as a new client sees it.
        probe = await ProtoClient.open(edge.url)
        tops = {}
        for ch in channels:
            reply = await probe.subscribe(ch)
            tops[ch] = reply["offset"]
        await probe.close()
        resyncs = 0
        for client in clients:
            await client.wait_for(
                functools.partial(reached, client, {ch: tops[ch] - 1 for ch in channels}), 30)
            resyncs += sum(check_offsets(client, ch, tops[ch]) for ch in channels)
            assert not client.closed.done(), client.closed
            await client.close()
    print(f"\ningest on a cluster: lease master killed, every client had new messages on "
          f"every channel {resumed:.2f} s after; resyncs {resyncs}, "
          f"messages per channel {min(tops.values())}..{max(tops.values())}")


def flowing(client: ProtoClient, channels: list[str]) -> bool:
    return all(len(client.offsets.get(ch, [])) >= 5 for ch in channels)
