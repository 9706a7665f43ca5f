"""In-process tests of the hub's ordering logic: history and live messages racing each
other, gaps, epoch changes. No Redis: history reads are scripted."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis

from common.channels import parse_channel
from common.errors import Disconnect
from common.keys import Keys
from common.protocol import Codec, Frame, Position
from edge.hub import Batch, HistoryResult, Hub, Publication, Subscription
from edge.stats import EdgeStats

CH = "quotes.MNQ"
KEYS = Keys("t")


class FakeSession:
    codec = Codec.JSON

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.failed: Disconnect | None = None

    def enqueue(self, frame: Frame) -> None:
        self.frames.append(frame)

    def resynced(self, sub: Subscription, frame: Frame) -> None:
        self.frames.append(frame)

    def deliver(self, sub: Subscription, batch: Batch, start: int) -> None:
        self.frames += [pub.frame(self.codec) for pub in batch.pubs[start:]]

    def flush_out(self) -> None:
        """Nothing is held back: `deliver` keeps every frame at once."""

    def fail(self, exc: Disconnect) -> None:
        self.failed = exc

    def offsets(self) -> list[int]:
        import json

        return [json.loads(f)["offset"] for f in self.frames if '"type":"pub"' in str(f)]


def live(hub: Hub, epoch: str, offset: int) -> None:
    hub._on_live(CH, f"{epoch}\n{offset}\n0\n\n\n{{\"o\":{offset}}}")  # no receive time


def history(epoch: str, top: int, first: int, since: int) -> HistoryResult:
    ok = since >= 0 and first - 1 <= since <= top
    entries = [Publication(CH, epoch, o, "", f'{{"o":{o}}}') for o in range(since + 1, top + 1)]
    return HistoryResult(epoch, top, first, ok, entries if ok else [], {"": '{"o":0}'})


def make_hub(reader: Callable[[Hub, int], Awaitable[HistoryResult]]) -> Hub:
    hub = Hub(Redis(), lambda: None, KEYS, EdgeStats(), logging.getLogger("t"),  # type: ignore[arg-type,return-value]
              node_id="n")

    async def read_history(
        name: str, since: int, snapshot: str, epoch: str = "", until: int | None = None
    ) -> HistoryResult:
        return await reader(hub, since)

    hub.read_history = read_history  # type: ignore[method-assign]
    return hub


async def confirmed(hub: Hub) -> None:
    while CH not in hub.channels:
        await asyncio.sleep(0)
    hub._on_confirmed(CH)


async def test_live_messages_during_history_read_are_merged_once() -> None:
    async def reader(hub: Hub, since: int) -> HistoryResult:
        # While the history is read, offsets 5..8 arrive live; history was read at top=6.
        for o in (5, 6, 7, 8):
            live(hub, "e", o)
        return history("e", 6, 1, since)

    hub = make_hub(reader)
    s = FakeSession()
    task = asyncio.create_task(
        hub.subscribe(s, parse_channel(CH), Position(2, "e"), False, 1)
    )
    await confirmed(hub)
    _, joined = await task
    assert joined.reply["recovered"] is True
    assert [p.offset for p in joined.replay] == [3, 4, 5, 6, 7, 8]
    for o in (7, 8, 9):  # 7 and 8 again (pub/sub lagging behind history), then 9
        live(hub, "e", o)
    await asyncio.sleep(0)  # delivered in one batch at the end of the loop's turn
    assert s.offsets() == [9]
    assert s.failed is None


async def test_gap_in_live_flow_is_filled_from_history() -> None:
    reads: list[int] = []

    async def reader(hub: Hub, since: int) -> HistoryResult:
        reads.append(since)
        return history("e", 10 if since >= 0 else 3, 1, since)

    hub = make_hub(reader)
    s = FakeSession()
    task = asyncio.create_task(hub.subscribe(s, parse_channel(CH), None, False, 1))
    await confirmed(hub)
    _, joined = await task
    assert joined.reply["offset"] == 3 and joined.replay == []
    live(hub, "e", 4)
    live(hub, "e", 8)  # 5..7 were lost on the way: fill from history (up to 10)
    live(hub, "e", 11)  # arrives during the fill: held back, released after
    while hub.channels[CH].repair is not None:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert reads == [-1, 4]
    assert s.offsets() == [4, 5, 6, 7, 8, 9, 10, 11]


async def test_new_epoch_resyncs_subscribers() -> None:
    async def reader(hub: Hub, since: int) -> HistoryResult:
        if hub.channels[CH].active:
            return history("f", 2, 1, since)
        return history("e", 3, 1, since)

    hub = make_hub(reader)
    s = FakeSession()
    task = asyncio.create_task(hub.subscribe(s, parse_channel(CH), None, False, 1))
    await confirmed(hub)
    await task
    live(hub, "f", 3)  # the stream was recreated: epoch f
    while hub.channels[CH].repair is not None:
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    resyncs = [f for f in s.frames if '"type":"resync"' in str(f)]
    assert len(resyncs) == 1 and '"epoch":"f"' in str(resyncs[0])
    assert s.offsets() == [3]  # offset 3 of epoch f follows the resync at 2


async def test_unfillable_gap_resyncs() -> None:
    async def reader(hub: Hub, since: int) -> HistoryResult:
        return history("e", 3 if not hub.channels[CH].active else 50, 40, since)

    hub = make_hub(reader)
    s = FakeSession()
    task = asyncio.create_task(hub.subscribe(s, parse_channel(CH), None, False, 1))
    await confirmed(hub)
    await task
    live(hub, "e", 45)  # 4..44: history only holds 40..50
    while hub.channels[CH].repair is not None:
        await asyncio.sleep(0)
    assert any('"type":"resync"' in str(f) for f in s.frames)
    live(hub, "e", 51)
    await asyncio.sleep(0)
    assert s.offsets() == [51]
