"""Admission before the upgrade, pure (common/admission.py, edge/admission.py): origin
patterns, client addresses behind trusted proxies, the limiter's counts, the answers and
their logging. Against an edge on loopback: tests/integration/test_admission.py."""

from __future__ import annotations

import logging
import resource

import pytest

from common.admission import (
    ClientAddresses,
    OriginPolicy,
    limit_key,
    parse_networks,
    parse_origin_pattern,
)
from common.config import EdgeConfig
from edge.admission import RETRY_AFTER, Admission, ConnectionLimiter, Refusal, Slot
from edge.stats import EdgeStats

# --- origins (pure) --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "origin", "allowed"),
    [
        (["https://app.example.com"], "https://app.example.com", True),
        (["https://app.example.com"], "https://APP.example.com", True),
        (["https://app.example.com"], "https://app.example.com:443", True),
        (["https://app.example.com"], "https://app.example.com:8443", False),
        (["https://app.example.com"], "http://app.example.com", False),
        (["https://app.example.com"], "https://app.example.com.evil.example", False),
        (["https://app.example.com"], "http://evil.example", False),
        (["https://*.example.com"], "https://a.example.com", True),
        (["https://*.example.com"], "https://a.b.example.com", True),
        (["https://*.example.com"], "https://example.com", False),
        (["https://*.example.com"], "https://badexample.com", False),
        (["https://*.example.com"], "https://.example.com", False),
        (["http://localhost:8000"], "http://localhost:8000", True),
        (["http://localhost:8000"], "http://localhost", False),
        (["http://localhost:*"], "http://localhost:1234", True),
        (["http://localhost:*"], "http://localhost", True),
        (["http://*:8000"], "http://10.1.2.3:8000", True),
        (["http://*:8000"], "http://10.1.2.3:8001", False),
        (["http://[::1]:8000"], "http://[::1]:8000", True),
        (["https://app.example.com"], "null", False),
        (["null"], "null", True),
        (["*"], "http://evil.example", True),
        ([], "http://evil.example", True),  # no list: any origin
        (["https://app.example.com"], "", False),
        (["https://app.example.com"], "https://app.example.com/path", False),
        (["https://app.example.com"], "garbage", False),
        (["https://a.example", "https://b.example"], "https://b.example", True),
    ],
)
def test_origin_patterns(patterns: list[str], origin: str, allowed: bool) -> None:
    assert OriginPolicy(patterns).allows(origin) is allowed


@pytest.mark.parametrize("allow_missing", [True, False])
def test_a_handshake_without_origin_follows_the_setting(allow_missing: bool) -> None:
    assert OriginPolicy(["https://a.example"], allow_missing).allows(None) is allow_missing
    assert OriginPolicy([], allow_missing).allows(None) is allow_missing


@pytest.mark.parametrize(
    "pattern",
    ["app.example.com", "ftp://app.example.com", "https://app.example.com/", "https://a*.b.com",
     "https://**", "https://a.*.com", "https://*.*.com", "https://app.example.com:0",
     "https://app.example.com:x", "https://-bad-.com", "https://[::g]", "https://exa mple.com",
     "https://example.com.", ""],
)
def test_bad_origin_patterns(pattern: str) -> None:
    with pytest.raises(ValueError):
        parse_origin_pattern(pattern)


# --- client addresses (pure) -------------------------------------------------------------


PROXIES = ClientAddresses(parse_networks(["10.0.0.0/8", "2001:db8::/32"]))


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("192.0.2.1", [], "192.0.2.1"),
        ("192.0.2.1", ["203.0.113.7"], "192.0.2.1"),  # not a trusted peer: header ignored
        ("10.0.0.5", [], "10.0.0.5"),  # a proxy that did not say: the proxy
        ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),
        ("10.0.0.5", ["198.51.100.9, 203.0.113.7"], "203.0.113.7"),  # the client's own claim
        ("10.0.0.5", ["198.51.100.9", "203.0.113.7"], "203.0.113.7"),  # two header lines
        ("10.0.0.5", ["203.0.113.7, 10.0.0.6"], "203.0.113.7"),  # through two proxies
        ("10.0.0.5", ["10.0.0.7, 10.0.0.6"], "10.0.0.7"),  # all proxies: the first
        ("10.0.0.5", ["203.0.113.7, garbage"], "10.0.0.5"),  # garbage from a proxy
        ("10.0.0.5", ["garbage, 203.0.113.7"], "203.0.113.7"),  # garbage beyond the client
        ("10.0.0.5", ["[2001:db9::1]:443"], "2001:db9::1"),
        ("10.0.0.5", ["203.0.113.7:5555"], "203.0.113.7"),
        ("::ffff:10.0.0.5", ["203.0.113.7"], "203.0.113.7"),  # mapped: as IPv4
        ("2001:db8::1", ["203.0.113.7"], "203.0.113.7"),
        ("::ffff:192.0.2.1", [], "192.0.2.1"),
        (None, ["203.0.113.7"], "unknown"),
    ],
)
def test_client_address(peer: str | None, forwarded: list[str], client: str) -> None:
    assert PROXIES.resolve(peer, forwarded) == client


