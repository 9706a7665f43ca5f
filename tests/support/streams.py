"""Typed Redis reads for the tests. redis-py types every reply as bytes, str or None
whichever way a client decodes; the tests' clients decode (decode_responses=True), so these
say so once instead of at every use."""

from __future__ import annotations

from typing import cast

from redis.asyncio import Redis

Entry = tuple[str, dict[str, str]]  # a stream entry: its id and its fields


async def xrange(redis: Redis, name: str, start: str = "-", end: str = "+") -> list[Entry]:
    return cast(list[Entry], await redis.xrange(name, start, end))


async def xrevrange(redis: Redis, name: str, count: int | None = None) -> list[Entry]:
    return cast(list[Entry], await redis.xrevrange(name, count=count))


async def hgetall(redis: Redis, name: str) -> dict[str, str]:
    return cast(dict[str, str], await redis.hgetall(name))


async def get(redis: Redis, name: str) -> str | None:
    return cast(str | None, await redis.get(name))
