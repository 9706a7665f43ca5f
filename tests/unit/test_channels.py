"""Channel-name grammar (common/channels.py): pure, no I/O."""

from __future__ import annotations

import pytest

from common.channels import (
    MAX_CHANNEL_LENGTH,
    MAX_KEY_LENGTH,
    Channel,
    SnapshotMode,
    parse_channel,
    validate_key,
)
from common.errors import BadChannel

# --- valid names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("quotes.MNQ", Channel("quotes.MNQ", "quotes", "quotes", symbol="MNQ")),
        (
            "trades.CON.F.US.MNQ.Z25",
            Channel("trades.CON.F.US.MNQ.Z25", "trades", "trades", symbol="CON.F.US.MNQ.Z25"),
        ),
        ("depth.ES", Channel("depth.ES", "depth", "depth", symbol="ES")),
        ("quotes.a_b-c:D9", Channel("quotes.a_b-c:D9", "quotes", "quotes", symbol="a_b-c:D9")),
        (
            "bars.1m.MNQ",
            Channel("bars.1m.MNQ", "bars", "bars", symbol="MNQ", interval="1m"),
        ),
        (
            "bars.15s.NQ",
            Channel("bars.15s.NQ", "bars", "bars", symbol="NQ", interval="15s"),
        ),
        (
            "bars.9999d.CON.F.US.MNQ.Z25",
            Channel(
                "bars.9999d.CON.F.US.MNQ.Z25", "bars", "bars",
                symbol="CON.F.US.MNQ.Z25", interval="9999d",
            ),
        ),
        (
            "account.12345.orders",
            Channel("account.12345.orders", "account", "account.orders", account="12345"),
        ),
        (
            "account.12345.positions",
            Channel("account.12345.positions", "account", "account.positions", account="12345"),
        ),
        (
            "account.12345.balance",
            Channel("account.12345.balance", "account", "account.balance", account="12345"),
        ),
        (
            "account.12345.trades",
            Channel("account.12345.trades", "account", "account.trades", account="12345"),
        ),
        (
            "account.Ab_9-x.orders",
            Channel("account.Ab_9-x.orders", "account", "account.orders", account="Ab_9-x"),
        ),
    ],
)
def test_valid_channels_parse_to_their_parts(name: str, expected: Channel) -> None:
    assert parse_channel(name) == expected


def test_channel_str_is_its_name() -> None:
    assert str(parse_channel("bars.1h.ES")) == "bars.1h.ES"


@pytest.mark.parametrize("interval", ["1s", "5m", "1h", "1d", "0s", "9999h"])
def test_every_interval_unit_and_length_up_to_four_digits(interval: str) -> None:
    assert parse_channel(f"bars.{interval}.ES").interval == interval


def test_longest_allowed_name_is_accepted() -> None:
    name = "quotes." + "X" * (MAX_CHANNEL_LENGTH - len("quotes."))
    assert len(name) == 128
    assert parse_channel(name).symbol == "X" * 121


# --- invalid names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        "quotes",  # no namespace separator
        "MNQ",
        "quotes.",  # trailing dot, empty symbol
        ".MNQ",  # empty namespace
        "futures.MNQ",  # unknown namespace
        "QUOTES.MNQ",  # namespaces are lower case
        "quotes..X",  # empty segment
        "quotes.X.",  # trailing dot
        "quotes.X..Y",
        "quotes.MN Q",  # space
        " quotes.MNQ",
        "quotes.MNQ ",
        "quotes.MNQ\n",
        "quotes.MNQ\t",
        'quotes.MN"Q',  # quote
        "quotes.MN'Q",
        "quotes.MN\\Q",  # backslash
        "quotes.{MNQ}",  # braces (Redis hash tags)
        "quotes.MN{Q",
        "quotes.MN}Q",
        "quotes.MN/Q",
        "quotes.MN*Q",
        "quotes.MNQé",  # non-ASCII letter
        "quotes.MNQ٣",  # non-ASCII digit
        "bars.1x.ES",  # bad interval unit
        "bars.1m",  # no symbol
        "bars.1m.",  # empty symbol
        "bars.m.ES",  # no digits
        "bars.12345m.ES",  # five digits
        "bars.1M.ES",  # unit is lower case
        "bars..ES",
        "bars.ES",
        "account.12345",  # no kind
        "account.12345.",  # empty kind
        "account.12345.fills",  # unknown kind
        "account.12345.Orders",
        "account.12345.orders.x",
        "account.1.2.orders",  # account id with a dot
        "account..orders",  # empty account id
        "account.a:b.orders",  # colon not allowed in an account id
        "account.a b.orders",
    ],
)
def test_invalid_channels_raise_bad_channel(name: str) -> None:
    with pytest.raises(BadChannel) as info:
        parse_channel(name)
    assert info.value.code == "bad_channel"


def test_name_over_128_characters_is_rejected() -> None:
    name = "quotes." + "X" * (MAX_CHANNEL_LENGTH - len("quotes.") + 1)
    assert len(name) == 129
    with pytest.raises(BadChannel, match="longer than 128"):
        parse_channel(name)


@pytest.mark.parametrize("value", [None, 5, 1.5, True, b"quotes.MNQ", ["quotes.MNQ"], {}])
def test_non_string_channel_is_rejected(value: object) -> None:
    with pytest.raises(BadChannel, match="must be a string"):
        parse_channel(value)


def test_empty_channel_message() -> None:
    with pytest.raises(BadChannel, match="must not be empty"):
        parse_channel("")


def test_unknown_namespace_message_lists_the_known_ones() -> None:
    with pytest.raises(BadChannel) as info:
        parse_channel("futures.MNQ")
    assert info.value.message == (
        "unknown namespace 'futures': expected one of quotes, trades, depth, bars, account"
    )


def test_unknown_account_kind_message_lists_the_known_ones() -> None:
    with pytest.raises(BadChannel) as info:
        parse_channel("account.7.fills")
    assert info.value.message == (
        "unknown account channel kind 'fills': expected one of orders, positions, balance, trades"
    )


# --- snapshot modes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("quotes.MNQ", SnapshotMode.MERGE),
        ("trades.MNQ", SnapshotMode.LAST),
        ("depth.MNQ", SnapshotMode.KEYED),
        ("bars.1m.MNQ", SnapshotMode.LAST),
        ("account.1.orders", SnapshotMode.KEYED),
        ("account.1.positions", SnapshotMode.KEYED),
        ("account.1.balance", SnapshotMode.MERGE),
        ("account.1.trades", SnapshotMode.LAST),
    ],
)
def test_snapshot_mode_per_kind(name: str, mode: SnapshotMode) -> None:
    assert parse_channel(name).snapshot_mode is mode


def test_snapshot_mode_values_are_the_script_names() -> None:
    assert [m.value for m in SnapshotMode] == ["merge", "last", "keyed"]


# --- snapshot keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "bid:1", "level 3", 'quo"te', "back\\slash", "é€😀", "k" * MAX_KEY_LENGTH, " "],
)
def test_valid_keys_are_returned_unchanged(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize(
    "key",
    ["a\nb", "\n", "\x00", "a\x1f", "\r", "\t", "x\x1b[0m", "k" * (MAX_KEY_LENGTH + 1)],
)
def test_keys_with_control_characters_or_too_long_are_rejected(key: str) -> None:
    with pytest.raises(ValueError, match="snapshot key must be a string"):
        validate_key(key)


@pytest.mark.parametrize("value", [None, 1, b"key", ["k"]])
def test_non_string_keys_are_rejected(value: object) -> None:
    with pytest.raises(ValueError):
        validate_key(value)
