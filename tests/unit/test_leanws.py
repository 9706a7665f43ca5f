"""The pure parts of the lean WebSocket path (edge/leanws.py): the upgrade head, the frame
parser (split reads, fragmentation, masks, sizes, UTF-8), close frames."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import h11
import pytest
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.server import ServerState
from websockets.speedups import apply_mask as c_apply_mask
from websockets.utils import accept_key

from edge.admission import ConnectionLimiter, Refusal, Slot
from edge.handshake import refusal_parts, refusal_response
from edge.leanws import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    LeanServer,
    LeanWebSocket,
    ProtocolError,
    accept_value,
    close_frame,
    frame,
    parse_close,
    parse_upgrade,
    py_apply_mask,
)
from edge.wsprotocol import FAILED, INVALID_UTF8_REASON

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GOOD = [b"Host: edge:8000", b"Upgrade: websocket", b"Connection: Upgrade",
        b"Sec-WebSocket-Key: " + KEY, b"Sec-WebSocket-Version: 13"]


def head(lines: list[bytes], line: bytes = b"GET /ws HTTP/1.1") -> bytes:
    return b"\r\n".join([line, *lines])


def masked(first: int, payload: bytes, key: bytes = b"\x12\x34\x56\x78") -> bytes:
    n = len(payload)
    if n < 126:
        hdr = bytes((first, 0x80 | n))
    elif n < 0x10000:
        hdr = bytes((first, 0xFE)) + n.to_bytes(2, "big")
    else:
        hdr = bytes((first, 0xFF)) + n.to_bytes(8, "big")
    return hdr + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# --- the upgrade head ---------------------------------------------------------------------


def test_a_valid_upgrade_gives_headers_key_path_query_and_subprotocols() -> None:
    lines = [*GOOD, b"Origin: https://app.example",
             b"Sec-WebSocket-Protocol: fanout.msgpack, fanout.json",
             b"X-Forwarded-For:  10.0.0.1 "]
    req = parse_upgrade(head(lines, b"GET /ws?a=1&b HTTP/1.1"), "/ws", False)
    assert req is not None
    assert (req.raw_path, req.query_string, req.key) == (b"/ws", b"a=1&b", KEY)
    assert req.subprotocols == ["fanout.msgpack", "fanout.json"]
    assert (b"origin", b"https://app.example") in req.headers
    assert (b"x-forwarded-for", b"10.0.0.1") in req.headers  # names lower-cased, OWS stripped
    assert len(req.headers) == len(lines)


def test_header_case_and_token_lists_are_as_lenient_as_websockets() -> None:
    lines = [b"host: x", b"UPGRADE: WebSocket", b"connection: keep-alive, Upgrade",
             b"sec-websocket-key: " + KEY, b"SEC-WEBSOCKET-VERSION: 13"]
    assert parse_upgrade(head(lines), "/ws", False) is not None


@pytest.mark.parametrize("line", [
    b"GET /other HTTP/1.1", b"GET /ws HTTP/1.0", b"POST /ws HTTP/1.1", b"GET /ws/ HTTP/1.1",
    b"GET /w%73 HTTP/1.1", b"GET  /ws HTTP/1.1", b"get /ws HTTP/1.1", b"GET http://x/ws HTTP/1.1",
])
def test_other_request_lines_go_to_h11(line: bytes) -> None:
    assert parse_upgrade(head(GOOD, line), "/ws", False) is None


@pytest.mark.parametrize("change", [
    ("drop", b"Host"), ("drop", b"Upgrade"), ("drop", b"Connection"),
    ("drop", b"Sec-WebSocket-Key"), ("drop", b"Sec-WebSocket-Version"),
    ("add", b"Sec-WebSocket-Key: " + KEY), ("add", b"Host: two"), ("add", b"Upgrade: websocket"),
    ("add", b" folded"), ("add", b"\tfolded"), ("add", b"Bad Name: x"), ("add", b"NoColon"),
    ("add", b"X: a\x00b"), ("add", b"Content-Length: 0"), ("add", b"Transfer-Encoding: chunked"),
    ("set", b"Upgrade: h2c"), ("set", b"Upgrade: websocket, h2c"), ("set", b"Connection: close"),
    ("set", b"Sec-WebSocket-Version: 8"), ("set", b"Sec-WebSocket-Key: c2hvcnQ="),
    ("set", b"Sec-WebSocket-Key: " + base64.b64encode(os.urandom(17))),
    ("set", b"Sec-WebSocket-Key: !!!!!!!!!!!!!!!!!!!!!!=="),
    ("add", b"Sec-WebSocket-Protocol: a b"), ("add", b"Sec-WebSocket-Protocol: a,,b"),
])
def test_invalid_or_unusual_upgrades_go_to_h11(change: tuple[str, bytes]) -> None:
    """Whatever uvicorn or websockets would answer otherwise than with a 101 (or answer
    differently for), the lean path leaves to them."""
    what, line = change
    name = line.split(b":")[0].lower()
    lines = list(GOOD)
    if what in ("drop", "set"):
        lines = [x for x in lines if x.split(b":")[0].lower() != name]
    if what in ("add", "set"):
        lines.append(line)
    assert parse_upgrade(head(lines), "/ws", False) is None


def test_extensions_go_to_websockets_only_when_the_edge_compresses() -> None:
    lines = [*GOOD, b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"]
    assert parse_upgrade(head(lines), "/ws", True) is None
    assert parse_upgrade(head(lines), "/ws", False) is not None  # simply not negotiated


def test_an_oversize_head_goes_to_h11() -> None:
    lines = [*GOOD, b"X-Pad: " + b"a" * 17_000]
    assert parse_upgrade(head(lines), "/ws", False) is None


def test_accept_value_is_rfc_6455s() -> None:
    assert accept_value(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 1.3
    key = base64.b64encode(os.urandom(16))
    assert accept_value(key).decode() == accept_key(key.decode())


# --- frames ---------------------------------------------------------------------------------


def test_masks_pure_python_as_websockets_c() -> None:
    for n in (0, 1, 3, 4, 5, 125, 126, 4096, 70_001):
        data, mask = os.urandom(n), os.urandom(4)
        assert py_apply_mask(data, mask) == c_apply_mask(data, mask)


def test_many_frames_in_one_read() -> None:
    p = FrameParser(1 << 20)
    data = (masked(0x81, b'{"a":1}') + masked(0x82, b"\x00\x01") + masked(0x89, b"hi")
            + masked(0x8A, b"") + masked(0x81, "é".encode()))
    events, error = p.feed(data)
    assert error is None
    assert events == [(OP_TEXT, '{"a":1}'), (OP_BINARY, b"\x00\x01"), (OP_PING, b"hi"),
                      (OP_PONG, b""), (OP_TEXT, "é")]


@pytest.mark.parametrize("size", [0, 10, 125, 126, 1000, 65_535, 65_536, 200_000])
def test_every_split_of_the_stream_gives_the_same_messages(size: int) -> None:
    payloads = [os.urandom(size), b"x", os.urandom(size // 2 + 1)]
    data = b"".join(masked(0x82, p, os.urandom(4)) for p in payloads)
    cuts = sorted({0, 1, 2, 3, 7, 9, 13, 15, len(data) // 3, len(data) // 2, len(data) - 1})
    for step in (1, 5, 4096) if size <= 1000 else (4096, 65_536):
        p = FrameParser(1 << 20)
        got: list[tuple[int, object]] = []
        for i in range(0, len(data), step):
            events, error = p.feed(data[i:i + step])
            assert error is None
            got += events
        assert got == [(OP_BINARY, x) for x in payloads], step
    for cut in cuts:  # two reads, cut anywhere
        p = FrameParser(1 << 20)
        first, _ = p.feed(data[:cut])
        rest, _ = p.feed(data[cut:])
        assert first + rest == [(OP_BINARY, x) for x in payloads]


def test_fragmented_messages_come_out_whole_with_control_frames_between() -> None:
    p = FrameParser(1 << 20)
    data = (masked(0x01, b'{"type":') + masked(0x89, b"p") + masked(0x00, b'"ping",')
            + masked(0x80, b'"id":7}') + masked(0x02, b"ab") + masked(0x80, b"cd"))
    events, error = p.feed(data)
    assert error is None
    assert events == [(OP_PING, b"p"), (OP_TEXT, '{"type":"ping","id":7}'), (OP_BINARY, b"abcd")]


def test_text_split_inside_a_utf8_character_is_checked_whole() -> None:
    p = FrameParser(1 << 20)
    euro = "€".encode()
    events, error = p.feed(masked(0x01, euro[:1]) + masked(0x80, euro[1:]))
    assert (events, error) == ([(OP_TEXT, "€")], None)
    p = FrameParser(1 << 20)
    events, error = p.feed(masked(0x01, b'"\xe2') + masked(0x80, b'\x28\xa1"'))
    assert events == [] and error is not None
    assert (error.code, error.reason) == (3500, INVALID_UTF8_REASON)


@pytest.mark.parametrize(
    "payload", [b"\xff", b"\xc3\x28", b'"\xed\xa0\x80"', b"\xf8\x88\x80\x80\x80"])
def test_text_that_is_not_utf8_is_3500_after_the_frames_before_it(payload: bytes) -> None:
    p = FrameParser(1 << 20)
    events, error = p.feed(masked(0x81, b"ok") + masked(0x81, payload) + masked(0x81, b"late"))
    assert events == [(OP_TEXT, "ok")]
    assert error is not None and error.code == 3500
    assert error.__traceback__ is None  # no cycle through the frames (and the transport)


@pytest.mark.parametrize(("data", "code"), [
    (b"\x81\x02{}", 1002),  # not masked
    (masked(0xC1, b""), 1002),  # RSV1
    (masked(0xB1, b""), 1002),  # RSV3
    (masked(0x83, b""), 1002),  # reserved data opcode
    (masked(0x8B, b""), 1002),  # reserved control opcode
    (masked(0x80, b"{}"), 1002),  # continuation of nothing
    (masked(0x01, b"a") + masked(0x81, b"b"), 1002),  # a new message inside a fragmented one
    (masked(0x09, b""), 1002),  # fragmented ping
    (masked(0x89, b"x" * 126), 1002),  # control frame over 125 bytes
    (b"\x82\xff" + (1 << 63).to_bytes(8, "big") + b"mask", 1002),  # length's top bit
])
def test_broken_framing_is_1002(data: bytes, code: int) -> None:
    events, error = FrameParser(1 << 20).feed(data)
    assert events == [] and error is not None and error.code == code


def test_an_oversize_message_fails_on_its_header_before_its_payload_arrives() -> None:
    p = FrameParser(1000)
    events, error = p.feed(masked(0x82, b"x" * 1000))
    assert error is None and events == [(OP_BINARY, b"x" * 1000)]
    events, error = p.feed(masked(0x82, b"x" * 1001)[:20])  # only the header and a little
    assert error is not None and error.code == 1009


def test_an_oversize_fragmented_message_fails_on_the_fragment_that_crosses_the_limit() -> None:
    p = FrameParser(1000)
    events, error = p.feed(masked(0x02, b"x" * 600))
    assert (events, error) == ([], None)
    events, error = p.feed(masked(0x80, b"y" * 401)[:10])
    assert error is not None and error.code == 1009


# --- close frames -------------------------------------------------------------------------


@pytest.mark.parametrize(("payload", "expected"), [
    (b"", (1005, "")), (b"\x03\xe8", (1000, "")), (b"\x03\xe9bye", (1001, "bye")),
    (b"\x0b\xb8x", (3000, "x")), (b"\x13\x87", (4999, "")),
])
def test_close_codes_a_client_may_send(payload: bytes, expected: tuple[int, str]) -> None:
    assert parse_close(payload) == expected


@pytest.mark.parametrize(("payload", "code"), [
    (b"\x03", 1002), (b"\x03\xe7", 1002), (b"\x03\xed", 1002), (b"\x03\xee", 1002),
    (b"\x03\xf7", 1002), (b"\x0b\xb7", 1002), (b"\x13\x88", 1002), (b"\x03\xe8\xff", 1007),
])
def test_close_codes_a_client_may_not_send(payload: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_close(payload)
    assert info.value.code == code


def test_server_frames_are_unmasked_and_close_frames_carry_code_and_reason() -> None:
    assert frame(OP_TEXT, b"hi") == b"\x81\x02hi"
    assert frame(OP_BINARY, b"x" * 126)[:4] == b"\x82\x7e\x00\x7e"
    assert frame(OP_BINARY, b"x" * 65_536)[:10] == b"\x82\x7f" + (65_536).to_bytes(8, "big")
    assert close_frame(1009, "too big") == b"\x88\x09\x03\xf1too big"
    assert close_frame(1005) == bytes((0x80 | OP_CLOSE, 0))


@pytest.mark.parametrize("refusal", [
    Refusal("origin", 403, "origin not allowed"),
    Refusal("total_limit", 503, "server full", 7),
])
def test_a_refusal_written_directly_is_the_answer_h11_writes(refusal: Refusal) -> None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head(GOOD) + b"\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Request)
    body, headers = refusal_parts(refusal)
    via_h11 = (conn.send(h11.Response(status_code=refusal.status, headers=headers,
                                      reason=STATUS_PHRASES[refusal.status]))
               or b"") + (conn.send(h11.Data(data=body)) or b"") + (
                   conn.send(h11.EndOfMessage()) or b"")
    assert refusal_response(refusal) == via_h11


# --- LeanWebSocket's ASGI side, on a fake transport ---------------------------------------


class FakeTransport(asyncio.Transport):
    """What LeanWebSocket writes, and whether it paused, half-closed or closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False
        self.eof = False
        self.paused = False
        self.proto: asyncio.BaseProtocol | None = None

    def write(self, data: Any) -> None:
        assert not self.closing and not self.eof
        self.out += data

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            proto = self.proto
            if isinstance(proto, asyncio.Protocol):
                asyncio.get_running_loop().call_soon(proto.connection_lost, None)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


