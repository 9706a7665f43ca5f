"""Direct frame writes (edge/wire.py): the framing itself, byte for byte as websockets',
and when the fast path is taken."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode

from edge.wire import RAW_SEND, RawWebSocket, encode_frame, frame_header


def _reference(opcode: Opcode, payload: bytes) -> bytes:
    """websockets' own serializer: what the library would have written (server: no mask)."""
    return Frame(opcode, payload).serialize(mask=False)


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65_535, 65_536, 70_000])
def test_header_lengths_match_websockets(length: int) -> None:
    payload = b"x" * length
    assert encode_frame(payload) == _reference(Opcode.BINARY, payload)
    assert frame_header(0x1, length) + payload == _reference(Opcode.TEXT, payload)


@given(st.text(max_size=300))
def test_text_frames_match_websockets(text: str) -> None:
    assert encode_frame(text) == _reference(Opcode.TEXT, text.encode())


def test_no_fast_path_without_uvicorn_sansio() -> None:
    assert RawWebSocket.attach({}) is None

    async def send(message: object) -> None:  # e.g. Starlette's test client
        pass

    assert RawWebSocket.attach({RAW_SEND: send}) is None

