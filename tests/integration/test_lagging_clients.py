"""Clients that read, but slowly, against a real edge process: a client seconds behind
with its backlog in the kernel's socket buffers (not in the edge's queue) gets its
namespace's overflow policy (drop with `gap`, conflate, close 3001), never 3003 (no pong)
as if it were dead, and a fast client of the same channel is not held back
(edge/heartbeat.py, edge/tcpinfo.py, docs/architecture.md "Slow consumers").

How the slow client gets behind, whatever the machine's load: a burst of BURST bytes at
once, which it reads at most READ_RATE bytes/s (a 4 KiB receive buffer, 4 KiB every 20 ms;
a loaded machine only makes it slower), so it is at least BURST / READ_RATE = 5 s behind,
more than PONG_TIMEOUT: its pings wait that long behind the burst. Publishing then goes on
at a modest rate until the outcome shows. Every wait is for a condition; DEADLINE is only
how long to wait before calling it never.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import RedisServer
from tests.support.edgeproc import EdgeProcess, edge_process
from tests.support.slow_reader import SlowReader
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

DEADLINE = 60.0
PONG_TIMEOUT = 2.0
MAX_LAG = 0.5
PAD = "x" * 2000
BURST = 500  # messages of ~2 KB: ~1 MB at once
CHUNK, PERIOD = 4096, 0.02
READ_RATE = CHUNK / PERIOD  # bytes/s at most: the burst takes the slow client >= 5 s
ROUND = 2  # messages per 50 ms after the burst: ~80 KB/s


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples in /metrics text."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rpartition(" ")[2])
    return total


def disconnects(text: str) -> dict[str, int]:
    found: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("fanout_edge_disconnects_total{"):
            labels, _, value = line.rpartition(" ")
            if float(value):
                found[labels.split('"')[1]] = int(float(value))
    return found


UNSENT_LIMITS = pytest.mark.parametrize("edge", [16384, 0], indirect=True,
                                        ids=["unsent-limit", "kernel-buffers"])


@pytest.fixture
async def edge(request: pytest.FixtureRequest, redis_server: RedisServer, key_prefix: str
               ) -> AsyncIterator[EdgeProcess]:
    """An edge with short heartbeats and lag bound; its queue bounds far above anything
    here, so that only the lag can make a client a slow consumer. Its socket unsent limit
    is the parameter, if any, else the default 16 KiB; with 0 (`kernel-buffers`) a socket
    takes all it will: the burst sits in the edge's kernel send buffer and its queue stays
    empty, as in the field report."""
    limit = getattr(request, "param", 16384)
    async with edge_process(
        redis_server.url, key_prefix, FANOUT_LOG_LEVEL="warning",
        FANOUT_PING_INTERVAL="1", FANOUT_PONG_TIMEOUT=str(PONG_TIMEOUT),
        FANOUT_MAX_LAG=str(MAX_LAG), FANOUT_SOCKET_UNSENT_LIMIT=str(limit),
        FANOUT_QUEUE_MAX_BYTES=str(64 * 1024 * 1024), FANOUT_QUEUE_MAX_MESSAGES="1000000",
        FANOUT_MAX_CONNECTIONS_PER_IP="0",
    ) as e:
        yield e


async def publish_until(publisher: Publisher, messages: Callable[[int], list[UpstreamMessage]],
                        done: Callable[[], bool], what: str) -> dict[str, int]:
    """Rounds of `messages(n)` every 50 ms (a rate, not a wait) until `done()`; the last
    offset published per channel."""
    last: dict[str, int] = {}
    deadline = time.monotonic() + DEADLINE
    n = 0
    while not done():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE:g} s: {what}")
        batch = messages(n)
        for m, r in zip(batch, await publisher.publish_batch(batch), strict=True):
            last[m.channel] = r.offset
        n += 1
        await asyncio.sleep(0.05)
    return last


def burst(channel: str) -> list[UpstreamMessage]:
    return [UpstreamMessage(channel, {"t": time.monotonic(), "pad": PAD}) for _ in range(BURST)]


async def clients(edge: EdgeProcess, *channels: str) -> tuple[SlowReader, ProtoClient]:
    slow = await SlowReader.open(edge.url, chunk=CHUNK, period=PERIOD)
    fast = await ProtoClient.open(edge.url)
    await slow.request({"type": "connect"}, "connected")
    for i, ch in enumerate(channels, 1):
        reply = await slow.request({"type": "subscribe", "channel": ch, "id": i}, "subscribed")
        assert reply["channel"] == ch
        await fast.subscribe(ch)
    return slow, fast


def everything(client: ProtoClient, channel: str, last: int) -> bool:
    return client.offsets.get(channel) == list(range(1, last + 1)) and not any(
        m.get("type") in ("gap", "resync") for m in client.messages)


@UNSENT_LIMITS
async def test_dropping_client_behind_gets_gaps_and_stays(
    edge: EdgeProcess, publisher: Publisher
) -> None:
    channel = f"trades.L{os.urandom(3).hex()}"  # policy: drop
    slow, fast = await clients(edge, channel)
    await publisher.publish_batch(burst(channel))

    def gap_then_live() -> bool:
        """A gap notice, and live publications after it: behind, dropped, caught up."""
        kinds = [(m.get("type"), m.get("offset", 0)) for m in slow.messages]
        gaps = [i for i, (k, _) in enumerate(kinds) if k == "gap"]
        return bool(gaps) and any(k == "pub" for k, _ in kinds[gaps[0]:])

    last = await publish_until(
        publisher, lambda n: [UpstreamMessage(channel, {"t": time.monotonic(), "pad": PAD})
                              for _ in range(ROUND)],
        gap_then_live, "the slow client never got a gap notice followed by live messages")
    slow.period = 0  # it reads at full speed now: everything else arrives at once
    total = last[channel]
    await slow.wait_for(lambda: len(slow.covered(channel)) >= total, DEADLINE)
    await fast.wait_for(lambda: everything(fast, channel, total), DEADLINE)

    assert sorted(slow.covered(channel)) == list(range(1, total + 1))  # each offset once
    assert slow.lag > PONG_TIMEOUT, slow.lag  # so far behind that its pongs were late
    assert slow.pongs >= 1
    assert not slow.closed.done() and not fast.closed.done()
    text = await edge.metrics()
    assert disconnects(text) == {}  # neither 3003 nor anything else
    assert metric(text, "fanout_edge_clients_behind_total") >= 1
    assert metric(text, "fanout_edge_messages_dropped_total") > 0
    print(f"slow client: {slow.lag:.1f} s behind at most, {len(slow.offsets[channel])} of "
          f"{total} received, {sum(m.get('type') == 'gap' for m in slow.messages)} gap notices")
    await slow.close()
    await fast.close()


async def test_conflating_client_behind_gets_latest_values(
    edge: EdgeProcess, publisher: Publisher
) -> None:
    """The burst that used to sit in the kernel's buffers (a conflating client 5 s behind)
    now stops at the socket's unsent limit: the rest waits in the client's queue, where
    each channel's updates are merged into its latest value. So the client never falls far
    behind at all (its lag is printed; not checked, as it depends on the machine's load)."""
    symbols = [f"L{os.urandom(2).hex()}{i}" for i in range(5)]
    channels = [f"quotes.{s}" for s in symbols]  # policy: conflate, merge mode
    slow, fast = await clients(edge, *channels)
    expected: dict[str, dict[str, Any]] = {ch: {} for ch in channels}
    published = 0

    def updates(n: int, count: int) -> list[UpstreamMessage]:
        """`count` partial updates, round robin over the channels, as the gateway sends."""
        nonlocal published
        out = []
        for i in range(published, published + count):
            ch = channels[i % len(channels)]
            update: dict[str, Any] = {"t": time.monotonic(), "pad": PAD,
                                      ("bid" if i % 3 else "ask"): i}
            if i % 7 == 0:
                update["last"] = i
            expected[ch].update(update)
            out.append(UpstreamMessage(ch, update))
        published += count
        return out

    first = updates(0, BURST)
    burst_last: dict[str, int] = {}
    for m, r in zip(first, await publisher.publish_batch(first), strict=True):
        burst_last[m.channel] = r.offset

    def past_burst() -> bool:
        """The slow client got something published after the burst: it caught up once."""
        return any(slow.offsets.get(ch, [0])[-1] > burst_last[ch] for ch in channels)

    last = await publish_until(publisher, lambda n: updates(n, ROUND), past_burst,
                               "the slow client never got past the burst")
    for ch in channels:
        last.setdefault(ch, burst_last[ch])
    slow.period = 0

    def slow_done() -> bool:
        return all(slow.offsets.get(ch, [0])[-1] == last[ch] for ch in channels)

    def fast_done() -> bool:
        return all(fast.offsets.get(ch, [0])[-1] == last[ch] for ch in channels)

    await slow.wait_for(slow_done, DEADLINE)
    # The fast one too ends with the latest value of every field. It may itself get some of
    # the burst merged: a whole channel's burst comes in one event-loop turn (publish.lua
    # publishes a channel's messages in one call), more than any socket takes at once, and
    # on a conflating channel what waits in a queue is merged, whoever's queue it is.
    await fast.wait_for(fast_done, DEADLINE)
    fast_data = {ch: [m["data"] for m in fast.messages
                      if m.get("type") == "pub" and m.get("channel") == ch] for ch in channels}
    for offsets, data in ((slow.offsets, slow.data), (fast.offsets, fast_data)):
        state: dict[str, dict[str, Any]] = {ch: {} for ch in channels}
        for ch in channels:
            for update in data[ch]:
                state[ch].update(update)
            assert offsets[ch] == sorted(set(offsets[ch]))  # offsets only go up
        assert state == expected  # the latest value of every field
    received = sum(len(v) for v in slow.offsets.values())
    assert received < published  # some were conflated
    assert not slow.closed.done() and not fast.closed.done()
    text = await edge.metrics()
    assert disconnects(text) == {}
    assert metric(text, "fanout_edge_messages_conflated_total") > 0
    print(f"slow client: {slow.lag:.1f} s behind at most, {received} of {published} received")
    await slow.close()
    await fast.close()


async def test_disconnect_client_behind_is_closed_3001(
    edge: EdgeProcess, publisher: Publisher
) -> None:
    channel = f"account.L{os.urandom(3).hex()}.orders"  # policy: disconnect
    slow, fast = await clients(edge, channel)
    await publisher.publish_batch(burst(channel))
    last = await publish_until(
        publisher, lambda n: [UpstreamMessage(channel, {"t": time.monotonic(), "pad": PAD})
                              for _ in range(ROUND)],
        slow.closed.done, "the slow client was never closed")
    code, reason = slow.closed.result()
    assert code == 3001, (code, reason)  # slow consumer, not 3003 (no pong)
    assert reason.endswith("retry_after_ms=1000")
    got = slow.offsets[channel]
    assert got == list(range(1, len(got) + 1))  # in order, nothing skipped before the close
    await fast.wait_for(lambda: everything(fast, channel, last[channel]), DEADLINE)
    assert not fast.closed.done()
    text = await edge.metrics()
    assert disconnects(text) == {"slow_consumer": 1}
    assert metric(text, "fanout_edge_clients_behind_total") >= 1
    await slow.close()
    await fast.close()
