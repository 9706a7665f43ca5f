"""The upstream message id limit (common.channels.MAX_MESSAGE_ID_LENGTH), defined once and
enforced at the same length by each way a message comes in: pure."""

from __future__ import annotations

import pytest

from common.channels import MAX_MESSAGE_ID_LENGTH
from ingest.feeds.ws import MappingError, parse_mappings
from ingest.http_api import ApiError, parse_message


def test_the_limit() -> None:
    assert MAX_MESSAGE_ID_LENGTH == 256  # documented in docs/http-api.md and architecture.md


def test_the_ws_feed_maps_ids_up_to_the_limit() -> None:
    (mapping,) = parse_mappings('{"channel": "quotes.{s}", "id": "seq"}')
    rule = mapping.compile()
    longest = "x" * MAX_MESSAGE_ID_LENGTH
    assert rule.apply({"s": "ES", "seq": longest}).msg_id == longest
    with pytest.raises(MappingError, match=f"id longer than {MAX_MESSAGE_ID_LENGTH} char"):
        rule.apply({"s": "ES", "seq": longest + "x"})


def test_the_http_api_accepts_ids_up_to_the_limit() -> None:
    longest = "x" * MAX_MESSAGE_ID_LENGTH
    assert parse_message({"channel": "quotes.ES", "data": 1, "id": longest}).msg_id == longest
    with pytest.raises(ApiError, match=f"at most {MAX_MESSAGE_ID_LENGTH} characters"):
        parse_message({"channel": "quotes.ES", "data": 1, "id": longest + "x"})
