"""Configuration: frozen dataclasses built from a TOML config file, ``FANOUT_*``
environment variables and flags.

Each setting has one key in the config file (``[edge] port``), one name in the environment
(``FANOUT_EDGE_PORT``) and one flag (``--port``); the file < the environment < flags
(`load`). A bad value, an unknown file key or a ``FANOUT_`` variable that is no setting of
any command fails at start with a `ConfigError` naming it. Secrets (`Setting.secret`) come
only from the environment or a file it names (``FANOUT_AUTH_SECRET_FILE``), never from a
flag; they never appear in a repr or a log line (URLs: `redact_url`).
"""
from __future__ import annotations

import argparse
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from common.broker.keys import DEFAULT_PREFIX
from common.channels import active_namespaces
from common.errors import ConfigError
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


CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """The seed nodes of a Redis Cluster URL: `redis+cluster://[user:pass@]host:port,...`
    (or a plain `redis://host:port` with `cluster = true`: one seed). ValueError if one
    is not host:port."""
    netloc = urlsplit(url).netloc.rsplit("@", 1)[-1]
    seeds: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"seed {item!r} is not host:port")
        seeds.append((host.strip("[]"), int(port)))
    return seeds


def _check_redis_url(setting: str, url: str) -> str:
    if url.partition("://")[0].lower() in CLUSTER_SCHEMES:
        try:
            cluster_seeds(url)
        except ValueError as exc:
            raise ConfigError(setting, f"not a valid cluster URL ({exc})") from None
        return url
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigError(setting, f"not a valid URL ({exc})") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            setting, "must be a redis://, rediss://, unix:// or redis+cluster:// URL"
        )
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
    # wait for a free one (common/broker/client.py).
    max_connections: int = 64
    # Redis Cluster (common/broker/cluster.py): also implied by a redis+cluster:// URL;
    # with a redis:// URL, that node is the one seed.
    cluster: bool = False

    @property
    def is_cluster(self) -> bool:
        return self.cluster or self.url.partition("://")[0].lower() in CLUSTER_SCHEMES

    def __repr__(self) -> str:
        return (
            f"RedisSettings(url={redact_url(self.url)!r}, key_prefix={self.key_prefix!r}, "
            f"meta_ttl={self.meta_ttl}, max_connections={self.max_connections}, "
            f"cluster={self.is_cluster})"
        )


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Connections the kernel queues until the edge accepts them (listen(2); capped by
    # net.core.somaxconn). A mass reconnect brings thousands at once: beyond the queue the
    # kernel drops them, and each client waits out TCP's retransmission (1, 3, 7, 15 s...).
    backlog: int = 16384
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
    # A client whose ping is unanswered this long while it still reads is a slow consumer:
    # its queue's policy applies as if it were full, until it answers (edge/heartbeat.py).
    # Measured in time, so that it counts the backlog in the kernel's buffers too. 0 = off.
    max_lag: float = 3.0
    # TCP_NOTSENT_LOWAT: bytes a client's socket may hold unsent (not counting what is in
    # flight), so that a slow client's backlog stays where the policy reaches it
    # (edge/tcpinfo.py). 0 = the kernel's default (no limit).
    socket_unsent_limit: int = 16 * 1024
    overflow: Mapping[str, str] = field(default_factory=namespace_overflow)
    max_frame_messages: int = 1_000  # messages coalesced into one frame (1 = no coalescing)
    max_frame_bytes: int = 65_536  # a coalesced frame's size; a single larger message goes alone
    write_delay: float = 0.0  # s the writer waits to gather more messages into a frame
    # Pacing (edge/hub.py `Hub.pace`): the share of the loop's time live flushes may take
    # (1 = never pace; halved while recovering subscribes wait for Redis reads), and the
    # longest the pub/sub reader holds a reply so that more gathers for the next flush.
    live_share: float = 0.5
    live_coalesce_max: float = 0.05
    recovery_limit: int = 10_000  # most messages one subscribe may replay
    # Recovery from memory (edge/hub.py): the last publications of each channel the edge
    # serves, by count and by bytes (payload + 100 per message); 0 messages = none kept.
    recent_window_messages: int = 64
    recent_window_bytes: int = 16_384
    channel_linger: float = 10.0  # s a channel stays subscribed after its last client left
    # Load admission (edge/admission.py): broker reads of recovering subscribes at once
    # (0 = no limit), how many may wait for one, and the retry delay advised beyond that.
    # The reads of one event-loop turn go to Redis in one pipeline (edge/hub.py). A place
    # is held across a new channel's SUBSCRIBE confirmation and its read, a turn or more
    # each, and a storm's turn takes 100 ms or more: 1,000 places held a 10,000-client
    # storm to a few thousand reads a second (19.4 s; 11.5 s with no limit), while Redis
    # spent 1.3 s of CPU on its 78,000 reads. A waiting subscribe costs the edge a future
    # (its task exists anyway), a deferred one a request and a reply more.
    max_recoveries: int = 10_000
    recovery_queue: int = 50_000
    recovery_retry: float = 0.5  # s; advised: random in [x, 2x]
    connection_rate: float = 0.0  # new connections per second (0 = no limit) ...
    connection_burst: int = 1_000  # ... and how many at once above it (HTTP 503 beyond)
    compression: bool = False  # permessage-deflate: ~5x the CPU in fan-out, off by default
    direct_write: bool = True  # write finished frames to the transport (edge/wire.py)
    drain_seconds: float = 10.0  # on SIGTERM/SIGINT, close connections spread over this long
    # The cyclic garbage collector's thresholds (gc.set_threshold); None = Python's own.
    gc_thresholds: tuple[int, int, int] | None = (50_000, 50, 100)
    # The young generation's threshold while the recovery gate holds a storm's reads
    # (edge/gcpolicy.py); 0 = as the rest of the time. Not with gc_thresholds None.
    gc_storm_gen0: int = 500_000
    # Admission (common/admission.py, edge/admission.py): who may connect, and how many.
    allowed_origins: tuple[str, ...] = ()  # browser Origin patterns; () = any (a warning)
    allow_no_origin: bool = True  # handshakes without an Origin header (not a browser)
    max_connections: int = 10_000  # WebSocket connections of this edge; 0 = no limit
    max_connections_per_ip: int = 100  # per client address (IPv6: per /64); 0 = no limit
    trusted_proxies: tuple[str, ...] = ()  # CIDRs whose X-Forwarded-For is believed
    handshake_timeout: float = 5.0  # s for a new TCP connection to send its request head
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
    loop: str = "auto"  # the event loop (common/loop.py): auto, asyncio or uvloop
    log_level: str = "info"


# --- building from environment and flags ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its flag, environment variable, config file key, parser and help.

    Everything else (the file key, the --help group and metavar, the `_FILE` variant of a
    secret, the unknown-variable check) is derived from these, so a new row in a table gets
    it all."""

    attr: str  # dotted path into the config, e.g. "redis.url": file key [redis] url
    flag: str
    env: str
    parse: Callable[[str, str], Any]
    help: str
    # Never a flag (visible in ps) nor a value in the config file: only the environment
    # variable or <ENV>_FILE naming a file that holds it (Docker/Kubernetes secrets), or a
    # `<key>_file` key in the config file. Shown as *** by `fanout config check`.
    secret: bool = False
    # A URL that may carry credentials (user:password@, ?password=): as a flag or in the
    # file only without them; <ENV>_FILE as for secrets; shown redacted.
    url_secret: bool = False
    metavar: str = ""  # "" = derived from the name and the parser (_metavar)
    group: str = ""  # --help section; "" = derived from the name (_group)
    default: str = ""  # how --help shows the default; "" = the dataclass default
    json: bool = False  # a JSON text: TOML arrays and tables are given as JSON
    # The key in the command's own section when it is not the attr's: a feed's settings
    # (ingest/feeds/) are attrs of their own dataclass ("ws.url") but keep their flat keys
    # ([ingest] ws_url) and so their flags and variables.
    file_key: str = ""

    @property
    def section(self) -> str:
        """The config file section: the first part of a dotted attr, else "" (the
        command's own section, [edge] or [ingest])."""
        if self.file_key:
            return ""
        return self.attr.split(".", 1)[0] if "." in self.attr else ""

    @property
    def key(self) -> str:
        """The key in the config file section."""
        return self.file_key or self.attr.rsplit(".", 1)[-1]

    @property
    def sensitive(self) -> bool:
        return self.secret or self.url_secret


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


def _share(setting: str, text: str) -> float:
    """A fraction: 0 < x <= 1."""
    value = _float(0)(setting, text)
    if value > 1:
        raise ConfigError(setting, f"must be a number > 0 and <= 1, got {text}")
    return value


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


def _loop(setting: str, text: str) -> str:
    from common.loop import LOOPS, uvloop_available

    name = text.lower()
    if name not in LOOPS:
        raise ConfigError(setting, f"must be auto, asyncio or uvloop, got {text!r}")
    if name == "uvloop" and not uvloop_available():
        raise ConfigError(setting, "uvloop is not installed (it does not run on Windows); "
                                   "use auto or asyncio")
    return name


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


def _origins(setting: str, text: str) -> tuple[str, ...]:
    from common.admission import check_origin_patterns

    items = _csv(setting, text)
    if not items:
        raise ConfigError(setting, "must name at least one origin pattern (or *)")
    try:
        return check_origin_patterns(items)
    except ValueError as exc:
        raise ConfigError(setting, str(exc)) from None


def _networks(setting: str, text: str) -> tuple[str, ...]:
    from common.admission import parse_networks

    try:
        return tuple(str(net) for net in parse_networks(_csv(setting, text)))
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


def _namespaces_file(setting: str, text: str) -> str:
    """Load (and check) the namespaces file, and parse channel names with it from now on:
    the settings that name namespaces (FANOUT_HISTORY, FANOUT_OVERFLOW) come after it."""
    activate(load_namespaces(text, setting))
    return text


def _prefix(setting: str, text: str) -> str:
    if not text or any(c in text for c in "{}: \t\n"):
        raise ConfigError(setting, "must be a non-empty name without braces, colons or spaces")
    return text


# The parsers for settings tables outside this module (ingest/config.py, a feed's in
# ingest/feeds/): each takes (the setting's name, the text) and raises ConfigError naming it.
parse_int = _int  # parse_int(lo, hi): a parser of integers in [lo, hi]
parse_float = _float  # parse_float(lo, strict): of finite numbers > lo (>= if not strict)
parse_bool = _bool
parse_str = _str
parse_nonempty = _nonempty
parse_log_level = _log_level
parse_csv = _csv
parse_ints = _ints
parse_json_object = _json_object
parse_name = _prefix  # a name without braces, colons or spaces (key prefix, ids)


REDIS_SETTINGS = (
    Setting(
        "redis.url", "--redis-url", "REDIS_URL", _check_redis_url,
        "Redis/Valkey URL: redis://, rediss:// or unix://, or a Redis Cluster's seed nodes "
        "as redis+cluster://host:port,host:port (one with a password only from the "
        "environment)",
        url_secret=True,
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
    Setting(
        "redis.cluster", "--redis-cluster", "FANOUT_REDIS_CLUSTER", _bool,
        "Redis Cluster mode (sharded pub/sub, scripts on each channel's slot) with the "
        "URL's node as seed; a redis+cluster:// URL implies it",
    ),
)

NAMESPACES_FILE_SETTING = Setting(
    "namespaces_file", "--namespaces-file", "FANOUT_NAMESPACES_FILE", _namespaces_file,
    "TOML file of the channel namespaces (default: the shipped market-data namespaces); "
    "FANOUT_HISTORY and FANOUT_OVERFLOW override its history and overflow policies",
)

LOOP_SETTING = Setting(
    "loop", "--loop", "FANOUT_LOOP", _loop,
    "event loop: uvloop, asyncio, or auto (uvloop where it is installed: not on Windows)",
    metavar="LOOP",
)

EDGE_SETTINGS = (
    *REDIS_SETTINGS,
    NAMESPACES_FILE_SETTING,
    Setting("host", "--host", "FANOUT_EDGE_HOST", _nonempty, "address to listen on"),
    Setting("port", "--port", "FANOUT_EDGE_PORT", _int(0, 65535), "port to listen on"),
    Setting("backlog", "--backlog", "FANOUT_BACKLOG", _int(1),
            "connections the kernel queues until the edge accepts them (listen backlog; "
            "the kernel caps it at net.core.somaxconn)"),
    Setting("ping_interval", "--ping-interval", "FANOUT_PING_INTERVAL", _float(0),
            "seconds between server pings"),
    Setting("pong_timeout", "--pong-timeout", "FANOUT_PONG_TIMEOUT", _float(0),
            "seconds a client has to answer a ping"),
    Setting("connect_timeout", "--connect-timeout", "FANOUT_CONNECT_TIMEOUT", _float(0),
            "seconds a new connection has to send connect"),
    Setting("max_message_size", "--max-message-size", "FANOUT_MAX_MESSAGE_SIZE", _int(256),
            "largest client frame in bytes (larger: close 1009)"),
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
    Setting("max_lag", "--max-lag", "FANOUT_MAX_LAG", _float(0, strict=False),
            "seconds a ping may stay unanswered while the client still reads before its "
            "queue's overflow policy applies as if it were full (0 = off)"),
    Setting("socket_unsent_limit", "--socket-unsent-limit", "FANOUT_SOCKET_UNSENT_LIMIT",
            _int(0), "most bytes a client's socket may hold unsent (TCP_NOTSENT_LOWAT), "
            "beyond what is in flight; 0 = the kernel's default"),
    Setting("recent_window_messages", "--recent-window-messages",
            "FANOUT_RECENT_WINDOW_MESSAGES", _int(0),
            "publications of each channel kept in memory, from which a client nearly up to "
            "date is recovered without a Redis read (0 = none)"),
    Setting("recent_window_bytes", "--recent-window-bytes", "FANOUT_RECENT_WINDOW_BYTES",
            _int(0), "most bytes (payload + 100 per message) of a channel's recent window"),
    Setting("channel_linger", "--channel-linger", "FANOUT_CHANNEL_LINGER",
            _float(0, strict=False),
            "seconds a channel stays subscribed (and its recent window kept) after its last "
            "client left, for clients that come back (0 = dropped at once)"),
    Setting("max_recoveries", "--max-recoveries", "FANOUT_MAX_RECOVERIES", _int(0),
            "Redis history reads of subscribes and history requests at once (0 = no limit)"),
    Setting("recovery_queue", "--recovery-queue", "FANOUT_RECOVERY_QUEUE", _int(0),
            "subscribes that may wait for a history read; more get unavailable with "
            "retry_after_ms"),
    Setting("recovery_retry", "--recovery-retry", "FANOUT_RECOVERY_RETRY", _float(0),
            "seconds a deferred subscribe is advised to wait (random in [x, 2x])"),
    Setting("connection_rate", "--connection-rate", "FANOUT_CONNECTION_RATE",
            _float(0, strict=False),
            "new connections per second this edge accepts; more get HTTP 503 with "
            "Retry-After 1-3 s (0 = no limit)"),
    Setting("connection_burst", "--connection-burst", "FANOUT_CONNECTION_BURST", _int(1),
            "new connections accepted at once above the rate"),
    Setting("overflow", "--overflow", "FANOUT_OVERFLOW", parse_overflow,
            "slow-client policy per namespace, <namespace>=<disconnect|conflate|drop>,...; "
            "namespaces not named keep theirs", metavar="POLICIES"),
    Setting("max_frame_messages", "--max-frame-messages", "FANOUT_MAX_FRAME_MESSAGES",
            _int(1), "most messages coalesced into one frame (1 = no coalescing)"),
    Setting("max_frame_bytes", "--max-frame-bytes", "FANOUT_MAX_FRAME_BYTES", _int(256),
            "largest coalesced frame in bytes"),
    Setting("write_delay", "--write-delay", "FANOUT_WRITE_DELAY", _float(0, strict=False),
            "seconds a writer waits to batch more messages into a frame"),
    Setting("live_share", "--live-share", "FANOUT_LIVE_SHARE", _share,
            "share of the event loop's time live flushes may take (0 < x <= 1; halved while "
            "subscribes wait for recovery reads); after a flush that took longer than 1 ms "
            "the pub/sub reader waits so that the next flush carries more (1 = never wait)",
            metavar="FRACTION"),
    Setting("live_coalesce_max", "--live-coalesce-max", "FANOUT_LIVE_COALESCE_MAX",
            _float(0, strict=False),
            "most seconds the pub/sub reader holds a live message to pace expensive flushes "
            "(0 = never)", metavar="SECONDS"),
    Setting("compression", "--compression", "FANOUT_WS_COMPRESSION", _bool,
            "permessage-deflate (true/false)"),
    Setting("direct_write", "--direct-write", "FANOUT_DIRECT_WRITE", _bool,
            "write finished frames straight to the socket, shared by all clients of a "
            "batch (true/false)"),
    Setting("drain_seconds", "--drain-seconds", "FANOUT_DRAIN_SECONDS",
            _float(0, strict=False),
            "on SIGTERM/SIGINT: not ready at once, connections closed (3000) spread over this "
            "many seconds, then exit; 0 = close all at once"),
    Setting("gc_thresholds", "--gc-thresholds", "FANOUT_GC_THRESHOLDS", _gc_thresholds,
            "garbage collector thresholds gen0,gen1,gen2, or 'python' for Python's "
            "700,10,10", metavar="N,N,N"),
    Setting("gc_storm_gen0", "--gc-storm-gen0", "FANOUT_GC_STORM_GEN0", _int(0),
            "the collector's young-generation threshold while 100 or more subscribes read "
            "from Redis at once (a reconnect storm); 0 = unchanged", metavar="N"),
    Setting("allowed_origins", "--allowed-origins", "FANOUT_ALLOWED_ORIGINS", _origins,
            "browser origins allowed to connect: comma-separated patterns such as "
            "https://app.example.com,https://*.example.com (unset: any, with a warning)"),
    Setting("allow_no_origin", "--allow-no-origin", "FANOUT_ALLOW_NO_ORIGIN", _bool,
            "accept handshakes without an Origin header, i.e. non-browser clients "
            "(true/false)"),
    Setting("max_connections", "--max-connections", "FANOUT_MAX_CONNECTIONS", _int(0),
            "most WebSocket connections of this edge; more get HTTP 503 (0 = no limit)"),
    Setting("max_connections_per_ip", "--max-connections-per-ip",
            "FANOUT_MAX_CONNECTIONS_PER_IP", _int(0),
            "most WebSocket connections per client address (IPv6: per /64) on this edge; "
            "more get HTTP 503 (0 = no limit)"),
    Setting("trusted_proxies", "--trusted-proxies", "FANOUT_TRUSTED_PROXIES", _networks,
            "comma-separated networks (CIDRs) of proxies whose X-Forwarded-For names the "
            "client (unset: none, the header is ignored)"),
    Setting("handshake_timeout", "--handshake-timeout", "FANOUT_HANDSHAKE_TIMEOUT", _float(0),
            "seconds a new TCP connection has to send its whole HTTP request (the WebSocket "
            "handshake); then it is closed"),
    Setting("auth_secret", "--auth-secret", "FANOUT_AUTH_SECRET", _auth_secret,
            "HMAC secret of connection tokens (JWT HS256/384/512), at least 32 bytes; "
            "unset (and no public key or JWKS URL) = no authentication", secret=True),
    Setting("auth_public_key_file", "--auth-public-key-file", "FANOUT_AUTH_PUBLIC_KEY_FILE",
            _auth_public_key_file,
            "PEM file of the public key (or certificate) that verifies connection tokens "
            "(RSA >= 2048 bits, EC P-256/384/521, Ed25519/Ed448)"),
    Setting("auth_jwks_url", "--auth-jwks-url", "FANOUT_AUTH_JWKS_URL", _jwks_url,
            "https:// URL of the JWKS whose keys verify connection tokens (chosen by kid; "
            "fetched at start, refreshed, refetched for an unknown kid)", url_secret=True),
    Setting("auth_algorithms", "--auth-algorithms", "FANOUT_AUTH_ALGORITHMS", _algorithms,
            "comma-separated JWT algorithms accepted (HS256,HS384,HS512 with a secret; "
            "RS*/PS*, ES* or EdDSA with public keys)", metavar="ALGORITHMS",
            default="every one of the key's type"),
    Setting("auth_jwks_refresh", "--auth-jwks-refresh", "FANOUT_AUTH_JWKS_REFRESH",
            _float(0), "seconds a fetched JWKS is used before it is fetched again; a "
            "shorter Cache-Control max-age wins, down to the min interval"),
    Setting("auth_jwks_min_interval", "--auth-jwks-min-interval",
            "FANOUT_AUTH_JWKS_MIN_INTERVAL", _float(0),
            "seconds: at most one JWKS fetch per this interval for tokens with an unknown "
            "kid; also the longest retry delay after a failed fetch"),
    Setting("auth_jwks_timeout", "--auth-jwks-timeout", "FANOUT_AUTH_JWKS_TIMEOUT", _float(0),
            "seconds a JWKS fetch may take"),
    Setting("auth_channels", "--auth-channels", "FANOUT_AUTH_CHANNELS", _patterns,
            "channel patterns a token without a channels claim may subscribe to"),
    Setting("auth_issuer", "--auth-issuer", "FANOUT_AUTH_ISSUER", _nonempty,
            "required iss claim of tokens", metavar="ISSUER", default="not checked"),
    Setting("auth_audience", "--auth-audience", "FANOUT_AUTH_AUDIENCE", _nonempty,
            "required aud claim of tokens", metavar="AUDIENCE", default="not checked"),
    Setting("node_id", "--node-id", "FANOUT_NODE_ID", _prefix,
            "this edge's id (in client ids and the probe channel)", metavar="ID",
            default="random"),
    LOOP_SETTING,
    Setting("log_level", "--log-level", "FANOUT_LOG_LEVEL", _log_level,
            "log level: debug, info, warning or error"),
)

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


# --- commands, sources and the unknown-variable rule -----------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A command that runs from the Setting tables: its config class, settings and the
    cross-setting check."""

    name: str  # also its config file section: [edge], [ingest]
    cls: type[Any]
    settings: tuple[Setting, ...]
    check: Callable[[Any], None]


EDGE_COMMAND = Command("edge", EdgeConfig, EDGE_SETTINGS, check_edge)

# Which commands exist is the composition root's knowledge (fanout/config.py: edge here,
# ingest from ingest/config.py): the functions below that look at every command (the
# unknown-variable check, the config file's keys) take them as this mapping, by name.
Commands = Mapping[str, Command]

CONFIG_ENV = "FANOUT_CONFIG"  # the config file, as --config FILE

# FANOUT_* variables that are not settings but that the project itself reads (its tests);
# allowed in any environment, so that the unknown-variable check never trips on them.
NOT_SETTINGS: dict[str, str] = {
    CONFIG_ENV: "the config file (--config)",
    "FANOUT_ARTIFACTS": "tests/integration/test_browser.py: where screenshots and traces go",
    "FANOUT_PROPERTY_EXAMPLES": "tests/integration/test_recovery_property.py: hypothesis examples",
    "FANOUT_TEST_LOOP": "tests/integration/conftest.py: uvloop runs the tests on uvloop",
    # make fuzz (tests/*/test_fuzz.py, tests/support/fuzz_live.py): the run's size, seed and log.
    "FANOUT_FUZZ_EXAMPLES": "tests/unit/test_fuzz.py: hypothesis examples per fuzz target",
    "FANOUT_FUZZ_FRAMES": "tests/integration/test_fuzz.py: frames the live fuzzer sends",
    "FANOUT_FUZZ_SEED": "tests/integration/test_fuzz.py: the live fuzzer's random seed",
    "FANOUT_FUZZ_LOG": "tests/support/fuzz_live.py: where the fuzzed edge's log goes",
    "FANOUT_FUZZ_EDGE_GC": "tests/support/fuzz_live.py: the fuzzed edge's collector thresholds",
}

# Kubernetes gives every pod variables for the Services of its namespace (service links,
# unless the pod spec says enableServiceLinks: false): a Service "fanout-edge" yields
# FANOUT_EDGE_SERVICE_HOST, FANOUT_EDGE_PORT_80_TCP and the like. Not settings, not typos.
_SERVICE_LINK = re.compile(
    r"FANOUT_[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?|PORT_\d+_(TCP|UDP|SCTP)"
    r"(_PROTO|_PORT|_ADDR)?)"
)
_SERVICE_LINK_URL = re.compile(r"(tcp|udp|sctp)://[^/]*:\d+")


def _env_names(setting: Setting) -> tuple[str, ...]:
    """The variables a setting's value is read from, first found wins."""
    if setting.env == "REDIS_URL":
        return ("FANOUT_REDIS_URL", "REDIS_URL")
    return (setting.env,)


def _file_env(setting: Setting) -> str:
    """<ENV>_FILE: the variable naming a file that holds a secret setting's value."""
    return f"{_env_names(setting)[0]}_FILE"


def known_env(commands: Commands) -> frozenset[str]:
    """Every FANOUT_ variable that means something to some command."""
    names = set(NOT_SETTINGS)
    for command in commands.values():
        for s in command.settings:
            names.update(_env_names(s))
            if s.sensitive:
                names.add(_file_env(s))
    return frozenset(names)


def check_environment(env: Mapping[str, str], commands: Commands) -> None:
    """Fail on a FANOUT_ variable that is no setting of any command (a typo is otherwise
    silently ignored), naming the closest one. A setting of another command is fine:
    edges and ingest workers often share one environment (docker-compose.yml)."""
    known = known_env(commands)
    for name in sorted(env):
        if not name.startswith("FANOUT_") or name in known:
            continue
        if _SERVICE_LINK.fullmatch(name) or (
            name.endswith("_PORT") and _SERVICE_LINK_URL.fullmatch(env[name])
        ):
            continue
        raise ConfigError(name, "unknown setting" + _hint(name, known))


def _hint(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, sorted(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


@dataclass(frozen=True, slots=True)
class Source:
    """Where a setting's value came from: default, file, env or flag, and its name there
    (the file and key, the variable, the flag)."""

    kind: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" if self.name else self.kind


DEFAULT = Source("default")


@dataclass(frozen=True, slots=True)
class Loaded:
    """A command's config and where each setting came from (by attr)."""

    command: Command
    config: Any
    sources: Mapping[str, Source]
    file: str | None = None


# --- the config file ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigFile:
    path: str
    sections: Mapping[str, Mapping[str, Any]]


def file_sections(commands: Commands) -> dict[str, dict[str, Setting]]:
    """section -> key -> setting, over every command: [redis], [edge], [ingest]."""
    sections: dict[str, dict[str, Setting]] = {}
    for command in commands.values():
        for s in command.settings:
            sections.setdefault(s.section or command.name, {})[s.key] = s
    return sections


def read_config_file(path: str, commands: Commands) -> ConfigFile:
    """Read and check a TOML config file: known sections, known keys (for every command,
    not only the one running), no secrets. Values are parsed later, by `load`."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(path, f"cannot read the config file: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    known = file_sections(commands)
    for section, table in data.items():
        if not isinstance(table, dict):
            where = [f"[{name}] {section}" for name, keys in known.items() if section in keys]
            hint = f"; did you mean {' or '.join(where)}?" if where else ""
            raise ConfigError(f"{path}: {section}", "settings go in a section: "
                              f"{', '.join(f'[{name}]' for name in known)}{hint}")
        if section not in known:
            raise ConfigError(f"{path}: [{section}]", "unknown section" + _hint(section, known))
        keys = known[section]
        for key, value in table.items():
            name = f"{path}: [{section}] {key}"
            setting = keys.get(key)
            if setting is None and key.endswith("_file"):
                of = keys.get(key[: -len("_file")])
                if of is not None and of.sensitive:
                    if not isinstance(value, str):
                        raise ConfigError(name, "must be the name of a file")
                    if table.get(of.key) not in (None, ""):
                        raise ConfigError(name, f"set only one of {of.key} and {key}")
                    continue
            if setting is None:
                valid = [*keys, *(f"{k}_file" for k, s in keys.items() if s.sensitive)]
                elsewhere = [f"[{other}] {key}" for other, others in known.items()
                             if key in others]
                hint = (f"; it belongs in {' or '.join(elsewhere)}" if elsewhere
                        else _hint(key, valid))
                raise ConfigError(name, "unknown setting" + hint)
            if setting.secret:
                raise ConfigError(name, "secrets are not read from the config file: set "
                                  f"{setting.env} or {_file_env(setting)} in the "
                                  f"environment, or {key}_file = \"/path/to/file\" here")
            if setting.url_secret and isinstance(value, str) and _has_credentials(value):
                raise ConfigError(name, "holds credentials, which do not belong in the config "
                                  f"file: set {_env_names(setting)[0]} or "
                                  f"{_file_env(setting)}, or {key}_file = \"/path/to/file\"")
    return ConfigFile(path, data)


def _file_text(setting: Setting, name: str, value: Any) -> str:
    """A TOML value as the text the setting's parser reads (as from the environment)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return str(value)
    if setting.json and isinstance(value, (list, dict)):
        return json.dumps(value)
    scalar = (str, int, float)
    if isinstance(value, list) and all(isinstance(v, scalar) and not isinstance(v, bool)
                                       for v in value):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict) and all(isinstance(v, scalar) and not isinstance(v, bool)
                                       for v in value.values()):
        return ",".join(f"{k}={v}" for k, v in value.items())
    raise ConfigError(name, f"unsupported value {type(value).__name__}: give a string, "
                      "number, boolean, or an array or table of strings and numbers")


def read_secret_file(name: str, path: str) -> str:
    """The contents of a secret's file, without trailing newlines (as `echo` writes)."""
    try:
        with open(path, "rb") as file:
            data = file.read(1024 * 1024 + 1)
    except OSError as exc:
        raise ConfigError(name, f"cannot read {path!r}: {exc.strerror}") from None
    if len(data) > 1024 * 1024:
        raise ConfigError(name, f"{path!r} is larger than 1 MiB")
    try:
        return data.decode().rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(name, f"{path!r} is not UTF-8 text") from None


def _has_credentials(url: str) -> bool:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return False  # the parser names the bad URL
    return "@" in parts.netloc or "password=" in parts.query.lower()


# --- building: defaults < file < environment < flags -------------------------------------------


def _dest(setting: Setting) -> str:
    """The flag's argparse dest: the attr, or the file key of a feed's setting (--rate is
    args.rate, not args.sim__rate)."""
    return (setting.file_key or setting.attr).replace(".", "__")


def _resolve(
    settings: tuple[Setting, ...],
    env: Mapping[str, str],
    args: argparse.Namespace | None,
    file: ConfigFile | None,
    section: str,
) -> tuple[dict[str, Any], dict[str, Source]]:
    values: dict[str, Any] = {}
    sources: dict[str, Source] = {}
    for s in settings:
        raw: str | None = None
        secret_file = ""  # raw is the name of a file holding the value: read if it wins
        name, source = s.env, DEFAULT
        if file is not None:
            table = file.sections.get(s.section or section, {})
            where = f"{file.path}: [{s.section or section}]"
            if s.sensitive and table.get(f"{s.key}_file"):
                key = f"{s.key}_file"
                name = f"{where} {key}"
                raw, secret_file, source = table[key], table[key], Source("file", name)
            if table.get(s.key) not in (None, ""):
                name = f"{where} {s.key}"
                raw, secret_file = _file_text(s, name, table[s.key]), ""
                source = Source("file", name)
        for candidate in _env_names(s):
            file_var = f"{candidate}_FILE" if s.sensitive and candidate.startswith(
                "FANOUT_") else ""
            if env.get(candidate) not in (None, ""):
                if file_var and env.get(file_var):
                    raise ConfigError(file_var, f"set only one of {candidate} and {file_var}")
                raw, name, source = env[candidate], candidate, Source("env", candidate)
                secret_file = ""
                break
            if file_var and env.get(file_var):
                raw = secret_file = env[file_var]
                name, source = file_var, Source("env", file_var)
                break
        flag = getattr(args, _dest(s), None) if args is not None else None
        if flag is not None:
            if s.secret:
                raise ConfigError(s.flag, "secrets are not taken as flags (ps and shell "
                                  f"history show them): set {_env_names(s)[0]} or "
                                  f"{_file_env(s)} instead")
            if s.url_secret and _has_credentials(flag):
                raise ConfigError(s.flag, "holds credentials, which a flag would show in ps "
                                  f"and shell history: set {_env_names(s)[0]} or "
                                  f"{_file_env(s)} instead")
            raw, name, source = flag, s.flag, Source("flag", s.flag)
            secret_file = ""
        if raw is not None:
            if secret_file:
                raw = read_secret_file(name, secret_file)
            values[s.attr] = s.parse(name, raw)
            sources[s.attr] = source
        else:
            sources[s.attr] = DEFAULT
    return values, sources


def build(
    cls: type[T],
    settings: tuple[Setting, ...],
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
    file: ConfigFile | None = None,
    section: str = "",
) -> T:
    """The config from defaults, then the file (its `section` and shared ones such as
    [redis]), then the environment, then flags. No unknown-variable check: see `load`."""
    env = os.environ if env is None else env
    values, _ = _resolve(settings, env, args, file, section)
    return _construct(cls, values)


def config_path(env: Mapping[str, str], args: argparse.Namespace | None = None) -> str | None:
    """The config file: --config, else FANOUT_CONFIG, else none."""
    path = getattr(args, "config", None) if args is not None else None
    return path or env.get(CONFIG_ENV) or None


def load(
    commands: Commands,
    command: str,
    env: Mapping[str, str] | None = None,
    args: argparse.Namespace | None = None,
    path: str | None = None,
) -> Loaded:
    """What `fanout <command>` runs with: the environment checked for unknown FANOUT_
    variables, the config file (`path`, else --config, else FANOUT_CONFIG) read and
    checked, then every setting resolved and the command's cross-setting check run."""
    cmd = commands[command]
    env = os.environ if env is None else env
    check_environment(env, commands)
    path = path or config_path(env, args)
    file = read_config_file(path, commands) if path else None
    values, sources = _resolve(cmd.settings, env, args, file, cmd.name)
    config = _construct(cmd.cls, values)
    cmd.check(config)
    return Loaded(cmd, config, sources, path)


def _construct(cls: type[T], values: dict[str, Any], prefix: str = "") -> T:
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        path = f"{prefix}{f.name}"
        if path in values:
            kwargs[f.name] = values[path]
        elif any(k.startswith(path + ".") for k in values):
            kwargs[f.name] = _construct(type(getattr(cls(), f.name)), values, path + ".")
    return cls(**kwargs)


# --- showing values: --help defaults and `fanout config check` ----------------------------------


def attr_value(config: Any, attr: str) -> Any:
    for part in attr.split("."):
        config = getattr(config, part)
    return config


def show_value(setting: Setting, value: Any) -> str:
    """A value as text a user could give back, secrets as *** (unset: empty)."""
    if setting.secret:
        return "***" if value else ""
    if setting.url_secret and isinstance(value, str):
        return redact_url(value)
    return _show(value)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, HistoryPolicy):
        return f"{value.max_length}/{value.max_age:g}"
    if isinstance(value, Mapping):
        return ",".join(f"{k}={_show(v)}" for k, v in value.items())
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value)
    return str(value)


def describe(loaded: Loaded) -> list[tuple[str, str, str]]:
    """(file key, value, source) of every setting of a loaded command, secrets redacted."""
    rows = []
    for s in loaded.command.settings:
        key = f"{s.section or loaded.command.name}.{s.key}"
        shown = show_value(s, attr_value(loaded.config, s.attr))
        rows.append((key, shown or f"({s.default or 'unset'})", str(loaded.sources[s.attr])))
    return rows


# --- flags: --help groups, metavars and defaults -------------------------------------------------

# (pattern on the setting's key, --help group); the first match wins, the rest is "process".
_GROUPS: tuple[tuple[str, str], ...] = (
    (r"auth_.*", "authentication"),
    (r"api_.*", "HTTP publish API"),
    (r"namespace.*", "channel namespaces"),
    (r"host|port|backlog|node_id|metrics_host|metrics_port", "network"),
    (r"ping_interval|pong_timeout|connect_timeout|handshake_timeout|.*_timeout",
     "heartbeats and timeouts"),
    (r"max_message_size|max_subscriptions|request_rate|request_burst|max_connections.*"
     r"|.*origins?|.*prox(y|ies)|max_recoveries|recovery_queue|recovery_retry"
     r"|connection_rate|connection_burst", "connection limits and admission"),
    (r"queue_.*|max_lag|socket_.*|overflow|max_frame_.*|write_delay|live_share"
     r"|live_coalesce_max|compression|direct_write",
     "queues and delivery"),
    (r"recovery_limit|unpublished_ttl|history|idempotency_ttl|recent_window_.*"
     r"|channel_linger", "history and recovery"),
    (r"feed|reconnect_.*", "ingest feed"),
    (r"batch_size|feed_id|lease_.*", "publishing and leader election"),
)


# The order of the groups in --help. A group not listed (a feed's own, named by its
# settings: ingest/feeds/) comes right after "ingest feed", in the order of the settings.
_GROUP_ORDER = [
    "Redis", "network", "heartbeats and timeouts", "connection limits and admission",
    "queues and delivery", "history and recovery", "authentication", "ingest feed",
    "publishing and leader election", "HTTP publish API", "channel namespaces", "process",
]
_FEED_GROUPS_AFTER = "ingest feed"


def _group_rank(group: str, used: list[str]) -> tuple[int, int]:
    """Where `group` goes in --help: its place in _GROUP_ORDER; an unlisted one (a feed's)
    after _FEED_GROUPS_AFTER, in the order of first use."""
    if group in _GROUP_ORDER:
        return _GROUP_ORDER.index(group), 0
    return _GROUP_ORDER.index(_FEED_GROUPS_AFTER), 1 + used.index(group)


def setting_group(setting: Setting) -> str:
    if setting.group:
        return setting.group
    if setting.section == "redis":
        return "Redis"
    for pattern, group in _GROUPS:
        if re.fullmatch(pattern, setting.key):
            return group
    return "process"


_SECONDS = re.compile(r".*(timeout|ttl|interval|seconds|delay|refresh|_base|_cap)")


def setting_metavar(setting: Setting) -> str:
    """SECONDS, BYTES, N, URL, PATTERNS...: from the name, else from the parser."""
    if setting.metavar:
        return setting.metavar
    key = setting.key
    parser = getattr(setting.parse, "__qualname__", "")
    if key.endswith(("_file", "_path")):
        return "FILE"
    if key.endswith("url"):
        return "URL"
    if key == "host" or key.endswith("_host"):
        return "HOST"
    if key == "port" or key.endswith("_port"):
        return "PORT"
    if setting.parse is _bool:
        return "BOOL"
    if setting.parse is _log_level:
        return "LEVEL"
    if _SECONDS.fullmatch(key):
        return "SECONDS"
    if key.endswith(("_bytes", "_size")):
        return "BYTES"
    if key.endswith("rate"):
        return "PER_SECOND"
    if key.endswith(("channels", "patterns")):
        return "PATTERNS"
    if key.endswith("origins"):
        return "ORIGINS"
    if key.endswith("proxies"):
        return "CIDRS"
    if key.endswith("prefix"):
        return "NAME"
    if parser.startswith("_int."):
        return "N"
    if parser.startswith("_float."):
        return "NUMBER"
    if setting.parse is _csv:
        return "LIST"
    return "VALUE"


def setting_default(setting: Setting, defaults: Any) -> str:
    if setting.default:
        return setting.default
    try:
        value = attr_value(defaults, setting.attr)
    except AttributeError:
        return "none"
    shown = show_value(setting, value)
    return shown if shown else "none"


def add_arguments(
    parser: argparse.ArgumentParser,
    settings: tuple[Setting, ...],
    cls: type[Any] | None = None,
    section: str = "",
) -> None:
    """One flag per setting, in --help groups, each with a metavar, its default, its
    variable and its config file key; values stay strings until `build`, which names
    errors. Secret settings get a hidden flag whose use fails, saying where they go."""
    defaults = cls() if cls is not None else None
    used = list(dict.fromkeys(setting_group(s) for s in settings if not s.secret))
    groups = {group: parser.add_argument_group(group)
              for group in sorted(used, key=lambda g: _group_rank(g, used))}
    secrets = [s for s in settings if s.secret]
    for s in settings:
        if s.secret:
            continue
        group = setting_group(s)
        envs = " or ".join(_env_names(s))
        if s.url_secret:
            envs += f" or {_file_env(s)}"
        key = f"{s.section or section or '<command>'}.{s.key}"
        default = f"; default {setting_default(s, defaults)}" if defaults is not None else ""
        groups[group].add_argument(
            s.flag, dest=_dest(s), metavar=setting_metavar(s), default=None,
            help=f"{s.help} [env {envs}; file {key}{default}]".replace("%", "%%"),
        )
    if secrets:
        lines = "; ".join(f"{_env_names(s)[0]} or {_file_env(s)} (file "
                          f"{s.section or section or '<command>'}.{s.key}_file): {s.help}"
                          for s in secrets)
        hidden = parser.add_argument_group(
            "secrets (never flags)",
            "Secrets are read only from the environment: the variable, or VAR_FILE naming a "
            "file that holds the value (Docker and Kubernetes secrets; trailing newlines "
            f"stripped), or a <key>_file key in the config file. {lines}".replace("%", "%%"),
        )
        for s in secrets:
            hidden.add_argument(s.flag, dest=_dest(s), default=None, help=argparse.SUPPRESS)
