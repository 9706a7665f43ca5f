"""Reconnect storm: N clients on two edges all drop at once and come back with `recover`.

Two edges (`python -m fanout edge` subprocesses) and an embedded Valkey; N WebSocket
clients, half on each edge, each subscribed to 20 channels: 16 of its own
(`account.<client>x<j>.<kind>`, 4 accounts x orders/positions/balance/trades) and 4 shared
(`quotes.STORM<k>`). This process's publisher keeps publishing (`--rate` messages/s, spread
over all the channels) the whole time. Then every client's TCP connection is aborted in the
same instant and each client reconnects at once, to a random edge, sending its 20 subscribes
with `recover` from the positions it had in one write, as the client packages do (the
browser and TCP coalesce them). Publications are read by a scan of the edge's frame layout
(channel, offset), not a JSON decode, so that the load client is not the bound. It
follows the edges' advice: an HTTP 503's Retry-After, an `unavailable` reply's
`retry_after_ms` (plus up to half again; without advice 1-5 s); connection failures back
off 0.1-1 s.

The clients (`--client`): `c` (the default) is bench/stormload.c, built on first use with
`cc -O2 -o <cache dir>/stormload bench/stormload.c` (like delivery.py's wsload), every
client in one epoll loop in a process of its own, driven over its stdin/stdout; `python`
is the BenchClient below, in this process beside the publisher (at 5,000 clients it spends
as much CPU as the edges: the bound, not the edges). Both have the same semantics (see the
top of stormload.c for the few paths where they differ).

Where things run (`--layout`): `shared` (the default) pins both edges to `--edge-cpu` and
the clients, this process and Valkey to `--bench-cpu`; `split` pins edge A to CPU 0 and
edge B to CPU 1 and leaves the C client, this process (the publisher) and Valkey unpinned:
they float over both CPUs, beside the edges.

Reported per row: **recovered s** (from the abort until the last client had all 20 channels
subscribed again), **p50 s** (median client), **recovered/resynced** subscribes, the edges'
CPU seconds during the storm, the clients' (**bench CPU s**: the C client's process; with
`--client python` this process, the publisher included: when it nears the storm's wall
time, the load client is the bound, not the edges), this process's (**publisher CPU s**:
the publisher and the metrics reads; with the Python clients it is in bench CPU s),
**history reads** (Redis history.lua calls, from Valkey's
INFO commandstats: EVALSHA calls minus the publisher's), deferred (`unavailable` replies
and 503s the clients got), **conn failures** (connections that failed before the upgrade's
answer, e.g. none within 30 s of the TCP connect: retried after 0.1-1 s) and what the
clients saw: after the storm the publisher stops and
every client must reach the last published offset of each of its channels with no offset
missed or repeated (**gaps**, **dups**; both must be 0; **behind**: with the C client the
(client, channel) pairs still behind after 60 s, with the Python client the channels of the
first client still behind). Offsets skipped on a channel whose
subscribe reply said `delivery` `conflate` or `drop` (the shipped `quotes` namespace
conflates for a client that falls behind, as an overloaded bench process does) are counted
apart (**conflated**): allowed by the protocol, not a gap. **gap notices**: `gap` messages
(the drop policy's notice; the C client counts them, the Python client ignores them: "-").
**msgs/frame**: messages the edges sent per WebSocket frame during the storm (their
`messages_sent` / `frames_sent`): a client that reads slowly gets more per frame, which
costs the edges less.

    .venv/bin/python bench/reconnect.py [--clients 1000,5000,10000] [--rate 2000]
    .venv/bin/python bench/reconnect.py --clients 10000 --rate 200 --layout split
    .venv/bin/python bench/reconnect.py --clients 1000 --client python  # the Python clients
    .venv/bin/python bench/reconnect.py --edge-source /tmp/base  # another checkout's edges

The machine is shared: absolute times are pessimistic; compare rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import re
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, NamedTuple

from _common import (
    HOST,
    EdgeProcess,
    bench_prefix,
    child_preexec,
    cpu_seconds,
    delete_prefix,
    environment,
    pin,
    progress,
    quit_child,
    redis_server,
    run_async,
    sigterm_as_interrupt,
    source_state,
    table,
    wait_ready,
)
from delivery import SetupError, build_c
from redis.asyncio import Redis
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage

KINDS = ("orders", "positions", "balance", "trades")
STORMLOAD_SRC = Path(__file__).resolve().parent / "stormload.c"
SHARED = [f"quotes.STORM{k}" for k in range(4)]


# A publication as the edge writes it (common/protocol.py pub_json): the channel (no quote
# in a channel name) and the offset, in this order, at the start of the object.
PUB = re.compile(rb'\{"type":"pub","channel":"([^"]*)","offset":(\d+)')


def _retrieved(task: asyncio.Future[None]) -> None:
    """A reconnect's end, taken so that asyncio does not log it; a cancelled one (the row
    ending) has none to take (its `exception()` would raise)."""
    if not task.cancelled():
        task.exception()


def own_channels(client: int) -> list[str]:
    return [f"account.c{client}x{j}.{kind}" for j in range(4) for kind in KINDS]


class Stats:
    def __init__(self) -> None:
        self.gaps = 0  # offsets skipped on a channel whose delivery is "all"
        self.conflated = 0  # skipped on a "conflate"/"drop" channel (a client behind: allowed)
        self.dups = 0
        self.recovered = 0
        self.resynced = 0
        self.deferred = 0  # unavailable replies
        self.refused = 0  # HTTP 503 (or another failed handshake)
        self.conn_failures = 0
        self.gap_notices = 0  # `gap` messages (the C client counts them; Python ignores them)
        self.disconnects = 0  # connections lost after their client was back (C client)
        self.errors: list[str] = []


class Client(asyncio.Protocol):
    """One WebSocket connection of a bench client (`Bench` reconnects it)."""

    def __init__(self, owner: BenchClient, uri: str) -> None:
        self.owner = owner
        self.proto = ClientProtocol(parse_uri(uri), subprotocols=[Subprotocol("fanout.json")],
                                    max_size=None)
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"lost: {exc!r}"))
        self.owner.lost(self)

    def _flush(self) -> None:
        assert self.transport is not None
        data = b"".join(self.proto.data_to_send())  # one system call, not one per frame
        if data:
            self.transport.write(data)

    def send(self, obj: dict[str, Any], flush: bool = True) -> None:
        """Send a request; `flush=False`: written with the next flush (a client's 20
        subscribes in one write, as a browser's would leave in one segment)."""
        if (self.closed or self.proto.state is not State.OPEN or self.transport is None
                or self.transport.is_closing()):
            return
        self.proto.send_text(json.dumps(obj, separators=(",", ":")).encode())
        if flush:
            self._flush()

    def flush(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.proto.receive_data(data)
        for event in self.proto.events_received():
            if not isinstance(event, Frame):
                continue  # the handshake's response
            if event.opcode is Opcode.TEXT:
                text = bytes(event.data)
                pubs = PUB.findall(text)
                if pubs and len(pubs) == text.count(b'"type":'):
                    # Only publications (most frames): channel and offset by a scan of
                    # the edge's fixed layout (common/protocol.py pub_json), no decode.
                    pub = self.owner.pub
                    for channel, offset in pubs:
                        pub(self, channel, int(offset))
                    continue
                obj = json.loads(text)
                for m in obj if isinstance(obj, list) else [obj]:
                    self.owner.message(self, m)
        if not self.opened.done():
            if self.proto.state is State.OPEN:
                self.opened.set_result(None)
            elif self.proto.handshake_exc is not None:
                self.opened.set_exception(self.proto.handshake_exc)
        self._flush()
        if self.proto.close_expected() and self.transport is not None:
            self.transport.close()


class BenchClient:
    """A client's positions across connections; subscribes with recover after each one."""

    def __init__(self, index: int, stats: Stats, rng: random.Random) -> None:
        self.index = index
        self.channels = SHARED + own_channels(index)
        self.stats = stats
        self.rng = rng
        self.positions: dict[str, tuple[int, str]] = {}
        self.live: set[str] = set()  # subscribed on the current connection
        self.lossy: set[str] = set()  # channels whose `delivery` may skip (docs/protocol.md)
        self.conn: Client | None = None
        self.ids = 0
        self.requests: dict[int, str] = {}
        self.done: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    def reset(self) -> None:
        self.live.clear()
        self.requests.clear()
        if self.done.done():  # not when dropped during its recovery: the storm waits on it
            self.done = asyncio.get_running_loop().create_future()

    async def connect(self, ports: list[int]) -> None:
        """Connect (retrying as advised) and subscribe every channel; `done` resolves with
        the moment the last one is subscribed."""
        loop = asyncio.get_running_loop()
        while not BenchClient.stopping:
            port = self.rng.choice(ports)
            uri = f"ws://{HOST}:{port}/ws"
            try:
                _, conn = await loop.create_connection(
                    functools.partial(Client, self, uri), HOST, port)
                self.conn = conn
                await asyncio.wait_for(conn.opened, 30)
            except InvalidStatus as exc:
                self.stats.refused += 1
                after = exc.response.headers.get("Retry-After", "1")
                delay = float(after) if after.isdigit() else 1.0
                await asyncio.sleep(delay + self.rng.uniform(0, delay / 2))
                continue
            except (OSError, TimeoutError):
                self.stats.conn_failures += 1
                await asyncio.sleep(self.rng.uniform(0.1, 1.0))
                continue
            conn.send({"type": "connect", "id": 0, "name": "storm"})
            return

    stopping = False  # the row is over: nobody reconnects

    def lost(self, conn: Client) -> None:
        if (conn is self.conn and not self.done.done() and self.live != set(self.channels)
                and not BenchClient.stopping):
            # Dropped during its recovery (not by us): try again.
            asyncio.get_running_loop().call_soon(self._again)

    def _again(self) -> None:
        self.reset()
        task = asyncio.ensure_future(self.connect(self.ports))
        task.add_done_callback(_retrieved)

    ports: list[int] = []

    def subscribe(self, channel: str, flush: bool = True) -> None:
        assert self.conn is not None
        self.ids += 1
        self.requests[self.ids] = channel
        req: dict[str, Any] = {"type": "subscribe", "id": self.ids, "channel": channel}
        pos = self.positions.get(channel)
        if pos is not None:
            req["recover"] = {"offset": pos[0], "epoch": pos[1]}
        self.conn.send(req, flush)

    def pub(self, conn: Client, channel: bytes | str, offset: int) -> None:
        """A publication: checked against the position (gap, duplicate) and taken."""
        if conn is not self.conn:
            return
        ch = channel.decode() if isinstance(channel, bytes) else channel
        pos = self.positions.get(ch)
        if pos is None or ch not in self.live:
            return
        if offset <= pos[0]:
            self.stats.dups += 1
            return
        if offset != pos[0] + 1:
            if ch in self.lossy:
                self.stats.conflated += offset - pos[0] - 1
            else:
                self.stats.gaps += offset - pos[0] - 1
        self.positions[ch] = (offset, pos[1])

    def message(self, conn: Client, m: dict[str, Any]) -> None:
        if conn is not self.conn:
            return
        kind = m.get("type")
        if kind == "pub":
            self.pub(conn, m["channel"], m["offset"])
        elif kind == "ping":
            conn.send({"type": "pong"})
        elif kind == "connected":
            for ch in self.channels:
                self.subscribe(ch, flush=False)
            conn.flush()
        elif kind == "subscribed":
            ch = self.requests.pop(m["id"])
            pos = self.positions.get(ch)
            if pos is not None and m.get("recovered") and pos[1] == m["epoch"]:
                self.stats.recovered += 1
            else:
                if pos is not None:
                    self.stats.resynced += 1
                self.positions[ch] = (m["offset"], m["epoch"])
            self.live.add(ch)
            if m.get("delivery", "all") == "all":
                self.lossy.discard(ch)
            else:
                self.lossy.add(ch)
            if len(self.live) == len(self.channels) and not self.done.done():
                self.done.set_result(time.monotonic())
        elif kind == "resync":
            ch = m["channel"]
            self.stats.resynced += 1
            self.positions[ch] = (m["offset"], m["epoch"])
        elif kind == "error":
            failed = self.requests.pop(m.get("id", -1), None)
            if failed is None or m.get("code") not in ("unavailable", "internal"):
                if len(self.stats.errors) < 5:
                    self.stats.errors.append(str(m))
                return
            self.stats.deferred += 1
            advised = m.get("retry_after_ms")
            if isinstance(advised, int) and advised > 0:
                delay = advised / 1000 * (1 + self.rng.random() / 2)
            else:
                delay = self.rng.uniform(1.0, 5.0)
            asyncio.get_running_loop().call_later(delay, self._retry, conn, failed)

    def _retry(self, conn: Client, channel: str) -> None:
        if conn is self.conn and not conn.closed:
            self.subscribe(channel)


async def commandstats(redis: Redis) -> dict[str, int]:
    info = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def redis_cpu(redis: Redis) -> float:
    """The Redis server's CPU seconds (INFO cpu: user + system, its main thread's included)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def edge_metric(edge: EdgeProcess, name: str) -> float | None:
    """A metric's total over its labels; None if the edge does not export it, or did not
    answer within 30 s (an edge swamped by the storm: a "-" in the row, not a lost row)."""
    from _common import http_get

    try:
        _, text = await asyncio.to_thread(http_get, edge.url("/metrics"), 30.0)
    except (OSError, TimeoutError) as exc:
        progress(f"/metrics of {edge.url('')}: {exc!r}")
        return None
    total = None
    for line in text.splitlines():
        if line.startswith(name):
            total = (total or 0.0) + float(line.split()[-1])
    return total


def delta(after: list[float | None], before: list[float | None]) -> object:
    """The edges' total change of a metric; "-" when the edges do not export it."""
    if None in after or None in before:
        return "-"
    return int(sum(a or 0 for a in after) - sum(b or 0 for b in before))


CONNECT_CONCURRENCY = 200  # clients between their first connect and their return at once
CHECK_WAIT = 60.0  # s for every client to reach the last published offsets


class StormResult(NamedTuple):
    back: int  # clients back (all 20 channels subscribed again)
    elapsed: float | None  # s from the abort to the last one back; None if not all were
    p50: float | None  # the median client's, s


class PythonLoad:
    """`--client python`: the BenchClients above, in this process (with the publisher)."""

    description = "python: the clients in this process (asyncio, websockets sans-I/O)"

    def __init__(self, n: int, ports: list[int], rng: random.Random) -> None:
        self.stats = Stats()
        self.ports = ports
        BenchClient.ports = ports
        BenchClient.stopping = False
        self.clients = [BenchClient(i, self.stats, rng) for i in range(n)]

    async def connect(self) -> None:
        sem = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def first(c: BenchClient, port: int) -> None:
            async with sem:
                await c.connect([port])
                await asyncio.wait_for(asyncio.shield(c.done), 120)

        await asyncio.gather(*(first(c, self.ports[c.index % 2]) for c in self.clients))

    def cpu(self) -> float:
        """The clients' CPU seconds so far: this process's (the publisher's included)."""
        return time.process_time()

    async def storm(self, timeout: float) -> StormResult:
        # The storm: every connection aborted at once, every client back at once.
        start = time.monotonic()
        for c in self.clients:
            conn = c.conn
            c.conn = None
            c.reset()
            if conn is not None:
                conn.abort()
        for c in self.clients:
            asyncio.ensure_future(c.connect(self.ports)).add_done_callback(_retrieved)
        pending = {c.done for c in self.clients}
        done_at: list[float] = []
        timed_out = False
        while pending:
            finished, pending = await asyncio.wait(pending, timeout=max(
                timeout - (time.monotonic() - start), 0.01))
            done_at += [f.result() - start for f in finished]
            if not finished:
                timed_out = True
                break
        return StormResult(len(done_at), max(done_at) if done_at and not timed_out else None,
                           statistics.median(done_at) if done_at else None)

    async def behind(self, tops: dict[str, int]) -> int:
        """Waits up to CHECK_WAIT for every client to reach the tops; then the channels the
        first client still behind is behind on (0: all caught up)."""
        deadline = time.monotonic() + CHECK_WAIT
        behind = 0
        for c in self.clients:
            while True:
                behind = sum(1 for ch in c.channels
                             if ch in tops and c.positions.get(ch, (0, ""))[0] < tops[ch])
                if not behind or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            if behind:
                break
        return behind

    async def counts(self) -> Stats:
        return self.stats

    async def close(self) -> None:
        BenchClient.stopping = True
        for c in self.clients:
            if c.conn is not None:
                c.conn.abort()


class CLoad:
    """`--client c`: bench/stormload.c, a child process running every client in one epoll
    loop, driven over its stdin/stdout one line at a time (see the top of stormload.c).
    It dies with us (PR_SET_PDEATHSIG) and when its stdin closes; `close()` ends it."""

    REPLY_TIMEOUT = 30.0  # s for a command's answer beyond the time it may take itself

    def __init__(self, binary: Path, n: int, ports: list[int], seed: int, timeout: float,
                 cpu: int | None) -> None:
        self.cmd = [str(binary), "--ports", ",".join(map(str, ports)), "--clients", str(n),
                    "--concurrency", str(CONNECT_CONCURRENCY), "--timeout", str(timeout),
                    "--seed", str(seed), "--host", HOST, "--path", "/ws"]
        self.timeout = timeout
        self.cpu_pin = cpu
        self.description = f"c: bench/stormload.c ({binary}), every client in one epoll loop"
        self.proc: asyncio.subprocess.Process | None = None
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="bench-stormload-")  # noqa: SIM115
        self.storm_reply: dict[str, Any] = {}
        self.pubs = 0  # publications the clients took (not dups), from `stats`

    async def _line(self, timeout: float | None) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"stormload did not answer within {timeout:g} s") from None
        if not raw:
            code = await self.proc.wait()
            raise RuntimeError(f"stormload exited with code {code}: {self.output()}")
        line = raw.decode(errors="replace").strip()
        if line.startswith("error"):
            raise RuntimeError(f"stormload: {line}")
        return line

    async def command(self, text: str, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._line(timeout + self.REPLY_TIMEOUT)

    async def connect(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=self.log, preexec_fn=child_preexec(self.cpu_pin), start_new_session=True,
            limit=1 << 20,
        )
        line = await self._line(None)  # it gives up on a client after 120 s itself
        if not line.startswith("ready "):
            raise RuntimeError(f"stormload: {line}")

    def cpu(self) -> float:
        """The C client's CPU seconds so far (its own process: not the publisher's)."""
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    async def storm(self, timeout: float) -> StormResult:
        d = json.loads(await self.command("storm", timeout))
        self.storm_reply = d
        return StormResult(d["back"], None if d["timed_out"] else d["max"], d["p50"])

    async def behind(self, tops: dict[str, int]) -> int:
        """Every (client, channel) pair still behind the tops after up to CHECK_WAIT."""
        with tempfile.NamedTemporaryFile("w", prefix="bench-storm-tops-", suffix=".txt") as f:
            f.writelines(f"{ch} {offset}\n" for ch, offset in tops.items())
            f.flush()
            d = json.loads(await self.command(f"check {f.name} {CHECK_WAIT:g}", CHECK_WAIT))
        return int(d["behind"])

    async def counts(self) -> Stats:
        d = json.loads(await self.command("stats", 0))
        stats = Stats()
        for name in ("gaps", "conflated", "dups", "recovered", "resynced", "deferred",
                     "refused", "conn_failures", "gap_notices", "disconnects"):
            setattr(stats, name, d[name])
        self.pubs = int(d["pubs"])
        stats.errors = d["error_samples"]
        if d["errors"] > len(stats.errors):
            stats.errors.append(f"... {d['errors']} errors in all")
        return stats

    async def close(self) -> None:
        """`quit` (every connection aborted), then the process ends; killed if it does not
        within 5 s."""
        if self.proc is not None:
            await quit_child(self.proc)

    def output(self, limit: int = 2_000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:].strip() or "(no output)"


async def storm(args: argparse.Namespace, n: int, redis_url: str, edges: list[EdgeProcess],
                prefix: str, stormload: Path | None, client_cpu: int | None) -> list[object]:
    redis = Redis.from_url(redis_url)
    publisher = Publisher(RedisBroker(Redis.from_url(redis_url), Keys(prefix)))
    rng = random.Random(n)
    ports = [e.port for e in edges]
    clients: PythonLoad | CLoad = (
        CLoad(stormload, n, ports, n, args.timeout, client_cpu) if stormload is not None
        else PythonLoad(n, ports, rng))
    channels = SHARED + [ch for c in range(n) for ch in own_channels(c)]
    published = 0
    tops: dict[str, int] = {}
    publishing = True
    stats: Stats | None = None

    async def publish() -> None:
        nonlocal published
        batch_size = max(int(args.rate / 50), 1)
        while publishing:
            t0 = time.monotonic()
            msgs = [UpstreamMessage(ch, {"t": t0})
                    for ch in (rng.choice(SHARED) if rng.random() < 0.3 else rng.choice(channels)
                               for _ in range(batch_size))]
            for msg, res in zip(msgs, await publisher.publish_batch(msgs), strict=True):
                tops[msg.channel] = res.offset
            published += len(msgs)
            await asyncio.sleep(max(0.02 - (time.monotonic() - t0), 0.0))

    try:
        progress(f"[{n}] connecting {n} clients x {len(SHARED) + 16} channels "
                 f"({clients.description}) ...")
        pub_task = asyncio.create_task(publish())
        t0 = time.monotonic()
        await clients.connect()
        progress(f"[{n}] connected in {time.monotonic() - t0:.1f} s; publishing {args.rate}/s")
        steady0, t_steady = [cpu_seconds(e.pid) for e in edges], time.monotonic()
        await asyncio.sleep(2.0)
        steady = [(cpu_seconds(e.pid) - c0) / (time.monotonic() - t_steady) * 100
                  for e, c0 in zip(edges, steady0, strict=True)]
        progress(f"[{n}] edges' CPU before the storm (publishing, all clients on): "
                 + " / ".join(f"{x:.0f} %" for x in steady))
        memory_name = 'fanout_edge_subscribe_sources_total{source="memory"}'
        deferred_name = 'fanout_edge_admission_total{kind="recovery",outcome="deferred"}'
        memory0 = [await edge_metric(e, memory_name) for e in edges]
        deferred0 = [await edge_metric(e, deferred_name) for e in edges]
        frames0 = [await edge_metric(e, "fanout_edge_frames_sent_total") for e in edges]
        sent0 = [await edge_metric(e, "fanout_edge_messages_sent_total") for e in edges]
        cpu0 = [cpu_seconds(e.pid) for e in edges]
        bench_cpu0 = clients.cpu()
        pub_cpu0 = time.process_time()
        cmd0 = await commandstats(redis)
        redis_cpu0 = await redis_cpu(redis)
        pub0 = published
        hook = (await asyncio.create_subprocess_shell(
            args.on_storm.format(pids=" ".join(str(e.pid) for e in edges)))
            if args.on_storm else None)
        result = await clients.storm(args.timeout)
        if hook is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hook.wait(), 60)
        cpu = [cpu_seconds(e.pid) - c0 for e, c0 in zip(edges, cpu0, strict=True)]
        bench_cpu = clients.cpu() - bench_cpu0
        pub_cpu = time.process_time() - pub_cpu0
        cmd1 = await commandstats(redis)
        redis_cpu1 = await redis_cpu(redis)
        pub_during = published - pub0
        reads = cmd1.get("evalsha", 0) - cmd0.get("evalsha", 0) - pub_during
        frames = delta([await edge_metric(e, "fanout_edge_frames_sent_total") for e in edges],
                       frames0)
        sent = delta([await edge_metric(e, "fanout_edge_messages_sent_total") for e in edges],
                     sent0)
        per_frame = (f"{sent / frames:.1f}" if isinstance(sent, int) and isinstance(frames, int)
                     and frames else "-")
        publishing = False
        await pub_task
        progress(f"[{n}] recovered: {result.back}/{n}; checking every client reaches the tops")
        behind = await clients.behind(tops)
        memory = delta([await edge_metric(e, memory_name) for e in edges], memory0)
        deferred = delta([await edge_metric(e, deferred_name) for e in edges], deferred0)
        stats = await clients.counts()
        if isinstance(clients, CLoad):
            progress(f"[{n}] stormload: publications {clients.pubs:,}, disconnects "
                     f"{stats.disconnects}")
            progress(f"[{n}] Redis CPU during the storm: {redis_cpu1 - redis_cpu0:.1f} s")
            d = clients.storm_reply
            if "upgraded_p50" in d:
                progress(f"[{n}] s from the abort, p50 / p90: upgraded {d['upgraded_p50']:.1f} / "
                         f"{d['upgraded_p90']:.1f}, connected {d['connected_p50']:.1f} / "
                         f"{d['connected_p90']:.1f}, back {d['p50']:.1f} / {d['p90']:.1f}")
        return [
            n, f"{result.elapsed:.1f}" if result.elapsed is not None else f"> {args.timeout:.0f} "
            f"({result.back} back)",
            f"{result.p50:.1f}" if result.p50 is not None else "-",
            stats.recovered, stats.resynced,
            " / ".join(f"{x:.1f}" for x in cpu), f"{bench_cpu:.2f}",
            f"{pub_cpu:.2f}" if isinstance(clients, CLoad) else "(in bench)", reads,
            stats.deferred, stats.refused, stats.conn_failures,
            memory, deferred,
            stats.gaps, stats.conflated, stats.dups, behind,
            stats.gap_notices if isinstance(clients, CLoad) else "-", per_frame,
        ]
    finally:
        publishing = False
        await clients.close()
        await redis.aclose()
        if stats is None and isinstance(clients, PythonLoad):
            stats = clients.stats
        if stats is not None and stats.errors:
            progress(f"[{n}] errors: {stats.errors}")
        if isinstance(clients, CLoad) and clients.proc is not None:
            tail = clients.output()
            if tail != "(no output)":
                progress(f"[{n}] stormload stderr: {tail}")


