"""Configuration from the environment and flags (common/config.py), pure; config files and
secret files written to tmp_path are tests/inprocess/test_config.py.

Every test passes its own `env` mapping, so the process environment is never read.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import re
from pathlib import Path

import pytest

from common.config import (
    DEFAULT_HISTORY,
    EDGE_SETTINGS,
    NOT_SETTINGS,
    EdgeConfig,
    HistoryPolicy,
    RedisSettings,
    Setting,
    add_arguments,
    build,
    cluster_seeds,
    parse_history,
    redact_url,
    setting_metavar,
)
from common.errors import ConfigError
from fanout.config import COMMANDS, check_environment, load
from ingest.config import INGEST_SETTINGS, IngestConfig
from ingest.feeds.sim import SimSettings


def parse_flags(settings: tuple[Setting, ...], argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, settings)
    return parser.parse_args(argv)


def edge(env: dict[str, str], argv: list[str] | None = None) -> EdgeConfig:
    args = None if argv is None else parse_flags(EDGE_SETTINGS, argv)
    return build(EdgeConfig, EDGE_SETTINGS, env=env, args=args)


def ingest(env: dict[str, str], argv: list[str] | None = None) -> IngestConfig:
    args = None if argv is None else parse_flags(INGEST_SETTINGS, argv)
    return build(IngestConfig, INGEST_SETTINGS, env=env, args=args)


# --- defaults --------------------------------------------------------------------------------


def test_edge_defaults() -> None:
    config = edge({})
    assert config == EdgeConfig()
    assert config.host == "127.0.0.1"
    assert config.port == 8000
    assert config.redis == RedisSettings("redis://127.0.0.1:6379/0", "fanout")
    assert (config.ping_interval, config.pong_timeout) == (5.0, 5.0)
    assert config.max_message_size == 65_536
    assert config.compression is False
    assert config.log_level == "info"


def test_ingest_defaults() -> None:
    config = ingest({})
    assert config == IngestConfig()
    assert config.sim.symbols == ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM")
    assert config.history == DEFAULT_HISTORY
    assert config.feed == "sim"
    assert config.feed_id == ""  # the leader election uses the feed name then
    assert config.lease_ttl == 5.0


def test_defaults_with_flags_parsed_but_none_given() -> None:
    assert edge({}, []) == EdgeConfig()
    assert ingest({}, []) == IngestConfig()


def test_unrelated_environment_is_ignored() -> None:
    assert edge({"PORT": "1", "HOME": "/x"}) == EdgeConfig()


def test_empty_environment_values_are_ignored() -> None:
    assert edge({"FANOUT_EDGE_PORT": "", "FANOUT_EDGE_HOST": "", "REDIS_URL": ""}) == EdgeConfig()


# --- the environment overrides the defaults --------------------------------------------------


def test_edge_environment_overrides() -> None:
    config = edge({
        "FANOUT_REDIS_URL": "rediss://cache:6380/2",
        "FANOUT_KEY_PREFIX": "test1",
        "FANOUT_EDGE_HOST": " 0.0.0.0 ",
        "FANOUT_EDGE_PORT": "9001",
        "FANOUT_PING_INTERVAL": "5.5",
        "FANOUT_PONG_TIMEOUT": "2",
        "FANOUT_CONNECT_TIMEOUT": "0.5",
        "FANOUT_MAX_MESSAGE_SIZE": "256",
        "FANOUT_MAX_SUBSCRIPTIONS": "3",
        "FANOUT_QUEUE_MAX_MESSAGES": "10",
        "FANOUT_QUEUE_MAX_BYTES": "1024",
        "FANOUT_RECOVERY_LIMIT": "7",
        "FANOUT_WS_COMPRESSION": "yes",
        "FANOUT_NODE_ID": "edge-a",
        "FANOUT_LOG_LEVEL": "DEBUG",
    })
    assert config == EdgeConfig(
        host="0.0.0.0",
        port=9001,
        redis=RedisSettings("rediss://cache:6380/2", "test1"),
        ping_interval=5.5,
        pong_timeout=2.0,
        connect_timeout=0.5,
        max_message_size=256,
        max_subscriptions=3,
        queue_max_messages=10,
        queue_max_bytes=1024,
        recovery_limit=7,
        compression=True,
        node_id="edge-a",
        log_level="debug",
    )


def test_admission_defaults() -> None:
    config = edge({})
    assert config.allowed_origins == ()  # any origin (the edge warns)
    assert config.allow_no_origin is True
    assert config.max_connections == 10_000
    assert config.max_connections_per_ip == 100
    assert config.trusted_proxies == ()
    assert config.handshake_timeout == 5.0


def test_admission_settings() -> None:
    config = edge({
        "FANOUT_ALLOWED_ORIGINS": " https://App.Example.com , https://*.example.com,null ",
        "FANOUT_ALLOW_NO_ORIGIN": "false",
        "FANOUT_MAX_CONNECTIONS": "0",
        "FANOUT_MAX_CONNECTIONS_PER_IP": "7",
        "FANOUT_TRUSTED_PROXIES": "10.0.0.0/8, 192.168.1.5 ,2001:db8::/32",
        "FANOUT_HANDSHAKE_TIMEOUT": "2.5",
    })
    assert config.allowed_origins == ("https://app.example.com", "https://*.example.com", "null")
    assert config.allow_no_origin is False
    assert config.max_connections == 0
    assert config.max_connections_per_ip == 7
    assert config.trusted_proxies == ("10.0.0.0/8", "192.168.1.5/32", "2001:db8::/32")
    assert config.handshake_timeout == 2.5
    flags = edge({}, ["--allowed-origins", "http://localhost:*", "--max-connections", "5",
                      "--trusted-proxies", "127.0.0.1"])
    assert flags.allowed_origins == ("http://localhost:*",)
    assert flags.max_connections == 5
    assert flags.trusted_proxies == ("127.0.0.1/32",)


def test_a_bad_origin_pattern_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        edge({"FANOUT_ALLOWED_ORIGINS": "https://ok.example,ftp://bad.example"})
    assert info.value.setting == "FANOUT_ALLOWED_ORIGINS"
    assert "ftp://bad.example" in info.value.problem


def test_live_pacing_settings() -> None:
    defaults = edge({})
    assert (defaults.live_share, defaults.live_coalesce_max) == (0.5, 0.05)
    config = edge({"FANOUT_LIVE_SHARE": "0.25"}, ["--live-coalesce-max", "0"])
    assert (config.live_share, config.live_coalesce_max) == (0.25, 0.0)
    assert edge({}, ["--live-share", "1"]).live_share == 1.0
    for bad in ("0", "1.5", "-0.1", "nan", "half"):
        with pytest.raises(ConfigError) as info:
            edge({"FANOUT_LIVE_SHARE": bad})
        assert info.value.setting == "FANOUT_LIVE_SHARE"
    with pytest.raises(ConfigError) as info:
        edge({}, ["--live-coalesce-max", "-0.01"])
    assert info.value.setting in ("--live-coalesce-max", "FANOUT_LIVE_COALESCE_MAX")


def test_a_bad_trusted_proxy_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        edge({"FANOUT_TRUSTED_PROXIES": "10.0.0.0/8,haproxy"})
    assert info.value.setting == "FANOUT_TRUSTED_PROXIES"
    assert "'haproxy'" in info.value.problem


def test_ingest_environment_overrides() -> None:
    config = ingest({
        "REDIS_URL": "unix:///tmp/redis.sock",
        "FANOUT_FEED": "sim",
        "FANOUT_SYMBOLS": " MNQ , CON.F.US.MNQ.Z25,,",
        "FANOUT_RATE": "0.25",
        "FANOUT_SEED": "0",
        "FANOUT_BATCH_SIZE": "10000",
        "FANOUT_HISTORY": "quotes=100/5",
        "FANOUT_META_TTL": "60",
        "FANOUT_IDEMPOTENCY_TTL": "1",
        "FANOUT_INGEST_METRICS_PORT": "9100",
        "FANOUT_FEED_ID": "md-1",
        "FANOUT_LEASE_TTL": "0.5",
        "FANOUT_LOG_LEVEL": "warning",
    })
    assert config == IngestConfig(
        redis=RedisSettings("unix:///tmp/redis.sock", meta_ttl=60),
        feed="sim",
        sim=SimSettings(symbols=("MNQ", "CON.F.US.MNQ.Z25"), rate=0.25, seed=0),
        batch_size=10_000,
        history={**DEFAULT_HISTORY, "quotes": HistoryPolicy(100, 5.0)},
        idempotency_ttl=1,
        metrics_port=9100,
        feed_id="md-1",
        lease_ttl=0.5,
        log_level="warning",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("YES", True), (" on ", True),
     ("0", False), ("False", False), ("no", False), ("off", False)],
)
def test_booleans(text: str, expected: bool) -> None:
    assert edge({"FANOUT_WS_COMPRESSION": text}).compression is expected


@pytest.mark.parametrize("port", ["0", "65535"])
def test_port_bounds_are_inclusive(port: str) -> None:
    assert edge({"FANOUT_EDGE_PORT": port}).port == int(port)


def test_key_prefix_alone_keeps_the_default_url() -> None:
    assert edge({"FANOUT_KEY_PREFIX": "p"}).redis == RedisSettings(
        "redis://127.0.0.1:6379/0", "p"
    )


# --- flags beat the environment --------------------------------------------------------------


def test_flag_beats_environment() -> None:
    config = edge(
        {"FANOUT_EDGE_PORT": "9000", "FANOUT_EDGE_HOST": "10.0.0.1"},
        ["--port", "9001"],
    )
    assert config.port == 9001
    assert config.host == "10.0.0.1"  # no flag: the environment still applies


def test_flags_set_nested_settings() -> None:
    config = edge(
        {"FANOUT_REDIS_URL": "redis://env:1/0", "FANOUT_KEY_PREFIX": "envp"},
        ["--redis-url", "redis://flag:2/0", "--key-prefix", "flagp"],
    )
    assert config.redis == RedisSettings("redis://flag:2/0", "flagp")


def test_ingest_flags() -> None:
    config = ingest(
        {"FANOUT_SYMBOLS": "ES"},
        ["--symbols", "NQ,YM", "--history", "bars=10/60"],
    )
    assert config.sim.symbols == ("NQ", "YM")
    assert config.history["bars"] == HistoryPolicy(10, 60.0)


def test_add_arguments_defaults_are_none_and_help_names_env() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, EDGE_SETTINGS, EdgeConfig, "edge")
    args = parser.parse_args([])
    assert args.redis__url is None
    assert args.port is None
    helps = {a.option_strings[0]: a.help or "" for a in parser._actions if a.option_strings}
    assert helps["--port"] == (
        "port to listen on [env FANOUT_EDGE_PORT; file edge.port; default 8000]"
    )
    assert helps["--redis-url"].endswith(
        "[env FANOUT_REDIS_URL or REDIS_URL or FANOUT_REDIS_URL_FILE; file redis.url; "
        "default redis://127.0.0.1:6379/0]"
    )


# --- REDIS_URL and FANOUT_REDIS_URL ----------------------------------------------------------


def test_redis_url_alone() -> None:
    assert edge({"REDIS_URL": "redis://a:1/0"}).redis.url == "redis://a:1/0"


def test_fanout_redis_url_alone() -> None:
    assert edge({"FANOUT_REDIS_URL": "redis://b:2/0"}).redis.url == "redis://b:2/0"


def test_fanout_redis_url_wins_over_redis_url() -> None:
    env = {"REDIS_URL": "redis://a:1/0", "FANOUT_REDIS_URL": "redis://b:2/0"}
    assert edge(env).redis.url == "redis://b:2/0"
    assert ingest(env).redis.url == "redis://b:2/0"


def test_empty_fanout_redis_url_falls_back_to_redis_url() -> None:
    env = {"REDIS_URL": "redis://a:1/0", "FANOUT_REDIS_URL": ""}
    assert edge(env).redis.url == "redis://a:1/0"


@pytest.mark.parametrize(
    ("env", "argv", "setting"),
    [
        ({"REDIS_URL": "http://a/"}, None, "REDIS_URL"),
        ({"FANOUT_REDIS_URL": "http://a/"}, None, "FANOUT_REDIS_URL"),
        ({"REDIS_URL": "redis://ok/0", "FANOUT_REDIS_URL": "tcp://a"}, None, "FANOUT_REDIS_URL"),
        ({"REDIS_URL": "redis://ok/0"}, ["--redis-url", "localhost:6379"], "--redis-url"),
    ],
)
def test_bad_redis_url_names_the_setting_used(
    env: dict[str, str], argv: list[str] | None, setting: str
) -> None:
    with pytest.raises(ConfigError) as info:
        edge(env, argv)
    assert info.value.setting == setting
    assert info.value.problem == (
        "must be a redis://, rediss://, unix:// or redis+cluster:// URL")


def test_redis_cluster_mode_from_the_url_or_the_flag() -> None:
    seeds = "redis+cluster://a:7000,b:7001,[::1]:7002"
    config = edge({"REDIS_URL": seeds}, None)
    assert config.redis.is_cluster and not config.redis.cluster
    assert cluster_seeds(seeds) == [("a", 7000), ("b", 7001), ("::1", 7002)]
    config = edge({"REDIS_URL": "redis://a:7000/0", "FANOUT_REDIS_CLUSTER": "true"}, None)
    assert config.redis.is_cluster and cluster_seeds(config.redis.url) == [("a", 7000)]
    assert not edge({"REDIS_URL": "redis://a:7000/0"}, None).redis.is_cluster


@pytest.mark.parametrize("url", ["redis+cluster://a:7000,b", "redis+cluster://a:70000",
                                 "redis+cluster://", "redis+cluster://a:7000,,b:1"])
def test_a_bad_cluster_url_names_the_setting(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        edge({"REDIS_URL": url}, None)
    assert info.value.setting == "REDIS_URL"
    assert info.value.problem.startswith("not a valid cluster URL (seed ")


@pytest.mark.parametrize("url", ["redis://[::1", "redis://[bad/0"])
def test_unparseable_redis_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        edge({"REDIS_URL": url})
    assert info.value.setting == "REDIS_URL"


# --- bad values ------------------------------------------------------------------------------

EDGE_BAD = [
    ("FANOUT_KEY_PREFIX", "a:b", "--key-prefix"),
    ("FANOUT_KEY_PREFIX", "{x}", "--key-prefix"),
    ("FANOUT_KEY_PREFIX", "a b", "--key-prefix"),
    ("FANOUT_EDGE_HOST", "   ", "--host"),
    ("FANOUT_EDGE_PORT", "http", "--port"),
    ("FANOUT_EDGE_PORT", "80.5", "--port"),
    ("FANOUT_EDGE_PORT", "-1", "--port"),
    ("FANOUT_EDGE_PORT", "65536", "--port"),
    ("FANOUT_PING_INTERVAL", "0", "--ping-interval"),
    ("FANOUT_PING_INTERVAL", "-1", "--ping-interval"),
    ("FANOUT_PING_INTERVAL", "nan", "--ping-interval"),
    ("FANOUT_PING_INTERVAL", "soon", "--ping-interval"),
    ("FANOUT_PONG_TIMEOUT", "0.0", "--pong-timeout"),
    ("FANOUT_CONNECT_TIMEOUT", "-0.1", "--connect-timeout"),
    ("FANOUT_MAX_MESSAGE_SIZE", "255", "--max-message-size"),
    ("FANOUT_MAX_SUBSCRIPTIONS", "0", "--max-subscriptions"),
    ("FANOUT_QUEUE_MAX_MESSAGES", "0", "--queue-max-messages"),
    ("FANOUT_QUEUE_MAX_BYTES", "1023", "--queue-max-bytes"),
    ("FANOUT_RECOVERY_LIMIT", "0", "--recovery-limit"),
    ("FANOUT_WS_COMPRESSION", "maybe", "--compression"),
    ("FANOUT_WS_COMPRESSION", "2", "--compression"),
    ("FANOUT_NODE_ID", "edge:1", "--node-id"),
    ("FANOUT_LOG_LEVEL", "verbose", "--log-level"),
    ("FANOUT_LOG_LEVEL", "critical", "--log-level"),
    ("FANOUT_ALLOWED_ORIGINS", "app.example.com", "--allowed-origins"),
    ("FANOUT_ALLOWED_ORIGINS", "https://app.example.com/", "--allowed-origins"),
    ("FANOUT_ALLOWED_ORIGINS", "https://ok.example,ftp://bad.example", "--allowed-origins"),
    ("FANOUT_ALLOWED_ORIGINS", "https://a.*.example", "--allowed-origins"),
    ("FANOUT_ALLOWED_ORIGINS", " , ", "--allowed-origins"),
    ("FANOUT_ALLOW_NO_ORIGIN", "sometimes", "--allow-no-origin"),
    ("FANOUT_MAX_CONNECTIONS", "-1", "--max-connections"),
    ("FANOUT_MAX_CONNECTIONS", "many", "--max-connections"),
    ("FANOUT_MAX_CONNECTIONS_PER_IP", "-1", "--max-connections-per-ip"),
    ("FANOUT_MAX_CONNECTIONS_PER_IP", "1.5", "--max-connections-per-ip"),
    ("FANOUT_TRUSTED_PROXIES", "10.0.0.1/8", "--trusted-proxies"),
    ("FANOUT_TRUSTED_PROXIES", "10.0.0.0/8,haproxy", "--trusted-proxies"),
    ("FANOUT_TRUSTED_PROXIES", "10.0.0.0/33", "--trusted-proxies"),
    ("FANOUT_HANDSHAKE_TIMEOUT", "0", "--handshake-timeout"),
    ("FANOUT_HANDSHAKE_TIMEOUT", "inf", "--handshake-timeout"),
    ("FANOUT_HANDSHAKE_TIMEOUT", "soon", "--handshake-timeout"),
]

INGEST_BAD = [
    ("FANOUT_FEED", "live", "--feed"),
    ("FANOUT_FEED", "SIM", "--feed"),
    ("FANOUT_SYMBOLS", ",", "--symbols"),
    ("FANOUT_SYMBOLS", " , , ", "--symbols"),
    ("FANOUT_SYMBOLS", "MNQ,M Q", "--symbols"),
    ("FANOUT_SYMBOLS", "MNQ,a..b", "--symbols"),
    ("FANOUT_SYMBOLS", "{x}", "--symbols"),
    ("FANOUT_RATE", "0", "--rate"),
    ("FANOUT_RATE", "fast", "--rate"),
    ("FANOUT_SEED", "-1", "--seed"),
    ("FANOUT_SEED", "1.0", "--seed"),
    ("FANOUT_BATCH_SIZE", "0", "--batch-size"),
    ("FANOUT_BATCH_SIZE", "10001", "--batch-size"),
    ("FANOUT_HISTORY", "quotes=1", "--history"),
    ("FANOUT_META_TTL", "59", "--meta-ttl"),
    ("FANOUT_IDEMPOTENCY_TTL", "0", "--idempotency-ttl"),
    ("FANOUT_INGEST_METRICS_PORT", "70000", "--metrics-port"),
    ("FANOUT_FEED_ID", "a:b", "--feed-id"),
    ("FANOUT_FEED_ID", "{x}", "--feed-id"),
    ("FANOUT_LEASE_TTL", "0.49", "--lease-ttl"),
    ("FANOUT_LEASE_TTL", "inf", "--lease-ttl"),
    ("FANOUT_LEASE_TTL", "soon", "--lease-ttl"),
    ("FANOUT_LOG_LEVEL", "", "--log-level"),  # only as a flag: empty env values are ignored
]


@pytest.mark.parametrize(("env_name", "text", "flag"), [b for b in EDGE_BAD if b[1]])
def test_edge_bad_environment_value_names_the_variable(
    env_name: str, text: str, flag: str
) -> None:
    with pytest.raises(ConfigError) as info:
        edge({env_name: text})
    assert info.value.setting == env_name
    assert str(info.value).startswith(f"{env_name}: ")


@pytest.mark.parametrize(("env_name", "text", "flag"), EDGE_BAD)
def test_edge_bad_flag_value_names_the_flag(env_name: str, text: str, flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        edge({}, [flag, text])
    assert info.value.setting == flag


@pytest.mark.parametrize(("env_name", "text", "flag"), [b for b in INGEST_BAD if b[1]])
def test_ingest_bad_environment_value_names_the_variable(
    env_name: str, text: str, flag: str
) -> None:
    with pytest.raises(ConfigError) as info:
        ingest({env_name: text})
    assert info.value.setting == env_name


@pytest.mark.parametrize(("env_name", "text", "flag"), INGEST_BAD)
def test_ingest_bad_flag_value_names_the_flag(env_name: str, text: str, flag: str) -> None:
    with pytest.raises(ConfigError) as info:
        ingest({}, [flag, text])
    assert info.value.setting == flag


def test_bad_value_message_is_exact() -> None:
    with pytest.raises(ConfigError) as info:
        edge({"FANOUT_EDGE_PORT": "65536"})
    assert str(info.value) == "FANOUT_EDGE_PORT: must be between 0 and 65535, got 65536"
    with pytest.raises(ConfigError) as info:
        edge({"FANOUT_EDGE_PORT": "x"})
    assert info.value.problem == "must be an integer, got 'x'"
    with pytest.raises(ConfigError) as info:
        edge({}, ["--ping-interval", "0"])
    assert str(info.value) == "--ping-interval: must be a finite number > 0, got 0"


def test_a_good_flag_does_not_hide_a_bad_environment_value_of_another_setting() -> None:
    with pytest.raises(ConfigError) as info:
        edge({"FANOUT_EDGE_PORT": "x"}, ["--host", "0.0.0.0"])
    assert info.value.setting == "FANOUT_EDGE_PORT"


def test_a_good_flag_replaces_a_bad_environment_value() -> None:
    assert edge({"FANOUT_EDGE_PORT": "x"}, ["--port", "1"]).port == 1


@pytest.mark.parametrize("env_name", ["FANOUT_PING_INTERVAL", "FANOUT_PONG_TIMEOUT"])
def test_infinite_timeouts_are_rejected(env_name: str) -> None:
    with pytest.raises(ConfigError) as info:
        edge({env_name: "inf"})
    assert info.value.setting == env_name


# --- parse_history ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", ",", " , ,"])
def test_parse_history_empty_keeps_defaults(text: str) -> None:
    assert parse_history("H", text) == DEFAULT_HISTORY


def test_parse_history_overrides_named_namespaces_only() -> None:
    policies = parse_history("H", " quotes=100/5 , bars=10/0.5 ,")
    assert policies == {
        "quotes": HistoryPolicy(100, 5.0),
        "trades": HistoryPolicy(10_000, 600.0),
        "depth": HistoryPolicy(10_000, 120.0),
        "bars": HistoryPolicy(10, 0.5),
        "account": HistoryPolicy(1_000, 86_400.0),
    }


def test_parse_history_last_item_for_a_namespace_wins() -> None:
    assert parse_history("H", "depth=1/1,depth=2/2")["depth"] == HistoryPolicy(2, 2.0)


def test_parse_history_does_not_change_the_defaults() -> None:
    before = dict(DEFAULT_HISTORY)
    parse_history("H", "quotes=1/1,trades=2/2,depth=3/3,bars=4/4,account=5/5")
    assert before == DEFAULT_HISTORY


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("quotes", "bad item 'quotes': expected <namespace>=<max length>/<max age s>"),
        ("quotes=100", "bad item 'quotes=100': expected <namespace>=<max length>/<max age s>"),
        ("quotes100/5", "bad item 'quotes100/5': expected <namespace>=<max length>/<max age s>"),
        ("futures=1/1", "bad item 'futures=1/1': expected <namespace>=<max length>/<max age s>"),
        ("=1/1", "bad item '=1/1': expected <namespace>=<max length>/<max age s>"),
        ("quotes=x/5", "bad numbers in 'quotes=x/5'"),
        ("quotes=1.5/5", "bad numbers in 'quotes=1.5/5'"),
        ("quotes=1/x", "bad numbers in 'quotes=1/x'"),
        ("quotes=/5", "bad numbers in 'quotes=/5'"),
        ("quotes=1/", "bad numbers in 'quotes=1/'"),
        ("quotes=0/5", "'quotes=0/5': length must be >= 1 and age > 0"),
        ("quotes=-1/5", "'quotes=-1/5': length must be >= 1 and age > 0"),
        ("quotes=1/0", "'quotes=1/0': length must be >= 1 and age > 0"),
        ("quotes=1/-5", "'quotes=1/-5': length must be >= 1 and age > 0"),
        ("quotes=1/1,bars=0/1", "'bars=0/1': length must be >= 1 and age > 0"),
    ],
)
def test_parse_history_bad(text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_history("FANOUT_HISTORY", text)
    assert info.value.setting == "FANOUT_HISTORY"
    assert info.value.problem == problem


@pytest.mark.parametrize("text", ["quotes=10/nan", "quotes=10/inf"])
def test_parse_history_rejects_non_finite_age(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_history("FANOUT_HISTORY", text)
    assert info.value.setting == "FANOUT_HISTORY"


# --- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://u:secret@h:1/0", "redis://u:***@h:1/0"),
        ("redis://:secret@h:1/0", "redis://:***@h:1/0"),
        ("rediss://user:p%40ss@cache.example:6380/3", "rediss://user:***@cache.example:6380/3"),
        ("redis://u:p@ss@h/0", "redis://u:***@h/0"),  # an unescaped @ in the password
        ("redis://h:1/0", "redis://h:1/0"),
        ("redis://user@h:1/0", "redis://user@h:1/0"),
        ("unix:///tmp/redis.sock", "unix:///tmp/redis.sock"),
        ("redis://u:secret@[::1", "<unparseable url>"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_url_hides_a_password_in_the_query() -> None:
    assert "secret" not in redact_url("redis://h:1/0?password=secret")


def test_redis_settings_repr_hides_the_password() -> None:
    settings = RedisSettings(url="redis://u:secret@h:1/0")
    assert "secret" not in repr(settings)
    assert repr(settings) == (
        "RedisSettings(url='redis://u:***@h:1/0', key_prefix='fanout', meta_ttl=2592000, "
        "max_connections=64, cluster=False)"
    )


def test_config_reprs_hide_the_password() -> None:
    redis = RedisSettings(url="redis://u:secret@h:1/0")
    assert "secret" not in repr(EdgeConfig(redis=redis))
    assert "secret" not in repr(IngestConfig(redis=redis))
    assert "secret" not in repr(edge({"REDIS_URL": "redis://u:secret@h:1/0"}))


def test_config_error_from_a_bad_url_does_not_echo_it() -> None:
    with pytest.raises(ConfigError) as info:
        edge({"REDIS_URL": "http://u:secret@h/"})
    assert "secret" not in str(info.value)


# --- immutability ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "attr", "value"),
    [
        (EdgeConfig(), "port", 1),
        (IngestConfig(), "batch_size", 1),
        (SimSettings(), "rate", 1.0),
        (RedisSettings(), "url", "redis://x/0"),
        (HistoryPolicy(1, 1.0), "max_length", 2),
    ],
)
def test_configs_are_frozen(obj: object, attr: str, value: object) -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, attr, value)


def test_gc_thresholds_setting() -> None:
    assert EdgeConfig().gc_thresholds == (50_000, 50, 100)
    env = {"FANOUT_GC_THRESHOLDS": "1000,20,30"}
    assert build(EdgeConfig, EDGE_SETTINGS, env=env).gc_thresholds == (1000, 20, 30)
    env = {"FANOUT_GC_THRESHOLDS": "python"}
    assert build(EdgeConfig, EDGE_SETTINGS, env=env).gc_thresholds is None
    for bad in ("1,2", "1,2,0", "a,b,c", "1,2,3,4"):
        with pytest.raises(ConfigError, match="FANOUT_GC_THRESHOLDS: must be three"):
            build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_GC_THRESHOLDS": bad})


def test_loop_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """FANOUT_LOOP for both commands: auto resolves to uvloop where it is installed; uvloop
    where it is not (Windows) is refused at start, naming the setting."""
    from common import loop

    assert EdgeConfig().loop == "auto" and IngestConfig().loop == "auto"
    for name in ("auto", "asyncio", "uvloop", "UVLOOP"):
        env = {"FANOUT_LOOP": name}
        assert build(EdgeConfig, EDGE_SETTINGS, env=env).loop == name.lower()
        assert build(IngestConfig, INGEST_SETTINGS, env=env).loop == name.lower()
    for settings, cls in ((EDGE_SETTINGS, EdgeConfig), (INGEST_SETTINGS, IngestConfig)):
        with pytest.raises(ConfigError, match="FANOUT_LOOP: must be auto, asyncio or uvloop"):
            build(cls, settings, env={"FANOUT_LOOP": "trio"})
    assert loop.resolve("asyncio") == "asyncio"
    assert loop.resolve("auto") == "uvloop"  # installed here (the locks have it on Linux)
    monkeypatch.setattr(loop, "uvloop_available", lambda: False)
    assert loop.resolve("auto") == "asyncio"
    assert loop.loop_factory("auto") is asyncio.new_event_loop
    with pytest.raises(ConfigError, match="FANOUT_LOOP: uvloop is not installed"):
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_LOOP": "uvloop"})


def test_loop_factory_makes_the_named_loop() -> None:
    import uvloop

    from common.loop import loop_factory, loop_name

    for name, expected in (("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")):
        event_loop = loop_factory(name)()
        try:
            assert loop_name(event_loop) == expected
            assert isinstance(event_loop, uvloop.Loop) is (expected == "uvloop")
        finally:
            event_loop.close()


def test_tune_gc_sets_the_thresholds_or_leaves_pythons() -> None:
    import gc

    from edge.server import tune_gc

    before = gc.get_threshold()
    try:
        tune_gc(None)
        assert gc.get_threshold() == before
        tune_gc((1234, 5, 6))
        assert gc.get_threshold() == (1234, 5, 6)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def flags(command: str, argv: list[str]) -> argparse.Namespace:
    cmd = COMMANDS[command]
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=None)
    add_arguments(parser, cmd.settings, cmd.cls, command)
    return parser.parse_args(argv)


# --- unknown FANOUT_ variables ---------------------------------------------------------------


def test_a_misspelt_variable_fails_naming_the_closest_setting() -> None:
    with pytest.raises(ConfigError) as info:
        load("edge", env={"FANOUT_QUEUE_MAX_MESAGES": "5"})
    assert str(info.value) == (
        "FANOUT_QUEUE_MAX_MESAGES: unknown setting; did you mean FANOUT_QUEUE_MAX_MESSAGES?"
    )
    with pytest.raises(ConfigError, match="FANOUT_PORT: unknown setting; did you mean"):
        load("edge", env={"FANOUT_PORT": "2"})
    with pytest.raises(ConfigError) as info:
        check_environment({"FANOUT_QQQQQQQQQQQQQQQQQQQQQQQQ": "1"})
    assert info.value.problem == "unknown setting"  # nothing close: no hint


def test_unknown_variables_fail_even_when_empty() -> None:
    with pytest.raises(ConfigError, match="FANOUT_LOG_LEVLE"):
        load("ingest", env={"FANOUT_LOG_LEVLE": ""})


def test_settings_of_the_other_command_are_not_unknown_and_not_parsed() -> None:
    # docker-compose.yml gives edges and ingest workers one environment.
    assert load("edge", env={"FANOUT_FEED": "ws", "FANOUT_RATE": "fast",
                             "FANOUT_API_KEYS_FILE": "/nope"}).config == EdgeConfig()
    assert load("ingest", env={"FANOUT_AUTH_SECRET": "short", "FANOUT_EDGE_PORT": "x"}
                ).config == IngestConfig()


def test_what_is_not_a_setting_but_known() -> None:
    env = {name: "x" for name in NOT_SETTINGS}
    env.update({
        "FANOUT_CONFIG": "", "NOT_FANOUT_X": "1", "REDIS_URL": "",
        # Kubernetes service links of a Service named fanout-edge / fanout-ingest.
        "FANOUT_EDGE_SERVICE_HOST": "10.0.0.1", "FANOUT_EDGE_SERVICE_PORT": "80",
        "FANOUT_EDGE_SERVICE_PORT_HTTP": "80", "FANOUT_INGEST_PORT": "tcp://10.0.0.2:9100",
        "FANOUT_EDGE_PORT_80_TCP": "tcp://10.0.0.1:80", "FANOUT_EDGE_PORT_80_TCP_PROTO": "tcp",
        "FANOUT_EDGE_PORT_80_TCP_PORT": "80", "FANOUT_EDGE_PORT_80_TCP_ADDR": "10.0.0.1",
    })
    check_environment(env)
    with pytest.raises(ConfigError, match="FANOUT_INGEST_PORT"):
        check_environment({"FANOUT_INGEST_PORT": "9100"})  # not a service link: a typo


# --- secrets: never flags, never plain file values; env or <ENV>_FILE ------------------------


SECRETS = [(c, s) for c in COMMANDS for s in COMMANDS[c].settings if s.secret]


@pytest.mark.parametrize(("command", "setting"), SECRETS, ids=lambda x: getattr(x, "env", x))
def test_a_secret_flag_fails_saying_where_it_goes(command: str, setting: Setting) -> None:
    with pytest.raises(ConfigError) as info:
        load(command, env={}, args=flags(command, [setting.flag, "x" * 40]))
    assert str(info.value) == (
        f"{setting.flag}: secrets are not taken as flags (ps and shell history show them): "
        f"set {setting.env} or {setting.env}_FILE instead"
    )


def test_the_expected_settings_are_secret() -> None:
    assert {s.env for _, s in SECRETS} >= {
        "FANOUT_AUTH_SECRET", "FANOUT_API_KEYS", "FANOUT_PROJECTX_TOKEN", "FANOUT_WS_HEADERS",
        "FANOUT_WS_URL",
    }


def test_secret_flags_are_not_in_help() -> None:
    from fanout.cli import _parser

    for command in COMMANDS:
        text = _subparser(_parser(), command).format_help()
        for s in COMMANDS[command].settings:
            if s.secret:
                assert s.flag not in text
                assert f"{s.env} or {s.env}_FILE" in " ".join(text.split())


def test_a_url_flag_with_credentials_fails() -> None:
    with pytest.raises(ConfigError) as info:
        load("edge", env={}, args=flags("edge", ["--redis-url", "redis://:pw@h:1/0"]))
    assert info.value.setting == "--redis-url"
    assert "pw" not in str(info.value) and "FANOUT_REDIS_URL_FILE" in str(info.value)
    args = flags("edge", ["--redis-url", "redis://h:1/0"])
    assert load("edge", env={}, args=args).config.redis.url == "redis://h:1/0"
    with pytest.raises(ConfigError, match="--auth-jwks-url: holds credentials"):
        load("edge", env={}, args=flags("edge", ["--auth-jwks-url", "https://u:p@idp/jwks"]))


# --- --help: every default, groups, metavars -------------------------------------------------


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub: argparse.ArgumentParser = action.choices[name]
            return sub
    raise AssertionError(name)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_shows_every_default_a_metavar_and_a_group(command: str) -> None:
    from fanout.cli import _parser

    sub = _subparser(_parser(), command)
    cmd = COMMANDS[command]
    actions = {a.option_strings[0]: a for a in sub._actions if a.option_strings}
    for s in cmd.settings:
        action = actions[s.flag]
        if s.secret:
            assert action.help == argparse.SUPPRESS
            continue
        assert action.metavar not in (None, "VALUE"), s.flag
        assert action.help is not None and "; default " in action.help, s.flag
        assert f"file {s.section or command}.{s.key}" in action.help
    groups = {g.title: [a.option_strings[0] for a in g._group_actions]
              for g in sub._action_groups}
    assert "Redis" in groups and "--redis-url" in groups["Redis"]
    text = sub.format_help()
    assert "default 8000" in text if command == "edge" else "default sim" in text


def test_help_metavars() -> None:
    by_flag = {s.flag: setting_metavar(s) for s in EDGE_SETTINGS + INGEST_SETTINGS}
    assert by_flag["--ping-interval"] == "SECONDS"
    assert by_flag["--queue-max-bytes"] == "BYTES"
    assert by_flag["--queue-max-messages"] == "N"
    assert by_flag["--redis-url"] == "URL"
    assert by_flag["--auth-channels"] == "PATTERNS"
    assert by_flag["--port"] == "PORT"
    assert by_flag["--compression"] == "BOOL"


# --- what the docs and deploy files say ----------------------------------------------------


ROOT = Path(__file__).resolve().parents[2]


def test_docker_compose_environments_load() -> None:
    """One environment for edges and ingest workers: neither fails on the other's."""
    import yaml

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for service in compose["services"].values():
        if service.get("image") != "fanout:dev":
            continue
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v))
               for k, v in service["environment"].items()}
        load(service["command"][0], env=env)
        checked += 1
    assert checked == 5  # ingest x2, edge x3


def test_every_help_group_has_a_place_in_the_order() -> None:
    from common.config import _GROUP_ORDER, _GROUPS

    assert {group for _, group in _GROUPS} | {"Redis", "process"} == set(_GROUP_ORDER)
