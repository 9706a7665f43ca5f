"""Channel names: the grammar every component agrees on.

A channel name is the only thing a browser sends that reaches Redis key names, so it is
validated here once, strictly, before anything else looks at it. The grammar
(documented in docs/protocol.md):

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
from dataclasses import dataclass
from enum import StrEnum

from common.errors import BadChannel

MAX_CHANNEL_LENGTH = 128
MAX_KEY_LENGTH = 128

NAMESPACES = ("quotes", "trades", "depth", "bars", "account")
MARKET_NAMESPACES = ("quotes", "trades", "depth")
ACCOUNT_KINDS = ("orders", "positions", "balance", "trades")

_SEGMENT = r"[A-Za-z0-9_:\-]+"
_SYMBOL_RE = re.compile(rf"{_SEGMENT}(?:\.{_SEGMENT})*")
_INTERVAL_RE = re.compile(r"[0-9]{1,4}[smhd]")
_ACCOUNT_RE = re.compile(r"[A-Za-z0-9_\-]+")
# Snapshot keys travel in the pub/sub header, which is newline-separated.
_KEY_RE = re.compile(r"[^\x00-\x1f]*")


class SnapshotMode(StrEnum):
    """How a channel's latest state is kept (see the publish script)."""

    MERGE = "merge"  # one value; object fields merged into the previous value (quotes, balance)
    LAST = "last"  # one value; the newest message replaces it (trades, bars)
    KEYED = "keyed"  # latest value per key (orders, positions, depth levels)


_SNAPSHOT_MODES: dict[str, SnapshotMode] = {
    "quotes": SnapshotMode.MERGE,
    "trades": SnapshotMode.LAST,
    "depth": SnapshotMode.KEYED,
    "bars": SnapshotMode.LAST,
    "account.orders": SnapshotMode.KEYED,
    "account.positions": SnapshotMode.KEYED,
    "account.balance": SnapshotMode.MERGE,
    "account.trades": SnapshotMode.LAST,
}


@dataclass(frozen=True, slots=True)
class Channel:
    """A parsed, valid channel name."""

    name: str
    namespace: str  # first segment: quotes, trades, depth, bars, account
    kind: str  # namespace, or "account.<kind>" for per-account channels
    symbol: str | None = None
    interval: str | None = None
    account: str | None = None

    @property
    def snapshot_mode(self) -> SnapshotMode:
        return _SNAPSHOT_MODES[self.kind]

    def __str__(self) -> str:
        return self.name


def parse_channel(name: object) -> Channel:
    """Parse and validate a channel name; raise BadChannel saying what is wrong."""
    if not isinstance(name, str):
        raise BadChannel("channel must be a string")
    if not name:
        raise BadChannel("channel must not be empty")
    if len(name) > MAX_CHANNEL_LENGTH:
        raise BadChannel(f"channel longer than {MAX_CHANNEL_LENGTH} characters")
    namespace, sep, rest = name.partition(".")
    if not sep or not rest:
        raise BadChannel(f"channel {name!r} has no namespace: expected e.g. quotes.MNQ")
    if namespace in MARKET_NAMESPACES:
        if not _SYMBOL_RE.fullmatch(rest):
            raise BadChannel(f"bad symbol in channel {name!r}")
        return Channel(name, namespace, namespace, symbol=rest)
    if namespace == "bars":
        interval, sep, symbol = rest.partition(".")
        if not _INTERVAL_RE.fullmatch(interval) or not sep:
            raise BadChannel(f"bad bar interval in channel {name!r}: expected e.g. bars.1m.MNQ")
        if not _SYMBOL_RE.fullmatch(symbol):
            raise BadChannel(f"bad symbol in channel {name!r}")
        return Channel(name, "bars", "bars", symbol=symbol, interval=interval)
    if namespace == "account":
        account, sep, kind = rest.partition(".")
        if not _ACCOUNT_RE.fullmatch(account) or not sep:
            raise BadChannel(f"bad account id in channel {name!r}")
        if kind not in ACCOUNT_KINDS:
            raise BadChannel(
                f"unknown account channel kind {kind!r}: expected one of {', '.join(ACCOUNT_KINDS)}"
            )
        return Channel(name, "account", f"account.{kind}", account=account)
    raise BadChannel(
        f"unknown namespace {namespace!r}: expected one of {', '.join(NAMESPACES)}"
    )


def validate_key(key: object) -> str:
    """A snapshot key: a short string without control characters."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH or not _KEY_RE.fullmatch(key):
        raise ValueError(
            f"snapshot key must be a string of at most {MAX_KEY_LENGTH} printable characters"
        )
    return key
