"""Channel namespaces as configuration (common/namespaces.py): the file format and its
errors, the pattern syntax, the shipped file, precedence of FANOUT_HISTORY/FANOUT_OVERFLOW,
and a namespace defined by a file driven end to end through a real edge and Valkey."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.auth import Claims, permits, sign_token
from common.channels import SnapshotMode, active_namespaces, parse_channel
from common.config import (
    DEFAULT_HISTORY,
    DEFAULT_OVERFLOW,
    EDGE_SETTINGS,
    INGEST_SETTINGS,
    EdgeConfig,
    HistoryPolicy,
    IngestConfig,
    build,
)
from common.errors import BadChannel, ConfigError
from common.keys import Keys
from common.namespaces import (
    DEFAULT,
    DEFAULT_FILE,
    NamespacesError,
    activate,
    load_namespaces,
    parse_namespaces,
)
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.support.wsclient import ProtoClient

SECRET = b"0123456789abcdef0123456789abcdef"


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


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError) as info:
        load_namespaces(missing)
    assert info.value.setting == "FANOUT_NAMESPACES_FILE" and missing in info.value.problem


# --- the setting, and precedence of FANOUT_HISTORY / FANOUT_OVERFLOW ------------------------


CHAT = """
[namespaces.chat]
pattern = "chat.{room:id:32}"
snapshot = "none"
history_length = 100
history_age = 600
overflow = "drop"
subscribe = "public"

