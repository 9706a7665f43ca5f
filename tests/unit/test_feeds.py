"""The feed registry (ingest/feeds/__init__.py) and each feed's settings (their dataclass
and table next to the feed): pure, every environment a dict of its own."""

from __future__ import annotations

import argparse
import logging

import pytest

from common.backoff import Backoff
from common.config import Setting, add_arguments, build
from common.errors import ConfigError
from ingest.config import INGEST_SETTINGS, IngestConfig, check_ingest, parse_feed
from ingest.feeds import FEEDS, Feed, FeedContext, UnknownFeed, all_feeds, feed, make_upstream
from ingest.feeds.projectx import ProjectXFeed, ProjectXSettings
from ingest.feeds.sim import SimSettings, SimulatedFeed
from ingest.feeds.ws import WebSocketFeed, WsSettings

LOG = logging.getLogger("test.feeds")


def ingest(env: dict[str, str], argv: list[str] | None = None) -> IngestConfig:
    args = None
    if argv is not None:
        parser = argparse.ArgumentParser()
        add_arguments(parser, INGEST_SETTINGS)
        args = parser.parse_args(argv)
    return build(IngestConfig, INGEST_SETTINGS, env=env, args=args)


# --- the registry ---------------------------------------------------------------------------


def test_known_names_resolve_to_their_feed() -> None:
    assert list(FEEDS) == ["sim", "ws", "projectx"]
    for name in FEEDS:
        found = feed(name)
        assert isinstance(found, Feed)
        assert found.name == name
        # The settings dataclass is the IngestConfig field of the feed's name.
        assert type(IngestConfig().feed_settings(name)) is found.settings
    assert [f.name for f in all_feeds()] == list(FEEDS)
    assert feed("ws").settings is WsSettings


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(UnknownFeed) as info:
        feed("kafka")
    assert str(info.value) == "unknown feed 'kafka': expected one of sim, ws, projectx"
    assert info.value.name == "kafka"
    with pytest.raises(ConfigError) as config_error:
        parse_feed("FANOUT_FEED", "Sim")  # names are exact
    assert config_error.value.setting == "FANOUT_FEED"
    assert "expected one of sim, ws, projectx" in str(config_error.value)


def test_every_feed_setting_keeps_its_flat_key_flag_and_variable() -> None:
    for f in all_feeds():
        assert f.table, f.name
        for s in f.table:
            assert s.attr.startswith(f"{f.name}."), s.attr
            field = s.attr.split(".", 1)[1]
            assert s.section == ""  # the [ingest] section
            # The default feed's keys are its fields (symbols), the others' prefixed (ws_url).
            assert s.key == s.file_key == (field if f.name == "sim" else f"{f.name}_{field}")
            assert s.flag == "--" + s.key.replace("_", "-")
            assert s.env == "FANOUT_" + s.key.upper()
            assert s in INGEST_SETTINGS
    keys = [s.key for s in INGEST_SETTINGS]
    assert len(keys) == len(set(keys))  # no feed shadows another setting


def test_make_upstream_opens_the_chosen_feed_with_its_settings() -> None:
    states: list[tuple[str, str]] = []
    config = ingest({
        "FANOUT_FEED": "ws", "FANOUT_WS_URL": "wss://feed.example/x",
        "FANOUT_WS_MAPPING": '{"channel": "quotes.{s}"}', "FANOUT_WS_IDLE_TIMEOUT": "7",
        "FANOUT_RECONNECT_BASE": "0.1", "FANOUT_RECONNECT_CAP": "0.2",
    })
    check_ingest(config)
    upstream = make_upstream(config, LOG, lambda connection, state: states.append(
        (connection, state)))
    assert isinstance(upstream, WebSocketFeed)
    assert upstream.idle_timeout == 7.0
    projectx = make_upstream(IngestConfig(feed="projectx", projectx=ProjectXSettings(
        token="t", contracts=("CON.F.US.MNQ.Z25",))), LOG)
    assert isinstance(projectx, ProjectXFeed)
    assert isinstance(make_upstream(IngestConfig(), LOG), SimulatedFeed)


def test_a_registered_feed_is_opened_with_a_fresh_backoff_and_the_state_callback() -> None:
    seen: list[object] = []

    def open_test(settings: SimSettings, context: FeedContext) -> SimulatedFeed:
        first, second = context.backoff(), context.backoff()
        seen.extend([first is not second, first.base, first.cap])
        context.on_state("test", "live")
        return SimulatedFeed(settings.symbols, settings.rate, settings.seed)

    spec = Feed("sim", SimSettings, (), open_test)
    states: list[tuple[str, str]] = []
    context = FeedContext(LOG, lambda: Backoff(1.0, 2.0),
                          lambda connection, state: states.append((connection, state)))
    spec.open(SimSettings(symbols=("ES",)), context)
    assert seen == [True, 1.0, 2.0]
    assert states == [("test", "live")]


# --- each feed's settings -------------------------------------------------------------------


