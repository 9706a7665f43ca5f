"""Configuration: frozen dataclasses built from ``FANOUT_*`` environment variables and flags.

Each setting has one name in the environment (``FANOUT_EDGE_PORT``) and one flag
(``--port``); a flag wins over the environment. A bad value fails at start with a
`ConfigError` naming the setting. Secrets (the password in a Redis URL) never appear in a
repr or a log line: use `redact_url`.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from common.channels import active_namespaces
from common.errors import ConfigError
from common.keys import DEFAULT_PREFIX
from common.namespaces import DEFAULT as DEFAULT_NAMESPACES
from common.namespaces import activate, load_namespaces

T = TypeVar("T")


def redact_url(url: str) -> str:
    """The URL with any password (user info or ?password=) replaced by ***."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "<unparseable url>"
    if password is None and "password=" not in parts.query.lower():
        return url
    if password is not None:
        netloc = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{netloc}")
    if parts.query:
        query = [
            f"{k}=***" if k.lower() == "password" else f"{k}{sep}{v}"
            for k, sep, v in (item.partition("=") for item in parts.query.split("&"))
        ]
        parts = parts._replace(query="&".join(query))
    return urlunsplit(parts)


def _check_redis_url(setting: str, url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(setting, f"not a valid URL ({exc})") from None
    scheme = parts.scheme
    if scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(setting, "must be a redis://, rediss:// or unix:// URL")
    return url


@dataclass(frozen=True, slots=True)
class HistoryPolicy:
    """How much history a namespace keeps: what recovery after a disconnect can cover."""

    max_length: int
    max_age: float  # seconds


# The shipped namespaces' (common/namespaces.toml): quotes 10000/300, trades 10000/600,
# depth 10000/120, bars 5000/86400, account 1000/86400.
DEFAULT_HISTORY: dict[str, HistoryPolicy] = {
    name: HistoryPolicy(*policy) for name, policy in DEFAULT_NAMESPACES.history().items()
}


def namespace_history() -> dict[str, HistoryPolicy]:
    """The active namespaces' history (the file's, before FANOUT_HISTORY)."""
    return {name: HistoryPolicy(*policy)
            for name, policy in active_namespaces().history().items()}


def namespace_overflow() -> dict[str, str]:
    """The active namespaces' overflow policies (the file's, before FANOUT_OVERFLOW)."""
    return active_namespaces().overflow()


def parse_history(setting: str, text: str) -> dict[str, HistoryPolicy]:
    """``quotes=10000/300,trades=5000/600``: per namespace, max length / max age in seconds.
    Namespaces not named keep their defaults: the namespaces file's (FANOUT_NAMESPACES_FILE,
    read before this setting; the shipped file's without it)."""
    policies = namespace_history()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, spec = item.partition("=")
        length, sep2, age = spec.partition("/")
        if not sep or not sep2 or name not in active_namespaces():
            raise ConfigError(
                setting, f"bad item {item!r}: expected <namespace>=<max length>/<max age s>"
            )
        try:
            policy = HistoryPolicy(int(length), float(age))
        except ValueError:
            raise ConfigError(setting, f"bad numbers in {item!r}") from None
        if policy.max_length < 1 or not 0 < policy.max_age < 1e9:
            raise ConfigError(setting, f"{item!r}: length must be >= 1 and age > 0")
        policies[name] = policy
    return policies


OVERFLOW_POLICIES = ("disconnect", "conflate", "drop")

# The shipped namespaces' (common/namespaces.toml): quotes conflate, trades drop,
# depth conflate, bars drop, account disconnect.
DEFAULT_OVERFLOW: dict[str, str] = DEFAULT_NAMESPACES.overflow()


def parse_overflow(setting: str, text: str) -> dict[str, str]:
    """``quotes=conflate,trades=drop``: what a slow client's queue does per namespace.
    Namespaces not named keep their defaults: the namespaces file's (as for history)."""
    policies = namespace_overflow()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, policy = item.partition("=")
        if not sep or name not in active_namespaces() or policy not in OVERFLOW_POLICIES:
            raise ConfigError(
                setting,
                f"bad item {item!r}: expected <namespace>=<{'|'.join(OVERFLOW_POLICIES)}>",
            )
        policies[name] = policy
    return policies


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = field(default="redis://127.0.0.1:6379/0", repr=False)
    key_prefix: str = DEFAULT_PREFIX
    # s a channel's epoch, offset and snapshot live without a publish: the same for ingest
    # (which refreshes them on publish) and edges (which create a channel's epoch when a
    # client subscribes before its first publish).
    meta_ttl: int = 30 * 86_400
    # Connections of a process's command client (pub/sub has its own); requests beyond
    # wait for a free one (common/redisclient.py).
    max_connections: int = 64

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r}, "
            f"meta_ttl={self.meta_ttl}, max_connections={self.max_connections})"
        )


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    redis: RedisSettings = RedisSettings()
    # A trading front end must notice a stalled edge (or network) within seconds, not a
    # minute: a client gives up after interval + timeout (+ 1-2 s grace), ~11-12 s. The
    # cost is one small frame each way per client every 5 s (2,000/s at 10,000 clients).
    ping_interval: float = 5.0  # s between server pings (first one random in [I/2, I])
    pong_timeout: float = 5.0  # s to answer a ping
    connect_timeout: float = 10.0  # s for a new connection to send `connect`
    max_message_size: int = 65_536  # largest client frame, bytes; larger -> close 1009
    max_subscriptions: int = 1_000  # per connection
    unpublished_ttl: int = 3_600  # s a channel created by a subscribe lives unpublished
    request_rate: float = 100.0  # requests per second a connection may sustain ...
    request_burst: int = 1_000  # ... and how many it may send at once (3007 beyond)
    queue_max_messages: int = 10_000  # per client send queue
    queue_max_bytes: int = 1024 * 1024  # per client send queue
    overflow: Mapping[str, str] = field(default_factory=namespace_overflow)
    max_frame_messages: int = 1_000  # messages coalesced into one frame (1 = no coalescing)
    max_frame_bytes: int = 65_536  # a coalesced frame's size; a single larger message goes alone
    write_delay: float = 0.0  # s the writer waits to gather more messages into a frame
    recovery_limit: int = 10_000  # most messages one subscribe may replay
    compression: bool = False  # permessage-deflate: ~5x the CPU in fan-out, off by default
    direct_write: bool = True  # write finished frames to the transport (edge/wire.py)
    drain_seconds: float = 10.0  # on SIGTERM/SIGINT, close connections spread over this long
    # The cyclic garbage collector's thresholds (gc.set_threshold); None = Python's own.
    gc_thresholds: tuple[int, int, int] | None = (50_000, 50, 100)
    # Connection tokens (common/auth.py), verified with one of: an HMAC secret, a public
    # key (PEM file) or the keys of a JWKS URL; none of them = no authentication
    # (development). `check_edge` refuses more than one.
    auth_secret: str = field(default="", repr=False)
    auth_public_key_file: str = ""
    auth_jwks_url: str = field(default="", repr=False)  # may carry credentials
    auth_algorithms: tuple[str, ...] = ()  # () = every algorithm the key's type has
    auth_jwks_refresh: float = 600.0  # s a fetched key set is used at most (max-age: less)
    auth_jwks_min_interval: float = 30.0  # s between fetches asked for by unknown kids
    auth_jwks_timeout: float = 5.0  # s a JWKS fetch may take
    auth_channels: tuple[str, ...] = ("quotes.*", "trades.*", "depth.*", "bars.*")
    auth_issuer: str = ""
    auth_audience: str = ""
    node_id: str = ""  # defaults to a random id
    namespaces_file: str = ""  # "" = the shipped common/namespaces.toml
    log_level: str = "info"