[namespaces.alerts]
pattern = "alerts.{desk:id}"
snapshot = "last"
history_length = 50
history_age = 60
overflow = "conflate"
subscribe = "account"
account_segment = "desk"
account_claims = ["accounts", "sub"]
recovery = false
max_rate = 5
"""


@pytest.fixture
def chat_file(tmp_path: Path) -> str:
    path = tmp_path / "namespaces.toml"
    path.write_text(CHAT)
    return str(path)


def test_setting_loads_the_file_for_ingest(chat_file: str) -> None:
    config = build(IngestConfig, INGEST_SETTINGS, env={"FANOUT_NAMESPACES_FILE": chat_file})
    assert config.namespaces_file == chat_file
    assert active_namespaces().names == ("chat", "alerts")
    assert dict(config.history) == {"chat": HistoryPolicy(100, 600.0),
                                    "alerts": HistoryPolicy(50, 60.0)}
    assert parse_channel("chat.lobby").spec.snapshot == "none"


def test_history_and_overflow_settings_override_the_file(chat_file: str) -> None:
    ingest = build(IngestConfig, INGEST_SETTINGS, env={
        "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_HISTORY": "chat=10/5"})
    assert dict(ingest.history) == {"chat": HistoryPolicy(10, 5.0),
                                    "alerts": HistoryPolicy(50, 60.0)}
    edge = build(EdgeConfig, EDGE_SETTINGS, env={
        "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_OVERFLOW": "alerts=disconnect"})
    assert dict(edge.overflow) == {"chat": "drop", "alerts": "disconnect"}


def test_overrides_must_name_namespaces_of_the_file(chat_file: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(IngestConfig, INGEST_SETTINGS, env={
            "FANOUT_NAMESPACES_FILE": chat_file, "FANOUT_HISTORY": "quotes=10/5"})
    assert info.value.setting == "FANOUT_HISTORY"


def test_flag_selects_the_file_too(chat_file: str) -> None:
    import argparse

    from common.config import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser, EDGE_SETTINGS)
    config = build(EdgeConfig, EDGE_SETTINGS, env={},
                   args=parser.parse_args(["--namespaces-file", chat_file]))
    assert config.namespaces_file == chat_file and dict(config.overflow)["chat"] == "drop"


def test_bad_file_fails_the_build_naming_file_namespace_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[namespaces.chat]\npattern = "chat.{room:id}"\noverflow = "block"\n')
    with pytest.raises(ConfigError) as info:
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_NAMESPACES_FILE": str(path)})
    assert info.value.setting == "FANOUT_NAMESPACES_FILE"
    assert str(path) in str(info.value) and "'chat': overflow:" in str(info.value)
    assert active_namespaces() is DEFAULT  # nothing activated


def test_without_the_setting_the_shipped_namespaces_are_used() -> None:
    config = build(EdgeConfig, EDGE_SETTINGS, env={})
    assert config.namespaces_file == "" and dict(config.overflow) == DEFAULT_OVERFLOW


# --- permissions ---------------------------------------------------------------------------


def test_permits_per_subscribe_mode(chat_file: str) -> None:
    activate(load_namespaces(chat_file))
    nobody = Claims("nobody", 0.0, ("quotes.*",))
    d1 = Claims("d1", 0.0, ())
    trader = Claims("t", 0.0, (), ("d3",))
    admin = Claims("admin", 0.0, ("alerts.*",))
    assert permits(nobody, parse_channel("chat.lobby"))  # public
    assert not permits(nobody, parse_channel("alerts.d1"))
    assert permits(d1, parse_channel("alerts.d1")) and not permits(d1, parse_channel("alerts.d2"))
    assert permits(trader, parse_channel("alerts.d3"))
    assert not permits(trader, parse_channel("alerts.d1"))
    assert permits(admin, parse_channel("alerts.d9"))  # token patterns grant too


def test_permits_with_the_shipped_namespaces_is_the_claims_check() -> None:
    claims = Claims("42", 0.0, ("quotes.*", "account.7.*"), ("7",))
    for name in ("quotes.MNQ", "trades.MNQ", "account.7.orders", "account.42.orders",
                 "account.8.balance", "bars.1m.ES"):
        assert permits(claims, parse_channel(name)) == claims.allows(name), name
    # "accounts" alone by default: the subject is no account.
    assert not permits(claims, parse_channel("account.42.orders"))


# --- end to end: a namespace from a file, through a real edge and Valkey --------------------


async def _open(url: str, token: str, *, rcvbuf: int | None = None) -> ProtoClient:
    kwargs: dict[str, Any] = {}
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        host, port = url.split("//")[1].split("/")[0].split(":")
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        kwargs["sock"] = sock
    client = await ProtoClient.open(url, connect=False, **kwargs)
    reply = await client.request({"type": "connect", "token": token})
    assert reply["type"] == "connected", reply
    return client


def _token(**claims: Any) -> str:
    return sign_token({"exp": time.time() + 300, **claims}, SECRET)


@pytest.fixture
async def chat_edge(edge_factory: Any, chat_file: str) -> Any:
    config = build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_NAMESPACES_FILE": chat_file})
    return await edge_factory(
        namespaces_file=chat_file, overflow=config.overflow, auth_secret=SECRET.decode(),
        queue_max_messages=50, queue_max_bytes=64 * 1024,
    )


@pytest.mark.integration
async def test_namespace_from_a_file_end_to_end(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    publisher = Publisher(redis, keys)  # the file's history: chat 100
    channel = "chat.lobby"
    first = await publisher.publish(UpstreamMessage(channel, {"text": "hi"}))
    assert first.offset == 1

    # public: a token whose channels claim does not name chat reads it
    alice = await _open(chat_edge.url, _token(sub="alice", channels=["quotes.*"]))
    reply = await alice.subscribe(channel, snapshot=True)
    assert reply["type"] == "subscribed" and reply["offset"] == 1
    assert reply["snapshot"] == {}  # snapshot "none": nothing kept ...
    assert not await redis.exists(keys.snapshot(channel))  # ... not even in Redis
    assert reply["delivery"] == "drop"
    second = await publisher.publish(UpstreamMessage(channel, {"text": "there"}))
    await alice.wait_for(lambda: alice.offsets[channel] == [second.offset])
    position = alice.positions[channel]
    await alice.close()

    # recover with an offset: the messages published while away, exactly
    missed = [await publisher.publish(UpstreamMessage(channel, {"n": i})) for i in range(3)]
    back = await _open(chat_edge.url, _token(sub="alice", channels=[]))
    reply = await back.subscribe(channel, recover=position)
    assert reply["recovered"] is True and not reply.get("snapshot")
    await back.wait_for(lambda: back.offsets[channel] == [m.offset for m in missed])

    # history 100: a position older than that is not recovered (and the snapshot is empty)
    await publisher.publish_batch([UpstreamMessage(channel, {"n": i}) for i in range(120)])
    assert await redis.xlen(keys.stream(channel)) == 100
    late = await _open(chat_edge.url, _token(sub="bob"))
    reply = await late.subscribe(channel, recover=position)
    assert reply["recovered"] is False and reply["snapshot"] == {}

    # names of another file are not channels here
    bad = await late.request({"type": "subscribe", "channel": "quotes.MNQ"})
    assert bad["code"] == "bad_channel"
    assert bad["message"] == "unknown namespace 'quotes': expected one of chat, alerts"
    await back.close()
    await late.close()


@pytest.mark.integration
async def test_namespace_from_a_file_slow_consumer_drops(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    publisher = Publisher(redis, Keys(key_prefix))
    channel = "chat.busy"
    slow = await _open(chat_edge.url, _token(sub="slow"), rcvbuf=4096)
    reply = await slow.subscribe(channel)
    assert reply["delivery"] == "drop"
    slow.ws.transport.pause_reading()
    pad = "x" * 2000
    total = 0
    for _ in range(60):  # ~12 MB: more than the socket buffers and the queue (64 KiB) hold
        results = await publisher.publish_batch(
            [UpstreamMessage(channel, {"pad": pad}) for _ in range(100)]
        )
        total = results[-1].offset
        await asyncio.sleep(0)
    slow.ws.transport.resume_reading()

    await slow.wait_for(lambda: len(slow.covered(channel)) >= total, 30)
    assert any(m.get("type") == "gap" for m in slow.messages), "the client was never slow"
    # each offset once: received, or dropped and told
    assert sorted(slow.covered(channel)) == list(range(1, total + 1))
    assert not slow.closed.done()  # drop, not disconnect
    assert chat_edge.edge.stats.dropped.get("chat", 0) > 0
    await slow.close()


@pytest.mark.integration
async def test_namespace_without_recovery_account_permission_and_max_rate(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    publisher = Publisher(redis, Keys(key_prefix))
    await publisher.publish(UpstreamMessage("alerts.d1", {"level": 1}))
    d1 = await _open(chat_edge.url, _token(sub="d1"))  # account_claims: sub
    reply = await d1.subscribe("alerts.d1")
    assert reply["type"] == "subscribed"
    assert reply["delivery"] == "conflate"  # max_rate 5 by default
    position = (reply["offset"], reply["epoch"])
    denied = await d1.request({"type": "subscribe", "channel": "alerts.d2"})
    assert denied["code"] == "permission_denied"
    await d1.close()

    await publisher.publish(UpstreamMessage("alerts.d1", {"level": 2}))
    trader = await _open(chat_edge.url, _token(sub="t", accounts=["d1"]))  # accounts claim
    reply = await trader.subscribe("alerts.d1", recover=position)
    # recovery = false: a recovering subscribe starts over from the snapshot
    assert reply["recovered"] is False and reply["snapshot"] == {"": {"level": 2}}
    assert reply["offset"] == 2
    await trader.close()


def test_the_documented_example_file_loads() -> None:
    text = Path("docs/protocol.md").read_text()
    block = re.search(r"```toml\n(.*?)```", text, re.S)
    assert block is not None
    spaces = parse_namespaces(block.group(1), "protocol.md")
    assert spaces.parse("risk.d7.alerts").spec.recovery is False
    assert spaces.parse("chat.lobby").spec.rate(100) == 50


@pytest.mark.integration
async def test_snapshot_none_publishes_every_message_even_if_changed_only(
    chat_file: str, redis: Any, key_prefix: str
) -> None:
    activate(load_namespaces(chat_file))
    keys = Keys(key_prefix)
    publisher = Publisher(redis, keys)
    msg = UpstreamMessage("chat.x", {"same": 1}, if_changed=True)
    offsets = [(await publisher.publish(msg)).offset for _ in range(3)]
    assert offsets == [1, 2, 3]  # no state kept: nothing is "unchanged"
    assert not await redis.exists(keys.snapshot("chat.x"))
    assert await redis.xlen(keys.stream("chat.x")) == 3


@pytest.mark.parametrize("command", ["edge", "ingest"])
def test_bad_file_stops_the_command_at_start(tmp_path: Path, command: str) -> None:
    import os
    import subprocess
    import sys

    path = tmp_path / "ns.toml"
    path.write_text('[namespaces.chat]\npattern = "chat.{room:id}"\nsnapshot = "full"\n')
    env = {**os.environ, "FANOUT_NAMESPACES_FILE": str(path)}
    done = subprocess.run([sys.executable, "-m", "common.cli", command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert (f"FANOUT_NAMESPACES_FILE: {path}: namespace 'chat': snapshot: must be one of "
            "merge, last, keyed, none, got 'full'") in done.stderr


def test_openapi_document_describes_the_loaded_namespaces(chat_file: str) -> None:
    from ingest.http_api import CHANNEL_PATTERN, openapi_document

    def pattern() -> str:
        doc = openapi_document(1 << 20, 1000)
        channel = doc["components"]["schemas"]["Message"]["properties"]["channel"]
        return str(channel["pattern"])

    assert pattern() == CHANNEL_PATTERN == DEFAULT.openapi_pattern
    activate(load_namespaces(chat_file))
    assert pattern() == active_namespaces().openapi_pattern
    assert re.search(pattern()[:-1] + r"\Z", "chat.lobby")
    assert not re.search(pattern()[:-1] + r"\Z", "quotes.MNQ")
