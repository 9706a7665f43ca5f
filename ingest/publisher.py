"""Publishing through the atomic publish script, pipelined.

One round trip carries up to `batch_size` script calls; Redis runs each atomically and in
order, so offsets are assigned in the order messages were given. A failed batch can be
sent again: messages with an upstream id are published once however often they are sent.

A leader publishes with its `Fence` (fencing token and lease deadline, see
ingest/leader.py): the script then writes nothing for a token lower than the highest one
that already published to the channel, or once the server's clock is past the deadline, and
the publisher raises `FencedOut`. Without a fence (the HTTP API, tests) publishing is
unfenced.

A message marked `if_changed` (a state: a depth level, a position, a balance, a quote) is
published only if it changes its channel's snapshot; otherwise the script writes nothing and
the result says `unchanged`. That is how a new leader's upstream, which re-sends the current
state on subscribe, does not repeat what the old leader already published.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from common.channels import parse_channel, validate_key
from common.config import DEFAULT_HISTORY, HistoryPolicy
from common.errors import BadChannel
from common.keys import Keys
from common.scripts import register
from ingest.upstream import UpstreamMessage


class InvalidMessage(ValueError):
    """A message that cannot be published: bad channel, key or data."""


@dataclass(frozen=True, slots=True)
class Fence:
    """What a leader publishes with: its fencing token, and the moment (the Redis server's
    clock, ms since the epoch) after which its lease may have expired (None = no deadline)."""

    token: int
    deadline_ms: int | None = None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What the script did with one message. `duplicate`: its id was published before, at
    `offset`. `unchanged`: an `if_changed` message equal to the snapshot's state, not
    published; `offset` is the channel's top (0, and `epoch` "", if it has no epoch yet).
    Otherwise the message was published at `offset`."""

    channel: str
    offset: int
    epoch: str
    duplicate: bool
    unchanged: bool = False

    @property
    def published(self) -> bool:
        return not (self.duplicate or self.unchanged)


class FencedOut(Exception):
    """The publish script refused (some of) a batch: a higher fencing token has published
    to `channel` (`reason` "token"; `fence` is the channel's token), or the lease deadline
    has passed on the server (`reason` "expired"). What was refused wrote nothing; the
    other messages of the batch are in `results` (a later message of the batch may have
    been published while an earlier one was refused: the caller must stop, and the next
    leader republish from the upstream, idempotently)."""

    def __init__(
        self, channel: str, token: int, fence: int, reason: str, results: list[PublishResult]
    ) -> None:
        super().__init__(f"fenced out: channel={channel} token={token} fence={fence} "
                         f"reason={reason}")
        self.channel = channel
        self.token = token
        self.fence = fence
        self.reason = reason
        self.results = results


class Publisher:
    def __init__(
        self,
        redis: Redis,
        keys: Keys | None = None,
        history: Mapping[str, HistoryPolicy] | None = None,
        meta_ttl: int = 30 * 86_400,
        idempotency_ttl: int = 3_600,
    ) -> None:
        self.redis = redis
        self.keys = keys or Keys()
        self.history = dict(history or DEFAULT_HISTORY)
        self.meta_ttl = meta_ttl
        self.idempotency_ttl = idempotency_ttl
        self._script = register(redis, "publish")

    def _call_args(
        self, msg: UpstreamMessage, epoch: str, fence: Fence | None = None
    ) -> tuple[list[str], list[str | int]]:
        try:
            channel = parse_channel(msg.channel)
            key = validate_key(msg.key)
            data = json.dumps(msg.data, separators=(",", ":"), ensure_ascii=False,
                              allow_nan=False)
        except (BadChannel, ValueError, TypeError) as exc:
            raise InvalidMessage(f"{msg.channel!r}: {exc}") from None
        if len(msg.msg_id) > 256:
            raise InvalidMessage(f"{msg.channel!r}: message id longer than 256 characters")
        policy = self.history[channel.namespace]
        name = channel.name
        keys = [
            self.keys.meta(name),
            self.keys.stream(name),
            self.keys.snapshot(name),
            self.keys.idempotency(name, msg.msg_id),
        ]
        args: list[str | int] = [
            data, key, msg.msg_id, channel.snapshot_mode.value, policy.max_length,
            int(policy.max_age * 1000), self.meta_ttl, self.idempotency_ttl,
            self.keys.live(name), epoch, "1" if msg.delete else "0",
            "" if fence is None else fence.token,
            "" if fence is None or fence.deadline_ms is None else fence.deadline_ms,
            "1" if msg.if_changed else "0",
        ]
        return keys, args

    async def snapshot(self, channel: str) -> dict[str, Any]:
        """A channel's snapshot: key -> latest value (values that are not JSON are left out).
        For upstream adapters resuming what an earlier leader published."""
        raw = await self.redis.hgetall(self.keys.snapshot(channel))
        out: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                out[_text(key)] = json.loads(value)
            except ValueError:
                continue
        return out

    async def publish(self, msg: UpstreamMessage, fence: Fence | None = None) -> PublishResult:
        return (await self.publish_batch([msg], fence))[0]

    async def publish_batch(
        self, messages: Sequence[UpstreamMessage], fence: Fence | None = None
    ) -> list[PublishResult]:
        """Publish in order, in one round trip. Raises InvalidMessage (bad channel, key or
        data) before anything is sent: a batch is never published partially for bad input.
        With a `fence`, raises FencedOut if the script refused any message of the batch."""
        epoch = os.urandom(6).hex()  # used only by a channel that has no epoch yet
        calls = [self._call_args(msg, epoch, fence) for msg in messages]
        async with self.redis.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                await self._script(keys=keys, args=args, client=pipe)
            raw = await pipe.execute()
        results: list[PublishResult] = []
        refused: tuple[str, int, str] | None = None
        for msg, r in zip(messages, raw, strict=True):
            status = int(r[2])
            if status in (0, 1, 4):
                results.append(PublishResult(msg.channel, int(r[0]), _text(r[1]),
                                             duplicate=status == 1, unchanged=status == 4))
            elif refused is None:
                if status == 2:
                    refused = (msg.channel, int(_text(r[1])), "token")
                else:
                    refused = (msg.channel, 0, "expired")
        if refused is not None:
            assert fence is not None
            channel, channel_fence, reason = refused
            raise FencedOut(channel, fence.token, channel_fence, reason, results)
        return results


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value
