"""A generic WebSocket JSON feed: the upstream adapter for any feed that pushes JSON.

Configured by data rather than code: a URL, the messages to send after each connect
(authentication, subscriptions), and `FieldMapping`s that say how a message becomes an
`UpstreamMessage`, e.g. ``{"match": {"type": "quote"}, "channel": "quotes.{symbol}",
"id": "seq", "payload": "data"}``. A frame holding a JSON array is taken as several
messages. A mapping may declare its messages states (``"if_changed": true``): then one
that would not change the channel's snapshot is not published, which is how a feed without
message ids avoids repeating its current state after a reconnect or a failover (the upstream
sends it again on subscribe). A message no mapping matches (a heartbeat, a subscription
ack) is counted and skipped; one that matches but cannot be mapped (a field missing, a bad
channel) is counted and skipped with a warning, at most one per reason every
`SKIP_LOG_INTERVAL` seconds: a malformed feed must not drown the log, nor stop the rest of
the feed.

The connection is the adapter's: it reconnects with `common.backoff.Backoff` (reset once
a connection delivers its first mapped message), treats `idle_timeout` seconds without a
frame as a dead upstream, sends the subscribe messages again after every connect, and
reports its state (connecting, live, backing_off) through `state` and an `on_state`
callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from common.backoff import Backoff
from common.channels import MAX_MESSAGE_ID_LENGTH, parse_channel, validate_key
from common.config import Setting, parse_float, parse_json_object, parse_str
from common.errors import BadChannel, ConfigError
from ingest.feeds import Feed, FeedContext
from ingest.upstream import Upstream, UpstreamMessage

Sleep = Callable[[float], Awaitable[object]]

SKIP_LOG_INTERVAL = 10.0  # s between two warnings of one skip reason
MAPPING_FIELDS = frozenset({"channel", "key", "id", "payload", "delete", "match", "if_changed"})

_PLACEHOLDER_RE = re.compile(r"\{([^{}]*)\}")
_MISSING = object()


class FeedState(StrEnum):
    CONNECTING = "connecting"
    LIVE = "live"  # connected and subscribed
    BACKING_OFF = "backing_off"
    STOPPED = "stopped"  # nobody iterates `messages`


class MappingError(ValueError):
    """A message matched a mapping but cannot become an UpstreamMessage."""


def _check_message_id(msg_id: str) -> None:
    if len(msg_id) > MAX_MESSAGE_ID_LENGTH:
        raise ValueError(f"id longer than {MAX_MESSAGE_ID_LENGTH} characters")


def _path(text: str, what: str) -> tuple[str, ...]:
    """A field path: dot-separated object fields; a numeric segment also indexes arrays."""
    segments = tuple(text.split("."))
    if not text or not all(segments):
        raise ValueError(f"{what}: bad field path {text!r}: expected e.g. data.symbol")
    return segments


def lookup(message: object, path: tuple[str, ...]) -> object:
    """The value at `path` in `message`, or `_MISSING`."""
    value = message
    for segment in path:
        if isinstance(value, dict):
            value = value.get(segment, _MISSING)
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            return _MISSING
        if value is _MISSING:
            return _MISSING
    return value


def _scalar(value: object, name: str, what: str) -> str:
    """A string or integer field as text (the only values that name channels, keys, ids)."""
    if value is _MISSING:
        raise MappingError(f"{what}: field {name!r} is missing")
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise MappingError(f"{what}: field {name!r} is not a string or an integer")


def _same(value: object, expected: object) -> bool:
    """JSON equality: true is not 1."""
    return value == expected and isinstance(value, bool) == isinstance(expected, bool)


@dataclass(frozen=True)
class FieldMapping:
    """How matching messages become UpstreamMessages.

    `channel` is a template: ``{path}`` is replaced by the message's string or integer at
    that field path (``quotes.{symbol}``, ``account.{account.id}.orders``). `key`, `msg_id`,
    `payload` and `delete` are field paths: the snapshot key, the idempotency id, the data
    published (default: the whole message) and a boolean that makes the message a delete
    (missing: false). `match` maps field paths to the values a message must have for this
    mapping to apply (empty: every message).

    `if_changed` (a flag, not a path) declares the messages states rather than events: each
    is published only if it changes the channel's snapshot (see `UpstreamMessage`). Use it
    for quotes, book levels, positions and balances when the upstream has no id field (or
    beside one): a reconnect, or a new leader after a failover, gets the upstream's current
    state again, and what is already in the snapshot is not published twice. Never for
    trades or other events, where two equal messages are two messages.
    """

    channel: str
    key: str | None = None
    msg_id: str | None = None
    payload: str | None = None
    delete: str | None = None
    match: Mapping[str, Any] = field(default_factory=dict)
    if_changed: bool = False

    def compile(self) -> _Rule:
        """Check the mapping (ValueError says what is wrong) and prepare it for use."""
        parts = _PLACEHOLDER_RE.split(self.channel)
        literals, names = parts[0::2], parts[1::2]
        if any("{" in text or "}" in text for text in literals):
            raise ValueError(f"channel template {self.channel!r}: unbalanced braces")
        what = f"channel template {self.channel!r}"
        paths = [_path(name, what) for name in names]
        if not paths:  # a fixed channel: check it now rather than per message
            try:
                parse_channel(self.channel)
            except BadChannel as exc:
                raise ValueError(f"{what}: {exc.message}") from None

        def optional(name: str, text: str | None) -> tuple[str, ...] | None:
            return None if text is None else _path(text, name)

        return _Rule(
            self,
            tuple(literals),
            tuple(paths),
            optional("key", self.key),
            optional("id", self.msg_id),
            optional("payload", self.payload),
            optional("delete", self.delete),
            tuple((_path(name, "match"), value) for name, value in self.match.items()),
        )

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> FieldMapping:
        """From configuration: ``{"channel", "key"?, "id"?, "payload"?, "delete"?,
        "match"?, "if_changed"?}``; the result is checked (ValueError)."""
        unknown = sorted(set(spec) - MAPPING_FIELDS)
        if unknown:
            expected = ", ".join(sorted(MAPPING_FIELDS))
            raise ValueError(f"unknown field(s) {', '.join(unknown)}: expected {expected}")
        channel = spec.get("channel")
        if not isinstance(channel, str):
            raise ValueError("'channel' (a string template) is required")
        paths: dict[str, str | None] = {}
        for name in ("key", "id", "payload", "delete"):
            value = spec.get(name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name!r} must be a field path (a string)")
            paths[name] = value
        match = spec.get("match", {})
        if not isinstance(match, dict):
            raise ValueError("'match' must be an object of field path -> value")
        if_changed = spec.get("if_changed", False)
        if not isinstance(if_changed, bool):
            raise ValueError("'if_changed' must be true or false")
        mapping = cls(
            channel, paths["key"], paths["id"], paths["payload"], paths["delete"], dict(match),
            if_changed,
        )
        mapping.compile()
        return mapping


@dataclass(frozen=True, slots=True)
class _Rule:
    """A compiled FieldMapping."""

    spec: FieldMapping
    literals: tuple[str, ...]  # one more than paths: literal, path, literal, ...
    paths: tuple[tuple[str, ...], ...]
    key: tuple[str, ...] | None
    msg_id: tuple[str, ...] | None
    payload: tuple[str, ...] | None
    delete: tuple[str, ...] | None
    match: tuple[tuple[tuple[str, ...], Any], ...]

    def matches(self, message: object) -> bool:
        return all(_same(lookup(message, path), value) for path, value in self.match)

    @staticmethod
    def _text(
        message: object, path: tuple[str, ...] | None, what: str, check: Callable[[str], object]
    ) -> str:
        """The scalar at `path` as text ("" without a path), passed by `check` (which
        raises ValueError); MappingError naming `what` otherwise."""
        if path is None:
            return ""
        text = _scalar(lookup(message, path), ".".join(path), what)
        try:
            check(text)
        except ValueError as exc:
            raise MappingError(f"{what}: {exc}") from None
        return text

    def apply(self, message: object) -> UpstreamMessage:
        """The UpstreamMessage of a matching message; MappingError if it cannot be one."""
        what = f"mapping {self.spec.channel!r}"
        pieces = [self.literals[0]]
        for path, literal in zip(self.paths, self.literals[1:], strict=True):
            pieces.append(_scalar(lookup(message, path), ".".join(path), what))
            pieces.append(literal)
        channel = "".join(pieces)
        try:
            parse_channel(channel)
        except BadChannel as exc:
            raise MappingError(f"{what}: {exc.message}") from None
        key = self._text(message, self.key, what, validate_key)
        msg_id = self._text(message, self.msg_id, what, _check_message_id)
        data: object = message
        if self.payload is not None:
            data = lookup(message, self.payload)
            if data is _MISSING:
                raise MappingError(f"{what}: field {'.'.join(self.payload)!r} is missing")
        delete = False
        if self.delete is not None:
            flag = lookup(message, self.delete)
            if flag is not _MISSING:
                if not isinstance(flag, bool):
                    raise MappingError(
                        f"{what}: field {'.'.join(self.delete)!r} is not true or false"
                    )
                delete = flag
        return UpstreamMessage(channel, data, key, msg_id, delete, self.spec.if_changed)


def parse_mappings(text: str) -> tuple[FieldMapping, ...]:
    """Mappings from configuration: a JSON array of mapping objects (or one object)."""
    try:
        specs = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if isinstance(specs, dict):
        specs = [specs]
    if not isinstance(specs, list) or not specs:
        raise ValueError("expected a JSON array of mapping objects")
    mappings = []
    for index, spec in enumerate(specs):
        if not isinstance(spec, dict):
            raise ValueError(f"mapping [{index}]: expected a JSON object")
        try:
            mappings.append(FieldMapping.from_dict(spec))
        except ValueError as exc:
            raise ValueError(f"mapping [{index}]: {exc}") from None
    return tuple(mappings)


def parse_subscribe(text: str) -> tuple[str, ...]:
    """Subscribe messages from configuration: a JSON array; a string element is sent as is,
    anything else as its JSON text."""
    try:
        items = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(items, list):
        raise ValueError("expected a JSON array of messages")
    return encode_subscribe(items)


def encode_subscribe(messages: Sequence[object]) -> tuple[str, ...]:
    """The text frames of subscribe messages: strings as they are, the rest as JSON."""
    frames = []
    for index, item in enumerate(messages):
        if isinstance(item, str):
            frames.append(item)
            continue
        try:
            frames.append(json.dumps(item, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"subscribe message [{index}] is not JSON: {exc}") from None
    return tuple(frames)


def safe_url(url: str) -> str:
    """The URL to log: no user info, query or fragment (tokens travel there)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparseable url>"
    return f"{parts.scheme}://{host}{port}{parts.path}"