async def run(args: argparse.Namespace, url: str, edge_cpus: list[int | None],
              stormload: Path | None, client_cpu: int | None) -> list[list[object]]:
    rows: list[list[object]] = []
    for n in args.clients:
        prefix = bench_prefix("storm")
        extra = shlex.split(args.edge_args)
        edges = [SourceEdge(Path(args.edge_source), url, prefix, cpu, extra)
                 if args.edge_source else EdgeProcess(url, prefix, cpu, extra)
                 for cpu in edge_cpus]
        try:
            for e in edges:
                e.start()
            for e in edges:
                await wait_ready(e)
            rows.append(await storm(args, n, url, edges, prefix, stormload, client_cpu))
            progress(f"[{n}] {rows[-1]}")
            for name, e in zip("AB", edges, strict=True):
                lines = e.output(100_000).splitlines()
                progress(f"[{n}] edge {name}: {len(lines)} log lines; last ones:")
                for line in lines[-8:]:
                    progress(f"    {line[:300]}")
        finally:
            for e in edges:
                e.stop()
            redis = Redis.from_url(url)
            with contextlib.suppress(Exception):
                await delete_prefix(redis, prefix)
            await redis.aclose()
    return rows


class SourceEdge(EdgeProcess):
    """An edge run from another checkout (its packages first on sys.path): the base of a
    comparison."""

    def __init__(self, source: Path, *args: Any) -> None:
        super().__init__(*args)
        self.source = source

    def start(self) -> None:
        import subprocess

        from _common import child_preexec

        cmd = [sys.executable, "-m", "fanout", "edge", "--host", HOST, "--port",
               str(self.port), "--key-prefix", self.prefix, "--log-level", "warning",
               "--max-connections", "0", "--max-connections-per-ip", "0", *self.extra]
        env = {**os.environ, "FANOUT_REDIS_URL": self.redis_url,
               "PYTHONPATH": str(self.source)}
        self.proc = subprocess.Popen(
            cmd, cwd=self.source, env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, preexec_fn=child_preexec(self.cpu),
            start_new_session=True)


