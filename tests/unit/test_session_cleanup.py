"""A subscribe cancelled because its session ends leaves nothing behind in the hub, even
when a Redis call swallowed the cancellation (redis-py 8 can; Python 3.11's `wait_for` can
too). Found by the live fuzzer: subscriptions of ended sessions stayed registered, holding
the session, its socket and its queue (the edge's RSS grew ~2 KB per fuzzed connection;
tests/support/fuzz_live.py now also checks that the edge holds nothing of ended clients)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from common.channels import parse_channel
from common.protocol import Position
from tests.unit.test_hub import CH, FakeSession, confirmed, history, make_hub


async def test_a_cancelled_subscribe_registers_nothing_when_redis_swallows_the_cancel() -> None:
    reading = asyncio.Event()

    async def reader(hub: object, since: int) -> object:
        reading.set()
        with contextlib.suppress(asyncio.CancelledError):  # as redis-py may: the command
            await asyncio.sleep(0.05)  # returns normally after all
        return history("e", 6, 1, since)

    hub = make_hub(reader)  # type: ignore[arg-type]
    s = FakeSession()
    task = asyncio.create_task(hub.subscribe(s, parse_channel(CH), Position(2, "e"), False, 1))
    await confirmed(hub)
    await reading.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert CH not in hub.channels  # nobody left: the channel state is gone too


async def test_a_subscribe_cancelled_during_its_redis_subscribe_leaves_no_channel() -> None:
    """The first subscribe of a channel creates its state and sends SUBSCRIBE; cancelled
    meanwhile, it must not leave behind a state that nothing will ever confirm (every later
    subscribe of the channel on this node would wait out the timeout)."""

    class SlowPubSub:
        async def subscribe(self, *channels: str) -> None:
            await asyncio.sleep(10)

        async def unsubscribe(self, *channels: str) -> None:
            pass

    hub = make_hub(lambda hub, since: history("e", 0, 1, since))  # type: ignore[arg-type,return-value]
    hub._pubsub = SlowPubSub()  # type: ignore[assignment]
    task = asyncio.create_task(hub.subscribe(FakeSession(), parse_channel(CH), None, False, 1))
    await asyncio.sleep(0.01)
    assert CH in hub.channels
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert CH not in hub.channels
