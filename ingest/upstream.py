"""The small interface every upstream adapter implements.

An upstream yields `UpstreamMessage`s; the worker publishes them in order. Adapters own
their connection (reconnects, heartbeats); the worker owns sequencing and publishing.
An adapter that keeps state derived from what was published (the depth levels it knows, to
delete them later) is `Resumable`: the worker hands it the channels' snapshots when it
becomes leader, so it takes over what the previous leader left, not what it last knew.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True, slots=True)
class UpstreamMessage:
    """One message for one channel.

    `msg_id` is the upstream's id of the message (empty if it has none): publishing the
    same id twice yields one entry. `key` names the snapshot entry of a keyed channel
    (an order id, a depth level); `delete` removes that key from the snapshot.

    `if_changed` marks a *state* (the latest value of its key: a depth level, a position, a
    balance, a quote) rather than an event: it is published only if it changes the channel's
    snapshot (a different value, a delete of a key that is there, a merge that changes a
    field). Upstreams re-send their current state when a connection subscribes; with this,
    a new leader does not publish again what the old one did, even without upstream ids.
    Never set it on events (trades, fills): two equal events are two messages.

    `received_at` (wall clock, s) is when it came from the upstream: it travels to the edges
    with the message, which measure delivery latency from it (not part of equality).
    """

    channel: str
    data: Any
    key: str = ""
    msg_id: str = ""
    delete: bool = False
    if_changed: bool = False
    received_at: float = field(default_factory=time.time, compare=False, repr=False)


class Upstream(Protocol):
    """A source of upstream messages."""

    name: str

    def messages(self) -> AsyncIterator[UpstreamMessage]:
        """Messages in upstream order, forever (or until the upstream ends)."""
        ...


SnapshotReader = Callable[[str], Awaitable[dict[str, Any]]]
"""A channel's snapshot as stored in Redis: key -> latest value (decoded JSON)."""


@runtime_checkable
class Resumable(Protocol):
    """An upstream that takes over published state when its worker becomes leader."""

    async def resume(self, snapshot: SnapshotReader) -> None:
        """Called before each `messages()` iteration of a term; `snapshot(channel)` reads
        a channel's snapshot. Raises what the reader raises (a Redis error)."""
        ...
