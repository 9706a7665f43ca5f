"""Floods against a real edge process: 1,000 connections from one address past the per-IP
limit, and 1,000 half-open TCP connections past the handshake deadline. Meanwhile a
bystander, subscribed to a channel that is published to every 20 ms, must get every message.

Addresses: Linux routes all of 127.0.0.0/8 to loopback, so the flood comes from 127.0.0.2
or 127.0.0.3 and the bystander from 127.0.0.1. Run with -s to see the measurements."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from fanout.embedded import free_port, stop_process
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import RedisServer
from tests.support.httpwait import metric, wait_http_ok
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

FLOOD = 1000


def raise_descriptor_limit(need: int) -> None:
    """This process holds the flood's sockets (the edge, its child, inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the descriptor limit (hard {hard}) is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


EdgeStarter = Callable[..., Awaitable[tuple[int, int]]]


@pytest.fixture
async def edge_process(redis_server: RedisServer, key_prefix: str) -> AsyncIterator[EdgeStarter]:
    """`await start(FANOUT_MAX_CONNECTIONS="5")`: a `fanout edge` process; its port and pid."""
    procs: list[subprocess.Popen[bytes]] = []

    async def start(**settings: str) -> tuple[int, int]:
        raise_descriptor_limit(4 * FLOOD)
        port = free_port()
        env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url,
               "FANOUT_KEY_PREFIX": key_prefix, "FANOUT_LOG_LEVEL": "warning",
               "FANOUT_DRAIN_SECONDS": "0", **settings}
        proc = subprocess.Popen(
            [sys.executable, "-m", "fanout", "edge", "--port", str(port)], env=env)
        procs.append(proc)
        async with httpx.AsyncClient(timeout=2, trust_env=False) as http:
            await wait_http_ok(http, f"http://127.0.0.1:{port}/readyz", proc=proc)
        return port, proc.pid

    yield start
    for proc in procs:
        stop_process(proc)


class Bystander:
    """A client from 127.0.0.1 on `channel`, published to every `every` s throughout."""

    def __init__(self, publisher: Publisher, channel: str, every: float = 0.02) -> None:
        self.publisher = publisher
        self.channel = channel
        self.every = every
        self.last = 0  # the last offset published
        self.arrivals: list[float] = []
        self._stop = asyncio.Event()

    async def start(self, port: int) -> None:
        self.client = await ProtoClient.open(f"ws://127.0.0.1:{port}/ws")
        assert (await self.client.subscribe(self.channel))["type"] == "subscribed"
        self._tasks = [asyncio.create_task(self._publish()), asyncio.create_task(self._watch())]
        await self.client.wait_for(lambda: len(self.client.offsets[self.channel]) >= 5)

    async def _publish(self) -> None:
        i = 0
        while not self._stop.is_set():
            i += 1
            result = await self.publisher.publish(UpstreamMessage(self.channel, {"bid": i}))
            self.last = result.offset
            await asyncio.sleep(self.every)

    def _more_than(self, seen: int) -> bool:
        return len(self.client.offsets[self.channel]) > seen

    async def _watch(self) -> None:
        """When messages arrive (to find the longest silence)."""
        while True:
            seen = len(self.client.offsets[self.channel])
            await self.client.wait_for(functools.partial(self._more_than, seen), 60)
            self.arrivals.append(time.monotonic())

    def longest_silence(self, since: float, until: float = math.inf) -> float:
        times = [t for t in self.arrivals if since <= t <= until]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def quiet_silence(self, messages: int = 60) -> float:
        """The longest silence over the next `messages` without a flood: the baseline of
        this machine (its other load, the publisher's and the bystander's own turns)."""
        started = time.monotonic()
        target = len(self.client.offsets[self.channel]) + messages
        await self.client.wait_for(lambda: len(self.client.offsets[self.channel]) >= target, 30)
        return self.longest_silence(started)

    async def check(self) -> int:
        """Stop publishing; every offset must have arrived, in order, on the one connection."""
        self._stop.set()
        await self._tasks[0]
        await self.client.wait_for(
            lambda: self.client.offsets[self.channel][-1:] == [self.last], 10)
        offsets = self.client.offsets[self.channel]
        assert offsets == list(range(offsets[0], self.last + 1))
        assert not self.client.closed.done()
        self._tasks[1].cancel()
        await self.client.close()
        return len(offsets)


def refusals(reason: str) -> str:
    return f'fanout_edge_connections_refused_total{{reason="{reason}"}}'


