"""A session in process, without servers (not a test module): a scripted WebSocket that
feeds it frames, a scripted hub, and a log handler that keeps what was logged."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from common.broker import HistoryResult, Publication
from common.channels import Channel
from common.errors import Unavailable
from common.protocol import Frame, Position
from edge.hub import Joined, Subscription
from edge.session import Session


class ScriptedWebSocket:
    """What a Session needs of Starlette's WebSocket: the frames to receive, then a close
    once the session has nothing left in flight; everything sent is recorded."""

    def __init__(self, inbox: list[Frame]) -> None:
        self.scope: dict[str, Any] = {}
        self.inbox = deque(inbox)
        self.sent: list[Frame] = []
        self.closed: tuple[int, str] | None = None
        self.session: Session | None = None

    async def receive(self) -> dict[str, Any]:
        await asyncio.sleep(0)
        if self.inbox:
            frame = self.inbox.popleft()
            if isinstance(frame, str):
                return {"type": "websocket.receive", "text": frame}
            return {"type": "websocket.receive", "bytes": frame}
        for _ in range(100):  # subscribes still running: let them answer first
            if self.session is None or not self.session._subscribing:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message.get("text") or message.get("bytes") or b"")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.closed = (code, reason)


class ScriptedHub:
    """A hub whose channels all sit at offset 10 of epoch e1; "FAIL" channels are down."""

    def __init__(self) -> None:
        self.subscribed: set[tuple[int, str]] = set()

    def subscribe_now(
        self, session: Any, channel: Channel, recover: Position | None, want_snapshot: bool,
    ) -> tuple[Subscription, Joined] | None:
        """From memory (no await), as the real hub does for a position it holds: here
        the subscribes needing no snapshot on channels with an even-length name."""
        name = channel.name
        if "FAIL" in name or len(name) % 2 or (recover is None and want_snapshot) or (
                recover is not None and not (recover.epoch == "e1" and recover.offset <= 10)):
            return None
        return self._join(session, name, recover, want_snapshot)

    async def subscribe(
        self, session: Any, channel: Channel, recover: Position | None, want_snapshot: bool,
    ) -> tuple[Subscription, Joined]:
        await asyncio.sleep(0)
        return self._join(session, channel.name, recover, want_snapshot)

    def _join(
        self, session: Any, name: str, recover: Position | None, want_snapshot: bool,
    ) -> tuple[Subscription, Joined]:
        if "FAIL" in name:
            raise Unavailable("channel temporarily unavailable, retry")
        sub = Subscription(session, name)
        recovered = recover is not None and recover.epoch == "e1" and recover.offset <= 10
        replay = [Publication(name, "e1", o, "", f'{{"o":{o}}}')
                  for o in range(recover.offset + 1, 11)] if recover and recovered else []
        snapshot = None if recovered or (recover is None and not want_snapshot) else {"": 1}
        self.subscribed.add((id(session), name))
        return sub, Joined("e1", 10, recovered, snapshot, replay)

    def unsubscribe(self, session: Any, name: str) -> None:
        self.subscribed.discard((id(session), name))

    async def read_history(self, name: str, since: int, snapshot: str, epoch: str = "",
                           until: int | None = None) -> HistoryResult:
        await asyncio.sleep(0)
        ok = epoch == "e1" and 0 <= since <= 10
        end = 10 if until is None else min(until, 10)
        entries = [Publication(name, "e1", o, "", "1") for o in range(since + 1, end + 1)]
        return HistoryResult("e1", 10, 1, ok, entries if ok else [], {})


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
