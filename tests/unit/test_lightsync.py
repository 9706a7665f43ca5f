"""LightEvent and LightQueue (edge/wsprotocol.py): asyncio.Event's and asyncio.Queue's
behaviour where uvicorn's protocol and the writer use them, without their deques."""

from __future__ import annotations

import asyncio

import pytest

from edge.wsprotocol import LightEvent, LightQueue


async def test_event_wakes_every_waiter_and_forgets_them() -> None:
    event = LightEvent()
    assert not event.is_set()
    waiters = [asyncio.create_task(event.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    event.set()
    assert await asyncio.gather(*waiters) == [True, True, True]
    assert event._waiters is None
    assert await event.wait() is True  # set: returns at once
    event.clear()
    assert not event.is_set()


async def test_event_set_then_cleared_still_wakes_a_waiter() -> None:
    event = LightEvent()
    waiter = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    event.set()
    event.clear()  # as asyncio.Event: the waiter was already woken
    assert await waiter is True


async def test_event_cancelled_waiter_is_removed() -> None:
    event = LightEvent()
    waiter = asyncio.create_task(event.wait())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert event._waiters is None
    event.set()


async def test_queue_in_order_and_waits_when_empty() -> None:
    queue: LightQueue[int] = LightQueue()
    assert queue.empty() and queue.qsize() == 0
    queue.put_nowait(1)
    queue.put_nowait(2)
    assert queue.qsize() == 2
    assert await queue.get() == 1
    getter = asyncio.create_task(queue.get())
    assert await getter == 2
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    assert not getter.done()
    queue.put_nowait(3)
    assert await getter == 3
    assert queue.empty() and queue._getters is None


async def test_queue_cancelled_getter_loses_nothing() -> None:
    queue: LightQueue[str] = LightQueue()
    first = asyncio.create_task(queue.get())
    second = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.sleep(0)
    queue.put_nowait("a")
    assert await second == "a"
    with pytest.raises(asyncio.CancelledError):
        await first
    # Woken, then cancelled before it ran: the item goes to the next getter.
    third = asyncio.create_task(queue.get())
    fourth = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait("b")
    third.cancel()
    assert await fourth == "b"
    with pytest.raises(asyncio.CancelledError):
        await third
    assert queue.empty()
