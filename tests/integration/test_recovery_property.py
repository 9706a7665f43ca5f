"""The central property: whatever the moments at which clients drop and come back, on
whichever edge, every client's offsets are contiguous, without a duplicate, up to the last
one published, while a publisher keeps publishing."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

# One client's life: a list of sessions, each (edge index, ms to stay, drop abruptly?).
session_st = st.tuples(st.integers(0, 1), st.integers(0, 120), st.booleans())
schedule_st = st.lists(st.lists(session_st, min_size=1, max_size=5), min_size=6, max_size=12)


@settings(
    max_examples=int(os.environ.get("FANOUT_PROPERTY_EXAMPLES", "6")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedules=schedule_st, seed=st.integers(0, 2**32))
async def test_clients_see_every_offset_once_across_reconnects(
    edge_factory: EdgeFactory, publisher: Publisher, schedules: list[list[tuple[int, int, bool]]],
    seed: int,
) -> None:
    edges = [await edge_factory(), await edge_factory()]
    # An exact-delivery channel: account channels never drop or conflate (policy disconnect).
    channel = f"account.P{os.urandom(4).hex()}.orders"
    rng = random.Random(seed)
    publishing = asyncio.Event()
    publishing.set()
    last_published = 0

    async def publish() -> None:
        nonlocal last_published
        i = 0
        while publishing.is_set() or i < 50:
            batch = [UpstreamMessage(channel, {"i": i + k}) for k in range(rng.randint(1, 20))]
            results = await publisher.publish_batch(batch)
            last_published = results[-1].offset
            i += len(batch)
            await asyncio.sleep(rng.uniform(0, 0.004))

    async def live(schedule: list[tuple[int, int, bool]]) -> list[int]:
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
        await publisher_done.wait()
        await client.wait_for(lambda: client.positions[channel][0] >= last_published, 20)
        await client.close()
        assert start is not None
        return [start, *received, *client.offsets[channel]]

    publisher_done = asyncio.Event()
    pub_task = asyncio.create_task(publish())
    await asyncio.sleep(0.01)
    lives = [asyncio.create_task(live(s)) for s in schedules]
    done, _ = await asyncio.wait(lives, timeout=5, return_when=asyncio.FIRST_EXCEPTION)
    for t in done:
        t.result()  # raise early if a client failed
    publishing.clear()
    await pub_task
    publisher_done.set()
    results = await asyncio.gather(*lives)
    for edge in edges:
        await edge.stop()
    assert last_published >= 50
    for start, *offsets in results:
        assert offsets == list(range(start + 1, last_published + 1)), (
            f"not contiguous: start={start} n={len(offsets)} last={last_published}"
        )
