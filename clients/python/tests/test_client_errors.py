"""The error tree: every protocol error and final close code maps to its own class, all
under FanoutClientError; unknown codes still land in the tree."""

from __future__ import annotations

import fanout_client
import pytest
from fanout_client import errors

REQUEST_CODES = {
    "bad_request": errors.BadRequest,
    "unknown_type": errors.UnknownType,
    "bad_channel": errors.BadChannel,
    "already_subscribed": errors.AlreadySubscribed,
    "not_subscribed": errors.NotSubscribed,
    "too_many_subscriptions": errors.TooManySubscriptions,
    "permission_denied": errors.PermissionDenied,
    "unauthorized": errors.Unauthorized,
    "history_unavailable": errors.HistoryUnavailable,
    "unavailable": errors.Unavailable,
    "internal": errors.InternalError,
}
CLOSE_CODES = {
    3500: errors.ClosedBadRequest,
    3501: errors.ClosedUnauthorized,
    3502: errors.ClosedForbidden,
    3503: errors.ClosedConnectionLimit,
}


@pytest.mark.parametrize("code", sorted(REQUEST_CODES))
def test_request_error_codes_map_to_their_class(code: str) -> None:
    exc = errors.request_error(code, "why", request="history", channel="trades.ES")
    assert type(exc) is REQUEST_CODES[code]
    assert isinstance(exc, errors.RequestFailed) and isinstance(exc, errors.FanoutClientError)
    assert (exc.code, exc.message, exc.request, exc.channel) == (code, "why", "history",
                                                                 "trades.ES")
    assert str(exc) == f"{code}: why"


def test_an_unknown_request_code_is_internal_and_keeps_its_code() -> None:
    exc = errors.request_error("brand_new", "later versions")
    assert type(exc) is errors.InternalError and exc.code == "brand_new"


@pytest.mark.parametrize("code", sorted(CLOSE_CODES))
def test_final_close_codes_map_to_their_class(code: int) -> None:
    exc = errors.closed_error(code, "reason")
    assert type(exc) is CLOSE_CODES[code]
    assert isinstance(exc, errors.FanoutClosed) and isinstance(exc, errors.FanoutClientError)
    assert (exc.code, exc.reason) == (code, "reason")


@pytest.mark.parametrize("code", [1000, 3999, None])
def test_other_final_closes_are_plain_fanout_closed(code: int | None) -> None:
    assert type(errors.closed_error(code, "")) is errors.FanoutClosed


def test_connection_lost_is_also_a_connection_error() -> None:
    assert issubclass(errors.ConnectionLost, ConnectionError)
    assert issubclass(errors.ConnectionLost, errors.FanoutClientError)
    assert issubclass(errors.TokenUnavailable, errors.FanoutClientError)


def test_every_exception_the_package_exports_is_in_the_tree() -> None:
    exported = [getattr(fanout_client, n) for n in fanout_client.__all__]
    classes = [c for c in exported if isinstance(c, type) and issubclass(c, BaseException)]
    assert len(classes) == 1 + 3 + 4 + 1 + len(REQUEST_CODES)
    assert all(issubclass(c, fanout_client.FanoutClientError) for c in classes)
