"""Redis clients whose connection pool waits for a free connection instead of failing.

Why: redis-py's default pool allows `max_connections` (100 in the asyncio client) and
raises MaxConnectionsError beyond them. An edge reads history for every subscribe, so a
reconnect storm (hundreds of subscribes at once) failed most of them with `unavailable`.
A blocking pool bounds the connections to Redis and makes the excess wait their turn.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from common.config import RedisSettings

POOL_TIMEOUT = 10.0  # s a command may wait for a free connection before it fails


def redis_client(settings: RedisSettings, **connection_kwargs: Any) -> Redis:
    """A client of `settings.url` with at most `settings.max_connections` connections."""
    pool = BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=POOL_TIMEOUT,
        **connection_kwargs,
    )
    return Redis.from_pool(pool)
