"""Every error this client raises on purpose, as one tree under `FanoutClientError`.

    FanoutClientError
    ├── ConnectionLost (also a ConnectionError): not connected, or the connection went
    │   while a request (history) waited for its reply; the client reconnects by itself
    ├── TokenUnavailable: the token function failed; that connection attempt fails
    ├── FanoutClosed: the client stopped for good; `code`, `reason`
    │   ├── ClosedBadRequest        3500
    │   ├── ClosedUnauthorized      3501
    │   ├── ClosedForbidden         3502
    │   └── ClosedConnectionLimit   3503
    │   (close() itself and other 3500-3999 codes: FanoutClosed)
    └── RequestFailed: an `error` reply to one request; `code`, `message`, `request`,
        `channel`; the connection stays open
        ├── BadRequest            bad_request
        ├── UnknownType           unknown_type
        ├── BadChannel            bad_channel
        ├── AlreadySubscribed     already_subscribed
        ├── NotSubscribed         not_subscribed
        ├── TooManySubscriptions  too_many_subscriptions
        ├── PermissionDenied      permission_denied
        ├── Unauthorized          unauthorized
        ├── HistoryUnavailable    history_unavailable
        ├── Unavailable           unavailable
        └── InternalError         internal (and any code this version does not know)

The codes are docs/protocol.md's (close codes, error codes). Close codes 3000-3499 never
surface: the client reconnects and recovers. Wrong arguments (an empty channel, a bad
max_rate) raise ValueError, as the standard library does, and are not in this tree.
"""

from __future__ import annotations

__all__ = [
    "AlreadySubscribed",
    "BadChannel",
    "BadRequest",
    "ClosedBadRequest",
    "ClosedConnectionLimit",
    "ClosedForbidden",
    "ClosedUnauthorized",
    "ConnectionLost",
    "FanoutClientError",
    "FanoutClosed",
    "HistoryUnavailable",
    "InternalError",
    "NotSubscribed",
    "PermissionDenied",
    "RequestFailed",
    "TokenUnavailable",
    "TooManySubscriptions",
    "Unauthorized",
    "Unavailable",
    "UnknownType",
    "closed_error",
    "request_error",
]


class FanoutClientError(Exception):
    """Base of every error the client raises on purpose: `except FanoutClientError`."""


class ConnectionLost(FanoutClientError, ConnectionError):
    """No open connection for a request, or it was lost before the reply came."""


class TokenUnavailable(FanoutClientError):
    """The token function failed at connect: this attempt fails, the next one retries."""


# --- the client stopped for good -------------------------------------------------------------


class FanoutClosed(FanoutClientError):
    """The client stopped for good: a 3500-3999 close (reconnecting would fail again), or
    close() was called (code 1000)."""

    close_code: int | None = None

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed with {code}: {reason}")
        self.code = code
        self.reason = reason


class ClosedBadRequest(FanoutClosed):
    """3500: the edge could not parse what this client sent (a bug, or a proxy mangling)."""

    close_code = 3500


class ClosedUnauthorized(FanoutClosed):
    """3501: the token is missing, invalid or expired at connect."""

    close_code = 3501


class ClosedForbidden(FanoutClosed):
    """3502: reserved by the protocol (an origin not allowed is refused with HTTP 403)."""

    close_code = 3502


class ClosedConnectionLimit(FanoutClosed):
    """3503: reserved by the protocol (limits refuse with HTTP 503 before the upgrade)."""

    close_code = 3503


_CLOSED: dict[int, type[FanoutClosed]] = {
    cls.close_code: cls
    for cls in (ClosedBadRequest, ClosedUnauthorized, ClosedForbidden, ClosedConnectionLimit)
    if cls.close_code is not None
}


def closed_error(code: int | None, reason: str) -> FanoutClosed:
    """The FanoutClosed (sub)class for a close code."""
    cls = _CLOSED.get(code, FanoutClosed) if code is not None else FanoutClosed
    return cls(code, reason)


# --- one request failed ---------------------------------------------------------------------


class RequestFailed(FanoutClientError):
    """An ``error`` reply: ``code`` is the protocol's stable error code, ``request`` the
    request it answered (subscribe, history, ...), ``channel`` its channel if any."""

    error_code = ""

    def __init__(
        self, code: str, message: str, *, request: str = "", channel: str | None = None
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request = request
        self.channel = channel


class BadRequest(RequestFailed):
    error_code = "bad_request"


class UnknownType(RequestFailed):
    error_code = "unknown_type"


class BadChannel(RequestFailed):
    error_code = "bad_channel"


class AlreadySubscribed(RequestFailed):
    error_code = "already_subscribed"


class NotSubscribed(RequestFailed):
    error_code = "not_subscribed"


class TooManySubscriptions(RequestFailed):
    error_code = "too_many_subscriptions"


class PermissionDenied(RequestFailed):
    error_code = "permission_denied"


class Unauthorized(RequestFailed):
    """A ``refresh`` token that does not authenticate (or names another subject)."""

    error_code = "unauthorized"


class HistoryUnavailable(RequestFailed):
    """The asked-for publications are no longer retained (or the epoch changed): do not
    retry the same range."""

    error_code = "history_unavailable"


class Unavailable(RequestFailed):
    """The edge could not reach its store in time: retrying later may work."""

    error_code = "unavailable"


class InternalError(RequestFailed):
    error_code = "internal"


_REQUEST: dict[str, type[RequestFailed]] = {
    cls.error_code: cls
    for cls in (
        BadRequest, UnknownType, BadChannel, AlreadySubscribed, NotSubscribed,
        TooManySubscriptions, PermissionDenied, Unauthorized, HistoryUnavailable,
        Unavailable, InternalError,
    )
}


def request_error(
    code: str, message: str, *, request: str = "", channel: str | None = None
) -> RequestFailed:
    """The RequestFailed subclass for an error code; unknown codes are InternalError."""
    cls = _REQUEST.get(code, InternalError)
    return cls(code, message, request=request, channel=channel)
