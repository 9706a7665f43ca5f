"""The Lua scripts, loaded from their .lua files once and run by SHA.

redis-py's `Script` sends EVALSHA and, on NOSCRIPT (a restarted or new server), loads the
script and retries, also inside pipelines.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    """The text of common/lua/<name>.lua."""
    return resources.files("common").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def register(client: Redis[Any] | Redis, name: str) -> AsyncScript:  # type: ignore[type-arg]
    """A script object bound to `client`, run by SHA."""
    return client.register_script(source(name))
