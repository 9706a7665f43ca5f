"""A deterministic upstream for failover tests: a stand-in for a real upstream that replays
its recent messages, with stable ids, when a new connection subscribes.

Message `i` goes to channel ``trades.S<i % channels>`` with data ``{"i": i, "w": <worker>}``
and upstream id ``m<i>``. Every `messages()` iteration (one per leadership term) starts a
little before the lowest message not yet published, found from each channel's last message
in Redis: the repeats are dropped by the publish script's idempotency, and whatever the
previous leader read but never published is published now. `w` records which worker
published a message first.

The lowest unpublished message, not the highest published one: what a leader published is,
per channel, a prefix of that channel's messages, but not across channels. A batch fenced
out on one channel may have published later messages of the others (docs/architecture.md,
"A partly fenced batch"), so the highest published message can be up to a batch (500 by
default, more than `replay`) above a message that was never published.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

from redis.asyncio import Redis

from common.broker.keys import Keys
from ingest.upstream import UpstreamMessage


def channel_of(i: int, channels: int) -> str:
    return f"trades.S{i % channels}"


class SequenceFeed:
    name = "seq"

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        *,
        worker: str,
        channels: int = 4,
        rate: float = 500.0,
        replay: int = 200,
        limit: int | None = None,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.worker = worker
        self.channels = channels
        self.rate = rate
        self.replay = replay
        self.limit = limit  # the feed ends after message limit - 1
        self.starts: list[int] = []  # where each iteration started
        # per iteration, each channel's last published message (-1: none) when it started
        self.resumed_at: list[dict[str, int]] = []

    async def last_published(self) -> dict[str, int]:
        """Per channel, the `i` of its last stream entry (-1 if it has none)."""
        out: dict[str, int] = {}
        for c in range(self.channels):
            channel = channel_of(c, self.channels)
            last = await self.redis.xrevrange(self.keys.stream(channel), count=1)
            out[channel] = -1
            if last:
                out[channel] = int(json.loads(_field(last[0][1], "d"))["i"])
        return out

    async def resume_position(self) -> tuple[int, int]:
        """(start, next): `start` is up to `replay` messages before the lowest message not
        yet published, `next` follows the highest one published (0 if none).

        Every message up to the lowest channel's last one is published (a channel's
        published messages are a prefix of its messages), so the lowest unpublished one
        comes after it. The messages from `start` to `next` are due at once."""
        tops = await self.last_published()
        self.resumed_at.append(tops)
        lowest, highest = min(tops.values()), max(tops.values())
        return max(0, lowest + 1 - self.replay), highest + 1

    async def messages(self) -> AsyncIterator[UpstreamMessage]:
        start, following = await self.resume_position()
        i = start
        self.starts.append(start)
        loop = asyncio.get_running_loop()
        # The replayed messages are due at once, as a real upstream sends its backlog.
        began = loop.time() - (following - start) / self.rate
        while self.limit is None or i < self.limit:
            due = start + int((loop.time() - began) * self.rate) + 1
            if self.limit is not None:
                due = min(due, self.limit)
            while i < due:
                yield UpstreamMessage(channel_of(i, self.channels), {"i": i, "w": self.worker},
                                      msg_id=f"m{i}")
                i += 1
            await asyncio.sleep(0.005)


Rows = dict[str, list[tuple[int, int, str]]]


async def published(redis: Redis, keys: Keys, channels: int = 4) -> Rows:
    """Per channel, every stream entry as (offset, i, worker), in stream order."""
    out: Rows = {}
    for c in range(channels):
        channel = channel_of(c, channels)
        entries = await redis.xrange(keys.stream(channel))
        rows = []
        for entry_id, fields in entries or []:
            data = json.loads(_field(fields, "d"))
            rows.append((int(_text(entry_id).split("-")[0]), int(data["i"]), str(data["w"])))
        out[channel] = rows
    return out


def check_clean(streams: Rows) -> int:
    """Assert what a consumer must see across any number of failovers: per channel,
    offsets 1, 2, 3, ... and messages in upstream order; across channels, every message
    0..max exactly once (none lost, none twice). Returns the number of messages."""
    seen: list[int] = []
    for channel, rows in streams.items():
        offsets = [offset for offset, _, _ in rows]
        assert offsets == list(range(1, len(rows) + 1)), f"{channel}: offsets not contiguous"
        ids = [i for _, i, _ in rows]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), f"{channel}: order or duplicate"
        seen.extend(ids)
    assert len(seen) == len(set(seen)), "a message published twice"
    assert sorted(seen) == list(range(len(seen))), "a message lost"
    return len(seen)


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Mapping[Any, Any] | None, name: str) -> str:
    """A stream entry's field, whether the client decodes replies or not."""
    assert fields is not None
    return _text(fields.get(name, fields.get(name.encode())))
