"""The Lua scripts (common/broker/lua/<name>.lua), run by SHA, and their KEYS/ARGV built by
name in one place: each script's header documents the same order.

`Script` sends EVALSHA and, on NOSCRIPT (a new or restarted server, a failover, a
`SCRIPT FLUSH`), loads the script once with SCRIPT LOAD and sends it again. Pipelines queue
EVALSHA only (`Script.queue`); the caller reloads and resends what came back NOSCRIPT
(`Script.missing`). Nothing is checked before sending: redis-py's own `Script` sends
`SCRIPT EXISTS` before every pipeline, an extra round trip per publish batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from hiredis import pack_command
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from common.broker.keys import Keys, idempotency_bucket
from common.broker.types import Fence, PublishRequest, SnapshotWant

Call = tuple[list[str], list[str | int]]  # KEYS, ARGV
Client = Redis | RedisCluster  # a script runs on one server, or on a cluster by its keys' slot

# Most messages of one channel in one publish.lua call: a call blocks the server while it
# runs (~3-10 µs per message), so a channel's share of a big batch is split.
MAX_CALL_MESSAGES = 1000


@cache
def source(name: str) -> str:
    """The text of common/broker/lua/<name>.lua."""
    return (resources.files("common.broker").joinpath("lua", f"{name}.lua")
            .read_text(encoding="utf-8"))


class Script:
    """One Lua script, run by SHA on `client` (or on the client given per call)."""

    def __init__(self, client: Client, name: str) -> None:
        self.client = client
        self.name = name
        self.source = source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def load(self, client: Client | None = None) -> None:
        """SCRIPT LOAD: after a NOSCRIPT, EVALSHA finds it again."""
        sha = await (client or self.client).script_load(self.source)
        if sha != self.sha:
            raise RuntimeError(f"{self.name}.lua: the server computed SHA {sha}, not "
                               f"{self.sha}")

    async def __call__(
        self, keys: Sequence[str], args: Sequence[str | int], client: Client | None = None
    ) -> Any:
        redis = client or self.client
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load(redis)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)

    def pack(self, keys: Sequence[str], args: Sequence[str | int]) -> bytes:
        """The EVALSHA of `keys` and `args` as RESP bytes, packed in one C call (redis-py's
        pipeline encodes each argument in Python first: most of the publisher's CPU per
        message when a call carries hundreds of arguments)."""
        command: Any = ("EVALSHA", self.sha, len(keys), *keys, *args)  # the stub wants a 1-tuple
        packed: bytes = pack_command(command)
        return packed

    def queue(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[str | int]) -> None:
        """Queue one EVALSHA in `pipe` (execute it with raise_on_error=False and look for
        `missing` replies)."""
        pipe.evalsha(self.sha, len(keys), *keys, *args)

    @staticmethod
    def missing(reply: object) -> bool:
        """Whether a pipelined reply says the server does not have the script."""
        return isinstance(reply, NoScriptError)


def register(client: Client, name: str) -> Script:
    """A script object bound to `client`, run by SHA."""
    return Script(client, name)


@dataclass(slots=True)
class PublishCall:
    """One publish.lua call: messages of one channel with one history policy and snapshot
    mode, in batch order; `indexes` are their positions in the batch."""

    channel: str
    policy: tuple[str, int, int]  # snapshot mode, max length, max age (ms)
    indexes: list[int] = field(default_factory=list)


PUBLISH_FIRST_MESSAGE_ARG = 10  # index of ARGV[11], the first message's data
PUBLISH_ARGS_PER_MESSAGE = 4
_FLAGS = ("0", "1", "2", "3")  # delete + 2 * if_changed


def group_publishes(batch: Sequence[PublishRequest]) -> list[PublishCall]:
    """The calls that publish `batch`: per channel, in the order channels first appear, its
    messages in batch order, in as few calls as its policy (the same for every message of a
    channel unless the caller mixes them) and `MAX_CALL_MESSAGES` allow. Running the calls
    in this order publishes every channel's messages in batch order; messages of different
    channels are no longer interleaved as in the batch (they have no order to keep)."""
    open_calls: dict[str, PublishCall] = {}
    calls: list[PublishCall] = []
    for i, req in enumerate(batch):
        policy = (req.snapshot_mode, req.max_length, req.max_age_ms)
        call = open_calls.get(req.channel)
        if call is None or call.policy != policy or len(call.indexes) >= MAX_CALL_MESSAGES:
            call = open_calls[req.channel] = PublishCall(req.channel, policy)
            calls.append(call)
        call.indexes.append(i)
    return calls


def publish_call(
    keys: Keys, call: PublishCall, batch: Sequence[PublishRequest], new_epoch: str,
    fence: Fence | None, *, meta_ttl: int, idempotency_ttl: int, sharded: bool = False,
    now: float | None = None,
) -> Call:
    """`sharded`: notify with SPUBLISH (Redis Cluster) instead of PUBLISH. `now`: the
    publisher's clock (s) that picks the idempotency bucket (default: time.time())."""
    name = call.channel
    mode, max_length, max_age_ms = call.policy
    bucket = idempotency_bucket(idempotency_ttl, time.time() if now is None else now)
    key_list = [keys.meta(name), keys.stream(name), keys.snapshot(name),
                keys.idempotency(name, bucket), keys.idempotency(name, bucket - 1)]
    args: list[str | int] = [
        mode,  # 1
        max_length,  # 2
        max_age_ms,  # 3
        meta_ttl,  # 4
        idempotency_ttl,  # 5
        keys.live(name),  # 6
        new_epoch,  # 7
        "" if fence is None else fence.token,  # 8
        "" if fence is None or fence.deadline_ms is None else fence.deadline_ms,  # 9
        "1" if sharded else "0",  # 10
    ]
    flags = _FLAGS
    for i in call.indexes:
        req = batch[i]
        flag = flags[req.delete + 2 * req.if_changed]
        args += (
            req.data,  # +0
            req.key,  # +1
            req.msg_id,  # +2
            f"{flag}{req.received_ms}" if req.received_ms else flag,  # +3
        )
    return key_list, args


HISTORY_INLINE_ARG = 6  # index of ARGV[7] (inline) in `history_call`'s ARGV


def history_call(
    keys: Keys, channel: str, since: int, snapshot: SnapshotWant, new_epoch: str, *,
    limit: int, meta_ttl: int, epoch: str, inline: int | None, until: int | None,
) -> Call:
    return (
        [keys.meta(channel), keys.stream(channel), keys.snapshot(channel)],
        [
            since,  # 1
            limit,  # 2
            snapshot,  # 3
            new_epoch,  # 4
            meta_ttl,  # 5
            epoch,  # 6
            "" if inline is None else inline,  # 7
            "" if until is None else until,  # 8
        ],
    )


def rebase_call(
    keys: Keys, channel: str, old_epoch: str, new_epoch: str, token: int | None, *,
    meta_ttl: int,
) -> Call:
    return ([keys.meta(channel), keys.stream(channel)],
            [old_epoch, new_epoch, "" if token is None else token, meta_ttl])


def acquire_call(keys: Keys, feed: str, owner: str, ttl_ms: int) -> Call:
    return [keys.lease(feed), keys.fence(feed)], [owner, ttl_ms]


def renew_call(keys: Keys, feed: str, holder: str, ttl_ms: int) -> Call:
    return [keys.lease(feed)], [holder, ttl_ms]


def release_call(keys: Keys, feed: str, holder: str, fence_floor: int) -> Call:
    return [keys.lease(feed), keys.fence(feed)], [holder, fence_floor]
