"""Channel namespaces as configuration (common/namespaces.py): the file format and its
errors, the pattern syntax, the shipped file. Files of tests' own: tests/inprocess; through
a real edge and Valkey: tests/integration."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.auth import Claims, permits
from common.channels import SnapshotMode, parse_channel
from common.config import (
    DEFAULT_HISTORY,
    DEFAULT_OVERFLOW,
    EDGE_SETTINGS,
    EdgeConfig,
    HistoryPolicy,
    build,
)
from common.errors import BadChannel, ConfigError
from common.namespaces import (
    DEFAULT,
    DEFAULT_FILE,
    NamespacesError,
    activate,
    parse_namespaces,
)


@pytest.fixture(autouse=True)
def _restore_namespaces() -> Iterator[None]:
    """Tests here activate other namespaces: every other test sees the shipped ones."""
    yield
    activate(DEFAULT)


def ns(text: str) -> Any:
    return parse_namespaces(text, "test.toml")


# --- the shipped file ----------------------------------------------------------------------


def test_shipped_file_is_what_the_code_had() -> None:
    assert DEFAULT.source == DEFAULT_FILE
    assert DEFAULT.names == ("quotes", "trades", "depth", "bars", "account")
    history = {
        "quotes": HistoryPolicy(10_000, 300.0),
        "trades": HistoryPolicy(10_000, 600.0),
        "depth": HistoryPolicy(10_000, 120.0),
        "bars": HistoryPolicy(5_000, 86_400.0),
        "account": HistoryPolicy(1_000, 86_400.0),
    }
    assert history == DEFAULT_HISTORY
    overflow = {"quotes": "conflate", "trades": "drop", "depth": "conflate", "bars": "drop",
                "account": "disconnect"}
    assert overflow == DEFAULT_OVERFLOW
    modes = {kind: DEFAULT.settings(kind).snapshot_mode for kind in (
        "quotes", "trades", "depth", "bars", "account.orders", "account.positions",
        "account.balance", "account.trades")}
    assert modes == {
        "quotes": SnapshotMode.MERGE, "trades": SnapshotMode.LAST, "depth": SnapshotMode.KEYED,
        "bars": SnapshotMode.LAST, "account.orders": SnapshotMode.KEYED,
        "account.positions": SnapshotMode.KEYED, "account.balance": SnapshotMode.MERGE,
        "account.trades": SnapshotMode.LAST,
    }
    for name in DEFAULT.names:
        settings = DEFAULT.settings(name)
        assert settings.recovery and settings.max_rate is None and settings.max_rate_limit is None
        assert settings.subscribe == ("account" if name == "account" else "token")


def test_shipped_file_is_package_data() -> None:
    text = Path("pyproject.toml").read_text()
    assert '"namespaces.toml"' in text


# --- the pattern syntax --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_", "good", "bad"),
    [
        ("id", ["a", "A_b-9", "42"], ["a:b", "a b", "é", "{x}"]),
        ("segment", ["a:b", "A_b-9:c"], ["a b", "a/b", "a{"]),
        ("int", ["0", "123"], ["a", "1a", "-1"]),
        ("interval", ["1s", "9999d", "15m"], ["1w", "12345s", "m", "1M"]),
        ("symbol", ["MNQ", "CON.F.US.MNQ.Z25", "a:b.c"], ["a..b", "a.", ".a", "a b"]),
    ],
)
def test_segment_types(type_: str, good: list[str], bad: list[str]) -> None:
    spaces = ns(f'[namespaces.x]\npattern = "x.{{v:{type_}}}"\n')
    for value in good:
        assert spaces.parse(f"x.{value}").param("v") == value
    for value in bad:
        with pytest.raises(BadChannel, match="bad v in channel"):
            spaces.parse(f"x.{value}")


def test_one_segment_types_do_not_take_dots() -> None:
    spaces = ns('[namespaces.x]\npattern = "x.{v:id}"\n')
    with pytest.raises(BadChannel, match=re.escape("has more segments than x.{v:id}")):
        spaces.parse("x.a.b")


def test_max_length_of_a_segment() -> None:
    spaces = ns('[namespaces.x]\npattern = "x.{a:id:3}.{s:symbol:5}"\n')
    assert spaces.parse("x.abc.AB.CD").params == (("a", "abc"), ("s", "AB.CD"))
    with pytest.raises(BadChannel, match=re.escape("bad a in channel 'x.abcd.A': longer than 3")):
        spaces.parse("x.abcd.A")
    with pytest.raises(BadChannel, match=re.escape("bad s in channel 'x.a.ABCDEF': longer than 5")):
        spaces.parse("x.a.ABCDEF")


def test_literals_kinds_and_the_channel_parts() -> None:
    spaces = ns("""
