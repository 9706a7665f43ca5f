"""The live-message codec: what publish.lua PUBLISHes, and its inverse.

One pub/sub message per publish.lua call, carrying every message the call published (they
share one epoch and have consecutive offsets): a record separator (0x1E), the epoch and the
first offset, then per message a record separator and a newline-separated record:

    \\x1e<epoch>\\n<first offset>
    \\x1e<deleted "1"/"0">\\n<key>\\n<received ms, "" = unknown>\\n<data>
    \\x1e<deleted>\\n<key>\\n<received>\\n<data>   (offset first + 1)
    ...

(without the line breaks shown here). Data is JSON text, which may hold newlines but no
other raw control character (JSON escapes them), and keys hold no control characters, so
0x1E separates records unambiguously. One PUBLISH per call instead of one per message is
cheaper for Redis and for every edge reading it.

The older format, one message per pub/sub message (`encode_live_one`), starts with the
epoch, never with 0x1E: `decode_live` reads both, so edges can be upgraded before the
ingest processes (docs/architecture.md, "Upgrading the live message format").

Keep this and common/broker/lua/publish.lua in step.
"""

from __future__ import annotations

from collections.abc import Sequence

from common.broker.types import Publication

SEP = "\x1e"


def encode_live(epoch: str, first: int, messages: Sequence[tuple[str, str, bool, int]]) -> str:
    """What publish.lua publishes for a call that published `messages` (key, data, deleted,
    received ms or 0) at offsets `first`, `first` + 1, ... (tests and the reference)."""
    parts = [f"{SEP}{epoch}\n{first}"]
    for key, data, deleted, received_ms in messages:
        received = str(received_ms) if received_ms else ""
        parts.append(f"{SEP}{'1' if deleted else '0'}\n{key}\n{received}\n{data}")
    return "".join(parts)


def encode_live_one(
    epoch: str, offset: int, key: str, data: str, deleted: bool = False, received_ms: int = 0
) -> str:
    """The older one-message format (what publish.lua published before; still decoded)."""
    received = str(received_ms) if received_ms else ""
    return f"{epoch}\n{offset}\n{'1' if deleted else '0'}\n{key}\n{received}\n{data}"


def decode_live(channel: str, payload: str) -> list[Publication]:
    """The publications a live message of `channel` carries, in offset order (the edge's
    hot path)."""
    if not payload.startswith(SEP):
        epoch, one, deleted, key, received, data = payload.split("\n", 5)
        return [Publication(channel, epoch, int(one), key, data, deleted == "1",
                            int(received) / 1000 if received else 0.0)]
    records = payload.split(SEP)
    epoch, first = records[1].split("\n")
    offset = int(first)
    out: list[Publication] = []
    append = out.append
    for record in records[2:]:
        deleted, key, received, data = record.split("\n", 3)
        append(Publication(channel, epoch, offset, key, data, deleted == "1",
                           int(received) / 1000 if received else 0.0))
        offset += 1
    return out