async def serve(app: App, data: bytes = b"", max_size: int = 1 << 20,
                ) -> tuple[LeanWebSocket, FakeTransport, ServerState, Slot]:
    state = ServerState()
    state.default_headers = [(b"date", b"today"), (b"server", b"uvicorn")]
    server = LeanServer(app, state, {"k": "v"}, max_size, "", "3.0",
                        logging.getLogger("fanout.edge.ws"), close_timeout=0.5)
    transport = FakeTransport()
    limiter = ConnectionLimiter(0, 0)
    assert limiter.try_acquire("k") is None
    slot = Slot(limiter, "127.0.0.1", "k")
    proto = LeanWebSocket(server, transport, asyncio.get_running_loop(), slot)
    transport.proto = proto
    request = parse_upgrade(head([*GOOD, b"Sec-WebSocket-Protocol: a, b"],
                                 b"GET /ws?x=1 HTTP/1.1"), "/ws", False)
    assert request is not None
    proto.start(request, "ws", ("127.0.0.1", 5000), ("127.0.0.1", 8000), data)
    return proto, transport, state, slot


async def until(cond: Callable[[], bool]) -> None:
    async with asyncio.timeout(2):
        while not cond():
            await asyncio.sleep(0)


async def test_accept_receive_send_and_the_scope_uvicorn_gives() -> None:
    seen: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append({k: v for k, v in scope.items() if k != "headers"})
        seen.append(len(scope["headers"]))
        seen.append(await receive())
        await send({"type": "websocket.accept", "subprotocol": "b"})
        seen.append(scope["headers"])  # emptied at the accept
        seen.append(await receive())
        await send({"type": "websocket.send", "text": "é"})
        await send({"type": "websocket.send", "bytes": b"\x00"})
        seen.append(await receive())

    proto, transport, state, slot = await serve(app, masked(0x81, b"hi"))
    await until(lambda: len(seen) >= 5)
    scope, n_headers, connect, headers_after, first = seen[:5]
    assert scope == {
        "type": "websocket", "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1", "scheme": "ws", "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000), "root_path": "", "path": "/ws", "raw_path": b"/ws",
        "query_string": b"x=1", "subprotocols": ["a", "b"], "state": {"k": "v"},
        "extensions": {"websocket.http.response": {}},
    }
    assert n_headers == len(GOOD) + 1 and headers_after == []
    assert connect == {"type": "websocket.connect"}
    assert first == {"type": "websocket.receive", "text": "hi"}
    response = bytes(transport.out).partition(b"\r\n\r\n")[0]
    assert response.split(b"\r\n") == [
        b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"date: today",
        b"server: uvicorn", b"Sec-WebSocket-Protocol: b"]
    await until(lambda: len(transport.out) > len(response) + 4 + 4)
    assert bytes(transport.out).endswith(frame(OP_TEXT, "é".encode()) + frame(OP_BINARY, b"\x00"))
    connections: set[Any] = state.connections
    assert proto in connections and len(state.tasks) == 1
    proto.data_received(masked(0x88, b"\x03\xe8"))  # the client closes: echoed, then closed
    await until(lambda: len(seen) == 6 and not state.tasks)
    assert seen[5] == {"type": "websocket.disconnect", "code": 1000, "reason": ""}
    assert bytes(transport.out).endswith(b"\x88\x02\x03\xe8") and transport.closing
    await until(lambda: proto.disconnected)
    assert proto not in connections and slot._limiter is None  # the slot given back


