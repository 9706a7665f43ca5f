"""Admission before the upgrade: origins (403), connection limits in total and per client
address (503 + Retry-After), X-Forwarded-For from trusted proxies only, and the handshake
deadline. Pure tests of common/admission.py and edge/admission.py, then an in-process edge on
loopback. The 1,000-connection floods against a real edge process are
tests/integration/test_flood.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource

import pytest
import websockets
from websockets.exceptions import InvalidStatus

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
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.support.httpwait import metric
from tests.support.wsclient import ProtoClient, http_upgrade, upgrade_request

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
                             "handshake_timeout": 0}


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


# --- an edge on loopback -------------------------------------------------------------------

integration = pytest.mark.integration


async def refused(url: str, **kwargs: object) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as info:
        await ProtoClient.open(url, **kwargs)  # type: ignore[arg-type]
    return info.value


def refusals(reason: str) -> str:
    return f'fanout_edge_connections_refused_total{{reason="{reason}"}}'


@integration
async def test_a_foreign_origin_gets_403_before_the_upgrade(edge_factory) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",
                                               "https://*.example.com"))
    answer = await http_upgrade("127.0.0.1", edge.port, headers=[("Origin", "http://evil.example")])
    assert answer.status == 403
    assert await answer.body() == b"origin not allowed\n"
    info = await refused(edge.url, origin="http://evil.example")
    assert info.response.status_code == 403
    stats = edge.edge.stats
    assert stats.connections_total == 0 and stats.subscriptions == 0  # nothing reached a session
    assert edge.edge.admission.limiter.total == 0
    assert await metric(edge.http, refusals("origin")) == 2

    for origin in ("https://app.example.com", "https://eu.app.example.com", None):
        client = await ProtoClient.open(edge.url, origin=origin)
        assert (await client.subscribe("quotes.ORIGIN"))["type"] == "subscribed"
        await client.close()
    assert stats.connections_total == 3
    assert await metric(edge.http, refusals("origin")) == 2


@integration
async def test_without_origin_refused_when_not_allowed(edge_factory) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",),
                              allow_no_origin=False)
    assert (await refused(edge.url)).response.status_code == 403
    client = await ProtoClient.open(edge.url, origin="https://app.example.com")
    await client.close()
    assert edge.edge.stats.refused["origin"] == 1


@integration
async def test_unset_allows_any_origin_with_a_warning(
    edge_factory, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "fanout.edge"):
        edge = await edge_factory()
    assert any("FANOUT_ALLOWED_ORIGINS" in r.getMessage() for r in caplog.records)
    client = await ProtoClient.open(edge.url, origin="http://evil.example")
    await client.close()


@integration
async def test_total_limit_answers_503_with_retry_after_and_frees_up(
    edge_factory, publisher: Publisher
) -> None:
    edge = await edge_factory(max_connections=3)
    clients = [await ProtoClient.open(edge.url) for _ in range(3)]
    answers = [await http_upgrade("127.0.0.1", edge.port) for _ in range(5)]
    assert {a.status for a in answers} == {503}
    assert all(RETRY_AFTER <= int(a.headers["retry-after"]) <= 2 * RETRY_AFTER for a in answers)
    assert await answers[0].body() == b"server full\n"
    assert (await refused(edge.url)).response.headers["Retry-After"].isdigit()
    await clients.pop().close()
    async with asyncio.timeout(5):
        while edge.edge.admission.limiter.total != 2:
            await asyncio.sleep(0.01)
    newcomer = await ProtoClient.open(edge.url)
    assert (await newcomer.subscribe("quotes.FULL"))["type"] == "subscribed"
    await publisher.publish(UpstreamMessage("quotes.FULL", {"bid": 1}))
    await newcomer.wait_for(lambda: newcomer.offsets["quotes.FULL"] == [1])
    assert await metric(edge.http, refusals("total_limit")) == 6
    assert await metric(edge.http, "fanout_edge_connections") == 3
    for c in [*clients, newcomer]:
        await c.close()
    for a in answers:
        await a.close()


@integration
async def test_forwarded_for_counts_only_from_trusted_proxies(edge_factory) -> None:
    """127.0.0.1 plays the load balancer; 127.0.0.2 is a client that sends the header
    itself. Linux routes all of 127.0.0.0/8 to loopback."""
    edge = await edge_factory(trusted_proxies=("127.0.0.1/32",), max_connections_per_ip=2)

    def xff(value: str) -> dict[str, object]:
        return {"additional_headers": {"X-Forwarded-For": value}}

    held = [await ProtoClient.open(edge.url, **xff("203.0.113.7")) for _ in range(2)]
    assert (await refused(edge.url, **xff("203.0.113.7"))).response.status_code == 503
    held.append(await ProtoClient.open(edge.url, **xff("203.0.113.8")))
    held.append(await ProtoClient.open(edge.url, **xff("198.51.100.1, 203.0.113.9")))
    # From an untrusted peer the header is ignored: counted as the peer itself.
    spoofer = {"local_addr": ("127.0.0.2", 0)}
    held += [await ProtoClient.open(edge.url, **xff("203.0.113.7"), **spoofer)
             for _ in range(2)]
    assert (await refused(edge.url, **xff("203.0.113.50"), **spoofer)).response.status_code == 503
    held.append(await ProtoClient.open(edge.url))  # the proxy's own (no header)
    assert edge.edge.admission.limiter.by_key == {
        "203.0.113.7": 2, "203.0.113.8": 1, "203.0.113.9": 1, "127.0.0.2": 2, "127.0.0.1": 1,
    }
    assert edge.edge.stats.refused["ip_limit"] == 2
    for c in held:
        await c.close()


@integration
async def test_slots_are_given_back_on_every_path(edge_factory, publisher: Publisher) -> None:
    """Many connections at once, ending every way there is; afterwards nothing is counted."""
    edge = await edge_factory(max_connections_per_ip=1000, connect_timeout=0.5)
    limiter = edge.edge.admission.limiter
    loop = asyncio.get_running_loop()

    async def normal() -> None:
        c = await ProtoClient.open(edge.url)
        await c.subscribe("quotes.PATHS")
        await c.close()

    async def server_closes() -> None:  # 3500: a bad frame
        c = await ProtoClient.open(edge.url)
        await c.ws.send("{not json")
        assert (await asyncio.wait_for(c.closed, 5))[0] == 3500

    async def connect_timeout() -> None:  # 3005
        c = await ProtoClient.open(edge.url, connect=False)
        assert (await asyncio.wait_for(c.closed, 5))[0] == 3005

    async def vanishes() -> None:  # TCP gone without a close frame
        c = await ProtoClient.open(edge.url)
        await c.subscribe("quotes.PATHS")
        c.ws.transport.abort()
        await c.close()

    async def abandons_handshake() -> None:  # the request, then gone before the answer
        _, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(upgrade_request(f"127.0.0.1:{edge.port}"))
        await writer.drain()
        writer.transport.abort()

    async def library_refuses() -> None:  # admitted, then websockets refuses the request
        request = upgrade_request(f"127.0.0.1:{edge.port}").replace(
            b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request)
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 400")
        writer.close()

    kinds = [normal, server_closes, connect_timeout, vanishes, abandons_handshake,
             library_refuses]
    await asyncio.gather(*(kind() for kind in kinds for _ in range(30)))
    drained = [await ProtoClient.open(edge.url) for _ in range(20)]
    await edge.edge.drain(0.2)  # closes them (3000), then refuses newcomers the same way
    late = await ProtoClient.open(edge.url, connect=False)
    codes = await asyncio.gather(*(asyncio.wait_for(c.closed, 5) for c in [*drained, late]))
    assert {code for code, _ in codes} == {3000}
    deadline = loop.time() + 10
    while (limiter.total, limiter.by_key, edge.edge.stats.connections) != (0, {}, 0):
        assert loop.time() < deadline, (limiter.total, limiter.by_key)
        await asyncio.sleep(0.02)
    for c in [*drained, late]:
        await c.close()


@integration
async def test_other_paths_are_not_counted_and_direct_writes_still_work(
    edge_factory, publisher: Publisher
) -> None:
    edge = await edge_factory(allowed_origins=("https://app.example.com",),
                              max_connections=1)
    other = await http_upgrade("127.0.0.1", edge.port, path="/elsewhere",
                               headers=[("Origin", "http://evil.example")])
    assert other.status == 403  # Starlette's answer: no route; not an admission refusal
    assert edge.edge.stats.refused["origin"] == 0 and edge.edge.admission.limiter.total == 0
    await other.close()
    client = await ProtoClient.open(edge.url)
    await client.subscribe("quotes.DIRECT")
    await publisher.publish(UpstreamMessage("quotes.DIRECT", {"bid": 1}))
    await client.wait_for(lambda: client.offsets["quotes.DIRECT"] == [1])
    assert edge.edge.stats.frames_direct > 0  # edge/wire.py still knows the protocol
    await client.close()


# --- the handshake deadline ---------------------------------------------------------------


async def closed_after(reader: asyncio.StreamReader, timeout: float = 10.0) -> bytes:
    """What the server sent until it closed the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return data