@dataclass
class FeedStats:
    """Counters of one feed, for metrics and tests."""

    connects: int = 0  # connection attempts
    connected: int = 0  # successful ones
    frames: int = 0
    mapped: int = 0  # messages yielded
    unmatched: int = 0  # messages no mapping matched
    invalid: int = 0  # not JSON, or matched but not mappable
    idle_timeouts: int = 0
    disconnects: int = 0  # connections that ended (closed, failed, idle)


class WebSocketFeed:
    """An `Upstream` reading JSON messages from a WebSocket URL (see the module docstring).

    `subscribe` messages are sent, in order, after every connect. `mappings` are tried in
    order; the first whose `match` fits maps the message. `headers` go with the opening
    handshake (an Authorization header, say) and are never logged. `ping_interval` keeps
    websockets' own keepalive pings (None: off). `proxy` is an explicit proxy URL; the
    environment's proxy settings are not used. `idle_timeout` is the application-level
    check, which also catches an upstream that answers pings but sends nothing.
    """

    def __init__(
        self,
        url: str,
        subscribe: Sequence[object],
        mappings: FieldMapping | Sequence[FieldMapping],
        *,
        logger: logging.Logger,
        backoff: Backoff | None = None,
        name: str = "ws",
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        headers: Mapping[str, str] | None = None,
        ping_interval: float | None = 20.0,
        max_size: int | None = 4 << 20,
        split_arrays: bool = True,
        proxy: str | None = None,
        on_state: Callable[[FeedState], None] | None = None,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("ws", "wss"):
            raise ValueError(f"feed URL must be ws:// or wss://, got {safe_url(url)!r}")
        if not idle_timeout > 0 or not connect_timeout > 0:
            raise ValueError("idle_timeout and connect_timeout must be > 0")
        if isinstance(mappings, FieldMapping):
            mappings = [mappings]
        if not mappings:
            raise ValueError("the feed needs at least one mapping")
        self.url = url
        self.name = name
        self.subscribe = encode_subscribe(subscribe)
        self.rules = tuple(mapping.compile() for mapping in mappings)
        self.log = logger
        self.backoff = backoff or Backoff()
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.headers = dict(headers or {})
        self.ping_interval = ping_interval
        self.max_size = max_size
        self.split_arrays = split_arrays
        self.proxy = proxy
        self.on_state = on_state
        self.stats = FeedStats()
        self.state = FeedState.STOPPED
        self._sleep = sleep
        self._clock = clock
        self._last_warning: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"WebSocketFeed(name={self.name!r}, url={safe_url(self.url)!r})"

    async def messages(self) -> AsyncIterator[UpstreamMessage]:
        """Mapped messages, across reconnects, until the consumer stops iterating."""
        try:
            while True:
                async with contextlib.aclosing(self._connection()) as connection:
                    async for msg in connection:
                        yield msg
                self._set_state(FeedState.BACKING_OFF)
                delay = self.backoff.next_delay()
                self.log.info(
                    "ws feed backing off feed=%s delay=%.3f attempt=%d",
                    self.name, delay, self.backoff.attempt,
                )
                await self._sleep(delay)
        finally:
            self._set_state(FeedState.STOPPED)

    async def _connection(self) -> AsyncGenerator[UpstreamMessage, None]:
        """One connection: connect, subscribe, read until it fails or goes idle."""
        self._set_state(FeedState.CONNECTING)
        self.stats.connects += 1
        url = safe_url(self.url)
        try:
            ws = await connect(
                self.url,
                additional_headers=self.headers or None,
                open_timeout=self.connect_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                close_timeout=self.connect_timeout,
                max_size=self.max_size,
                proxy=self.proxy,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            self.log.warning(
                "ws feed connect failed feed=%s url=%s error=%r", self.name, url, exc
            )
            return
        self.stats.connected += 1
        reason = "closed"
        try:
            for text in self.subscribe:
                async with asyncio.timeout(self.connect_timeout):
                    await ws.send(text)
            self._set_state(FeedState.LIVE)
            self.log.info(
                "ws feed live feed=%s url=%s subscribed=%d", self.name, url, len(self.subscribe)
            )
            first = True
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        frame = await ws.recv()
                except TimeoutError:
                    self.stats.idle_timeouts += 1
                    reason = "idle"
                    self.log.warning(
                        "ws feed idle feed=%s url=%s idle_timeout=%.1f: reconnecting",
                        self.name, url, self.idle_timeout,
                    )
                    return
                self.stats.frames += 1
                for msg in self._map_frame(frame):
                    if first:
                        # Data flows: the upstream works, the next failure starts from short
                        # delays again. (Not on connect, nor on any frame: an upstream that
                        # accepts, sends an error and closes must not be retried at once.)
                        self.backoff.reset()
                        first = False
                    yield msg
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            self.log.warning(
                "ws feed disconnected feed=%s url=%s code=%s reason=%r",
                self.name, url, rcvd.code if rcvd else None, rcvd.reason if rcvd else "",
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            reason = "error"
            self.log.warning("ws feed failed feed=%s url=%s error=%r", self.name, url, exc)
        finally:
            self.stats.disconnects += 1
            await self._close(ws, reason)

    async def _close(self, ws: ClientConnection, reason: str) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.connect_timeout):
                await ws.close(1000 if reason != "idle" else 1001, reason)

    def _map_frame(self, frame: str | bytes) -> Iterator[UpstreamMessage]:
        try:
            decoded = json.loads(frame)
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            self._skip_invalid("not_json", "a frame is not JSON")
            return
        items = decoded if self.split_arrays and isinstance(decoded, list) else [decoded]
        for item in items:
            msg = self.map(item)
            if msg is not None:
                yield msg

    def map(self, message: object) -> UpstreamMessage | None:
        """The UpstreamMessage of one decoded message, or None (counted, and logged)."""
        for rule in self.rules:
            if rule.matches(message):
                try:
                    msg = rule.apply(message)
                except MappingError as exc:
                    self._skip_invalid(rule.spec.channel, str(exc))
                    return None
                self.stats.mapped += 1
                return msg
        self.stats.unmatched += 1
        self.log.debug("ws feed message matches no mapping feed=%s", self.name)
        return None

    def _skip_invalid(self, reason: str, detail: str) -> None:
        """Count, and warn at most once per reason and SKIP_LOG_INTERVAL."""
        self.stats.invalid += 1
        now = self._clock()
        last = self._last_warning.get(reason)
        if last is not None and now - last < SKIP_LOG_INTERVAL:
            self._suppressed[reason] = self._suppressed.get(reason, 0) + 1
            return
        self._last_warning[reason] = now
        self.log.warning(
            "ws feed skipped message feed=%s problem=%s suppressed_since_last=%d",
            self.name, detail, self._suppressed.pop(reason, 0),
        )

    def _set_state(self, state: FeedState) -> None:
        if state is self.state:
            return
        self.state = state
        self.log.debug("ws feed state feed=%s state=%s", self.name, state.value)
        if self.on_state is not None:
            self.on_state(state)


# --- settings and registration (ingest/feeds/__init__.py) ----------------------------------

_GROUP = "feed ws (a generic WebSocket JSON feed)"


def parse_ws_url(setting: str, text: str) -> str:
    if urlsplit(text).scheme not in ("ws", "wss"):
        raise ConfigError(setting, "must be a ws:// or wss:// URL")
    return text


@dataclass(frozen=True, slots=True)
class WsSettings:
    """FANOUT_FEED=ws: a generic WebSocket JSON feed (docs/architecture.md, "Upstream
    adapters"). The mapping and subscribe texts are parsed when the feed opens."""

    url: str = field(default="", repr=False)  # may carry credentials in its query
    subscribe: str = ""  # JSON array of messages sent after each connect
    mapping: str = ""  # JSON: field mappings to channel, key, id and payload
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)  # secrets
    idle_timeout: float = 30.0  # s without a message before reconnecting


WS_SETTINGS = (
    Setting("ws.url", "--ws-url", "FANOUT_WS_URL", parse_ws_url,
            "feed ws: the upstream ws:// or wss:// URL (may carry credentials)", secret=True,
            file_key="ws_url", group=_GROUP),
    Setting("ws.subscribe", "--ws-subscribe", "FANOUT_WS_SUBSCRIBE", parse_str,
            "feed ws: JSON array of messages to send after each connect", metavar="JSON",
            default="none", json=True, file_key="ws_subscribe", group=_GROUP),
    Setting("ws.mapping", "--ws-mapping", "FANOUT_WS_MAPPING", parse_str,
            "feed ws: JSON field mappings (see docs/architecture.md)", metavar="JSON",
            json=True, file_key="ws_mapping", group=_GROUP),
    Setting("ws.headers", "--ws-headers", "FANOUT_WS_HEADERS", parse_json_object,
            "feed ws: JSON object of HTTP headers for the connection", secret=True,
            json=True, file_key="ws_headers", group=_GROUP),
    Setting("ws.idle_timeout", "--ws-idle-timeout", "FANOUT_WS_IDLE_TIMEOUT", parse_float(0),
            "feed ws: seconds without a message before reconnecting",
            file_key="ws_idle_timeout", group=_GROUP),
)


def check_ws(settings: WsSettings) -> None:
    if not settings.url:
        raise ConfigError("FANOUT_WS_URL", "is required with FANOUT_FEED=ws")
    if not settings.mapping:
        raise ConfigError("FANOUT_WS_MAPPING", "is required with FANOUT_FEED=ws")


def open_ws(settings: WsSettings, context: FeedContext) -> Upstream:
    """The feed; ConfigError for a mapping or subscribe text it cannot use."""
    try:
        mappings = parse_mappings(settings.mapping)
    except ValueError as exc:
        raise ConfigError("FANOUT_WS_MAPPING", str(exc)) from None
    try:
        subscribe = parse_subscribe(settings.subscribe) if settings.subscribe else ()
    except ValueError as exc:
        raise ConfigError("FANOUT_WS_SUBSCRIBE", str(exc)) from None
    return WebSocketFeed(
        settings.url, subscribe, mappings,
        logger=context.logger.getChild("ws"),
        backoff=context.backoff(),
        idle_timeout=settings.idle_timeout,
        headers=dict(settings.headers),
        on_state=lambda state: context.on_state("ws", state.value),
    )


FEED = Feed("ws", WsSettings, WS_SETTINGS, open_ws, check_ws)
