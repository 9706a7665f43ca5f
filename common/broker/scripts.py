"""The Lua scripts (common/broker/lua/<name>.lua), loaded once and run by SHA, and their
KEYS/ARGV built by name in one place: each script's header documents the same order.

redis-py's `Script` sends EVALSHA and, on NOSCRIPT (a restarted or new server), loads the
script and retries, also inside pipelines.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from common.broker.keys import Keys
from common.broker.types import Fence, PublishRequest, SnapshotWant

Call = tuple[list[str], list[str | int]]  # KEYS, ARGV


@cache
def source(name: str) -> str:
    """The text of common/broker/lua/<name>.lua."""
    return (resources.files("common.broker").joinpath("lua", f"{name}.lua")
            .read_text(encoding="utf-8"))


def register(
    client: Redis[Any] | Redis | RedisCluster, name: str  # type: ignore[type-arg]
) -> AsyncScript:
    """A script object bound to `client`, run by SHA."""
    return client.register_script(source(name))


def publish_call(
    keys: Keys, req: PublishRequest, new_epoch: str, fence: Fence | None, *,
    meta_ttl: int, idempotency_ttl: int, sharded: bool = False,
) -> Call:
    """`sharded`: notify with SPUBLISH (Redis Cluster) instead of PUBLISH."""
    name = req.channel
    return (
        [keys.meta(name), keys.stream(name), keys.snapshot(name),
         keys.idempotency(name, req.msg_id)],
        [
            req.data,  # 1
            req.key,  # 2
            req.msg_id,  # 3
            req.snapshot_mode,  # 4
            req.max_length,  # 5
            req.max_age_ms,  # 6
            meta_ttl,  # 7
            idempotency_ttl,  # 8
            keys.live(name),  # 9
            new_epoch,  # 10
            "1" if req.delete else "0",  # 11
            "" if fence is None else fence.token,  # 12
            "" if fence is None or fence.deadline_ms is None else fence.deadline_ms,  # 13
            "1" if req.if_changed else "0",  # 14
            req.received_ms,  # 15
            "1" if sharded else "0",  # 16
        ],
    )


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