async def test_reading_pauses_while_a_message_waits_for_the_app() -> None:
    gate = asyncio.Event()
    got: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await gate.wait()
        got.append(await receive())
        got.append(await receive())
        await gate.wait()

    proto, transport, _, _ = await serve(app, masked(0x81, b"1") + masked(0x81, b"2"))
    assert transport.paused
    gate.set()
    await until(lambda: len(got) == 2)
    assert not transport.paused
    proto.data_received(masked(0x81, b"3"))
    assert transport.paused


async def test_close_before_accept_is_403_and_a_failing_app_before_accept_500() -> None:
    async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.close"})

    async def fail(scope: dict[str, Any], receive: Any, send: Any) -> None:
        raise ValueError("boom")

    for app, status in ((refuse, b"403 Forbidden"), (fail, b"500 Internal Server Error")):
        proto, transport, state, _ = await serve(app)
        await until(lambda: proto.disconnected)  # noqa: B023
        assert bytes(transport.out).startswith(b"HTTP/1.1 " + status + b"\r\n")
        assert b"Connection: close" in transport.out and not state.tasks


async def test_an_app_failing_after_accept_closes_1011_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        raise ValueError("boom")

    proto, transport, _, _ = await serve(app)
    await until(lambda: bytes(transport.out).endswith(close_frame(1011)))
    assert not transport.closing  # waits for the client's close, or close_timeout
    proto.data_received(masked(0x88, b"\x03\xf3"))
    assert transport.closing
    assert any(r.name == "fanout.edge.ws" and r.exc_info for r in caplog.records)


