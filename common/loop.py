"""The event loop a command runs on (FANOUT_LOOP): asyncio's own, or uvloop (libuv's,
uvicorn's "standard" loop), which does the same work in C with less CPU per system call and
timer. uvloop does not build on Windows (nor on PyPy): there "auto" is asyncio's and
"uvloop" is refused at startup, naming the setting."""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable

LOOPS = ("auto", "asyncio", "uvloop")


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(name: str) -> str:
    """"asyncio" or "uvloop" for a FANOUT_LOOP value ("auto": uvloop where installed)."""
    if name == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    return name


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """What makes the loop `name` resolves to (for `asyncio.Runner`)."""
    if resolve(name) == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """"uvloop" or "asyncio": which one is running (for the startup log)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