[namespaces.risk]
pattern = "risk.{desk:id}.live.{kind}"
subscribe = "account"
account_segment = "desk"
[namespaces.risk.kinds]
limits = { snapshot = "merge" }
alerts = { snapshot = "none", recovery = false, max_rate = 5 }
""")
    channel = spaces.parse("risk.d7.live.alerts")
    assert (channel.namespace, channel.kind, channel.param("desk")) == ("risk", "risk.alerts", "d7")
    assert channel.snapshot_mode is None and not channel.spec.recovery
    assert channel.spec.max_rate == 5.0
    limits = spaces.parse("risk.d7.live.limits")
    assert limits.snapshot_mode is SnapshotMode.MERGE and limits.spec.recovery
    assert limits.spec.max_rate is None
    with pytest.raises(
        BadChannel, match=re.escape("expected 'live' after risk, e.g. risk.42.live.limits")
    ):
        spaces.parse("risk.d7.dead.limits")
    with pytest.raises(BadChannel) as info:
        spaces.parse("risk.d7.live.fills")
    assert info.value.message == (
        "unknown risk channel kind 'fills': expected one of limits, alerts"
    )
    with pytest.raises(BadChannel, match=re.escape("too short: expected e.g. risk.42.live.limits")):
        spaces.parse("risk.d7")


def test_messages_name_the_loaded_namespaces() -> None:
    spaces = ns('[namespaces.chat]\npattern = "chat.{room:id}"\n')
    with pytest.raises(BadChannel) as info:
        spaces.parse("quotes.MNQ")
    assert info.value.message == "unknown namespace 'quotes': expected one of chat"
    with pytest.raises(BadChannel) as info:
        spaces.parse("chat")
    assert info.value.message == "channel 'chat' has no namespace: expected e.g. chat.42"


def test_channel_length_limit_holds_for_every_namespace() -> None:
    spaces = ns('[namespaces.x]\npattern = "x.{s:symbol}"\n')
    assert spaces.parse("x." + "a" * 126).param("s") == "a" * 126
    with pytest.raises(BadChannel, match="longer than 128"):
        spaces.parse("x." + "a" * 127)


def test_openapi_pattern_of_a_file() -> None:
    spaces = ns('[namespaces.chat]\npattern = "chat.{room:id}.{n:int}"\n')
    assert spaces.openapi_pattern == r"^(?:chat\.(?:[A-Za-z0-9_\-]+)\.(?:[0-9]+))$"


def test_default_settings_of_a_minimal_namespace() -> None:
    s = ns('[namespaces.chat]\npattern = "chat.{room:id}"\n').settings("chat")
    assert (s.snapshot, s.history_length, s.history_age, s.overflow, s.subscribe, s.recovery,
            s.max_rate, s.max_rate_limit) == ("last", 1000, 300.0, "disconnect", "token", True,
                                              None, None)


@pytest.mark.parametrize(
    ("max_rate", "limit", "asked", "got"),
    [(None, None, None, None), (None, None, 7, 7), (5, None, None, 5), (5, None, 50, 50),
     (5, 10, 50, 10), (None, 10, None, 10), (5, 10, 2, 2)],
)
def test_max_rate_default_and_limit(max_rate: float | None, limit: float | None,
                                    asked: float | None, got: float | None) -> None:
    lines = ['[namespaces.x]', 'pattern = "x.{v:id}"']
    if max_rate is not None:
        lines.append(f"max_rate = {max_rate}")
    if limit is not None:
        lines.append(f"max_rate_limit = {limit}")
    assert ns("\n".join(lines)).settings("x").rate(asked) == got


# --- file errors: each names the file, the namespace and the field ------------------------


@pytest.mark.parametrize(
    ("body", "namespace", "field", "problem"),
    [
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nsnapshot = "full"', "chat",
         "snapshot", "must be one of merge, last, keyed, none, got 'full'"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\noverflow = "block"', "chat",
         "overflow", "must be one of disconnect, conflate, drop, got 'block'"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nsubscribe = "all"', "chat",
         "subscribe", "must be one of public, token, account, got 'all'"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nhistory_length = 0', "chat",
         "history_length", "must be above 0"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nhistory_length = 1.5', "chat",
         "history_length", "must be an integer, got 1.5"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nhistory_age = "1h"', "chat",
         "history_age", "must be a number, got '1h'"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nhistory_age = nan', "chat",
         "history_age", "must be above 0"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nmax_rate = 2000', "chat",
         "max_rate", "at most 1000"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nmax_rate = 10\nmax_rate_limit = 5',
         "chat", "max_rate", "must not exceed max_rate_limit"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\nrecovery = "no"', "chat",
         "recovery", "must be true or false, got 'no'"),
        ('[namespaces.chat]\npattern = "chat.{room:id}"\ncolour = "red"', "chat",
         "colour", "unknown field"),
        ('[namespaces.chat]\nsnapshot = "last"', "chat", "pattern", "is required"),
        ('[namespaces.chat]\npattern = 5', "chat", "pattern", "must be a string"),
        ('[namespaces.chat]\npattern = "talk.{room:id}"', "chat", "pattern",
         "must start with the namespace, 'chat'"),
        ('[namespaces.chat]\npattern = "chat"', "chat", "pattern", "no segment after"),
        ('[namespaces.chat]\npattern = "chat.{room:uuid}"', "chat", "pattern",
         "unknown type 'uuid'"),
        ('[namespaces.chat]\npattern = "chat.{room}"', "chat", "pattern", "unknown type None"),
        ('[namespaces.chat]\npattern = "chat.{room:id}.{room:int}"', "chat", "pattern",
         "segment name 'room' used twice"),
        ('[namespaces.chat]\npattern = "chat.{s:symbol}.x"', "chat", "pattern",
         "must be the last segment"),
        ('[namespaces.chat]\npattern = "chat.a b"', "chat", "pattern", "bad segment 'a b'"),
        ('[namespaces.chat]\npattern = "chat.{r:id:0}"', "chat", "pattern",
         "max length must be 1 to 128"),
        ('[namespaces.chat]\npattern = "chat.{r:id}..x"', "chat", "pattern", "bad segment ''"),
        ('[namespaces.chat]\npattern = "chat.{kind}"', "chat", "kinds", "needs a kinds table"),
        ('[namespaces.chat]\npattern = "chat.{r:id}"\nkinds = { a = {} }', "chat", "kinds",
         "only such a pattern"),
        ('[namespaces.chat]\npattern = "chat.{kind}"\nkinds = {}', "chat", "kinds",
         "at least one kind"),
        ('[namespaces.chat]\npattern = "chat.{kind}"\nkinds = { a = { overflow = "drop" } }',
         "chat.kinds.a", "overflow", "unknown field: a kind may set"),
        ('[namespaces.chat]\npattern = "chat.{kind}"\nkinds = { a = { snapshot = "x" } }',
         "chat.kinds.a", "snapshot", "must be one of"),
        ('[namespaces.chat]\npattern = "chat.{r:id}"\nsubscribe = "account"', "chat",
         "account_segment", "must name a segment of the pattern (r), got ''"),
        ('[namespaces.chat]\npattern = "chat.{r:id}"\nsubscribe = "account"\n'
         'account_segment = "r"\naccount_claims = ["email"]', "chat", "account_claims",
         "must be a list of accounts, sub"),
        ('[namespaces.Chat]\npattern = "Chat.{r:id}"', "Chat", "name", "lower-case"),
        ('[namespaces]\nchat = 5', "chat", "", "must be a table"),
        ('[namespaces]', "", "namespaces", "declare at least one"),
        ('[channels.chat]\npattern = "chat.{r:id}"', "", "channels", "unknown top-level field"),
        ('[namespaces.chat\n', "", "TOML", ""),
    ],
)
def test_bad_files_name_the_file_namespace_and_field(
    body: str, namespace: str, field: str, problem: str
) -> None:
    with pytest.raises(NamespacesError) as info:
        parse_namespaces(body, "/etc/fanout/ns.toml")
    err = info.value
    assert isinstance(err, ConfigError) and err.setting == "FANOUT_NAMESPACES_FILE"
    assert (err.file, err.namespace, err.field) == ("/etc/fanout/ns.toml", namespace, field)
    assert err.problem.startswith("/etc/fanout/ns.toml: ")
    if namespace:
        assert f"namespace {namespace!r}: {field}: " in err.problem
    assert problem in err.problem


def test_without_the_setting_the_shipped_namespaces_are_used() -> None:
    config = build(EdgeConfig, EDGE_SETTINGS, env={})
    assert config.namespaces_file == "" and dict(config.overflow) == DEFAULT_OVERFLOW


def test_permits_with_the_shipped_namespaces_is_the_claims_check() -> None:
    claims = Claims("42", 0.0, ("quotes.*", "account.7.*"), ("7",))
    for name in ("quotes.MNQ", "trades.MNQ", "account.7.orders", "account.42.orders",
                 "account.8.balance", "bars.1m.ES"):
        assert permits(claims, parse_channel(name)) == claims.allows(name), name
    # "accounts" alone by default: the subject is no account.
    assert not permits(claims, parse_channel("account.42.orders"))


def test_the_documented_example_file_loads() -> None:
    text = Path("docs/protocol.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    spaces = parse_namespaces(block.group(1), "protocol.md")
    assert spaces.parse("risk.d7.alerts").spec.recovery is False
    assert spaces.parse("chat.lobby").spec.rate(100) == 50
