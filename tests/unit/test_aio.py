"""common/aio.py: waits that never swallow a cancellation (in-process, no I/O)."""

from __future__ import annotations

import asyncio

import pytest

from common.aio import wait_event


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_soon(event.set)
    assert await wait_event(event, 5) is True


async def test_a_cancel_that_lands_as_the_event_is_set_is_not_swallowed() -> None:
    """The race Python 3.11's wait_for loses (an event set and the waiter cancelled in one
    loop turn: wait_for returns normally and the task runs on); loops that wait this way
    would never stop."""
    for _ in range(50):
        event = asyncio.Event()
        task = asyncio.create_task(wait_event(event, 10))
        await asyncio.sleep(0)  # the task is waiting
        event.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
