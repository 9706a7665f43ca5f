"""The configuration of `fanout ingest`: the worker's own settings, and each feed's (whose
dataclass and table live with the feed, in ingest/feeds/) as a field named after it.

Built like every command's (common/config.py: the file < the environment < flags); which
commands exist is the composition root's (fanout/config.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.config import (
    LOOP_SETTING,
    NAMESPACES_FILE_SETTING,
    REDIS_SETTINGS,
    Command,
    HistoryPolicy,
    RedisSettings,
    Setting,
    namespace_history,
    parse_csv,
    parse_float,
    parse_history,
    parse_int,
    parse_log_level,
    parse_name,
    parse_nonempty,
)
from common.errors import ConfigError
from ingest.feeds import FEEDS, UnknownFeed, all_feeds, feed
from ingest.feeds.projectx import ProjectXSettings
from ingest.feeds.sim import SimSettings
from ingest.feeds.ws import WsSettings

DEFAULT_FEED = "sim"


@dataclass(frozen=True, slots=True)
class IngestConfig:
    redis: RedisSettings = field(default_factory=RedisSettings)
    feed: str = DEFAULT_FEED  # a name in ingest.feeds.FEEDS
    batch_size: int = 500  # most publishes per pipelined round trip
    history: Mapping[str, HistoryPolicy] = field(default_factory=namespace_history)
    idempotency_ttl: int = 3_600  # s a published upstream message id is remembered
    metrics_port: int = 0  # 0 = no /metrics, /healthz, /readyz
    metrics_host: str = "127.0.0.1"
    feed_id: str = ""  # the feed's name in its lease: workers with one id elect one leader
    lease_ttl: float = 5.0  # s the leader's lease lasts without a renewal
    reconnect_base: float = 0.5  # s: ceiling of the first reconnect delay (full jitter)
    reconnect_cap: float = 20.0  # s: ceiling of any reconnect delay
    # the HTTP publish API (ingest/http_api.py); 0 = off
    api_host: str = "127.0.0.1"
    api_port: int = 0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    namespaces_file: str = ""  # "" = the shipped common/namespaces.toml
    loop: str = "auto"  # the event loop (common/loop.py): auto, asyncio or uvloop
    log_level: str = "info"
    # Each feed's settings, a field named after the feed (ingest/feeds/<name>.py).
    sim: SimSettings = field(default_factory=SimSettings)
    ws: WsSettings = field(default_factory=WsSettings)
    projectx: ProjectXSettings = field(default_factory=ProjectXSettings)

    def feed_settings(self, name: str) -> Any:
        """The settings of the feed registered as `name` (the field of that name)."""
        return getattr(self, name)


def parse_feed(setting: str, text: str) -> str:
    try:
        return feed(text).name
    except UnknownFeed as exc:
        raise ConfigError(setting, str(exc)) from None


def _settings() -> tuple[Setting, ...]:
    """The worker's settings and every feed's: the default feed's right after --feed (the
    order of --help and `fanout config check`), the others' after the reconnect settings."""
    default = feed(DEFAULT_FEED).table
    names = list(FEEDS)
    others = tuple(s for f in all_feeds() if f.name != DEFAULT_FEED for s in f.table)
    return (
        *REDIS_SETTINGS,
        NAMESPACES_FILE_SETTING,
        Setting("feed", "--feed", "FANOUT_FEED", parse_feed,
                f"upstream feed: {', '.join(names[:-1])} or {names[-1]}",
                metavar="FEED"),
        *default,
        Setting("batch_size", "--batch-size", "FANOUT_BATCH_SIZE", parse_int(1, 10_000),
                "most publishes per pipelined round trip", metavar="N"),
        Setting("history", "--history", "FANOUT_HISTORY", parse_history,
                "history per namespace, <namespace>=<max length>/<max age seconds>,...; "
                "namespaces not named keep theirs", metavar="POLICIES"),
        Setting("idempotency_ttl", "--idempotency-ttl", "FANOUT_IDEMPOTENCY_TTL",
                parse_int(1), "seconds a published upstream message id is remembered (at "
                "least; at most twice as long)"),
        Setting("metrics_port", "--metrics-port", "FANOUT_INGEST_METRICS_PORT",
                parse_int(0, 65535),
                "port of the ingest's /metrics, /healthz and /readyz (0 = none)"),
        Setting("metrics_host", "--metrics-host", "FANOUT_INGEST_METRICS_HOST",
                parse_nonempty, "address of the ingest's metrics and health port"),
        Setting("feed_id", "--feed-id", "FANOUT_FEED_ID", parse_name,
                "the feed's id in leader election: one leader per id", metavar="ID",
                default="the feed name"),
        Setting("lease_ttl", "--lease-ttl", "FANOUT_LEASE_TTL", parse_float(0.5, strict=False),
                "seconds the leader's lease lasts without renewal (>= 0.5)"),
        Setting("reconnect_base", "--reconnect-base", "FANOUT_RECONNECT_BASE", parse_float(0),
                "seconds: ceiling of the first upstream reconnect delay"),
        Setting("reconnect_cap", "--reconnect-cap", "FANOUT_RECONNECT_CAP", parse_float(0),
                "seconds: ceiling of any upstream reconnect delay"),
        *others,
        Setting("api_host", "--api-host", "FANOUT_API_HOST", parse_nonempty,
                "address of the HTTP publish API"),
        Setting("api_port", "--api-port", "FANOUT_API_PORT", parse_int(0, 65535),
                "port of the HTTP publish API (0 = off)"),
        Setting("api_keys", "--api-keys", "FANOUT_API_KEYS", parse_csv,
                "comma-separated API keys of the HTTP publish API", secret=True),
        LOOP_SETTING,
        Setting("log_level", "--log-level", "FANOUT_LOG_LEVEL", parse_log_level,
                "log level: debug, info, warning or error"),
    )


INGEST_SETTINGS = _settings()


def check_ingest(config: IngestConfig) -> None:
    """What one setting alone cannot tell: the settings the chosen feed and the API need."""
    chosen = feed(config.feed)
    chosen.check(config.feed_settings(chosen.name))
    if config.reconnect_cap < config.reconnect_base:
        raise ConfigError("FANOUT_RECONNECT_CAP", "must not be below FANOUT_RECONNECT_BASE")
    if config.api_port and not config.api_keys:
        raise ConfigError("FANOUT_API_KEYS", "is required when FANOUT_API_PORT is set")


INGEST_COMMAND = Command("ingest", IngestConfig, INGEST_SETTINGS, check_ingest)
