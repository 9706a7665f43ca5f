"""The broker seam: what ingest and the edge need from the message store (base.py), the
records crossing it (types.py), and two implementations: Redis (redisbroker.py, with its
keys, Lua scripts and live-message codec) and in-memory (memory.py, for pure tests).

Only this package talks to Redis; edge/ and ingest/ import from here."""

from common.broker.base import Broker, Live, LiveListener
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
    PublishStatus,
    RebaseReply,
    RebaseStatus,
    SnapshotWant,
    new_epoch,
)

__all__ = [
    "Broker", "BrokerUnavailable", "Fence", "HistoryRead", "HistoryResult",
    "LeaseGrant", "LeaseRenewal",
    "Live", "LiveListener", "Publication", "PublishReply", "PublishRequest", "PublishStatus",
    "RebaseReply", "RebaseStatus", "SnapshotWant", "new_epoch",
]
