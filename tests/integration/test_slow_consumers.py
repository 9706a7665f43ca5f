"""Slow consumers against a real edge process: a client that stops reading must neither
grow the edge's memory without bound nor delay anyone else, and ends as its namespace's
policy says (disconnected, conflated, or told exactly what it missed)."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from fanout.embedded import free_port
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import RedisServer
from tests.support.edgeproc import EdgeProcess
from tests.support.edgeproc import edge_process as edge_process_
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

# Not a time limit on what is tested: how long to wait for a condition before calling it
# never (a machine under load only makes the wait longer).
DEADLINE = 60.0


@dataclass
class EdgeGauges:
    """What the edge itself reports (its real /metrics) about its clients."""

    connections: int
    queue_bytes: int  # in every client's send queue together
    disconnects: dict[str, int]  # by reason

    @classmethod
    def parse(cls, text: str) -> EdgeGauges:
        def samples(name: str) -> dict[str, float]:
            found: dict[str, float] = {}
            for line in text.splitlines():
                if line.startswith((name + " ", name + "{")):
                    sample, _, value = line.rpartition(" ")
                    found[sample[len(name):]] = float(value)
            return found

        reasons = {
            labels.removeprefix('{reason="').removesuffix('"}'): int(n)
            for labels, n in samples("fanout_edge_disconnects_total").items()
        }
        return cls(
            connections=int(samples("fanout_edge_connections")[""]),
            queue_bytes=int(samples("fanout_edge_queue_bytes")[""]),
            disconnects={reason: n for reason, n in reasons.items() if n},
        )


async def gauges(edge: EdgeProcess) -> EdgeGauges:
    return EdgeGauges.parse(await edge.metrics())


@pytest.fixture
async def edge_process(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[EdgeProcess]:
    async with edge_process_(
        redis_server.url, key_prefix, pin=True, FANOUT_LOG_LEVEL="warning",
        # No application pings: a frozen client cannot answer one, and would be closed
        # for no_pong (5 s after a ping 2.5-5 s in) instead of by its queue's policy
        # whenever the machine is slow enough for a test to last that long.
        FANOUT_PING_INTERVAL="86400",
        # Hundreds of clients from 127.0.0.1: no per-address limit.
        FANOUT_MAX_CONNECTIONS_PER_IP="0",
    ) as edge:
        yield edge


async def frozen_client(url: str) -> ProtoClient:
    """A client whose socket has a tiny receive buffer, for `freeze()` to stop reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    host, port = url.split("//")[1].split("/")[0].split(":")
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    return await ProtoClient.open(url, sock=sock)


def freeze(client: ProtoClient) -> None:
    client.ws.transport.pause_reading()


def thaw(client: ProtoClient) -> None:
    client.ws.transport.resume_reading()


PAD = "x" * 2000  # big messages fill the kernel's socket buffers in a few thousand

QUEUE_MAX_BYTES = 1024 * 1024  # the edge's default queue_max_bytes (common/config.py)
ROUND_BIG = 50  # big messages per round on the frozen client's channel: ~100 KiB
ROUND_SMALL = 10  # small messages per round on the readers' channel
# The frozen client's queue holds this much: its socket and its transport are full (with
# direct writes the edge queues for a client only while its transport is paused).
STUCK = 256 * 1024
MAX_ROUNDS = 300  # ~30 MB for the frozen client: it must have been closed long before


async def caught_up(clients: list[ProtoClient], channel: str, offset: int, what: str) -> None:
    """Until every client got `channel` up to `offset`; fails with `what` after DEADLINE."""

    def done(c: ProtoClient) -> bool:
        got = c.offsets.get(channel)
        return got is not None and bool(got) and got[-1] >= offset

    try:
        async with asyncio.timeout(DEADLINE):
            for c in clients:
                await c.wait_for(functools.partial(done, c), DEADLINE)
    except TimeoutError:
        late = sum(not done(c) for c in clients)
        pytest.fail(f"{late} of {len(clients)} clients did not get {channel} up to {offset} "
                    f"within {DEADLINE:g} s: {what}")


def got_everything(client: ProtoClient, channel: str, last: int) -> bool:
    """Every offset 1..last of `channel` once, in order, nothing dropped or resynced."""
    return client.offsets[channel] == list(range(1, last + 1)) and not any(
        m.get("type") in ("gap", "resync") for m in client.messages
    )


