"""The lean WebSocket path (edge/leanws.py) against a real edge: which requests take it,
that every other request gets the answer uvicorn's path gives (an edge with the lean path
off answers the same requests side by side), and the frames: fragments, ping, oversize,
bad UTF-8, the client's close, an abort mid-frame, the server's shutdown.
(tests/integration/test_malformed.py and test_admission.py pin the rest, on this path too.)"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import os

import pytest

from edge.handshake import AdmittedWebSocketProtocol, EdgeHttpProtocol
from edge.leanws import FrameParser, LeanWebSocket, accept_value
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.integration.test_malformed import masked
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


def upgrade(path: str = "/ws", version: str = "HTTP/1.1", extra: tuple[str, ...] = (),
            drop: tuple[str, ...] = (), key: bytes | None = None) -> tuple[bytes, bytes]:
    key = key or base64.b64encode(os.urandom(16))
    headers = {"Host": "127.0.0.1", "Upgrade": "websocket", "Connection": "Upgrade",
               "Sec-WebSocket-Key": key.decode(), "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Protocol": "fanout.json"}
    lines = [f"GET {path} {version}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k not in drop]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


class Raw:
    """A raw TCP client: the answer's head, then frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def send(cls, port: int, data: bytes) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(data)
        return cls(reader, writer)

    async def head(self) -> tuple[int, dict[str, str]]:
        async with asyncio.timeout(5):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(5):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            assert not b1 & 0x80  # a server's frames are not masked
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def rest(self) -> bytes:
        """Everything until the server closes (a FIN, not a reset)."""
        async with asyncio.timeout(10):
            return await self.reader.read(-1)

    def close(self) -> None:
        self.writer.close()


def protocols(edge: EdgeServer) -> list[type]:
    return [type(c) for c in edge.server.server_state.connections]


async def lean_off(edge_factory: EdgeFactory, **overrides: object) -> EdgeServer:
    """An edge whose every request goes through h11 and uvicorn's WebSocket protocol."""
    edge = await edge_factory(**overrides)
    cls = edge.server.config.http_protocol_class
    assert issubclass(cls, EdgeHttpProtocol) and cls is not EdgeHttpProtocol
    cls.lean = False  # its own class (edge_http_protocol makes one per edge)
    return edge


async def test_a_valid_upgrade_is_served_by_the_lean_path_with_the_subprotocol(
    edge: EdgeServer,
) -> None:
    data, key = upgrade()
    raw = await Raw.send(edge.port, data)
    status, headers = await raw.head()
    assert status == 101
    assert headers["sec-websocket-accept"] == accept_value(key).decode()
    assert headers["sec-websocket-protocol"] == "fanout.json"
    assert headers["upgrade"].lower() == "websocket" and headers["connection"] == "Upgrade"
    assert "date" in headers and headers["server"] == "uvicorn"
    assert "sec-websocket-extensions" not in headers
    assert LeanWebSocket in protocols(edge)
    raw.writer.write(masked(0x81, b'{"type":"connect","id":1}'))
    opcode, payload = await raw.frame()
    assert opcode == 1 and b'"connected"' in payload
    raw.close()
    # The websockets client (every other integration test's) is served by it too.
    client = await ProtoClient.open(edge.url)
    assert client.ws.subprotocol == "fanout.json"
    assert protocols(edge).count(LeanWebSocket) >= 1
    await client.close()


