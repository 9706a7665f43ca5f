"""The live-message codec: what publish.lua's last lines PUBLISH, and its inverse.

One message per pub/sub message: a newline-separated header, then the data (JSON text,
which may hold newlines; keys hold no control characters):

    <epoch>\\n<offset>\\n<deleted "1"/"0">\\n<key>\\n<received ms, "" = unknown>\\n<data>

Keep this and common/broker/lua/publish.lua in step.
"""

from __future__ import annotations

from common.broker.types import Publication


def encode_live(
    epoch: str, offset: int, key: str, data: str, deleted: bool = False, received_ms: int = 0
) -> str:
    """What publish.lua publishes (tests and the memory broker's reference)."""
    received = str(received_ms) if received_ms else ""
    return f"{epoch}\n{offset}\n{'1' if deleted else '0'}\n{key}\n{received}\n{data}"


def decode_live(channel: str, payload: str) -> Publication:
    """The publication a live message of `channel` carries (the edge's hot path)."""
    epoch, offset, deleted, key, received, data = payload.split("\n", 5)
    return Publication(channel, epoch, int(offset), key, data, deleted == "1",
                       int(received) / 1000 if received else 0.0)
