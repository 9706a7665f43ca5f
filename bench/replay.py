"""Recovery replay: how fast a client that is N messages behind gets all of them back.

One edge (`python -m fanout edge`, a subprocess pinned to CPU 0, `--recovery-limit` the
largest N) and an embedded Valkey; the channel (`--channel`, default `trades.REPLAY`) holds
the largest N publications (each like a trade: `{"ts", "price", "size", "side"}`, about 70
bytes of JSON), published beforehand through the real Lua publish script. For each N of
`--behind`, `--runs` times: a fresh WebSocket connection (JSON subprotocol) sends
`connect`, waits for `connected`, then sends `subscribe` with `recover` at offset top - N,
and the clock starts just before that frame is written:

* **first frame**: until the first frame after the subscribe has arrived whole;
* **all**: until the frame holding the N-th replayed publication has arrived whole;
* **frames**: WebSocket frames from the reply to the last replayed publication.

The client is built not to be what is measured: an asyncio.Protocol in this process (pinned
to CPU 1 with Valkey) that parses frame headers in place and counts publications in a frame
with `bytes.count`, nothing else, while the clock runs. Afterwards, off the clock, every
frame is decoded and checked: the `subscribed` reply first with `recovered: true`, then
exactly the offsets top - N + 1 ... top, in order. `valkey ms` is the server's own time per
run (INFO commandstats, every command but INFO itself): what one replay costs the Redis that
every edge and the ingest share.

    .venv/bin/python bench/replay.py [--behind 1000,10000,50000] [--runs 7]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any

from _common import (
    HOST,
    EdgeProcess,
    bench_prefix,
    delete_prefix,
    environment,
    pin,
    progress,
    redis_server,
    run_async,
    sigterm_as_interrupt,
    source_state,
    table,
    wait_ready,
)
from redis.asyncio import Redis
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.channels import parse_channel
from common.config import DEFAULT_HISTORY, HistoryPolicy
from common.errors import BadChannel
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage

PUB = b'"type":"pub"'
PUBLISH_BATCH = 1_000


class ReplayClient(asyncio.Protocol):
    """One connection: the opening handshake through websockets' sans-I/O ClientProtocol
    (which also masks what we send); incoming frames parsed here, in place."""

    def __init__(self, uri: str) -> None:
        self.proto = ClientProtocol(
            parse_uri(uri), subprotocols=[Subprotocol("fanout.json")], max_size=None
        )
        self.transport: asyncio.Transport | None = None
        self.open = False
        self.head = b""
        self.buf = bytearray()
        self.frames: list[bytes] = []  # payloads of the text frames, in order
        self.pubs = 0  # publications counted in them
        self.expect = 0  # publications that end the measurement
        self.started = 0.0
        self.first: float | None = None
        self.done_at: float | None = None
        loop = asyncio.get_running_loop()
        self.connected: asyncio.Future[None] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.connected, self.done):
            if not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def send(self, obj: dict[str, Any]) -> None:
        self.proto.send_text(json.dumps(obj, separators=(",", ":")).encode())
        self._flush()

    def start(self, request: dict[str, Any], expect: int) -> None:
        """Send `request` (the subscribe) and start the clock; done at `expect` pubs."""
        self.frames.clear()
        self.pubs = 0
        self.expect = expect
        self.first = self.done_at = None
        self.started = time.perf_counter()
        self.send(request)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                if self.proto.state is State.OPEN:
                    self.proto.send_close(1000)
                    self._flush()
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.open:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            self.proto.receive_data(self.head[: end + 4])
            self.proto.events_received()
            if self.proto.state is not State.OPEN:
                self._fail(f"handshake failed: {self.proto.handshake_exc!r}")
                return
            self.open = True
            self.send({"type": "connect", "id": 1, "name": "bench-replay"})
            data, self.head = self.head[end + 4 :], b""
        buf = self.buf
        buf += data
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            length = buf[pos + 1]
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            elif length > 127:
                self._fail("masked frame from the server")
                return
            end = start + length
            if end > n:
                break
            if buf[pos] != 0x81:  # FIN + text; the edge sends nothing else but a close
                self._fail(f"unexpected frame, first byte {buf[pos]:#x}: "
                           f"{bytes(buf[start:end])[:120]!r}")
                return
            self._frame(buf, start, end, now)
            pos = end
        del buf[:pos]

    def _frame(self, buf: bytearray, start: int, end: int, now: float) -> None:
        if not self.connected.done():  # the `connected` reply
            self.connected.set_result(None)
            return
        if not self.expect:
            return  # a ping between runs
        if self.first is None:
            self.first = now
        self.frames.append(bytes(buf[start:end]))
        self.pubs += buf.count(PUB, start, end)
        if self.pubs >= self.expect and not self.done.done():
            self.done_at = now
            self.done.set_result(None)

    def _fail(self, why: str) -> None:
        exc = RuntimeError(why)
        for fut in (self.connected, self.done):
            if not fut.done():
                fut.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()


@dataclass
class Run:
    first_ms: float
    all_ms: float
    frames: int
    payload: int


def check(frames: list[bytes], rid: int, since: int, top: int) -> None:
    """Off the clock: the reply first, then exactly since+1 ... top, in order."""
    messages: list[dict[str, Any]] = []
    for payload in frames:
        obj = json.loads(payload)
        messages.extend(obj if isinstance(obj, list) else [obj])
    reply = messages[0]
    if reply.get("type") != "subscribed" or reply.get("id") != rid:
        raise RuntimeError(f"the first message is not the subscribe's reply: {reply}")
    if reply.get("recovered") is not True:
        raise RuntimeError(f"not recovered: {reply}")
    offsets = [m["offset"] for m in messages[1:] if m.get("type") == "pub"]
    if offsets != list(range(since + 1, top + 1)):
        raise RuntimeError(
            f"replay is not {since + 1}..{top}: {len(offsets)} publications, "
            f"from {offsets[:1]} to {offsets[-1:]}"
        )


async def one_run(port: int, channel: str, epoch: str, since: int, top: int) -> Run:
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(
        lambda: ReplayClient(f"ws://{HOST}:{port}/ws"), HOST, port
    )
    try:
        async with asyncio.timeout(60):
            await client.connected
            rid = 2
            client.start({"type": "subscribe", "id": rid, "channel": channel,
                          "recover": {"offset": since, "epoch": epoch}}, top - since)
            await client.done
        assert client.first is not None and client.done_at is not None
        check(client.frames, rid, since, top)
        return Run((client.first - client.started) * 1000,
                   (client.done_at - client.started) * 1000,
                   len(client.frames), sum(map(len, client.frames)))
    finally:
        client.close()


async def valkey_usec(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["usec"]) for k, v in stats.items() if k != "cmdstat_info")


async def run(args: argparse.Namespace, url: str, prefix: str, edge: EdgeProcess,
              notes: list[str]) -> list[str]:
    redis = Redis.from_url(url, decode_responses=True, socket_timeout=30.0)
    try:
        most = max(args.behind)
        history = dict(DEFAULT_HISTORY)
        namespace = parse_channel(args.channel).namespace
        history[namespace] = HistoryPolicy(most + PUBLISH_BATCH, 3_600.0)
        publisher = Publisher(RedisBroker(redis, Keys(prefix)), history=history)
        progress(f"publishing {most:,} messages to {args.channel} ...")
        top = 0
        for i in range(0, most, PUBLISH_BATCH):
            batch = [
                UpstreamMessage(args.channel, {"ts": time.time(), "price": 21000.25 + j % 17,
                                               "size": j % 5 + 1,
                                               "side": "buy" if j % 2 else "sell"})
                for j in range(i, min(i + PUBLISH_BATCH, most))
            ]
            top = (await publisher.publish_batch(batch))[-1].offset
        epoch = await redis.hget(Keys(prefix).meta(args.channel), "epoch")
        assert isinstance(epoch, str)
        await wait_ready(edge)
        await one_run(edge.port, args.channel, epoch, top - min(args.behind), top)  # warm-up
        rows: list[list[object]] = []
        for behind in args.behind:
            progress(f"{behind:,} behind: {args.runs} runs ...")
            runs: list[Run] = []
            usec = 0
            for _ in range(args.runs):
                before = await valkey_usec(redis)
                runs.append(await one_run(edge.port, args.channel, epoch, top - behind, top))
                usec += await valkey_usec(redis) - before
            firsts = [r.first_ms for r in runs]
            alls = [r.all_ms for r in runs]
            frames = statistics.median(r.frames for r in runs)
            rows.append([
                behind, args.runs,
                statistics.median(firsts), statistics.median(alls), max(alls),
                frames, behind / frames if frames else 0.0,
                statistics.median(r.payload for r in runs) / 1e6,
                usec / args.runs / 1000,
            ])
            progress("  " + " | ".join(f"{c:.1f}" if isinstance(c, float) else str(c)
                                       for c in rows[-1]))
        return [table(["behind", "runs", "first frame ms (median)", "all ms (median)",
                       "all ms (max)", "frames", "msgs/frame", "MB", "valkey ms"], rows),
                "", *notes]
    finally:
        with contextlib.suppress(Exception):
            await delete_prefix(redis, prefix)
        await redis.aclose()


def counts(text: str) -> list[int]:
    try:
        values = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1000,10000, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("counts must be >= 1")
    return values


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--behind", type=counts, default=[1_000, 10_000, 50_000],
                   help="messages behind, comma-separated (default 1000,10000,50000)")
    p.add_argument("--runs", type=int, default=7, help="recoveries per row (default 7)")
    p.add_argument("--channel", default="trades.REPLAY")
    p.add_argument("--edge-cpu", type=int, default=0, help="CPU to pin the edge to")
    p.add_argument("--bench-cpu", type=int, default=1,
                   help="CPU to pin this process (the client) and the embedded Valkey to")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--edge-args", default="", help="more flags for `fanout edge`")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"),
                   help="use this Redis/Valkey instead of an embedded one [env BENCH_REDIS_URL]")
    args = p.parse_args()
    try:
        parse_channel(args.channel)
    except BadChannel as exc:
        p.error(f"--channel: {exc}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args


def main() -> int:
    args = parse_args()
    sigterm_as_interrupt()
    print(f"fanout replay benchmark: {environment()}", flush=True)
    print(source_state(), flush=True)
    notes: list[str] = []
    edge_cpu: int | None = None
    can_pin = len(os.sched_getaffinity(0)) >= 2 and args.edge_cpu != args.bench_cpu
    if not args.no_pin and can_pin and pin(0, args.bench_cpu):
        edge_cpu = args.edge_cpu
        notes.append(f"edge pinned to CPU {args.edge_cpu}; this process (publisher, client) "
                     f"pinned to CPU {args.bench_cpu}")
    else:
        notes.append("nothing pinned (fewer than 2 usable CPUs, or --no-pin)")
    try:
        with redis_server(args.redis_url) as server:
            if server.embedded is not None and server.pid and edge_cpu is not None:
                pin(server.pid, args.bench_cpu)
                notes.append(f"embedded valkey-server pinned to CPU {args.bench_cpu}")
            elif server.embedded is None:
                notes.append("Redis: --redis-url (valkey ms counts everyone's commands)")
            prefix = bench_prefix("replay")
            extra = ["--recovery-limit", str(max(args.behind)), *shlex.split(args.edge_args)]
            edge = EdgeProcess(server.url, prefix, edge_cpu, extra)
            print(f"edge flags: {shlex.join(extra)}", flush=True)
            try:
                edge.start()
                lines = run_async(run(args, server.url, prefix, edge, notes))
                log = edge.output().strip()
                if log:
                    lines += ["", "edge log (warnings and errors; tail):", log[-3_000:]]
            except Exception:
                if edge.proc is not None:
                    print(f"edge output (tail):\n{edge.output()}", file=sys.stderr)
                raise
            finally:
                edge.stop()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
