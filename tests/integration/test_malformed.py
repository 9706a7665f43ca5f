"""Malformed input at every layer gets the documented answer, reliably, with nothing in the
edge's log but what the operator needs: oversized frames (1009 even when more frames follow
at once), broken WebSocket framing (1002), text frames that are not UTF-8 (3500), JSON that
is not standard (NaN, Infinity: 3500), a `type` that is not a string, and a `pong` with an
unusable id (no reply at all)."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from websockets.frames import Opcode

from tests.integration.conftest import EdgeServer, RedisServer
from tests.support.edgeproc import edge_process
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()
           or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


async def raw_frame(client: ProtoClient, opcode: Opcode, payload: bytes,
                    fin: bool = True) -> None:
    """A frame exactly as given (masked, as a client's must be), past websockets' checks
    (it would not send most of what these tests send)."""
    client.ws.transport.write(masked((0x80 if fin else 0) | opcode, payload))


def masked(first_byte: int, payload: bytes, key: bytes = b"\x12\x34\x56\x78") -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes((first_byte, 0x80 | n))
    elif n < 0x10000:
        head = bytes((first_byte, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first_byte, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def test_oversized_frame_closes_with_1009_even_with_more_frames_right_behind(
    redis_server: RedisServer, key_prefix: str
) -> None:
    """The edge must not close the socket with the client's data unread: the kernel then
    resets the connection, which destroys the close frame (the client saw 1006 instead of
    1009, for most frames of 200 KB and more). It half-closes and reads on until the
    client closes. A real edge process: the race needs the edge's reads and the client's
    writes in two processes (an in-process edge did not show it)."""
    async with edge_process(redis_server.url, key_prefix) as edge:
        codes: dict[str, list[int | None]] = {}
        for then in ("nothing", "a frame", "50 frames"):
            for size in (70_000, 300_000, 2_000_000, 300_000, 2_000_000):
                client = await ProtoClient.open(edge.url)
                await client.ws.send(json.dumps({"type": "ping", "pad": "x" * size}))
                for i in range({"nothing": 0, "a frame": 1, "50 frames": 50}[then]):
                    await raw_frame(client, Opcode.TEXT,
                                    json.dumps({"type": "ping", "id": i}).encode())
                code, _ = await asyncio.wait_for(client.closed, 15)
                codes.setdefault(then, []).append(code)
                await client.close()
        assert codes == dict.fromkeys(codes, [1009] * 5)
        assert edge.alive and "Traceback" not in edge.log()


@pytest.mark.parametrize(
    "payload",
    [b'{"type":"ping","x":"\xff"}', b"\xc3\x28", b'"\xed\xa0\x80"', b"\xf8\x88\x80\x80\x80"],
    ids=["invalid-byte", "bad-continuation", "surrogate", "five-bytes"],
)
async def test_text_frame_that_is_not_utf8_closes_with_3500_without_a_traceback(
    edge: EdgeServer, caplog: pytest.LogCaptureFixture, payload: bytes
) -> None:
    client = await ProtoClient.open(edge.url)
    await raw_frame(client, Opcode.TEXT, payload)
    await raw_frame(client, Opcode.TEXT, b'{"type":"ping","id":1}')
    code, reason = await asyncio.wait_for(client.closed, 5)
    assert (code, reason) == (3500, "malformed frame: text is not UTF-8")
    assert not any(m.get("type") == "pong" for m in client.messages)
    no_tracebacks(caplog)


async def test_fragmented_text_not_utf8_across_fragments_closes_with_3500(edge: EdgeServer) -> None:
    client = await ProtoClient.open(edge.url)
    await raw_frame(client, Opcode.TEXT, b'{"type":"ping","x":"\xe2', fin=False)
    await raw_frame(client, Opcode.CONT, b'\x28\xa1"}')
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3500


async def test_fragmented_valid_text_is_one_request(edge: EdgeServer) -> None:
    client = await ProtoClient.open(edge.url)
    await raw_frame(client, Opcode.TEXT, b'{"type":"ping",', fin=False)
    await raw_frame(client, Opcode.CONT, b'"id":7}')
    await client.wait_for(lambda: any(m.get("id") == 7 for m in client.messages))
    assert client.messages[-1] == {"type": "pong", "id": 7}
    await client.close()


@pytest.mark.parametrize(
    ("opcode", "payload", "fin"),
    [
        (Opcode.CONT, b"{}", True),  # a continuation with nothing to continue
        (Opcode.PING, b"x" * 200, True),  # a control frame over 125 bytes
        (Opcode.PING, b"", False),  # a fragmented control frame
        (Opcode.CLOSE, b"\x03", True),  # a close payload of one byte
        (Opcode.CLOSE, b"\x03\xe7", True),  # close code 999
    ],
    ids=["lone-cont", "long-ping", "fragmented-ping", "close-1-byte", "close-999"],
)
async def test_broken_framing_closes_with_1002(
    edge: EdgeServer, caplog: pytest.LogCaptureFixture, opcode: Opcode, payload: bytes, fin: bool
) -> None:
    client = await ProtoClient.open(edge.url)
    await raw_frame(client, opcode, payload, fin)
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 1002
    no_tracebacks(caplog)


@pytest.mark.parametrize("first_byte", [0x83, 0x8B, 0xC1, 0xB1])
async def test_reserved_opcodes_and_bits_close_with_1002(edge: EdgeServer, first_byte: int) -> None:
    """Opcodes 3 and 11 are reserved; RSV1 without a negotiated extension, RSV3 too."""
    client = await ProtoClient.open(edge.url)
    client.ws.transport.write(masked(first_byte, b""))
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 1002


async def test_unmasked_client_frame_closes_with_1002(edge: EdgeServer) -> None:
    client = await ProtoClient.open(edge.url)
    client.ws.transport.write(b"\x81\x02{}")
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 1002


@pytest.mark.parametrize(
    "text",
    ['{"type":"ping","id":NaN}', '{"type":"ping","x":Infinity}', '{"type":"ping","x":-Infinity}',
     '{"type":"subscribe","channel":"quotes.X","max_rate":NaN}', "NaN", "[Infinity]"],
)
async def test_non_standard_json_closes_with_3500(edge: EdgeServer, text: str) -> None:
    client = await ProtoClient.open(edge.url)
    await client.ws.send(text)
    code, reason = await asyncio.wait_for(client.closed, 5)
    assert (code, reason) == (3500, "malformed frame")


@pytest.mark.parametrize("text", ['{"type":"connect","x":NaN}', "Infinity"])
async def test_non_standard_json_as_first_frame_closes_with_3500(
    edge: EdgeServer, text: str,
) -> None:
    client = await ProtoClient.open(edge.url, connect=False)
    await client.ws.send(text)
    code, _ = await asyncio.wait_for(client.closed, 5)
    assert code == 3500


@pytest.mark.parametrize("rid", ["zz", -1, 1.5, 2**53, True, [1], None, 3])
async def test_pong_gets_no_reply_whatever_its_id(edge: EdgeServer, rid: object) -> None:
    client = await ProtoClient.open(edge.url)
    await client.send({"type": "pong", "id": rid})
    reply = await client.request({"type": "ping"})  # the next thing that comes back
    assert reply["type"] == "pong"
    assert [m["type"] for m in client.messages] == ["connected", "pong"]
    await client.close()


@pytest.mark.parametrize("kind", [5, None, True, 1.5, ["ping"], {"a": 1}])
async def test_type_that_is_not_a_string(edge: EdgeServer, kind: object) -> None:
    client = await ProtoClient.open(edge.url)
    reply = await client.request({"type": kind})
    assert reply["type"] == "error" and reply["code"] == "bad_request"
    assert reply["message"] == "type must be a string"
    reply = await client.request({"pad": 1})
    assert reply["message"] == "missing type"
    await client.close()