@dataclass(frozen=True, slots=True)
class IngestConfig:
    redis: RedisSettings = RedisSettings()
    feed: str = "sim"
    symbols: tuple[str, ...] = ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM")
    rate: float = 20.0  # simulated events per second per symbol
    seed: int = 1
    batch_size: int = 500  # most publishes per pipelined round trip
    history: Mapping[str, HistoryPolicy] = field(default_factory=namespace_history)
    idempotency_ttl: int = 3_600  # s a published upstream message id is remembered
    metrics_port: int = 0  # 0 = no /metrics, /healthz, /readyz
    metrics_host: str = "127.0.0.1"
    feed_id: str = ""  # the feed's name in its lease: workers with one id elect one leader
    lease_ttl: float = 5.0  # s the leader's lease lasts without a renewal
    reconnect_base: float = 0.5  # s: ceiling of the first reconnect delay (full jitter)
    reconnect_cap: float = 20.0  # s: ceiling of any reconnect delay
    # feed "ws": a generic WebSocket JSON feed (docs/architecture.md, "Upstream adapters")
    ws_url: str = field(default="", repr=False)  # may carry credentials in its query
    ws_subscribe: str = ""  # JSON array of messages sent after each connect
    ws_mapping: str = ""  # JSON: field mappings to channel, key, id and payload
    ws_headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # secrets
    ws_idle_timeout: float = 30.0  # s without a message before reconnecting
    # feed "projectx": the ProjectX gateway's SignalR hubs
    projectx_url: str = "https://rtc.topstepx.com"
    projectx_token: str = field(default="", repr=False)
    projectx_contracts: tuple[str, ...] = ()
    projectx_accounts: tuple[int, ...] = ()
    # the HTTP publish API (ingest/http_api.py); 0 = off
    api_host: str = "127.0.0.1"
    api_port: int = 0
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    namespaces_file: str = ""  # "" = the shipped common/namespaces.toml
    log_level: str = "info"