def counts(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1000,5000, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise argparse.ArgumentTypeError("counts must be >= 2")
    return values


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=counts, default=[1_000, 5_000, 10_000],
                   help="clients per row, comma-separated (default 1000,5000,10000)")
    p.add_argument("--rate", type=float, default=2_000.0,
                   help="messages published per second (default 2000)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for every client to recover (default 60)")
    p.add_argument("--client", choices=("c", "python"), default="c",
                   help="the load client: c (bench/stormload.c, built with cc; default) or "
                        "python (the BenchClients in this process)")
    p.add_argument("--layout", choices=("shared", "split"), default="shared",
                   help="shared (default): both edges on --edge-cpu, the clients, publisher "
                        "and Valkey on --bench-cpu; split: edge A on CPU 0, edge B on CPU 1, "
                        "the rest unpinned")
    p.add_argument("--edge-cpu", type=int, default=0,
                   help="CPU to pin both edges to (--layout shared)")
    p.add_argument("--bench-cpu", type=int, default=1,
                   help="CPU to pin the clients, this process (publisher) and Valkey to "
                        "(--layout shared)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--edge-args", default="", help="more flags for `fanout edge`")
    p.add_argument("--on-storm", default="", metavar="CMD",
                   help="a shell command started at the abort, `{pids}` replaced by the edges' "
                        "process ids (e.g. a profiler: see bench/README.md)")
    p.add_argument("--edge-source", default="",
                   help="run the edges from this checkout (e.g. a worktree of the base)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"),
                   help="use this Redis/Valkey instead of an embedded one [env BENCH_REDIS_URL]")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    sigterm_as_interrupt()
    print(f"fanout reconnect-storm benchmark: {environment()}", flush=True)
    print(source_state() if not args.edge_source else f"edges from {args.edge_source}",
          flush=True)
    stormload: Path | None = None
    if args.client == "c":
        try:
            stormload = build_c(STORMLOAD_SRC, "--client python")
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    who = "the C client (its own process)" if stormload else "the Python clients"
    notes = [f"client: {args.client}; layout: {args.layout}; rate {args.rate:g}/s"]
    edge_cpus: list[int | None] = [None, None]
    client_cpu: int | None = None
    pin_valkey: int | None = None
    usable = os.sched_getaffinity(0)
    if args.no_pin:
        notes.append("nothing pinned")
    elif args.layout == "split":
        if {0, 1} <= usable:
            edge_cpus = [0, 1]
            notes.append(f"edge A pinned to CPU 0, edge B to CPU 1; {who}, the publisher "
                         "(this process) and Valkey unpinned: they float over both CPUs, "
                         "beside the edges")
        else:
            notes.append("nothing pinned (--layout split needs CPUs 0 and 1)")
    elif len(usable) >= 2 and args.edge_cpu != args.bench_cpu and pin(0, args.bench_cpu):
        edge_cpus = [args.edge_cpu, args.edge_cpu]
        client_cpu = pin_valkey = args.bench_cpu
        notes.append(f"both edges pinned to CPU {args.edge_cpu}; {who}, the publisher and "
                     f"Valkey to CPU {args.bench_cpu}")
    else:
        notes.append("nothing pinned")
    try:
        with redis_server(args.redis_url) as server:
            if server.embedded is not None and server.pid and pin_valkey is not None:
                pin(server.pid, pin_valkey)
            rows = run_async(run(args, server.url, edge_cpus, stormload, client_cpu))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(table(["clients", "recovered s", "p50 s", "recovered", "resynced",
                 "edge CPU s (A / B)", "bench CPU s", "publisher CPU s", "history reads",
                 "unavailable", "503", "conn failures", "from memory", "deferred (edges)",
                 "gaps", "conflated", "dups", "behind", "gap notices", "msgs/frame"], rows))
    print()
    print("\n".join(notes))
    if stormload is not None:
        print("bench CPU s: the C client's process; publisher CPU s: this process (the "
              "publisher and the metrics reads)")
    else:
        print("bench CPU s: this process (the Python clients and the publisher together)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
