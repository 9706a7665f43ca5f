"""The unit tier does no I/O, and this makes sure of it: while a test here runs, creating a
socket (socket.socket, socketpair, create_connection, any asyncio connection or server) or
resolving a name, and starting a process (subprocess, asyncio's subprocesses, fork, spawn)
fail with the test's name. The one socket allowed is the self-pipe of asyncio's own event
loop, which is not I/O of the test. A test that swallows the error still fails at teardown.
`make test-unit` also runs this tier without any network (`unshare -rn`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator
from types import FrameType
from typing import Any

import pytest

SELF_PIPE = ("_make_self_pipe", os.path.join("asyncio", "selector_events.py"))
CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item,
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Note whether the test itself failed, so a refusal is reported once."""
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


def _from_event_loop_self_pipe() -> bool:
    frame: FrameType | None = sys._getframe(2)
    for _ in range(4):  # socketpair() -> socket() -> __init__: a few frames up at most
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == SELF_PIPE[0] and code.co_filename.endswith(SELF_PIPE[1]):
            return True
        frame = frame.f_back
    return False


@pytest.fixture(autouse=True)
def no_io(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Refuse sockets, name lookups and processes for the length of one unit test."""
    attempts: list[str] = []

    def refuse(what: str) -> None:
        attempts.append(what)
        raise AssertionError(
            f"{request.node.nodeid}: {what} in a unit test (tests/unit does no I/O); "
            "move the test to tests/inprocess or tests/integration")

    real_init = socket.socket.__init__

    def socket_init(self: socket.socket, *args: Any, **kwargs: Any) -> None:
        if not _from_event_loop_self_pipe():
            refuse("a socket was created")
        real_init(self, *args, **kwargs)

    def refused(what: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            refuse(what)
        return call

    monkeypatch.setattr(socket.socket, "__init__", socket_init)
    monkeypatch.setattr(socket, "getaddrinfo", refused("a name lookup (getaddrinfo)"))
    monkeypatch.setattr(subprocess.Popen, "__init__", refused("a subprocess was started"))
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refused(f"os.{name}"))
    yield
    if attempts and not request.node.stash.get(CALL_FAILED, False):
        pytest.fail(f"{request.node.nodeid} tried I/O: {'; '.join(attempts)}", pytrace=False)