class FloodClient:
    """tests/support/flood_client.py in a process of its own, from `source` (an address of
    127.0.0.0/8): the flood's client work does not take the GIL from the bystander."""

    def __init__(self, mode: str, port: int, source: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.flood_client", mode, str(port), str(FLOOD),
             source],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def _line(self, timeout: float) -> bytes:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout)
        assert line, "the flood client exited early"
        return line

    def _say(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    async def go(self) -> None:
        """Once it has started up: flood now."""
        assert await self._line(60) == b"ready\n"
        self._say(b"go\n")

    async def result(self, timeout: float = 60.0) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(await self._line(timeout))
        return result

    def finish(self) -> None:
        """Let it close what it holds and exit."""
        with contextlib.suppress(OSError):
            self._say(b"done\n")
        try:
            self.proc.wait(30)
        finally:
            stop_process(self.proc)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_thousand_connections_from_one_address_past_its_limit(
    edge_process: EdgeStarter, publisher: Publisher
) -> None:
    limit = 20
    port, pid = await edge_process(FANOUT_MAX_CONNECTIONS_PER_IP=str(limit),
                                   FANOUT_CONNECT_TIMEOUT="120")
    base = f"http://127.0.0.1:{port}"
    bystander = Bystander(publisher, "quotes.FLOODIP")
    await bystander.start(port)

    flood = FloodClient("handshakes", port, "127.0.0.2")
    try:
        quiet = await bystander.quiet_silence()
        started, cpu = time.monotonic(), cpu_seconds(pid)
        await flood.go()
        result = await flood.result()
        cpu = cpu_seconds(pid) - cpu
        took = result["took"]
        answers = [(status, after) for status, after in result["answers"]]
        refused = await metric(base, refusals("ip_limit"))
        open_ = await metric(base, "fanout_edge_connections")  # the admitted ones held
    finally:
        flood.finish()
    statuses = collections.Counter(status for status, _ in answers)
    assert statuses == {101: limit, 503: FLOOD - limit}
    retry = [int(after) for status, after in answers if status == 503]
    assert min(retry) >= 5 and max(retry) <= 10 and len(set(retry)) > 1  # jittered
    assert refused == FLOOD - limit
    assert open_ == limit + 1  # the bystander and the admitted ones
    newcomer = await ProtoClient.open(f"ws://127.0.0.1:{port}/ws")  # another address: in
    assert (await newcomer.subscribe("quotes.FLOODIP"))["type"] == "subscribed"
    await newcomer.close()
    silence = bystander.longest_silence(started)
    received = await bystander.check()
    print(f"\n{FLOOD} handshakes from one address in {took:.2f} s: {dict(statuses)}; "
          f"Retry-After {min(retry)}-{max(retry)} s; edge CPU {cpu:.2f} s; bystander got all "
          f"{received} messages, longest silence {silence * 1000:.0f} ms (without a flood: "
          f"{quiet * 1000:.0f} ms; publishing every 20 ms)")


async def test_a_thousand_half_open_connections_are_closed_at_the_handshake_deadline(
    edge_process: EdgeStarter, publisher: Publisher
) -> None:
    deadline = 2.0
    port, pid = await edge_process(FANOUT_HANDSHAKE_TIMEOUT=str(deadline))
    base = f"http://127.0.0.1:{port}"
    bystander = Bystander(publisher, "quotes.FLOODHALF")
    await bystander.start(port)

    flood = FloodClient("half-open", port, "127.0.0.3")
    try:
        quiet = await bystander.quiet_silence()
        started, cpu = time.monotonic(), cpu_seconds(pid)
        await flood.go()
        result = await flood.result(timeout=deadline + 60)  # generous: a loaded machine
    finally:
        flood.finish()
    all_closed = time.monotonic() - started
    cpu = cpu_seconds(pid) - cpu
    lived = sorted(result["lived"])
    assert len(lived) == FLOOD
    assert result["answered"] == 0  # closed without an answer
    assert lived[0] >= deadline, lived[0]  # not before the deadline
    assert lived[-1] <= deadline + 10, lived[-1]
    assert await metric(base, refusals("handshake_timeout")) == FLOOD
    silence = bystander.longest_silence(started)
    received = await bystander.check()
    print(f"\n{FLOOD} half-open connections (deadline {deadline} s): each closed after "
          f"{lived[0]:.2f}-{lived[-1]:.2f} s (median {lived[len(lived) // 2]:.2f}), all "
          f"{all_closed:.2f} s after the flood process started; edge CPU {cpu:.2f} s; "
          f"bystander got all {received} messages, longest silence {silence * 1000:.0f} ms "
          f"(without a flood: {quiet * 1000:.0f} ms; publishing every 20 ms)")
