"""Publishing through the broker's atomic publish, pipelined.

One round trip carries up to `batch_size` messages; the broker runs each atomically and,
per channel, in order, so a channel's offsets are assigned in the order its messages were
given (Redis: one publish script call per channel of the batch carries that channel's
messages; the results come back in the batch's order). A failed batch can be sent again:
messages with an upstream id are published once however often they are sent.

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
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from common.broker import Broker, Fence, PublishRequest, PublishStatus, RebaseStatus
from common.channels import MAX_MESSAGE_ID_LENGTH, parse_channel, validate_key
from common.config import HistoryPolicy, namespace_history
from common.errors import BadChannel
from common.strictjson import compact_encoder
from ingest.upstream import UpstreamMessage

MAX_TRACKED_CHANNELS = 100_000  # channels whose last offset (and policy) a publisher remembers

class InvalidMessage(ValueError):
    """A message that cannot be published: bad channel, key or data."""


class PublishResult(NamedTuple):
    """What the script did with one message. `duplicate`: its id was published before, at
    `offset`. `unchanged`: an `if_changed` message equal to the snapshot's state, not
    published; `offset` is the channel's top (0, and `epoch` "", if it has no epoch yet).
    Otherwise the message was published at `offset`. A named tuple, not a dataclass: one
    per published message, built in a third of the time."""

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
    other messages of the batch are in `results`. Per channel, the refused messages are
    the last ones of the batch (a fence only grows, a deadline stays passed); across
    channels, a later message of the batch may have been published while an earlier one
    was refused. The caller must stop, and the next leader republish from the upstream,
    idempotently, from the lowest unpublished message (docs/architecture.md, "A partly
    fenced batch")."""

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
        broker: Broker,
        history: Mapping[str, HistoryPolicy] | None = None,
        meta_ttl: int = 30 * 86_400,
        idempotency_ttl: int = 3_600,
        logger: logging.Logger | None = None,
        on_rebase: Callable[[], None] | None = None,
    ) -> None:
        self.broker = broker
        self.history = dict(history or namespace_history())  # FANOUT_HISTORY, or the file's
        self.meta_ttl = meta_ttl
        self.idempotency_ttl = idempotency_ttl
        self.log = logger or logging.getLogger("fanout.publisher")
        # channel -> (epoch, highest offset this publisher got): how a loss is noticed.
        self._seen: dict[str, tuple[str, int]] = {}
        self._channels: dict[str, tuple[str, str, int, int]] = {}  # see `_channel`
        self.rebased = 0  # channels given a new epoch because their offsets went back
        self._on_rebase = on_rebase  # for a metric
        # JSON text of a message's data (the C encoder built once; one per Publisher).
        self._json = compact_encoder(allow_nan=False)

    def _channel(self, name: str) -> tuple[str, str, int, int]:
        """A channel's (name, snapshot mode, history max length, max age ms), parsed once
        per channel (raises BadChannel)."""
        known = self._channels.get(name)
        if known is None:
            channel = parse_channel(name)
            spec = channel.spec
            policy = self.history.get(channel.namespace) or HistoryPolicy(
                spec.history_length, spec.history_age
            )
            known = (channel.name, str(spec.snapshot), policy.max_length,
                     int(policy.max_age * 1000))
            if len(self._channels) >= MAX_TRACKED_CHANNELS:
                self._channels.clear()  # bounded memory
            self._channels[name] = known
        return known

    def _request(self, msg: UpstreamMessage) -> PublishRequest:
        try:
            name, mode, max_length, max_age_ms = self._channel(msg.channel)
            key = msg.key
            if key:
                validate_key(key)
            elif key != "":
                raise ValueError("snapshot key must be a string")
            data = self._json(msg.data)
        except (BadChannel, ValueError, TypeError) as exc:
            raise InvalidMessage(f"{msg.channel!r}: {exc}") from None
        if len(msg.msg_id) > MAX_MESSAGE_ID_LENGTH:
            raise InvalidMessage(f"{msg.channel!r}: message id longer than "
                                 f"{MAX_MESSAGE_ID_LENGTH} characters")
        return PublishRequest(
            name, data, key, msg.msg_id, mode, max_length, max_age_ms, msg.delete,
            msg.if_changed, int(msg.received_at * 1000),
        )

    async def snapshot(self, channel: str) -> dict[str, Any]:
        """A channel's snapshot: key -> latest value (values that are not JSON are left out).
        For upstream adapters resuming what an earlier leader published."""
        raw = await self.broker.snapshot(channel)
        out: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                out[key] = json.loads(value)
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
        requests = [self._request(msg) for msg in messages]
        # What this publisher had got before sending: whatever Redis answers now comes
        # after it, while batches sent concurrently may complete in any order.
        seen = self._seen
        before = {channel: seen.get(channel) for channel in {msg.channel for msg in messages}}
        replies = await self.broker.publish(requests, fence, meta_ttl=self.meta_ttl,
                                            idempotency_ttl=self.idempotency_ttl)
        results: list[PublishResult] = []
        refused: tuple[str, int, str] | None = None
        published, duplicate, unchanged = (PublishStatus.PUBLISHED, PublishStatus.DUPLICATE,
                                           PublishStatus.UNCHANGED)
        append = results.append
        for msg, r in zip(messages, replies, strict=True):
            status = r.status
            if status is published:  # the common case first: no keyword arguments
                append(PublishResult(msg.channel, r.offset, r.epoch, False))
            elif status is duplicate or status is unchanged:
                append(PublishResult(msg.channel, r.offset, r.epoch, status is duplicate,
                                     status is unchanged))
            elif refused is None:
                if status is PublishStatus.FENCED:
                    refused = (msg.channel, int(r.epoch), "token")
                else:
                    refused = (msg.channel, 0, "expired")
        if refused is not None:
            assert fence is not None
            channel, channel_fence, reason = refused
            raise FencedOut(channel, fence.token, channel_fence, reason, results)
        regressed = self._went_back(results, before)
        if regressed:
            await self._rebase(messages, results, regressed, fence)
        return results

    def _went_back(
        self, results: list[PublishResult], before: Mapping[str, tuple[str, int] | None]
    ) -> list[int]:
        """Indexes of results whose channel's offset went back within its epoch: at or
        below one this publisher had got before sending them (`before`), which Redis
        cannot answer unless it lost acknowledged writes. Remembers the highest offsets."""
        seen = self._seen
        if len(seen) > MAX_TRACKED_CHANNELS:
            seen.clear()  # bounded memory; detection resumes from the next publishes
        regressed = []
        for i, r in enumerate(results):
            if r.duplicate:
                continue  # the offset a known id was published at: old by design
            prev = before.get(r.channel)
            if prev is not None and prev[0] == r.epoch and (
                r.offset <= prev[1] if r.published else r.offset < prev[1]
            ):
                regressed.append(i)
                continue
            cur = seen.get(r.channel)
            if cur is None or cur[0] != r.epoch or r.offset > cur[1]:
                seen[r.channel] = (r.epoch, r.offset)
        return regressed

    async def _rebase(
        self, messages: Sequence[UpstreamMessage], results: list[PublishResult],
        regressed: list[int], fence: Fence | None,
    ) -> None:
        """Give each channel whose offsets went back a new epoch (its clients resync from
        the snapshot), then publish again, in the new epoch, the messages that got reused
        offsets: their results are replaced."""
        done: dict[str, str] = {}
        for i in regressed:
            r = results[i]
            if r.channel in done:
                continue
            reply = await self.broker.rebase(
                r.channel, r.epoch, None if fence is None else fence.token,
                meta_ttl=self.meta_ttl,
            )
            epoch, status = reply.epoch, reply.status
            if status is RebaseStatus.FENCED:
                assert fence is not None
                raise FencedOut(r.channel, fence.token, 0, "token", results)
            done[r.channel] = epoch
            if status is RebaseStatus.REBASED:
                self.rebased += 1
                if self._on_rebase is not None:
                    self._on_rebase()
            _, seen = self._seen.pop(r.channel, (r.epoch, 0))
            self.log.error(
                "offsets went back: Redis lost acknowledged writes channel=%s epoch=%s "
                "offset=%d seen=%d new_epoch=%s rebased=%s", r.channel, r.epoch, r.offset,
                seen, epoch, status is RebaseStatus.REBASED,
            )
        again = [i for i in regressed if results[i].published]
        if again:
            republished = await self.publish_batch([messages[i] for i in again], fence)
            for i, r in zip(again, republished, strict=True):
                results[i] = r