async def test_a_failed_connection_half_closes_reads_on_and_marks_the_event() -> None:
    events: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        events.append(await receive())
        with pytest.raises(ClientDisconnected):
            await send({"type": "websocket.send", "text": "late"})

    proto, transport, _, _ = await serve(app, max_size=100)
    await until(lambda: transport.out.endswith(b"\r\n\r\n"))
    proto.data_received(masked(0x81, b"x" * 101)[:8] + masked(0x89, b"p"))
    await until(lambda: bool(events))
    assert events[0]["code"] == 1009 and events[0][FAILED] is True
    assert close_frame(1009, events[0]["reason"]) in transport.out
    assert transport.eof and not transport.closing  # half-closed, still reading
    proto.data_received(masked(0x89, b"ignored"))  # discarded: no pong after the end
    assert frame(OP_PONG, b"p") not in transport.out
    await until(lambda: transport.closing)  # close_timeout (0.5 s here)


async def test_shutdown_closes_1012_and_sends_after_the_loss_raise() -> None:
    results: list[Any] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        results.append(await receive())
        await until(lambda: proto.disconnected)
        try:
            await send({"type": "websocket.send", "text": "x"})
        except ClientDisconnected:
            results.append("disconnected")

    proto, transport, _, _ = await serve(app)
    await until(lambda: transport.out.endswith(b"\r\n\r\n"))
    proto.shutdown()
    await until(lambda: len(results) == 2)
    assert results == [{"type": "websocket.disconnect", "code": 1012, "reason": ""},
                       "disconnected"]
    assert bytes(transport.out).endswith(close_frame(1012))


async def test_accepts_and_refusals_are_logged_as_uvicorn_logs_them(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def accept(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.accept"})

    async def refuse(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "websocket.close"})

    with caplog.at_level(logging.INFO, "uvicorn.error"):
        for app in (accept, refuse):
            proto, _, _, _ = await serve(app)
            await until(lambda: proto.disconnected)  # noqa: B023
    lines = [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"]
    assert lines == ['127.0.0.1:5000 - "WebSocket /ws?x=1" [accepted]',
                     '127.0.0.1:5000 - "WebSocket /ws?x=1" 403']