def test_feed_settings_defaults() -> None:
    config = ingest({})
    assert config.sim == SimSettings() == SimSettings(
        ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM"), 20.0, 1)
    assert config.ws == WsSettings(url="", subscribe="", mapping="", headers={},
                                   idle_timeout=30.0)
    assert config.projectx == ProjectXSettings("https://rtc.topstepx.com", "", (), ())


def test_feed_settings_from_environment_and_flags() -> None:
    config = ingest({
        "FANOUT_SYMBOLS": "ES, NQ", "FANOUT_RATE": "2.5", "FANOUT_SEED": "9",
        "FANOUT_WS_URL": "ws://127.0.0.1:1/x", "FANOUT_WS_HEADERS": '{"A": "b"}',
        "FANOUT_PROJECTX_CONTRACTS": "C1,C2", "FANOUT_PROJECTX_ACCOUNTS": "1, 2",
        "FANOUT_PROJECTX_TOKEN": "jwt",
    }, ["--rate", "4", "--projectx-url", "https://gw.example"])
    assert config.sim == SimSettings(("ES", "NQ"), 4.0, 9)  # the flag beats the variable
    assert config.ws.url == "ws://127.0.0.1:1/x"
    assert config.ws.headers == {"A": "b"}
    assert config.projectx == ProjectXSettings("https://gw.example", "jwt", ("C1", "C2"), (1, 2))


@pytest.mark.parametrize(
    ("env", "setting", "message"),
    [
        ({"FANOUT_SYMBOLS": "ES,a..b"}, "FANOUT_SYMBOLS", "bad symbol 'a..b'"),
        ({"FANOUT_SYMBOLS": " , "}, "FANOUT_SYMBOLS", "must name at least one symbol"),
        ({"FANOUT_RATE": "0"}, "FANOUT_RATE", "must be a finite number > 0, got 0"),
        ({"FANOUT_SEED": "-1"}, "FANOUT_SEED", "must be >= 0, got -1"),
        ({"FANOUT_WS_URL": "http://x"}, "FANOUT_WS_URL", "must be a ws:// or wss:// URL"),
        ({"FANOUT_WS_HEADERS": "[1]"}, "FANOUT_WS_HEADERS", "must be a JSON object of strings"),
        ({"FANOUT_WS_IDLE_TIMEOUT": "x"}, "FANOUT_WS_IDLE_TIMEOUT", "must be a number"),
        ({"FANOUT_PROJECTX_ACCOUNTS": "1,x"}, "FANOUT_PROJECTX_ACCOUNTS",
         "must be comma-separated integers"),
        ({"FANOUT_PROJECTX_URL": " "}, "FANOUT_PROJECTX_URL", "must not be empty"),
    ],
)
def test_a_bad_feed_setting_is_named(env: dict[str, str], setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ingest(env)
    assert info.value.setting == setting
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"FANOUT_FEED": "ws", "FANOUT_WS_MAPPING": "{}"}, "FANOUT_WS_URL"),
        ({"FANOUT_FEED": "ws", "FANOUT_WS_URL": "ws://h/x"}, "FANOUT_WS_MAPPING"),
        ({"FANOUT_FEED": "projectx", "FANOUT_PROJECTX_CONTRACTS": "C"}, "FANOUT_PROJECTX_TOKEN"),
        ({"FANOUT_FEED": "projectx", "FANOUT_PROJECTX_TOKEN": "t"}, "FANOUT_PROJECTX_CONTRACTS"),
    ],
)
def test_only_the_chosen_feed_is_checked(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        check_ingest(ingest(env))
    assert info.value.setting == setting
    # Another feed chosen: the same incomplete settings are not its business.
    check_ingest(ingest({**env, "FANOUT_FEED": "sim"}))


def test_secret_feed_settings_are_never_flags_nor_in_a_repr() -> None:
    secrets = {s.env for s in INGEST_SETTINGS if s.secret}
    assert {"FANOUT_WS_URL", "FANOUT_WS_HEADERS", "FANOUT_PROJECTX_TOKEN"} <= secrets
    config = ingest({"FANOUT_WS_URL": "wss://h/x?token=u-secret",
                     "FANOUT_WS_HEADERS": '{"Authorization": "h-secret"}',
                     "FANOUT_PROJECTX_TOKEN": "p-secret"})
    assert "secret" not in repr(config)
    with pytest.raises(ConfigError) as info:
        ingest({}, ["--projectx-token", "p-secret"])
    assert info.value.setting == "--projectx-token"


def test_the_ws_feed_names_a_mapping_it_cannot_use() -> None:
    for env, setting in (({"FANOUT_WS_MAPPING": "not json"}, "FANOUT_WS_MAPPING"),
                         ({"FANOUT_WS_MAPPING": '{"channel": "quotes.{s}"}',
                           "FANOUT_WS_SUBSCRIBE": "{}"}, "FANOUT_WS_SUBSCRIBE")):
        config = ingest({"FANOUT_FEED": "ws", "FANOUT_WS_URL": "ws://h/x", **env})
        with pytest.raises(ConfigError) as info:
            make_upstream(config, LOG)
        assert info.value.setting == setting


def test_setting_file_key_decides_section_key_and_dest() -> None:
    nested = Setting("ws.url", "--ws-url", "FANOUT_WS_URL", lambda n, t: t, "h",
                     file_key="ws_url")
    dotted = Setting("redis.url", "--redis-url", "REDIS_URL", lambda n, t: t, "h")
    assert (nested.section, nested.key) == ("", "ws_url")
    assert (dotted.section, dotted.key) == ("redis", "url")
    parser = argparse.ArgumentParser()
    add_arguments(parser, (nested,))
    assert parser.parse_args(["--ws-url", "ws://h/x"]).ws_url == "ws://h/x"