@integration
async def test_a_connection_without_a_whole_request_is_closed_at_the_deadline(
    edge_factory,
) -> None:
    edge = await edge_factory(handshake_timeout=0.5)
    loop = asyncio.get_running_loop()
    ok = await ProtoClient.open(edge.url)  # a WebSocket outlives the deadline
    started = loop.time()
    silent = await asyncio.open_connection("127.0.0.1", edge.port)
    partial = await asyncio.open_connection("127.0.0.1", edge.port)
    partial[1].write(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    # A kept-alive HTTP connection: one whole request, then half of the next.
    kept = await asyncio.open_connection("127.0.0.1", edge.port)
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await kept[0].readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    kept[1].write(b"GET /healthz HTTP/1.1\r\nHo")
    results = await asyncio.gather(*(closed_after(r) for r, _ in (silent, partial, kept)))
    elapsed = loop.time() - started
    assert results[:2] == [b"", b""]  # no answer, just closed
    assert 0.5 <= elapsed < 3.0, elapsed
    assert (await ok.request({"type": "ping"}))["type"] == "pong"
    assert edge.edge.stats.refused["handshake_timeout"] == 3
    for _, w in (silent, partial, kept):
        w.close()
    await ok.close()


@integration
async def test_a_slow_but_timely_handshake_is_served(edge_factory) -> None:
    edge = await edge_factory(handshake_timeout=1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
    request = upgrade_request(f"127.0.0.1:{edge.port}")
    writer.write(request[:20])
    await asyncio.sleep(0.3)  # the point of the test: a pause inside the request
    writer.write(request[20:])
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    writer.close()
    assert edge.edge.stats.refused["handshake_timeout"] == 0


@integration
async def test_websockets_client_sees_refusals_as_invalid_status(edge_factory) -> None:
    """What a non-browser client library gets: the status and Retry-After."""
    edge = await edge_factory(max_connections=1)
    async with websockets.connect(edge.url) as first:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(edge.url):
                pass
        assert info.value.response.status_code == 503
        assert int(info.value.response.headers["Retry-After"]) >= RETRY_AFTER
        assert first.state is websockets.protocol.State.OPEN
