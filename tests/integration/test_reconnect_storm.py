"""A reconnect storm against real edges and Valkey: every client drops at once and comes
back with `recover` while a publisher keeps publishing. Each one must end with every offset
of each channel exactly once; most recoveries must come from the edges' memory (recent
windows of held and lingering channels, shared reads), and subscribes beyond the recovery
gate are deferred with advice and retried, never lost."""

from __future__ import annotations

import asyncio
import functools
import os
import random
from typing import Any

import pytest
from fanout_client import FanoutClient, Resync

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


async def subscribe_retrying(client: ProtoClient, channel: str,
                             recover: tuple[int, str] | None) -> dict[str, Any]:
    """Subscribe; on `unavailable`, wait what the edge advises (as the client packages do)."""
    while True:
        reply = await client.subscribe(channel, recover=recover)
        if reply["type"] == "subscribed":
            return reply
        assert reply["code"] == "unavailable", reply
        await asyncio.sleep(reply.get("retry_after_ms", 1000) / 1000)


async def test_every_client_recovers_gap_free_and_mostly_from_memory(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    edges = [await edge_factory(max_recoveries=4, recovery_queue=8, recovery_retry=0.05),
             await edge_factory(max_recoveries=4, recovery_queue=8, recovery_retry=0.05)]
    tag = os.urandom(3).hex()
    shared = [f"quotes.S{tag}{i}" for i in range(2)]
    clients_n = 24
    own = {c: [f"account.{tag}{c}.orders", f"account.{tag}{c}.positions"]
           for c in range(clients_n)}
    rng = random.Random(5)
    publishing = True

    async def publish() -> None:
        channels = shared + [ch for chs in own.values() for ch in chs]
        while publishing:
            await publisher.publish_batch(
                [UpstreamMessage(ch, {"v": rng.random()}) for ch in rng.sample(channels, 8)])
            await asyncio.sleep(0.005)

    for ch in shared + [ch for chs in own.values() for ch in chs]:
        await publisher.publish_batch([UpstreamMessage(ch, {"v": 0})])  # every channel exists
    pub_task = asyncio.create_task(publish())

    async def first_session(c: int) -> ProtoClient:
        client = await ProtoClient.open(edges[c % 2].url)
        for ch in shared + own[c]:
            await subscribe_retrying(client, ch, None)
        return client

    try:
        clients = list(await asyncio.gather(*(first_session(c) for c in range(clients_n))))
        await asyncio.sleep(0.3)  # publications flow
        reads_before = sum(e.edge.stats.history_reads for e in edges)
        memory_before = sum(e.edge.stats.subscribe_sources["memory"] for e in edges)
        # All drop at once (abruptly: no close handshake) ...
        for client in clients:
            client.ws.transport.abort()
        received = [dict(c.offsets) for c in clients]
        positions = [dict(c.positions) for c in clients]
        for client in clients:
            await client.close()

        async def come_back(c: int) -> ProtoClient:
            # ... and come back at once, half of them to the other edge.
            client = await ProtoClient.open(edges[(c + rng.randint(0, 1)) % 2].url)
            for ch in shared + own[c]:
                reply = await subscribe_retrying(client, ch, positions[c][ch])
                assert reply["recovered"] is True, reply
            return client

        back = list(await asyncio.gather(*(come_back(c) for c in range(clients_n))))
        recoveries = clients_n * (len(shared) + 2)
        reads = sum(e.edge.stats.history_reads for e in edges) - reads_before
        memory = sum(e.edge.stats.subscribe_sources["memory"] for e in edges) - memory_before
        publishing = False
        await pub_task
        tops = {ch: (await publisher.publish_batch([UpstreamMessage(ch, {"v": "end"})]))[0]
                .offset for ch in shared + [ch for chs in own.values() for ch in chs]}
        def at_top(client: ProtoClient, ch: str) -> bool:
            return client.offsets.get(ch, [])[-1:] == [tops[ch]]

        for c, client in enumerate(back):
            for ch in shared + own[c]:
                await client.wait_for(functools.partial(at_top, client, ch), 20)
                seen = received[c].get(ch, []) + client.offsets[ch]
                first = seen[0]
                assert seen == list(range(first, tops[ch] + 1)), (c, ch)
            await client.close()
        # Held channels (shared) and lingering ones (own, same edge) came from memory.
        assert memory >= recoveries // 3, (memory, recoveries)
        assert reads < recoveries, (reads, recoveries)
    finally:
        publishing = False
        await asyncio.gather(pub_task, return_exceptions=True)


async def test_deferred_subscribes_are_retried_by_the_python_client(
    edge_factory: EdgeFactory, publisher: Publisher
) -> None:
    """A gate of one read and no queue: most of the concurrent subscribes are deferred
    (`unavailable` with `retry_after_ms`); the client retries after the advice and every
    subscription gets its snapshot."""
    edge: EdgeServer = await edge_factory(max_recoveries=1, recovery_queue=0,
                                          recovery_retry=0.05)
    tag = os.urandom(3).hex()
    channels = [f"depth.D{tag}{i}" for i in range(12)]
    for i, ch in enumerate(channels):
        await publisher.publish_batch([UpstreamMessage(ch, {"i": i})])
    client = FanoutClient([edge.url])
    await client.connect()
    try:
        subs = [client.subscribe(ch, snapshot=True) for ch in channels]

        async def first_event(i: int) -> object:
            async for event in subs[i]:
                return event
            raise AssertionError("subscription ended")

        events = await asyncio.wait_for(
            asyncio.gather(*(first_event(i) for i in range(len(channels)))), 30)
        for i, event in enumerate(events):
            assert isinstance(event, Resync) and event.snapshot == {"": {"i": i}}
        stats = edge.edge.stats
        assert stats.admission[("recovery", "deferred")] > 0
        assert stats.request_errors.get("unavailable", 0) > 0
    finally:
        await client.close()