# --- building from environment and flags ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its flag, environment variable, parser and help."""

    attr: str  # dotted path into the config, e.g. "redis.url"
    flag: str
    env: str
    parse: Callable[[str, str], Any]
    help: str


def _int(lo: int, hi: int | None = None) -> Callable[[str, str], int]:
    def parse(setting: str, text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(setting, f"must be an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            raise ConfigError(setting, f"must be {bound}, got {value}")
        return value

    return parse


def _float(lo: float, strict: bool = True) -> Callable[[str, str], float]:
    def parse(setting: str, text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ConfigError(setting, f"must be a number, got {text!r}") from None
        if not math.isfinite(value) or value < lo or (strict and value == lo):
            raise ConfigError(
                setting, f"must be a finite number {'>' if strict else '>='} {lo}, got {text}"
            )
        return value

    return parse


def _bool(setting: str, text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(setting, f"must be true or false, got {text!r}")


def _str(setting: str, text: str) -> str:
    return text


def _nonempty(setting: str, text: str) -> str:
    if not text.strip():
        raise ConfigError(setting, "must not be empty")
    return text.strip()


def _log_level(setting: str, text: str) -> str:
    if text.lower() not in ("debug", "info", "warning", "error"):
        raise ConfigError(setting, f"must be debug, info, warning or error, got {text!r}")
    return text.lower()


def _symbols(setting: str, text: str) -> tuple[str, ...]:
    from common.channels import parse_channel
    from common.errors import BadChannel

    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    if not symbols:
        raise ConfigError(setting, "must name at least one symbol")
    for symbol in symbols:
        try:
            parse_channel(f"quotes.{symbol}")
        except BadChannel:
            raise ConfigError(setting, f"bad symbol {symbol!r}") from None
    return symbols


FEEDS = ("sim", "ws", "projectx")


def _feed(setting: str, text: str) -> str:
    if text not in FEEDS:
        raise ConfigError(setting, f"unknown feed {text!r}: expected one of {', '.join(FEEDS)}")
    return text


def _csv(setting: str, text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _gc_thresholds(setting: str, text: str) -> tuple[int, int, int] | None:
    if text.strip().lower() == "python":
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(v >= 1 for v in values):
        raise ConfigError(setting, f"must be three positive integers or 'python', got {text!r}")
    return values[0], values[1], values[2]


def _auth_secret(setting: str, text: str) -> str:
    from common.auth import MIN_SECRET, make_key

    if len(text.encode()) < MIN_SECRET:
        raise ConfigError(setting, f"must be at least {MIN_SECRET} bytes long")
    try:
        make_key(text.encode())  # not a public key used as a secret (algorithm confusion)
    except ValueError as exc:
        raise ConfigError(setting, f"{exc} (for public keys: FANOUT_AUTH_PUBLIC_KEY_FILE "
                          "or FANOUT_AUTH_JWKS_URL)") from None
    return text


def _auth_public_key_file(setting: str, text: str) -> str:
    from common.auth import load_public_key

    try:
        with open(text, "rb") as file:
            data = file.read(1024 * 1024)
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {text!r}: {exc.strerror}") from None
    try:
        load_public_key(data)
    except ValueError as exc:
        raise ConfigError(setting, f"{text!r}: {exc}") from None
    return text


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: not known to be loopback


def _jwks_url(setting: str, text: str) -> str:
    try:
        parts = urlsplit(text.strip())
        host = parts.hostname or ""
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(setting, f"not a valid URL ({exc})") from None
    loopback = _is_loopback(host)
    if not host or not (parts.scheme == "https" or (parts.scheme == "http" and loopback)):
        # Keys fetched over plain HTTP could be swapped by anyone on the path: whoever
        # does so mints tokens the edge accepts.
        raise ConfigError(setting, "must be an https:// URL (http:// only to a loopback "
                          "address, for development)")
    return text.strip()


def _algorithms(setting: str, text: str) -> tuple[str, ...]:
    from common.auth import check_algorithms

    names = _csv(setting, text)
    if not names:
        raise ConfigError(setting, "must name at least one algorithm")
    try:
        return check_algorithms(names)
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from None


def _patterns(setting: str, text: str) -> tuple[str, ...]:
    from common.auth import check_patterns

    try:
        return check_patterns(_csv(setting, text))
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from None


def _ints(setting: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in _csv(setting, text))
    except ValueError:
        raise ConfigError(setting, f"must be comma-separated integers, got {text!r}") from None


def _json_object(setting: str, text: str) -> dict[str, str]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(setting, "must be a JSON object") from None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ConfigError(setting, "must be a JSON object of strings")
    return value


def _ws_url(setting: str, text: str) -> str:
    if urlsplit(text).scheme not in ("ws", "wss"):
        raise ConfigError(setting, "must be a ws:// or wss:// URL")
    return text


def _namespaces_file(setting: str, text: str) -> str:
    """Load (and check) the namespaces file, and parse channel names with it from now on:
    the settings that name namespaces (FANOUT_HISTORY, FANOUT_OVERFLOW) come after it."""
    activate(load_namespaces(text, setting))
    return text


def _prefix(setting: str, text: str) -> str:
    if not text or any(c in text for c in "{}: \t\n"):
        raise ConfigError(setting, "must be a non-empty name without braces, colons or spaces")
    return text


REDIS_SETTINGS = (
    Setting(
        "redis.url", "--redis-url", "REDIS_URL", _check_redis_url,
        "Redis/Valkey URL (FANOUT_REDIS_URL or REDIS_URL)",
    ),
    Setting(
        "redis.key_prefix", "--key-prefix", "FANOUT_KEY_PREFIX", _prefix,
        "prefix of every Redis key",
    ),
    Setting(
        "redis.meta_ttl", "--meta-ttl", "FANOUT_META_TTL", _int(60),
        "seconds an idle channel's epoch, offset and snapshot live",
    ),
    Setting(
        "redis.max_connections", "--redis-max-connections", "FANOUT_REDIS_MAX_CONNECTIONS",
        _int(1), "most Redis connections of the command client; more requests wait",
    ),
)

NAMESPACES_FILE_SETTING = Setting(
    "namespaces_file", "--namespaces-file", "FANOUT_NAMESPACES_FILE", _namespaces_file,
    "TOML file of the channel namespaces (default: the shipped market-data namespaces); "
    "FANOUT_HISTORY and FANOUT_OVERFLOW override its history and overflow policies",
)

EDGE_SETTINGS = (
    *REDIS_SETTINGS,
    NAMESPACES_FILE_SETTING,
    Setting("host", "--host", "FANOUT_EDGE_HOST", _nonempty, "address to listen on"),
    Setting("port", "--port", "FANOUT_EDGE_PORT", _int(0, 65535), "port to listen on"),
    Setting("ping_interval", "--ping-interval", "FANOUT_PING_INTERVAL", _float(0),
            "seconds between server pings"),
    Setting("pong_timeout", "--pong-timeout", "FANOUT_PONG_TIMEOUT", _float(0),
            "seconds a client has to answer a ping"),
    Setting("connect_timeout", "--connect-timeout", "FANOUT_CONNECT_TIMEOUT", _float(0),
            "seconds a new connection has to send connect"),
    Setting("max_message_size", "--max-message-size", "FANOUT_MAX_MESSAGE_SIZE", _int(256),
            "largest client frame in bytes"),
    Setting("max_subscriptions", "--max-subscriptions", "FANOUT_MAX_SUBSCRIPTIONS", _int(1),
            "most subscriptions per connection"),
    Setting("unpublished_ttl", "--unpublished-ttl", "FANOUT_UNPUBLISHED_TTL", _int(60),
            "seconds a channel's epoch created by a subscribe lives until its first publish"),
    Setting("request_rate", "--request-rate", "FANOUT_REQUEST_RATE", _float(0),
            "requests per second a connection may sustain (more: close 3007)"),
    Setting("request_burst", "--request-burst", "FANOUT_REQUEST_BURST", _int(1),
            "requests a connection may send at once above the rate"),
    Setting("queue_max_messages", "--queue-max-messages", "FANOUT_QUEUE_MAX_MESSAGES",
            _int(1), "most messages in a client's send queue"),
    Setting("queue_max_bytes", "--queue-max-bytes", "FANOUT_QUEUE_MAX_BYTES", _int(1024),
            "most bytes in a client's send queue"),
    Setting("recovery_limit", "--recovery-limit", "FANOUT_RECOVERY_LIMIT", _int(1),
            "most messages one subscribe may replay"),
    Setting("overflow", "--overflow", "FANOUT_OVERFLOW", parse_overflow,
            "slow-client policy per namespace: quotes=conflate,trades=drop,depth=conflate,"
            "bars=drop,account=disconnect"),
    Setting("max_frame_messages", "--max-frame-messages", "FANOUT_MAX_FRAME_MESSAGES",
            _int(1), "most messages coalesced into one frame (1 = no coalescing)"),
    Setting("max_frame_bytes", "--max-frame-bytes", "FANOUT_MAX_FRAME_BYTES", _int(256),
            "largest coalesced frame in bytes"),
    Setting("write_delay", "--write-delay", "FANOUT_WRITE_DELAY", _float(0, strict=False),
            "seconds a writer waits to batch more messages into a frame (default 0)"),
    Setting("compression", "--compression", "FANOUT_WS_COMPRESSION", _bool,
            "permessage-deflate (true/false)"),
    Setting("direct_write", "--direct-write", "FANOUT_DIRECT_WRITE", _bool,
            "write finished frames straight to the socket, shared by all clients of a "
            "batch (true/false; default true)"),
    Setting("drain_seconds", "--drain-seconds", "FANOUT_DRAIN_SECONDS",
            _float(0, strict=False),
            "on SIGTERM/SIGINT: not ready at once, connections closed (3000) spread over this "
            "many seconds, then exit; 0 = close all at once (default 10)"),
    Setting("gc_thresholds", "--gc-thresholds", "FANOUT_GC_THRESHOLDS", _gc_thresholds,
            "garbage collector thresholds gen0,gen1,gen2 (default 50000,50,100; 'python' "
            "keeps Python's 700,10,10)"),
    Setting("auth_secret", "--auth-secret", "FANOUT_AUTH_SECRET", _auth_secret,
            "HMAC secret of connection tokens (JWT HS256/384/512), at least 32 bytes "
            "(secret); unset (and no public key or JWKS URL) = no authentication"),
    Setting("auth_public_key_file", "--auth-public-key-file", "FANOUT_AUTH_PUBLIC_KEY_FILE",
            _auth_public_key_file,
            "PEM file of the public key (or certificate) that verifies connection tokens "
            "(RSA >= 2048 bits, EC P-256/384/521, Ed25519/Ed448)"),
    Setting("auth_jwks_url", "--auth-jwks-url", "FANOUT_AUTH_JWKS_URL", _jwks_url,
            "https:// URL of the JWKS whose keys verify connection tokens (chosen by kid; "
            "fetched at start, refreshed, refetched for an unknown kid)"),
    Setting("auth_algorithms", "--auth-algorithms", "FANOUT_AUTH_ALGORITHMS", _algorithms,
            "comma-separated JWT algorithms accepted (default: every one of the key's type: "
            "HS256,HS384,HS512 with a secret; RS*/PS*, ES* or EdDSA with public keys)"),
    Setting("auth_jwks_refresh", "--auth-jwks-refresh", "FANOUT_AUTH_JWKS_REFRESH",
            _float(0), "seconds a fetched JWKS is used before it is fetched again; a "
            "shorter Cache-Control max-age wins, down to the min interval (default 600)"),
    Setting("auth_jwks_min_interval", "--auth-jwks-min-interval",
            "FANOUT_AUTH_JWKS_MIN_INTERVAL", _float(0),
            "seconds: at most one JWKS fetch per this interval for tokens with an unknown "
            "kid; also the longest retry delay after a failed fetch (default 30)"),
    Setting("auth_jwks_timeout", "--auth-jwks-timeout", "FANOUT_AUTH_JWKS_TIMEOUT", _float(0),
            "seconds a JWKS fetch may take (default 5)"),
    Setting("auth_channels", "--auth-channels", "FANOUT_AUTH_CHANNELS", _patterns,
            "channel patterns a token without a channels claim may subscribe to "
            "(default quotes.*,trades.*,depth.*,bars.*)"),
    Setting("auth_issuer", "--auth-issuer", "FANOUT_AUTH_ISSUER", _nonempty,
            "required iss claim of tokens (default: not checked)"),
    Setting("auth_audience", "--auth-audience", "FANOUT_AUTH_AUDIENCE", _nonempty,
            "required aud claim of tokens (default: not checked)"),
    Setting("node_id", "--node-id", "FANOUT_NODE_ID", _prefix, "this edge's id (default random)"),
    Setting("log_level", "--log-level", "FANOUT_LOG_LEVEL", _log_level, "log level"),
)

INGEST_SETTINGS = (
    *REDIS_SETTINGS,
    NAMESPACES_FILE_SETTING,
    Setting("feed", "--feed", "FANOUT_FEED", _feed, "upstream feed: sim, ws or projectx"),
    Setting("symbols", "--symbols", "FANOUT_SYMBOLS", _symbols,
            "comma-separated symbols of the simulated feed"),
    Setting("rate", "--rate", "FANOUT_RATE", _float(0),
            "simulated events per second per symbol"),
    Setting("seed", "--seed", "FANOUT_SEED", _int(0), "random seed of the simulated feed"),
    Setting("batch_size", "--batch-size", "FANOUT_BATCH_SIZE", _int(1, 10_000),
            "most publishes per pipelined round trip"),
    Setting("history", "--history", "FANOUT_HISTORY", parse_history,
            "history per namespace: quotes=10000/300,trades=10000/600,..."),
    Setting("idempotency_ttl", "--idempotency-ttl", "FANOUT_IDEMPOTENCY_TTL", _int(1),
            "seconds a published upstream message id is remembered"),
    Setting("metrics_port", "--metrics-port", "FANOUT_INGEST_METRICS_PORT", _int(0, 65535),
            "port of the ingest's /metrics, /healthz and /readyz (0 = none)"),
    Setting("metrics_host", "--metrics-host", "FANOUT_INGEST_METRICS_HOST", _nonempty,
            "address of the ingest's metrics and health port"),
    Setting("feed_id", "--feed-id", "FANOUT_FEED_ID", _prefix,
            "the feed's id in leader election: one leader per id (default: the feed name)"),
    Setting("lease_ttl", "--lease-ttl", "FANOUT_LEASE_TTL", _float(0.5, strict=False),
            "seconds the leader's lease lasts without renewal (>= 0.5; default 5)"),
    Setting("reconnect_base", "--reconnect-base", "FANOUT_RECONNECT_BASE", _float(0),
            "seconds: ceiling of the first upstream reconnect delay (default 0.5)"),
    Setting("reconnect_cap", "--reconnect-cap", "FANOUT_RECONNECT_CAP", _float(0),
            "seconds: ceiling of any upstream reconnect delay (default 20)"),
    Setting("ws_url", "--ws-url", "FANOUT_WS_URL", _ws_url, "feed ws: the upstream URL"),
    Setting("ws_subscribe", "--ws-subscribe", "FANOUT_WS_SUBSCRIBE", _str,
            "feed ws: JSON array of messages to send after each connect"),
    Setting("ws_mapping", "--ws-mapping", "FANOUT_WS_MAPPING", _str,
            "feed ws: JSON field mappings (see docs/architecture.md)"),
    Setting("ws_headers", "--ws-headers", "FANOUT_WS_HEADERS", _json_object,
            "feed ws: JSON object of HTTP headers for the connection (secret)"),
    Setting("ws_idle_timeout", "--ws-idle-timeout", "FANOUT_WS_IDLE_TIMEOUT", _float(0),
            "feed ws: seconds without a message before reconnecting (default 30)"),
    Setting("projectx_url", "--projectx-url", "FANOUT_PROJECTX_URL", _nonempty,
            "feed projectx: the gateway's base URL"),
    Setting("projectx_token", "--projectx-token", "FANOUT_PROJECTX_TOKEN", _nonempty,
            "feed projectx: the JWT (secret)"),
    Setting("projectx_contracts", "--projectx-contracts", "FANOUT_PROJECTX_CONTRACTS", _csv,
            "feed projectx: comma-separated contract ids"),
    Setting("projectx_accounts", "--projectx-accounts", "FANOUT_PROJECTX_ACCOUNTS", _ints,
            "feed projectx: comma-separated account ids for the user hub"),
    Setting("api_host", "--api-host", "FANOUT_API_HOST", _nonempty,
            "address of the HTTP publish API"),
    Setting("api_port", "--api-port", "FANOUT_API_PORT", _int(0, 65535),
            "port of the HTTP publish API (0 = off)"),
    Setting("api_keys", "--api-keys", "FANOUT_API_KEYS", _csv,
            "comma-separated API keys of the HTTP publish API (secret)"),
    Setting("log_level", "--log-level", "FANOUT_LOG_LEVEL", _log_level, "log level"),
)


def check_ingest(config: IngestConfig) -> None:
    """What one setting alone cannot tell: the settings the chosen feed and the API need."""
    if config.feed == "ws":
        if not config.ws_url:
            raise ConfigError("FANOUT_WS_URL", "is required with FANOUT_FEED=ws")
        if not config.ws_mapping:
            raise ConfigError("FANOUT_WS_MAPPING", "is required with FANOUT_FEED=ws")
    if config.feed == "projectx":
        if not config.projectx_token:
            raise ConfigError("FANOUT_PROJECTX_TOKEN", "is required with FANOUT_FEED=projectx")
        if not config.projectx_contracts and not config.projectx_accounts:
            raise ConfigError(
                "FANOUT_PROJECTX_CONTRACTS", "name contracts and/or FANOUT_PROJECTX_ACCOUNTS"
            )
    if config.reconnect_cap < config.reconnect_base:
        raise ConfigError("FANOUT_RECONNECT_CAP", "must not be below FANOUT_RECONNECT_BASE")
    if config.api_port and not config.api_keys:
        raise ConfigError("FANOUT_API_KEYS", "is required when FANOUT_API_PORT is set")


def check_edge(config: EdgeConfig) -> None:
    """What one setting alone cannot tell: one source of token keys at most, algorithms
    that fit it, JWKS intervals in order."""
    from common.auth import HMAC_ALGORITHMS, load_public_key

    sources = [env for env, value in (("FANOUT_AUTH_SECRET", config.auth_secret),
                                      ("FANOUT_AUTH_PUBLIC_KEY_FILE", config.auth_public_key_file),
                                      ("FANOUT_AUTH_JWKS_URL", config.auth_jwks_url)) if value]
    if len(sources) > 1:
        raise ConfigError(sources[1], f"set only one of {', '.join(sources)}")
    algorithms = config.auth_algorithms
    if algorithms:
        hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
        if not sources:
            raise ConfigError("FANOUT_AUTH_ALGORITHMS", "needs a key: FANOUT_AUTH_SECRET, "
                              "FANOUT_AUTH_PUBLIC_KEY_FILE or FANOUT_AUTH_JWKS_URL")
        if config.auth_secret and len(hmac) != len(algorithms):
            raise ConfigError("FANOUT_AUTH_ALGORITHMS", "only HS256, HS384 and HS512 verify "
                              "with FANOUT_AUTH_SECRET")
        if not config.auth_secret and hmac:
            raise ConfigError("FANOUT_AUTH_ALGORITHMS", f"{', '.join(hmac)} need "
                              "FANOUT_AUTH_SECRET: a public key is never an HMAC secret")
    if config.auth_public_key_file:
        try:
            with open(config.auth_public_key_file, "rb") as file:
                load_public_key(file.read(1024 * 1024), algorithms or None)
        except OSError as exc:
            raise ConfigError("FANOUT_AUTH_PUBLIC_KEY_FILE", f"cannot read: {exc.strerror}"
                              ) from None
        except ValueError as exc:
            raise ConfigError("FANOUT_AUTH_PUBLIC_KEY_FILE", str(exc)) from None
    if config.auth_jwks_min_interval > config.auth_jwks_refresh:
        raise ConfigError("FANOUT_AUTH_JWKS_MIN_INTERVAL",
                          "must not exceed FANOUT_AUTH_JWKS_REFRESH")


def _env_names(setting: Setting) -> tuple[str, ...]:
    if setting.env == "REDIS_URL":
        return ("FANOUT_REDIS_URL", "REDIS_URL")
    return (setting.env,)


def add_arguments(parser: argparse.ArgumentParser, settings: tuple[Setting, ...]) -> None:
    """Add one flag per setting; values stay strings until `build`, which names errors."""
    for s in settings:
        envs = " or ".join(_env_names(s))
        parser.add_argument(s.flag, dest=s.attr.replace(".", "__"), metavar="VALUE",
                            default=None, help=f"{s.help} [env {envs}]")


def build(
    cls: type[T],
    settings: tuple[Setting, ...],
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
) -> T:
    """The config from defaults, then the environment, then flags."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for s in settings:
        raw: str | None = None
        name = s.env
        for candidate in _env_names(s):
            if env.get(candidate) not in (None, ""):
                raw, name = env[candidate], candidate
                break
        if args is not None and getattr(args, s.attr.replace(".", "__"), None) is not None:
            raw, name = getattr(args, s.attr.replace(".", "__")), s.flag
        if raw is not None:
            values[s.attr] = s.parse(name, raw)
    return _construct(cls, values)


def _construct(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        path = f"{prefix}{f.name}"
        if path in values:
            kwargs[f.name] = values[path]
        elif any(k.startswith(path + ".") for k in values):
            kwargs[f.name] = _construct(type(getattr(cls(), f.name)), values, path + ".")
    return cls(**kwargs)