CASES = {
    "http/1.0": upgrade(version="HTTP/1.0")[0],
    "no key": upgrade(drop=("Sec-WebSocket-Key",))[0],
    "short key": upgrade(key=base64.b64encode(b"x" * 8))[0],
    "two keys": upgrade(extra=("Sec-WebSocket-Key: " + base64.b64encode(os.urandom(16))
                               .decode(),))[0],
    "version 8": upgrade(drop=("Sec-WebSocket-Version",), extra=("Sec-WebSocket-Version: 8",))[0],
    "no upgrade": upgrade(drop=("Upgrade",))[0],
    "no connection": upgrade(drop=("Connection",))[0],
    "no host": upgrade(drop=("Host",))[0],
    "other path": upgrade(path="/elsewhere")[0],
    "bad subprotocol": upgrade(drop=("Sec-WebSocket-Protocol",),
                               extra=("Sec-WebSocket-Protocol: a b",))[0],
    "obs-fold": upgrade(extra=("X-Thing: a", " folded"))[0],
    "post": upgrade()[0].replace(b"GET", b"POST", 1),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_requests_the_lean_path_leaves_get_uvicorns_answer(
    edge_factory: EdgeFactory, case: str
) -> None:
    """The same request to an edge with the lean path and to one without: the same
    status and headers (the date aside), and no lean protocol involved."""
    lean = await edge_factory()
    plain = await lean_off(edge_factory)
    answers = []
    for edge in (lean, plain):
        raw = await Raw.send(edge.port, CASES[case])
        status, headers = await raw.head()
        headers.pop("date", None)
        if status == 101:
            # (uvicorn upgrades an HTTP/1.0 request too, and an obs-fold h11 unfolds.)
            assert headers.pop("sec-websocket-accept")
        answers.append((status, headers))
        assert LeanWebSocket not in protocols(edge)
        raw.close()
    assert answers[0] == answers[1]


async def test_extensions_with_compression_on_go_to_uvicorn_and_negotiate_deflate(
    edge_factory: EdgeFactory,
) -> None:
    edge = await edge_factory(compression=True)
    data, _ = upgrade(extra=("Sec-WebSocket-Extensions: permessage-deflate",))
    raw = await Raw.send(edge.port, data)
    status, headers = await raw.head()
    assert status == 101 and headers["sec-websocket-extensions"].startswith("permessage-deflate")
    assert AdmittedWebSocketProtocol in protocols(edge)
    assert LeanWebSocket not in protocols(edge)
    raw.close()
    # Without extensions offered the lean path serves a compressing edge too.
    raw = await Raw.send(edge.port, upgrade()[0])
    status, headers = await raw.head()
    assert status == 101 and "sec-websocket-extensions" not in headers
    assert LeanWebSocket in protocols(edge)
    raw.close()


async def test_extensions_with_compression_off_are_not_negotiated(edge: EdgeServer) -> None:
    data, _ = upgrade(extra=("Sec-WebSocket-Extensions: permessage-deflate",))
    raw = await Raw.send(edge.port, data)
    status, headers = await raw.head()
    assert status == 101 and "sec-websocket-extensions" not in headers
    assert LeanWebSocket in protocols(edge)
    raw.close()


async def connected(edge: EdgeServer) -> Raw:
    raw = await Raw.send(edge.port, upgrade()[0] + masked(0x81, b'{"type":"connect","id":1}'))
    status, _ = await raw.head()
    assert status == 101
    opcode, payload = await raw.frame()  # frames sent with the request are read too
    assert opcode == 1 and b'"connected"' in payload
    return raw


async def test_fragmented_request_with_a_ping_between_its_fragments(edge: EdgeServer) -> None:
    raw = await connected(edge)
    raw.writer.write(masked(0x01, b'{"type":"ping",') + masked(0x89, b"between")
                     + masked(0x00, b'"id"') + masked(0x80, b":7}"))
    assert await raw.frame() == (0xA, b"between")  # pong with the ping's payload
    opcode, payload = await raw.frame()
    assert opcode == 1 and payload == b'{"type":"pong","id":7}'
    raw.close()


async def test_ping_in_one_byte_writes_gets_its_pong(edge: EdgeServer) -> None:
    raw = await connected(edge)
    for byte in masked(0x89, b"abc"):
        raw.writer.write(bytes((byte,)))
        await raw.writer.drain()
    assert await raw.frame() == (0xA, b"abc")
    raw.close()


async def test_oversize_is_1009_with_the_close_frame_received_not_a_reset(
    edge_factory: EdgeFactory,
) -> None:
    edge = await edge_factory(max_message_size=10_000)
    raw = await connected(edge)
    raw.writer.write(masked(0x81, b"x" * 300_000) + masked(0x81, b'{"type":"ping","id":1}'))
    opcode, payload = await raw.frame()
    assert opcode == 8 and int.from_bytes(payload[:2], "big") == 1009
    raw.writer.write_eof()  # the edge read on until our EOF: then it closes, no reset
    assert await raw.rest() == b""
    async with asyncio.timeout(5):
        while edge.edge.stats.connections:
            await asyncio.sleep(0.01)
    assert edge.edge.stats.disconnects.get("message_too_big") == 1


async def test_invalid_utf8_is_3500(edge: EdgeServer) -> None:
    raw = await connected(edge)
    raw.writer.write(masked(0x81, b'{"x":"\xff"}'))
    opcode, payload = await raw.frame()
    assert opcode == 8
    assert (int.from_bytes(payload[:2], "big"), payload[2:]) == (
        3500, b"malformed frame: text is not UTF-8")
    raw.close()


async def test_client_close_is_echoed_and_clean(edge: EdgeServer) -> None:
    raw = await connected(edge)
    raw.writer.write(masked(0x88, (4000).to_bytes(2, "big") + b"bye"))
    assert await raw.frame() == (8, (4000).to_bytes(2, "big") + b"bye")
    assert await raw.rest() == b""  # then the edge closes the TCP connection
    async with asyncio.timeout(5):
        while edge.edge.stats.connections or edge.edge.admission.limiter.total:
            await asyncio.sleep(0.01)
    assert edge.edge.stats.disconnects.get("client_closed") == 1


async def test_abort_mid_frame_frees_session_and_slot(edge: EdgeServer) -> None:
    raw = await connected(edge)
    raw.writer.write(masked(0x81, b'{"type":"subscribe","id":2,"channel":"quotes.X"}')[:20])
    await raw.writer.drain()
    raw.writer.transport.abort()
    async with asyncio.timeout(5):
        while (edge.edge.stats.connections or edge.edge.admission.limiter.total
               or LeanWebSocket in protocols(edge)):
            await asyncio.sleep(0.01)


async def test_server_shutdown_closes_with_1012(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory()
    client = await ProtoClient.open(edge.url)
    await edge.stop()
    code, _ = await asyncio.wait_for(client.closed, 10)
    assert code == 1012
    with contextlib.suppress(Exception):
        await client.close()


async def test_ended_lean_connections_are_freed_without_the_garbage_collector(
    edge_factory: EdgeFactory,
) -> None:
    """Closed, failed (1009, 1002, 3500, a bad close code) and aborted connections leave no
    LeanWebSocket, parser or transport in a reference cycle (the edge raises the
    collector's thresholds: a cycle would wait for a full collection)."""
    edge = await edge_factory(max_message_size=1000)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for bad in (b"", masked(0x81, b"x" * 5000), b"\x81\x02{}", masked(0x81, b"\xff"),
                    masked(0x88, b"\x03\xe7"), masked(0x81, b"abc")[:4]):
            raw = await connected(edge)
            raw.writer.write(bad)
            if bad:
                raw.writer.write_eof()
                with contextlib.suppress(ConnectionError):
                    await raw.rest()
            raw.writer.transport.abort()
        async with asyncio.timeout(10):
            while edge.edge.stats.connections or LeanWebSocket in protocols(edge):
                await asyncio.sleep(0.02)
        gc.collect()
        left = [type(o).__name__ for o in gc.garbage
                if isinstance(o, LeanWebSocket | FrameParser)
                or (isinstance(o, asyncio.Transport)
                    and (o.get_extra_info("sockname") or ("", 0))[1] == edge.port)]
        assert left == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
