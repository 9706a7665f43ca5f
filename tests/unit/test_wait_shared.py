"""edge/hub.py `wait_shared`: a subscriber waiting for its channel's SUBSCRIBE confirmation
(a future many share), with a timeout, never cancelling the shared future."""

from __future__ import annotations

import asyncio

import pytest

from edge.hub import wait_shared


def callbacks(fut: asyncio.Future[None]) -> int:
    """Callbacks left on `fut` (the C future's list is None when empty)."""
    return len(getattr(fut, "_callbacks", None) or ())


async def test_returns_once_the_shared_future_is_done() -> None:
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters = [asyncio.create_task(wait_shared(shared, 10.0)) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)
    shared.set_result(None)
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert callbacks(shared) == 0


async def test_a_done_future_returns_at_once() -> None:
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    shared.set_result(None)
    await asyncio.wait_for(wait_shared(shared, 10.0), 5)


async def test_times_out_and_leaves_the_shared_future_pending() -> None:
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    other = asyncio.create_task(wait_shared(shared, 10.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(wait_shared(shared, 0.01), 5)
    assert not shared.done()
    assert callbacks(shared) == 1  # the other waiter's only
    shared.set_result(None)
    await asyncio.wait_for(other, 5)


async def test_cancelling_a_waiter_does_not_cancel_the_shared_future() -> None:
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiter = asyncio.create_task(wait_shared(shared, 10.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not shared.cancelled() and not shared.done()
    assert callbacks(shared) == 0
