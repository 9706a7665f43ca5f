"""asyncio helpers for cancellation that survives libraries which swallow it.

redis-py (seen with 8.1.0) can swallow a task's cancellation that arrives while a command
is in flight: the command returns normally and the task runs on, although `cancel()` was
called (reproduced with a plain SET). Python 3.11's `asyncio.wait_for` can do the same when
the inner call finishes as the outer task is cancelled. A task that was cancelled keeps a
non-zero `cancelling()` count, so loops check it after such calls and stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for `event` at most `timeout` s; whether it was set. With `asyncio.timeout`, not
    `wait_for`, so that a cancel is never swallowed (see the module doc)."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


def raise_if_cancelling() -> None:
    """Re-raise a cancellation of the current task that a callee swallowed. (The raising
    frame holds no reference to the task: the task keeps the exception, whose traceback
    keeps the frame, and a cycle through them would wait for a full garbage collection.)"""
    if _cancelling():
        raise asyncio.CancelledError


def _cancelling() -> int:
    task = asyncio.current_task()
    return task.cancelling() if task is not None else 0


async def stop_tasks(
    tasks: Iterable[asyncio.Task[object] | None], log: logging.Logger, timeout: float = 10.0
) -> None:
    """Cancel `tasks` and wait for them to end, at most `timeout` seconds: a task that still
    runs then is logged and left behind rather than hanging its caller."""
    pending = {t for t in tasks if t is not None}
    for task in pending:
        task.cancel()
    if not pending:
        return
    done, late = await asyncio.wait(pending, timeout=timeout)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved here; callers that care look at it themselves
    for task in late:
        log.warning("task did not stop when cancelled task=%s", task.get_name())
