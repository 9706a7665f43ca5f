"""The error hierarchy, and how each error reaches a client.

Two families, because a client must treat them differently:

* `RequestError`: one request failed (bad channel, subscribed twice, ...). The client gets
  an ``error`` reply carrying the request ``id`` and a stable string ``code``; the
  connection stays open.
* `Disconnect`: the connection ends with a WebSocket close code. Codes 3000-3499 mean
  "reconnect (with backoff) and recover"; 3500-3999 mean "do not reconnect, it would fail
  again". The table is docs/protocol.md's.

No exception text from inside the server reaches a client: only these messages do.
"""

from __future__ import annotations

from enum import IntEnum


class FanoutError(Exception):
    """Base of every error fanout raises on purpose."""


class ConfigError(FanoutError):
    """A bad setting: names the setting so that the operator can fix it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


# --- request errors: an error reply, the connection stays open ---------------------------


class RequestError(FanoutError):
    code = "internal"

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        # s: the server advises retrying no sooner (the reply's `retry_after_ms`)
        self.retry_after = retry_after


class BadRequest(RequestError):
    """The request is well-formed JSON/msgpack but its fields are wrong."""

    code = "bad_request"


class UnknownType(RequestError):
    code = "unknown_type"


class BadChannel(RequestError):
    code = "bad_channel"


class AlreadySubscribed(RequestError):
    code = "already_subscribed"


class NotSubscribed(RequestError):
    code = "not_subscribed"


class TooManySubscriptions(RequestError):
    code = "too_many_subscriptions"


class PermissionDenied(RequestError):
    code = "permission_denied"


class Unauthorized(RequestError):
    """A `refresh` token that does not authenticate (or names another subject)."""

    code = "unauthorized"


class HistoryUnavailable(RequestError):
    """The asked-for publications are no longer retained (or the epoch changed)."""

    code = "history_unavailable"


class Unavailable(RequestError):
    """Redis could not be reached in time, or the edge defers the request under load
    (with `retry_after`); retrying later may work."""

    code = "unavailable"


class InternalError(RequestError):
    code = "internal"


# --- disconnects: the connection is closed with a code ------------------------------------


class CloseCode(IntEnum):
    """WebSocket close codes. 1xxx are the standard ones fanout uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # standard; browsers send it on page unload
    MESSAGE_TOO_BIG = 1009  # standard; a frame over the edge's max message size
    # 3000-3499: reconnect and recover
    SHUTDOWN = 3000
    SLOW_CONSUMER = 3001
    INSUFFICIENT_STATE = 3002
    NO_PONG = 3003
    SERVER_ERROR = 3004
    CONNECT_TIMEOUT = 3005
    TOKEN_EXPIRED = 3006  # reconnect with a fresh token
    TOO_MANY_REQUESTS = 3007  # over the connection's request rate: reconnect after a delay
    # 3500-3999: do not reconnect
    BAD_REQUEST = 3500
    UNAUTHORIZED = 3501
    FORBIDDEN = 3502
    CONNECTION_LIMIT = 3503

    @property
    def reconnect(self) -> bool:
        return self.value < 3500 or self.value >= 4000


class Disconnect(FanoutError):
    """End the connection with `code`; `reason` is sent to the client (<= 123 bytes).

    `retry_after` (seconds) advises a reconnecting client to wait at least that long; it
    travels at the end of the reason as ``retry_after_ms=<n>`` (docs/protocol.md)."""

    def __init__(self, code: CloseCode, reason: str, retry_after: float | None = None) -> None:
        if retry_after is not None:
            reason = f"{reason[:90]} retry_after_ms={round(retry_after * 1000)}"
        super().__init__(f"{int(code)} {reason}")
        self.code = code
        # A close reason is at most 123 bytes of UTF-8; cut on a character boundary.
        self.reason = reason.encode()[:123].decode(errors="ignore")