async def test_frozen_client_does_not_delay_others(
    edge_process: EdgeProcess, publisher: Publisher
) -> None:
    """A client that stops reading delays nobody: the others, on its own channel (sharing its
    batches) and on another one, get every message published while its socket, transport and
    queue are full, before the edge closes it; its queue's bound closes it (3001), and the
    edge's memory stays bounded. No clock: each step waits for a condition (DEADLINE is only
    how long to wait for it), and the checks are on the order of events, the clients'
    offsets and the edge's own gauges, none of which a loaded machine changes. (Latency
    with and without frozen clients: `bench/delivery.py --frozen`.)"""
    tag = os.urandom(3).hex()
    big, small = f"account.{tag}.orders", f"trades.F{tag}"  # policies: disconnect, drop
    frozen = await frozen_client(edge_process.url)
    await frozen.subscribe(big)
    freeze(frozen)
    neighbours = [await ProtoClient.open(edge_process.url) for _ in range(3)]
    for c in neighbours:
        await c.subscribe(big)
    readers = [await ProtoClient.open(edge_process.url) for _ in range(200)]
    for c in readers:
        await c.subscribe(small)
    clients = 1 + len(neighbours) + len(readers)
    start = await gauges(edge_process)
    assert (start.connections, start.queue_bytes, start.disconnects) == (clients, 0, {})
    rss_before = edge_process.rss_kib()

    last = {big: 0, small: 0}
    queued = 0  # the frozen client's queue, as of the end of the previous round
    peak = 0
    stuck_rounds = 0
    end = start
    for n in range(MAX_ROUNDS):
        stuck = queued >= STUCK
        messages = []
        for i in range(ROUND_SMALL):
            messages.append(UpstreamMessage(small, {"round": n, "i": i}))
            messages += [UpstreamMessage(big, {"pad": PAD})] * (ROUND_BIG // ROUND_SMALL)
        results = await publisher.publish_batch(messages)
        for message, result in zip(messages, results, strict=True):
            last[message.channel] = result.offset
        what = (f"round {n}, the frozen client's queue holding {queued} bytes before it: the "
                "frozen client holds the others back")
        await caught_up(neighbours, big, last[big], what)
        await caught_up(readers, small, last[small], what)
        end = await gauges(edge_process)
        if end.disconnects:
            break
        # The others got everything, so what the edge holds is the frozen client's: bounded.
        assert end.connections == clients
        assert end.queue_bytes <= QUEUE_MAX_BYTES
        queued = end.queue_bytes
        peak = max(peak, queued)
        if stuck and queued >= STUCK:
            # Published while the frozen client was stuck, received by every other client
            # while it still was (still connected, its queue not yet cleared).
            stuck_rounds += 1
    else:
        pytest.fail(f"{MAX_ROUNDS} rounds and the frozen client is still connected "
                    f"(queue {queued} bytes): its queue is not bounded")
    # At once: the edge lets a close frame wait CLOSE_TIMEOUT (10 s) for a full socket. The
    # frozen client reads what its socket held, then the close frame (checked below).
    thaw(frozen)

    # From STUCK to the bound there is room for ~7 rounds: the others got several rounds
    # in full while the frozen client's queue was past STUCK, before it was closed.
    assert stuck_rounds >= 3, (stuck_rounds, peak)
    assert peak >= QUEUE_MAX_BYTES // 2  # it did fill its queue towards the bound
    # Closed by its queue's bound (the overflow policy), not by a timeout nor anything else;
    # nobody else closed, nothing left queued for anyone.
    assert end.disconnects == {"slow_consumer": 1}
    assert (end.connections, end.queue_bytes) == (clients - 1, 0)
    for c in neighbours:
        assert got_everything(c, big, last[big])
        assert not c.closed.done()
    for c in readers:
        assert got_everything(c, small, last[small])
        assert not c.closed.done()
    rss_after = edge_process.rss_kib()
    print(f"{n + 1} rounds, {stuck_rounds} delivered to the others while the frozen client's "
          f"queue held >= {STUCK} bytes (peak {peak}); rss {rss_before} -> {rss_after} KiB")
    # Bounded: the frozen client's queue (1 MiB) and socket buffers, not the MBs published.
    assert rss_after - rss_before < 16 * 1024

    code, reason = await asyncio.wait_for(frozen.closed, DEADLINE)
    assert code == 3001  # slow consumer: reconnect and recover
    assert reason.endswith("retry_after_ms=1000")  # ... after at least a second
    assert frozen.offsets[big] == list(range(1, len(frozen.offsets[big]) + 1))
    for c in neighbours + readers:
        await c.close()


async def test_conflating_client_ends_with_latest_values(
    edge_process: EdgeProcess, publisher: Publisher
) -> None:
    symbols = [f"C{os.urandom(2).hex()}{i}" for i in range(5)]
    slow = await frozen_client(edge_process.url)
    for s in symbols:
        await slow.subscribe(f"quotes.{s}")
    freeze(slow)
    expected: dict[str, dict[str, Any]] = {s: {} for s in symbols}
    last: dict[str, int] = {}
    for i in range(4000):
        s = symbols[i % 5]
        update: dict[str, Any] = {"pad": PAD}
        update["bid" if i % 3 else "ask"] = i  # partial updates, as the gateway sends
        if i % 7 == 0:
            update["last"] = i
        expected[s].update(update)
        results = await publisher.publish_batch([UpstreamMessage(f"quotes.{s}", update)])
        last[s] = results[0].offset
    thaw(slow)
    await slow.wait_for(
        lambda: all(slow.positions[f"quotes.{s}"][0] == last[s] for s in symbols), 30
    )
    state: dict[str, dict[str, Any]] = {s: {} for s in symbols}
    received = 0
    for m in slow.messages:
        if m.get("type") == "pub":
            state[m["channel"].split(".", 1)[1]].update(m["data"])
            received += 1
    assert state == expected
    assert received < 4000  # some were conflated
    for s in symbols:  # offsets only go up
        offsets = slow.offsets[f"quotes.{s}"]
        assert offsets == sorted(set(offsets))
    assert 'fanout_edge_messages_conflated_total{namespace="quotes"}' in (
        await edge_process.metrics()
    )
    await slow.close()


async def test_dropping_client_is_told_exactly_what_it_missed(
    edge_process: EdgeProcess, publisher: Publisher
) -> None:
    channel = f"trades.D{os.urandom(3).hex()}"  # policy: drop
    slow = await frozen_client(edge_process.url)
    reply = await slow.subscribe(channel)
    assert reply["delivery"] == "drop"
    freeze(slow)
    total = 0
    for _ in range(60):
        results = await publisher.publish_batch(
            [UpstreamMessage(channel, {"pad": PAD}) for _ in range(100)]
        )
        total = results[-1].offset
    thaw(slow)

    await slow.wait_for(lambda: len(slow.covered(channel)) >= total, 30)
    gaps = [m for m in slow.messages if m.get("type") == "gap"]
    assert gaps, "nothing was dropped: the test did not make the client slow"
    assert sorted(slow.covered(channel)) == list(range(1, total + 1))  # each offset exactly once
    # The client can backfill what it missed.
    g = gaps[0]
    epoch = slow.positions[channel][1]
    hist = await slow.request({"type": "history", "channel": channel, "epoch": epoch,
                               "from": g["from"], "to": min(g["to"], g["from"] + 9)})
    assert hist["type"] == "history"
    assert [p["offset"] for p in hist["publications"]] == list(
        range(g["from"], min(g["to"], g["from"] + 9) + 1)
    )
    assert 'fanout_edge_messages_dropped_total{namespace="trades"}' in (
        await edge_process.metrics()
    )
    await slow.close()


async def test_server_that_stops_pinging_is_detected(
    redis_server: RedisServer, key_prefix: str,
) -> None:
    port = free_port()
    env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix,
           "FANOUT_PING_INTERVAL": "0.5", "FANOUT_PONG_TIMEOUT": "0.3"}
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "edge", "--port", str(port)],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        async with asyncio.timeout(20):
            while True:
                try:
                    client = await ProtoClient.open(f"ws://127.0.0.1:{port}/ws")
                    break
                except OSError:
                    await asyncio.sleep(0.05)
        hello = next(m for m in client.messages if m["type"] == "connected")
        await client.wait_for(lambda: any(m["type"] == "ping" for m in client.messages), 5)
        proc.send_signal(19)  # SIGSTOP: the server goes silent, the TCP connection stays up
        stopped_at = time.monotonic()
        dead_after = await client.watch_heartbeat(hello["ping_interval"], hello["pong_timeout"])
        assert dead_after - stopped_at <= hello["ping_interval"] + hello["pong_timeout"] + 0.5
        await client.close()
    finally:
        proc.send_signal(18)  # SIGCONT, so that it can terminate
        proc.terminate()
        proc.wait(10)
