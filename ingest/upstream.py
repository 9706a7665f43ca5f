"""The small interface every upstream adapter implements.

An upstream yields `UpstreamMessage`s; the worker publishes them in order. Adapters own
their connection (reconnects, heartbeats); the worker owns sequencing and publishing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class UpstreamMessage:
    """One message for one channel.

    `msg_id` is the upstream's id of the message (empty if it has none): publishing the
    same id twice yields one entry. `key` names the snapshot entry of a keyed channel
    (an order id, a depth level); `delete` removes that key from the snapshot.
    """

    channel: str
    data: Any
    key: str = ""
    msg_id: str = ""
    delete: bool = False


class Upstream(Protocol):
    """A source of upstream messages."""

    name: str

    def messages(self) -> AsyncIterator[UpstreamMessage]:
        """Messages in upstream order, forever (or until the upstream ends)."""
        ...
