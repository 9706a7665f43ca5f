"""Pure parts of the client: the backoff schedule, advice parsing, publication decoding,
and argument checks made before any connection."""

from __future__ import annotations

import pytest
from fanout_client import (
    Backoff,
    FanoutClient,
    Publication,
    advised_delay,
    retry_after,
    subscribe_retry_delay,
)
from fanout_client.client import _publication


def test_backoff_schedule_with_injected_random() -> None:
    seen: list[tuple[float, float]] = []

    def top(lo: float, hi: float) -> float:
        seen.append((lo, hi))
        return hi

    backoff = Backoff(base=0.5, cap=4.0, rand=top)
    delays = [backoff.next_delay() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert all(lo == 0.0 for lo, _ in seen)  # full jitter: anywhere from 0
    backoff.reset()
    assert backoff.next_delay() == 0.5


@pytest.mark.parametrize(
    ("reason", "seconds"),
    [("too many requests retry_after_ms=5000", 5.0), ("retry_after_ms=250", 0.25),
     ("", 0.0), ("retry_after_ms=12345678", 0.0), ("xretry_after_ms=5", 0.0)],
)
def test_advised_delay(reason: str, seconds: float) -> None:
    assert advised_delay(reason) == seconds


@pytest.mark.parametrize(
    ("header", "seconds"), [("7", 7.0), (" 3 ", 3.0), (None, 0.0), ("soon", 0.0),
                            ("99999", 3600.0)],
)
def test_retry_after(header: str | None, seconds: float) -> None:
    assert retry_after(header) == seconds


def test_publication_decoding() -> None:
    pub = _publication({"type": "pub", "channel": "depth.ES", "offset": 7,
                        "key": "bid:1.25", "deleted": True, "data": None})
    assert pub == Publication("depth.ES", 7, None, key="bid:1.25", deleted=True)
    assert _publication({"channel": "trades.ES", "offset": 1, "data": {"p": 1}}).key == ""


def test_argument_checks_before_connecting() -> None:
    with pytest.raises(ValueError):
        FanoutClient([])
    client = FanoutClient("ws://127.0.0.1:9/ws")
    with pytest.raises(ValueError):
        client.subscribe("")
    with pytest.raises(ValueError):
        client.subscribe("quotes.ES", max_rate=0)
    client.subscribe("quotes.ES")
    with pytest.raises(ValueError):
        client.subscribe("quotes.ES")
    assert client.state == "closed" and client.positions() == {}


def test_subscribe_retry_delay_follows_the_servers_advice() -> None:
    def half(lo: float, hi: float) -> float:
        return (lo + hi) / 2

    assert subscribe_retry_delay({"code": "unavailable", "retry_after_ms": 800}, half) == 1.0
    assert subscribe_retry_delay({"code": "unavailable"}, half) == 3.0  # 1-5 s
    assert subscribe_retry_delay({"code": "unavailable", "retry_after_ms": "800"}, half) == 3.0
    assert subscribe_retry_delay({"code": "unavailable", "retry_after_ms": True}, half) == 3.0
    assert subscribe_retry_delay({"code": "unavailable", "retry_after_ms": 0}, half) == 3.0
    assert subscribe_retry_delay({"retry_after_ms": 10**7}, half) == 75.0  # capped at 60 s
