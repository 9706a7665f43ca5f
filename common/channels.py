"""Channel names: the grammar every component agrees on.

A channel name is the only thing a browser sends that reaches Redis key names, so it is
validated here once, strictly, before anything else looks at it. Which names exist is
configuration: the namespaces (common/namespaces.py, loaded from a TOML file; the shipped
one is common/namespaces.toml). With the shipped namespaces the grammar (documented in
docs/protocol.md) is:

    channel  = market / bars / account
    market   = ("quotes" / "trades" / "depth") "." symbol
    bars     = "bars" "." interval "." symbol
    account  = "account" "." account-id "." ("orders" / "positions" / "balance" / "trades")
    symbol   = segment *("." segment)        ; e.g. MNQ, CON.F.US.MNQ.Z25
    segment  = 1*(ALPHA / DIGIT / "_" / "-" / ":")
    interval = 1*4DIGIT ("s" / "m" / "h" / "d")
    account-id = 1*(ALPHA / DIGIT / "_" / "-")

At most 128 characters in all. Nothing else is a channel.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.namespaces import ChannelSettings, Namespaces

MAX_CHANNEL_LENGTH = 128
MAX_KEY_LENGTH = 128
# An upstream message id (idempotency): the publisher refuses longer ones, the HTTP API and
# the WebSocket feed check it first to say which message. Not checked again in publish.lua.
MAX_MESSAGE_ID_LENGTH = 256

# The shipped namespaces (common/namespaces.toml); the loaded ones: active_namespaces().
NAMESPACES = ("quotes", "trades", "depth", "bars", "account")
MARKET_NAMESPACES = ("quotes", "trades", "depth")
ACCOUNT_KINDS = ("orders", "positions", "balance", "trades")

# Snapshot keys travel in the pub/sub header, which is newline-separated.
_KEY_RE = re.compile(r"[^\x00-\x1f]*")


class SnapshotMode(StrEnum):
    """How a channel's latest state is kept (see the publish script). A namespace may also
    keep none (snapshot "none" in its file): its `Channel.snapshot_mode` is None."""

    MERGE = "merge"  # one value; object fields merged into the previous value (quotes, balance)
    LAST = "last"  # one value; the newest message replaces it (trades, bars)
    KEYED = "keyed"  # latest value per key (orders, positions, depth levels)


@dataclass(frozen=True, slots=True)
class Channel:
    """A parsed, valid channel name."""

    name: str
    namespace: str  # first segment: quotes, trades, depth, bars, account, ...
    kind: str  # namespace, or "<namespace>.<kind>" (account.orders) for namespaces with kinds
    symbol: str | None = None
    interval: str | None = None
    account: str | None = None
    # The values of the namespace pattern's placeholders, in order (`params` names them).
    values: tuple[str, ...] = field(default=(), compare=False, repr=False)
    # How the channel behaves (its namespace's, or its kind's, settings).
    settings: ChannelSettings | None = field(default=None, compare=False, repr=False)

    @property
    def spec(self) -> ChannelSettings:
        """The settings, looked up in the active namespaces for a Channel built by hand."""
        return self.settings or active_namespaces().settings(self.kind)

    @property
    def snapshot_mode(self) -> SnapshotMode | None:
        return self.spec.snapshot_mode

    @property
    def params(self) -> tuple[tuple[str, str], ...]:
        """Every placeholder of the namespace's pattern: (name, value), in order."""
        return tuple(zip(self.spec.groups, self.values, strict=False))

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    def __str__(self) -> str:
        return self.name


_active: Namespaces | None = None


def active_namespaces() -> Namespaces:
    """The namespaces this process parses channel names with (the shipped ones unless
    FANOUT_NAMESPACES_FILE named others)."""
    if _active is None:
        import common.namespaces  # noqa: F401 - activates the shipped namespaces
    assert _active is not None
    return _active


def use_namespaces(namespaces: Namespaces) -> None:
    global _active
    _active = namespaces


def parse_channel(name: object) -> Channel:
    """Parse and validate a channel name; raise BadChannel saying what is wrong."""
    return (_active or active_namespaces()).parse(name)


def validate_key(key: object) -> str:
    """A snapshot key: a short string without control characters."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"snapshot key must be a string of at most {MAX_KEY_LENGTH} printable characters"
        )
    return key
