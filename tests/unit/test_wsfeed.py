"""The generic WebSocket JSON feed: the mapping and its configuration (pure)."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from common.backoff import Backoff
from ingest.feeds.ws import (
    SKIP_LOG_INTERVAL,
    FieldMapping,
    WebSocketFeed,
    parse_mappings,
    parse_subscribe,
    safe_url,
)
from ingest.upstream import Upstream, UpstreamMessage

TIMEOUT = 10.0  # s for anything the tests wait for
LOG = logging.getLogger("test.wsfeed")

MAPPINGS = (
    FieldMapping("quotes.{s}", msg_id="seq", payload="q", match={"type": "quote"}),
    FieldMapping("trades.{s}", msg_id="seq", match={"type": "trade"}),
    FieldMapping(
        "account.{acct.id}.orders", key="order.id", msg_id="seq", payload="order",
        delete="order.gone", match={"type": "order"},
    ),
)
SUBSCRIBE = [{"op": "auth", "token": "t0k3n"}, {"op": "subscribe", "symbols": ["MNQ", "ES"]},
             "ready"]


def fast_backoff() -> Backoff:
    """Reconnects in milliseconds: the schedule is tested on its own, not through time."""
    return Backoff(base=0.005, cap=0.02)


def make_feed(url: str, **kwargs: Any) -> WebSocketFeed:
    options: dict[str, Any] = {"logger": LOG, "backoff": fast_backoff(), "idle_timeout": TIMEOUT,
                               "connect_timeout": 2.0}
    options.update(kwargs)
    return WebSocketFeed(url, SUBSCRIBE, MAPPINGS, **options)


# --- the mapping ---------------------------------------------------------------------------


def test_mapping_turns_messages_into_upstream_messages() -> None:
    feed = make_feed("ws://127.0.0.1:1/")
    quote = {"type": "quote", "s": "MNQ", "seq": 17, "q": {"bid": 1.25}}
    assert feed.map(quote) == UpstreamMessage("quotes.MNQ", {"bid": 1.25}, "", "17")
    trade = {"type": "trade", "s": "CON.F.US.MNQ.Z25", "seq": "t-1", "p": 3}
    assert feed.map(trade) == UpstreamMessage("trades.CON.F.US.MNQ.Z25", trade, "", "t-1")
    order = {"type": "order", "acct": {"id": 42}, "seq": 9,
             "order": {"id": "o-1", "qty": 2, "gone": True}}
    assert feed.map(order) == UpstreamMessage(
        "account.42.orders", order["order"], "o-1", "9", delete=True
    )
    del order["order"]["gone"]  # type: ignore[attr-defined]
    mapped = feed.map(order)
    assert mapped is not None and mapped.delete is False
    assert feed.stats.mapped == 4


def test_unmatched_and_invalid_messages_are_counted_and_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [1000.0]
    feed = make_feed("ws://127.0.0.1:1/", clock=lambda: now[0])
    caplog.set_level(logging.DEBUG, logger="test.wsfeed")
    assert feed.map({"type": "heartbeat"}) is None
    assert feed.map({"type": True}) is None  # true is not "quote"
    assert feed.map([1, 2]) is None
    assert feed.stats.unmatched == 3 and feed.stats.invalid == 0

    bad = [
        {"type": "quote", "s": "MNQ", "seq": 1},  # no payload field
        {"type": "quote", "s": "MN Q", "seq": 1, "q": {}},  # bad channel
        {"type": "quote", "s": 1.5, "seq": 1, "q": {}},  # a float names no channel
        {"type": "quote", "s": "MNQ", "q": {}},  # no id
        {"type": "quote", "s": "MNQ", "seq": True, "q": {}},  # a bool is no id
        {"type": "quote", "s": "MNQ", "seq": "x" * 300, "q": {}},  # id too long
        {"type": "order", "acct": {"id": 1}, "seq": 1, "order": {"id": "a\nb"}},  # bad key
        {"type": "order", "acct": {"id": 1}, "seq": 1, "order": {"id": "a", "gone": 1}},
    ]
    for message in bad:
        assert feed.map(message) is None, message
    assert feed.stats.invalid == len(bad) and feed.stats.mapped == 0
    # One warning per mapping per SKIP_LOG_INTERVAL, not one per message.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "matches no mapping" in caplog.text
    now[0] += SKIP_LOG_INTERVAL + 1
    feed.map(bad[0])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and "suppressed_since_last=5" in warnings[-1].getMessage()


def test_frames_arrays_and_non_json() -> None:
    feed = make_feed("ws://127.0.0.1:1/")
    frame = json.dumps([{"type": "trade", "s": "ES", "seq": 1}, {"type": "hb"},
                        {"type": "trade", "s": "NQ", "seq": 2}])
    assert [m.channel for m in feed._map_frame(frame)] == ["trades.ES", "trades.NQ"]
    assert list(feed._map_frame(b"\xff not json")) == []
    assert list(feed._map_frame("{")) == []
    assert feed.stats.invalid == 2 and feed.stats.unmatched == 1


def test_field_paths_index_arrays() -> None:
    rule = FieldMapping("depth.{0.sym}", key="0.levels.1.px", payload="0.levels.1").compile()
    message = [{"sym": "ES", "levels": [{"px": "1"}, {"px": "2", "sz": 5}]}]
    assert rule.apply(message) == UpstreamMessage("depth.ES", {"px": "2", "sz": 5}, "2")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ('{"channel": "quotes.{sym"}', "unbalanced"),
        ('{"channel": "quotes.{}"}', "field path"),
        ('{"channel": "quotes.{a..b}"}', "field path"),
        ('{"channel": "nope"}', "namespace"),
        ('{"channel": "quotes.MNQ", "extra": 1}', "unknown field"),
        ('{"key": "k"}', "channel"),
        ('{"channel": "quotes.MNQ", "key": 5}', "field path"),
        ('{"channel": "quotes.MNQ", "match": []}', "match"),
        ('{"channel": "quotes.MNQ", "if_changed": "yes"}', "if_changed"),
        ("[]", "array"),
        ("[1]", "JSON object"),
        ("{", "JSON"),
    ],
)
def test_bad_mapping_configuration_says_what_is_wrong(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        parse_mappings(spec)


def test_configuration_parsers() -> None:
    mappings = parse_mappings(
        '[{"match": {"type": "quote"}, "channel": "quotes.{s}", "id": "seq", "payload": "q"},'
        ' {"channel": "trades.ES"}]'
    )
    assert mappings == (
        FieldMapping("quotes.{s}", msg_id="seq", payload="q", match={"type": "quote"}),
        FieldMapping("trades.ES"),
    )
    assert parse_mappings('{"channel": "trades.ES"}') == (FieldMapping("trades.ES"),)
    assert parse_subscribe('[{"op": "sub"}, "ping"]') == ('{"op":"sub"}', "ping")
    with pytest.raises(ValueError):
        parse_subscribe('{"op": "sub"}')
    with pytest.raises(ValueError):
        WebSocketFeed("http://x/", [], MAPPINGS, logger=LOG)
    with pytest.raises(ValueError):
        WebSocketFeed("ws://x/", [], [], logger=LOG)
    assert safe_url("wss://u:pw@feed.example:8443/v1/ws?token=abc#x") == (
        "wss://feed.example:8443/v1/ws"
    )


def test_a_mapping_may_declare_its_messages_states() -> None:
    (levels,) = parse_mappings(
        '{"channel": "depth.{s}", "key": "px", "payload": "l", "if_changed": true}'
    )
    assert levels == FieldMapping("depth.{s}", key="px", payload="l", if_changed=True)
    feed = WebSocketFeed("ws://127.0.0.1:1/", [], [levels], logger=LOG)
    assert feed.map({"s": "ES", "px": "6000.25", "l": {"size": 3}}) == UpstreamMessage(
        "depth.ES", {"size": 3}, "6000.25", if_changed=True
    )
    assert parse_mappings('{"channel": "trades.ES"}')[0].if_changed is False


def test_is_an_upstream() -> None:
    feed: Upstream = make_feed("ws://127.0.0.1:1/", name="quotes-feed")
    assert feed.name == "quotes-feed"
