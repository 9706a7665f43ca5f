"""The records that cross the broker seam, and the one epoch generator.

`Publication` is what the broker hands the hub, live or from history, ready to be sent:
it encodes itself for clients at most once per codec however many clients receive it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, NamedTuple

from common import protocol
from common.protocol import Codec, Frame

# What a history read returns of the snapshot: "1" always, "0" never, "r" only if the
# entries after the position cannot be recovered.
SnapshotWant = Literal["0", "1", "r"]


class BrokerUnavailable(Exception):
    """The message store did not answer (connection lost, timeout, server error): the
    outcome of a write is unknown, and the caller retries or reports "unavailable"."""


def new_epoch() -> str:
    """A fresh epoch: random, so that a channel recreated after a loss never reuses one."""
    return os.urandom(6).hex()


class Publication:
    """A live or historical message of one channel, encoded for clients at most once per
    codec however many clients receive it."""

    __slots__ = ("_json", "_msgpack", "channel", "data", "deleted", "epoch", "key", "offset",
                 "received")

    def __init__(
        self, channel: str, epoch: str, offset: int, key: str, data: str, deleted: bool = False,
        received: float = 0.0,
    ) -> None:
        self.channel = channel
        self.epoch = epoch
        self.offset = offset
        self.key = key
        self.data = data
        self.deleted = deleted
        self.received = received  # upstream receive time (wall clock, s) of a live one; 0
        self._json: str | None = None
        self._msgpack: bytes | None = None

    def frame(self, codec: Codec) -> Frame:
        if codec is Codec.JSON:
            if self._json is None:
                self._json = protocol.pub_json(
                    self.channel, self.offset, self.key, self.data, self.deleted
                )
            return self._json
        if self._msgpack is None:
            self._msgpack = protocol.pub_msgpack(
                self.channel, self.offset, self.key, self.data, self.deleted
            )
        return self._msgpack


@dataclass(frozen=True, slots=True)
class HistoryResult:
    """A channel's position (epoch, top, first retained offset), the entries asked for if
    `recoverable`, and the snapshot (key -> JSON text) if asked for."""

    epoch: str
    top: int
    first: int
    recoverable: bool
    entries: list[Publication]
    snapshot: dict[str, str]


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """One read of `Broker.history_many`: `Broker.history`'s arguments but the limits."""

    channel: str
    since: int
    snapshot: SnapshotWant
    epoch: str = ""
    until: int | None = None


@dataclass(frozen=True, slots=True)
class Fence:
    """What a leader publishes with: its fencing token, and the moment (the store's clock,
    ms since the epoch) after which its lease may have expired (None = no deadline)."""

    token: int
    deadline_ms: int | None = None


class PublishRequest(NamedTuple):
    """One message to publish, already validated: `channel` a parsed name, `data` JSON
    text. The history policy and snapshot mode are the channel's. A named tuple, not a
    dataclass: one is built per published message, in a third of a frozen dataclass's
    time (issue 11: the publisher's CPU per message)."""

    channel: str
    data: str
    key: str = ""
    msg_id: str = ""  # upstream message id ("" = not idempotent)
    snapshot_mode: str = "last"  # merge | last | keyed | none
    max_length: int = 1000
    max_age_ms: int = 300_000
    delete: bool = False  # remove the key from a keyed snapshot
    if_changed: bool = False  # publish only if it changes the snapshot's state
    received_ms: int = 0  # when the upstream sent it (wall clock, ms; 0 = unknown)


class PublishStatus(IntEnum):
    PUBLISHED = 0
    DUPLICATE = 1  # the message id was published before: its offset and epoch
    FENCED = 2  # a higher token has published to the channel: epoch = that token
    EXPIRED = 3  # the store's clock is past the fence's deadline
    UNCHANGED = 4  # if_changed and the snapshot holds this state: the channel's top


class PublishReply(NamedTuple):
    """What the publish script did with one message (a named tuple: one per message)."""

    offset: int
    epoch: str
    status: PublishStatus


class RebaseStatus(IntEnum):
    REBASED = 0
    NOT_NEEDED = 1  # the channel is no longer in the old epoch
    FENCED = 2


@dataclass(frozen=True, slots=True)
class RebaseReply:
    epoch: str  # the new epoch, or the channel's current one ("" = none)
    status: RebaseStatus


@dataclass(frozen=True, slots=True)
class LeaseGrant:
    """An acquire: `token` > 0 if won (the new fencing token), else 0 with `holder` the
    lease's value and `ttl_ms` its remaining time (-1 = no expiry). `now_ms`: the store's
    clock when it decided; a won lease expires at now_ms + ttl_ms."""

    token: int
    now_ms: int
    ttl_ms: int
    holder: str


@dataclass(frozen=True, slots=True)
class LeaseRenewal:
    renewed: bool
    now_ms: int
    holder: str  # the lease's value when not renewed ("" = none)
