"""The protocol's JSON decoder refuses NaN and Infinity and keeps big and float numbers."""

from __future__ import annotations

import math

import pytest

from common import protocol
from common.errors import Disconnect
from common.protocol import Codec

# --- the decoder itself (pure) ------------------------------------------------------------


@pytest.mark.parametrize("text", ["NaN", "-Infinity", '{"a":[1,Infinity]}', '{"a":NaN}'])
def test_decoder_refuses_nan_and_infinity(text: str) -> None:
    with pytest.raises(Disconnect) as info:
        protocol.decode_frame(text, Codec.JSON)
    assert info.value.code == 3500
    with pytest.raises(Disconnect):
        protocol.decode_frame(text.encode(), Codec.JSON)  # a binary frame of JSON


def test_decoder_keeps_big_and_float_numbers() -> None:
    obj = protocol.decode_frame('{"a":1e308,"b":-0.0,"c":123456789012345678901234567890}',
                                Codec.JSON)
    assert obj["a"] == 1e308 and math.copysign(1, obj["b"]) == -1
    assert obj["c"] == 123456789012345678901234567890
