"""The broker seam: everything ingest and the edge need from the message store.

Two implementations: `common.broker.redis.RedisBroker` (Lua scripts, streams, pub/sub) and
`common.broker.memory.MemoryBroker` (the same semantics in one process, for pure tests).
The contract tests in tests/integration/test_broker_contract.py hold both to it.

Errors: a store that does not answer raises `BrokerUnavailable` (never a client library's
exception); callers also see `TimeoutError` from their own deadlines.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from common.broker.types import (
    BrokerUnavailable,
    Fence,
    HistoryRead,
    HistoryResult,
    LeaseGrant,
    LeaseRenewal,
    Publication,
    PublishReply,
    PublishRequest,
    RebaseReply,
    SnapshotWant,
)


class LiveListener(Protocol):
    """What a live connection reports to (the hub). Called from the event loop, in order."""

    def on_publication(self, pub: Publication) -> None:
        """A live message of a subscribed channel (the hot path: keep it cheap)."""
        ...

    def on_subscribed(self, channel: str) -> None:
        """The subscription to `channel` is in place: after `subscribe`, and again for
        every channel after the connection came back (what was published meanwhile is
        only in the history)."""
        ...

    def on_connected(self, channels: int) -> None:
        """The connection is up and resubscribing `channels` channels."""
        ...

    def on_lost(self, error: BaseException, retry_in: float) -> None:
        """The connection is down; messages published until it is back are lost."""
        ...

    def pace(self) -> float:
        """Seconds the reader should hold the reply it just read before handing it over
        (0: none). Called after each read returns, before the reply is processed: while it
        waits, what the server sends meanwhile gathers in the socket and is then handed
        over in one loop turn (the hub flushes fewer, fuller batches when its flushes are
        expensive). Only delays: order and content are untouched. A connection with no
        socket to read (the memory broker's, which delivers from `publish`) never calls it."""
        ...


class Live(Protocol):
    """One node's live-message connection. Tracks its channels itself and resubscribes
    them after a reconnect."""

    @property
    def connected(self) -> bool: ...

    async def start(self) -> None:
        """Connect (and keep reconnecting) in the background."""
        ...

    async def close(self) -> None: ...

    async def wait_connected(self) -> None: ...

    async def subscribe(self, channel: str) -> None:
        """Subscribe; the listener's `on_subscribed` confirms. A failure is logged: the
        connection notices it is broken and resubscribes on reconnect. The subscribes of
        one event-loop turn go to the server together (one SUBSCRIBE command for many
        channels where the server allows it)."""
        ...

    def unsubscribe(self, channel: str) -> None:
        """Unsubscribe in the background (skipped if subscribed again meanwhile)."""
        ...

    async def probe(self, timeout: float) -> bool:
        """Publish to this connection's own probe channel and expect it back in `timeout`:
        catches a half-open connection that a PING would not."""
        ...

    def reconnect(self) -> None:
        """Drop the connection and connect again (a failed probe)."""
        ...


class Broker(Protocol):
    """The message store, as ingest (publish, lease) and the edge (history, live) use it."""

    # --- ingest --------------------------------------------------------------------------

    async def publish(
        self, batch: Sequence[PublishRequest], fence: Fence | None = None, *,
        meta_ttl: int, idempotency_ttl: int,
    ) -> list[PublishReply]:
        """Publish each channel's messages in batch order (messages of different channels
        have no order to keep), atomically per message, in one round trip: assign the next
        offset, append to the history (trimmed by length and age), update the snapshot,
        remember the message id, notify live subscribers. A channel without an epoch gets
        a new one. `meta_ttl` (s): an idle channel's state expires after it."""
        ...

    async def rebase(
        self, channel: str, old_epoch: str, token: int | None, *, meta_ttl: int
    ) -> RebaseReply:
        """Give `channel` a new epoch if it is still in `old_epoch` (its offsets went back:
        the store lost acknowledged writes); its history goes, its snapshot stays."""
        ...

    async def snapshot(self, channel: str) -> dict[str, str]:
        """The channel's snapshot: key -> JSON text."""
        ...

    # --- the edge ------------------------------------------------------------------------

    async def history(
        self, channel: str, since: int, snapshot: SnapshotWant, *, epoch: str = "",
        until: int | None = None, limit: int, meta_ttl: int,
    ) -> HistoryResult:
        """Position, the entries after `since` up to `until` (None: the top) if `epoch` is
        the channel's (or "") and at most `limit` are missing, and the snapshot per
        `snapshot`; read atomically. A channel without an epoch is created with a new one
        (that expires after `meta_ttl` s unless published to)."""
        ...

    async def history_many(
        self, reads: Sequence[HistoryRead], *, limit: int, meta_ttl: int,
    ) -> list[HistoryResult | BrokerUnavailable]:
        """`history` for each read, in one round trip (per node in a cluster): a reconnect
        storm's recovering subscribes cost one command each on the wire, not one round
        trip each. Each read is atomic on its own (not with the others); its outcome is
        its result or, if that read alone failed, BrokerUnavailable. A store that does not
        answer raises BrokerUnavailable for all."""
        ...

    def live(self, listener: LiveListener, node_id: str) -> Live:
        """A live connection reporting to `listener`; `node_id` names its probe channel."""
        ...

    # --- leader election -----------------------------------------------------------------

    async def acquire(self, feed: str, owner: str, ttl_ms: int) -> LeaseGrant:
        """Take `feed`'s lease if free (or held by an earlier term of `owner`), with the
        next fencing token."""
        ...

    async def renew(self, feed: str, holder: str, ttl_ms: int) -> LeaseRenewal:
        """Extend the lease if `holder` ("<token>:<owner>") still has it."""
        ...

    async def release(self, feed: str, holder: str, fence_floor: int = 0) -> bool:
        """Give the lease up if `holder` has it; raise the fence counter to at least
        `fence_floor`. True if it was released."""
        ...

    # --- health --------------------------------------------------------------------------

    async def ping(self) -> bool: ...

    async def close(self) -> None:
        """Close what the broker opened itself."""
        ...