def test_without_trusted_proxies_the_header_is_never_believed() -> None:
    assert ClientAddresses().resolve("127.0.0.1", ["203.0.113.7"]) == "127.0.0.1"


def test_limit_key_counts_ipv6_by_its_64() -> None:
    assert limit_key("2001:db8:1:2:aaaa::1") == limit_key("2001:db8:1:2:bbbb::2")
    assert limit_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert limit_key("2001:db8:1:3::1") != limit_key("2001:db8:1:2::1")
    assert limit_key("203.0.113.7") == "203.0.113.7"
    assert limit_key("unknown") == "unknown"


@pytest.mark.parametrize("bad", ["10.0.0.1/8", "10.0.0.0/33", "ten", "2001:db8::/129"])
def test_bad_networks(bad: str) -> None:
    with pytest.raises(ValueError, match="bad network"):
        parse_networks([bad])


# --- the limiter and its refusals (pure) -----------------------------------------------------


def test_limiter_counts_and_releases_exactly() -> None:
    limiter = ConnectionLimiter(max_total=3, max_per_key=2)
    assert limiter.try_acquire("a") is None
    assert limiter.try_acquire("a") is None
    assert limiter.try_acquire("a") == "ip_limit"
    assert limiter.try_acquire("b") is None
    assert limiter.try_acquire("c") == "total_limit"
    limiter.release("a")
    assert limiter.try_acquire("c") is None
    for key in ("a", "b", "c"):
        limiter.release(key)
    assert limiter.total == 0 and limiter.by_key == {}


def test_unlimited_limiter() -> None:
    limiter = ConnectionLimiter(0, 0)
    assert all(limiter.try_acquire("a") is None for _ in range(10_000))


def request(peer: str, *headers: tuple[str, str]) -> tuple[list[tuple[bytes, bytes]],
                                                          tuple[str, int]]:
    """What the server's protocol hands `Admission.admit`: headers, and the socket's peer."""
    return [(k.lower().encode(), v.encode()) for k, v in headers], (peer, 5555)


def test_admission_answers_and_slots() -> None:
    config = EdgeConfig(allowed_origins=("https://app.example.com",), max_connections=10,
                        max_connections_per_ip=1, trusted_proxies=("10.0.0.0/8",))
    stats = EdgeStats()
    admission = Admission(config, stats, logging.getLogger("test"), rand=lambda a, b: b)
    evil = admission.admit(*request("192.0.2.1", ("Origin", "http://evil.example")))
    assert evil == Refusal("origin", 403, "origin not allowed")
    two = admission.admit(*request("192.0.2.1", ("Origin", "https://a.example"),
                                ("Origin", "https://app.example.com")))
    assert isinstance(two, Refusal) and two.reason == "origin"  # two Origin headers
    slot = admission.admit(*request("10.0.0.5", ("Origin", "https://app.example.com"),
                                 ("X-Forwarded-For", "203.0.113.7")))
    assert isinstance(slot, Slot) and slot.address == "203.0.113.7"
    again = admission.admit(*request("10.0.0.6", ("X-Forwarded-For", "203.0.113.7")))
    assert again == Refusal("ip_limit", 503, "too many connections from your address",
                            2 * RETRY_AFTER)
    slot.release()
    slot.release()  # once only
    assert admission.limiter.total == 0
    assert stats.refused == {"origin": 2, "ip_limit": 1, "total_limit": 0,
                             "connection_rate": 0, "handshake_timeout": 0}


def test_refusals_are_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    admission = Admission(EdgeConfig(max_connections_per_ip=1), EdgeStats(),
                          logging.getLogger("test.admission"), clock=lambda: now[0])
    admission.admit(*request("192.0.2.1"))
    with caplog.at_level(logging.WARNING, "test.admission"):
        for _ in range(100):
            admission.admit(*request("192.0.2.1"))
        now[0] = 11.0
        admission.admit(*request("192.0.2.1"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "reason=ip_limit client=192.0.2.1" in lines[0]
    assert lines[1].endswith("unlogged_since_last=99")
    assert admission.stats.refused["ip_limit"] == 101


def test_start_warns_of_any_origin_and_of_a_descriptor_limit_below_the_connection_limit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        pytest.skip("no descriptor limit here")
    with caplog.at_level(logging.WARNING, "test.start"):
        Admission(EdgeConfig(allowed_origins=("https://a.example",), max_connections=100),
                  EdgeStats(), logging.getLogger("test.start")).warn_at_start()
        assert caplog.records == []
        Admission(EdgeConfig(max_connections=soft), EdgeStats(),
                  logging.getLogger("test.start")).warn_at_start()
    messages = [r.getMessage() for r in caplog.records]
    assert any("FANOUT_ALLOWED_ORIGINS" in m for m in messages)
    assert any(f"ulimit -n {soft}" in m for m in messages)
