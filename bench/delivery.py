"""Fan-out throughput and latency of one edge process.

One edge (`python -m fanout edge`, a subprocess pinned to CPU 0) serves `--clients`
WebSocket clients that all subscribe to the same channel: `--channel`, or with `--channels K`
(a watchlist) the K channels `<channel>0` ... `<channel>K-1`. CPU 1 holds everything else: the
clients, this process (a publisher that publishes through the real Lua publish script at each
of the `--rates` in turn, round-robin over the channels) and the embedded Valkey. Each
message carries `ts` (time.time() at publish); clients take now - ts on receipt (same machine
clock).

Per rate: `--warmup` s of publishing, then `--duration` s measured, then a drain (until every
client has every channel's last offset, at most `--drain` s). Per client and channel the
offsets must be contiguous; gaps and duplicates are counted. The rates stop rising when
delivered < 90 % of expected or p99 > 1 s.

The clients must receive clients x rate messages/s on one core without becoming what limits
the measurement. `c` (default) is bench/wsload.c, built on first use with
`cc -O2 -o <cache dir>/wsload bench/wsload.c` (cache dir: $XDG_CACHE_HOME or ~/.cache, then
fanout-bench; rebuilt when the source is newer): one single-threaded epoll process, pinned to
the bench CPU, that opens every connection (handshake, Sec-WebSocket-Accept and subprotocol
checked), sends connect + subscribe, answers pings, checks offsets and keeps a latency
histogram; this process drives it over its stdin/stdout (`window`, `until`, `stats`, `quit`)
and measures its CPU apart (`clients` column). It takes over 5M msgs/s on one core here, so
the edge's ceiling can be measured. No C compiler: use `raw`, the Python client (400-800k
msgs/s at most here): an asyncio.Protocol per connection in this process that does the opening
handshake with websockets' sans-I/O `ClientProtocol` (request, Sec-WebSocket-Accept and
subprotocol checks) and sends through it (masking), but parses incoming frames itself and reads
a publication's offset and ts with one regex instead of json.loads (other frames: json.loads);
`sansio` feeds every incoming byte to `ClientProtocol` instead (for comparison). All accept
the edge's coalesced frames (a JSON array of messages) and its `gap` notices.

`--frozen N` measures what clients that stop reading cost the others: each rate runs
`--frozen-runs` times without and with N frozen clients, interleaved (the order alternating).
The frozen clients (in this process, SO_RCVBUF 4 KiB, reading paused) subscribe to the
readers' channels and to `--frozen-channel`; before each run with them, big messages on that
channel (which only they read) fill their sockets, transports and send queues, so that during
the run the edge has N stuck clients on the readers' channel (trades.*: policy drop, so they
stay connected and every message is dropped for them). A table gives the readers' p50/p99
without and with them, median and range over the runs. The tests check that a frozen client
delays nobody by the order of events (tests/integration/test_slow_consumers.py); this is the
latency.

    .venv/bin/python bench/delivery.py [--clients 500] [--rates 50,100,200,400,800] [--client c]
                                     [--channels 1] [--frozen 0 [--frozen-runs 3]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from _common import (
    HOST,
    CpuBusy,
    CpuMeter,
    EdgeProcess,
    bench_prefix,
    child_preexec,
    delete_prefix,
    environment,
    http_get,
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
from redis.asyncio import Redis
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.channels import parse_channel
from common.errors import BadChannel
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage

MAX_PUBLISH_BATCH = 200  # messages per publish round trip when the publisher catches up
STOP_DELIVERED = 0.9  # stop rising when delivered < 90 % of expected
STOP_P99 = 1.0  # s
MAX_CHANNELS = 1000  # --channels: the edge refuses more subscriptions per connection by default
CLIENT_BOUND = 85.0  # % of a core used by the client side: above it, it may limit a row
CPU_BOUND = 95.0  # % busy of the clients' CPU (everything on it): likewise
WSLOAD_SRC = Path(__file__).resolve().parent / "wsload.c"

# A publication exactly as `common.protocol.pub_json` builds it, with our data (ts first).
# Frames it does not match (replies, pings, a changed format) go through json.loads.
PUB_RE = re.compile(
    rb'\{"type":"pub","channel":"([^"]*)","offset":(\d+),"data":\{"ts":([0-9.]+)[,}]'
)
PUB_MATCH = PUB_RE.match
PUB_FINDITER = PUB_RE.finditer
MESSAGE_START = b'{"type":'


# --- clients -------------------------------------------------------------------------------


class Totals:
    """Counters of all clients together (one event loop: no locking)."""

    def __init__(self) -> None:
        self.pubs = 0  # publications received (in order, not duplicates)
        self.frames = 0  # text frames received (control frames not counted)
        self.gaps = 0  # offsets skipped without notice
        self.announced = 0  # offsets the edge dropped and said so (gap notices)
        self.dups = 0  # offsets received again (or going back)
        self.resyncs = 0
        self.errors = 0
        self.error_samples: list[str] = []
        self.disconnects = 0  # connections the edge closed (not us)
        self.close_codes: dict[int, int] = {}
        self.lat: list[float] = []  # s, of publications whose ts is in [lat_lo, lat_hi)
        self.lat_lo = math.inf
        self.lat_hi = math.inf


class BenchClient(asyncio.Protocol):
    """One WebSocket client: connect, subscribe to the channels, count what arrives."""

    def __init__(self, totals: Totals, uri: str, channels: list[str], raw: bool) -> None:
        self.totals = totals
        self.channels = channels
        self.raw = raw
        self.proto = ClientProtocol(
            parse_uri(uri), subprotocols=[Subprotocol("fanout.json")], max_size=None
        )
        self.transport: asyncio.Transport | None = None
        self.is_open = False  # handshake done
        self.handshake = b""
        self.buf = b""
        # per channel (its name as bytes): the highest offset received; -2 until subscribed
        self.lasts = dict.fromkeys((c.encode() for c in channels), -2)
        self.pending = len(channels)  # subscribed replies still to come
        self.closed = False
        self.closing = False  # we are closing: not a disconnect
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # --- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.proto.send_request(self.proto.connect())
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.closing:
            self.totals.disconnects += 1
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        try:
            if not self.is_open:
                self._handshake(data)
            elif self.raw:
                self._frames(data)
            else:
                self._sansio(data)
        except Exception as exc:  # a frame we do not understand: count it, drop the client
            self.fail(f"{type(exc).__name__}: {exc}")

    # --- sending -------------------------------------------------------------------------

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.proto.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def send(self, obj: dict[str, Any]) -> None:
        if self.closed:
            return
        self.proto.send_text(json.dumps(obj, separators=(",", ":")).encode())
        self._flush()

    def close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.closed:
            with contextlib.suppress(Exception):
                if self.proto.state is State.OPEN:
                    self.proto.send_close(1000)
                    self._flush()
            self.transport.close()

    def fail(self, why: str) -> None:
        self.totals.errors += 1
        if len(self.totals.error_samples) < 5:
            self.totals.error_samples.append(why[:300])
        if not self.ready.done():
            self.ready.set_exception(RuntimeError(why))
        if self.transport is not None:
            self.transport.abort()

    # --- receiving -----------------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        """Hand exactly the HTTP response to ClientProtocol; what follows it is frames."""
        self.handshake += data
        end = self.handshake.find(b"\r\n\r\n")
        if end < 0:
            if len(self.handshake) > 65_536:
                self.fail("handshake response too long")
            return
        head, rest = self.handshake[: end + 4], self.handshake[end + 4 :]
        self.handshake = b""
        self.proto.receive_data(head)
        self.proto.events_received()  # the Response
        if self.proto.state is not State.OPEN:
            self.fail(f"handshake failed: {self.proto.handshake_exc!r}")
            return
        self.is_open = True
        self.send({"type": "connect", "id": 1, "name": "bench"})
        if rest:
            self.data_received(rest)

    def _frames(self, data: bytes) -> None:
        """The hot path: unmasked server frames, parsed in place."""
        buf = self.buf + data if self.buf else data
        n = len(buf)
        pos = 0
        now = time.time()
        totals = self.totals
        while n - pos >= 2:
            length = buf[pos + 1]
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                start = pos + 10
            else:
                self.fail("masked frame from the server")
                return
            end = start + length
            if end > n:
                break
            if buf[pos] == 0x81:  # FIN + text, no RSV bits
                totals.frames += 1
                m = PUB_MATCH(buf, start, end)
                if m is not None:
                    channel = m[1]
                    offset = int(m[2])
                    if offset == self.lasts.get(channel, -3) + 1:  # subscribed, in order
                        self.lasts[channel] = offset
                        totals.pubs += 1
                        ts = float(m[3])
                        if totals.lat_lo <= ts < totals.lat_hi:
                            totals.lat.append(now - ts)
                    else:
                        self._pub(channel, offset, float(m[3]), now)
                else:
                    self._text(buf, start, end, now)
            else:
                self._control(buf[pos], buf[start:end])
                if self.transport is None or self.transport.is_closing():
                    return
            pos = end
        self.buf = buf[pos:] if pos < n else b""

    def _sansio(self, data: bytes) -> None:
        self.proto.receive_data(data)
        now = time.time()
        for frame in self.proto.events_received():
            if not isinstance(frame, Frame):
                continue
            if frame.opcode is Opcode.TEXT and frame.fin:
                self.totals.frames += 1
                payload = bytes(frame.data)
                m = PUB_MATCH(payload)
                if m is not None:
                    self._pub(m[1], int(m[2]), float(m[3]), now)
                else:
                    self._text(payload, 0, len(payload), now)
            elif frame.opcode is Opcode.CLOSE:
                self._count_close(bytes(frame.data))
            elif frame.opcode not in (Opcode.PING, Opcode.PONG):  # pings: answered by proto
                self.fail(f"unexpected frame {frame.opcode.name} fin={frame.fin}")
        self._flush()
        if self.proto.close_expected() and self.transport is not None:
            self.transport.close()

    def _text(self, buf: bytes, start: int, end: int, now: float) -> None:
        """A text frame other than a single publication: an array of messages (the edge
        coalesces), a reply, a ping, a notice."""
        if buf[start] == 0x5B:  # "[": coalesced messages
            matches = list(PUB_FINDITER(buf, start, end))
            if len(matches) == buf.count(MESSAGE_START, start, end):  # all publications
                for m in matches:
                    self._pub(m[1], int(m[2]), float(m[3]), now)
                return
            for obj in json.loads(buf[start:end]):
                self._message(obj, now)
            return
        self._message(json.loads(buf[start:end]), now)

    def _pub(self, channel: bytes, offset: int, ts: float | None, now: float) -> None:
        totals = self.totals
        last = self.lasts.get(channel)
        if last is None:  # not one of ours (the C client counts these apart; never seen)
            return
        if last < -1:
            totals.errors += 1  # a publication before the subscribe reply
            return
        if offset <= last:
            totals.dups += 1
            return
        if offset != last + 1:
            totals.gaps += offset - last - 1
        self.lasts[channel] = offset
        totals.pubs += 1
        if ts is not None and totals.lat_lo <= ts < totals.lat_hi:
            totals.lat.append(now - ts)

    def _message(self, obj: dict[str, Any], now: float) -> None:
        kind = obj.get("type")
        channel = str(obj.get("channel")).encode()
        if kind == "pub":
            data = obj.get("data")
            ts = data.get("ts") if isinstance(data, dict) else None
            self._pub(channel, int(obj["offset"]), float(ts) if ts is not None else None, now)
        elif kind == "ping":
            self.send({"type": "pong"})
        elif kind == "connected":
            self._subscribe(0)
        elif kind == "subscribed":
            if self.lasts.get(channel, 0) != -2:
                self.fail(f"unexpected subscribed reply: {obj}")
                return
            self.lasts[channel] = int(obj["offset"])
            self.pending -= 1
            if self.pending:
                self._subscribe(len(self.channels) - self.pending)
            elif not self.ready.done():
                self.ready.set_result(None)
        elif kind in ("resync", "gap"):
            last = self.lasts.get(channel)
            if last is None:
                return
            if last < -1:
                self.fail(f"{kind} before subscribed: {obj}")
            elif kind == "resync":
                self.totals.resyncs += 1
                self.lasts[channel] = int(obj["offset"])
            else:  # the edge dropped offsets from..to for us (drop policy)
                first, to = int(obj["from"]), int(obj["to"])
                if first > last + 1:
                    self.totals.gaps += first - last - 1
                self.totals.announced += max(0, to - max(first, last + 1) + 1)
                self.lasts[channel] = max(last, to)
        elif kind == "error":
            self.fail(f"error reply: {obj}")

    def _subscribe(self, i: int) -> None:
        """One subscribe at a time (the next on the previous reply), like wsload: the
        subscribes in flight stay at most --connect-concurrency (an edge answers
        `unavailable` when ~100 are in flight, its Redis pool's limit)."""
        self.send({"type": "subscribe", "id": 2 + i, "channel": self.channels[i]})

    def _control(self, first: int, payload: bytes) -> None:
        opcode = first & 0x0F
        if first & 0x70 or not first & 0x80 or opcode in (Opcode.CONT, Opcode.BINARY):
            self.fail(f"unexpected frame: first byte {first:#x} (RSV, fragment or binary)")
        elif opcode == Opcode.CLOSE:
            self._count_close(payload)
            if self.transport is not None:
                self.transport.close()
        elif opcode == Opcode.PING:
            self.proto.send_pong(payload)
            self._flush()
        elif opcode == Opcode.TEXT:  # FIN set and no RSV bits: handled by the caller
            self.fail("unreachable")

    def _count_close(self, payload: bytes) -> None:
        code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.totals.close_codes[code] = self.totals.close_codes.get(code, 0) + 1


async def connect_clients(
    clients: list[BenchClient], n: int, port: int, channels: list[str], raw: bool,
    totals: Totals,
    concurrency: int,
) -> None:
    """Open `n` clients into `clients` (so that the caller closes even a partial set)."""
    loop = asyncio.get_running_loop()
    uri = f"ws://{HOST}:{port}/ws"
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            _, client = await loop.create_connection(
                lambda: BenchClient(totals, uri, channels, raw), HOST, port
            )
            clients.append(client)
            await asyncio.wait_for(client.ready, 30.0)

    await asyncio.gather(*(one() for _ in range(n)))


# --- the client side, as the phases see it -------------------------------------------------


@dataclass
class Snapshot:
    """The clients' counters at one moment (all clients together)."""

    mono: float  # time.perf_counter() (CLOCK_MONOTONIC) when they were read
    pubs: int
    frames: int
    gaps: int
    dups: int
    announced: int
    resyncs: int
    errors: int
    disconnects: int
    open: int  # connections still open
    # per channel, the lowest last offset over the open clients; None if none is open
    min_lasts: list[int] | None
    close_codes: dict[int, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    samples: int = 0  # latency samples in the window
    p50: float = math.nan  # s
    p99: float = math.nan
    max: float = math.nan


class ClientSide:
    """What a phase needs from the clients: open them, measure a latency window, read the
    counters, close them. `pid` is a process of their own whose CPU is measured apart, or
    None when they run inside this process."""

    pid: int | None = None
    description = ""

    async def connect(self) -> None:
        raise NotImplementedError

    async def window(self, lo: float, hi: float) -> None:
        """From now on, take the latency of publications with lo <= ts < hi (clears)."""
        raise NotImplementedError

    async def until(self, hi: float) -> None:
        """Move the window's upper bound, keeping its samples."""
        raise NotImplementedError

    async def snapshot(self, latency: bool = False) -> Snapshot:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class PyClients(ClientSide):
    """`--client raw` / `sansio`: BenchClients in this process's event loop."""

    def __init__(self, args: argparse.Namespace, port: int, channels: list[str]) -> None:
        self.args = args
        self.port = port
        self.channels = channels
        self.totals = Totals()
        self.clients: list[BenchClient] = []
        self.description = (
            "raw: websockets sans-I/O ClientProtocol handshake + own frame parser, regex for "
            "pub offset/ts, in this process" if args.client == "raw" else
            "sansio: every byte through websockets' ClientProtocol, in this process"
        )

    async def connect(self) -> None:
        await connect_clients(self.clients, self.args.clients, self.port, self.channels,
                              self.args.client == "raw", self.totals,
                              self.args.connect_concurrency)

    async def window(self, lo: float, hi: float) -> None:
        self.totals.lat, self.totals.lat_lo, self.totals.lat_hi = [], lo, hi

    async def until(self, hi: float) -> None:
        self.totals.lat_hi = hi

    async def snapshot(self, latency: bool = False) -> Snapshot:
        t = self.totals
        mono = time.perf_counter()
        lasts = [c.lasts for c in self.clients if not c.closed]
        min_lasts = [min(d[k] for d in lasts) for k in lasts[0]] if lasts else None
        snap = Snapshot(
            mono=mono, pubs=t.pubs, frames=t.frames, gaps=t.gaps, dups=t.dups,
            announced=t.announced, resyncs=t.resyncs, errors=t.errors,
            disconnects=t.disconnects, open=len(lasts), min_lasts=min_lasts,
            close_codes=dict(t.close_codes), error_samples=list(t.error_samples),
        )
        if latency:
            lat = sorted(t.lat)
            snap.samples = len(lat)
            snap.p50, snap.p99 = quantile(lat, 0.50), quantile(lat, 0.99)
            snap.max = lat[-1] if lat else math.nan
        return snap

    async def close(self) -> None:
        for client in self.clients:
            client.close()
        await asyncio.sleep(0.2)  # let the transports close


class SetupError(Exception):
    """The benchmark cannot start (e.g. no C compiler); the message says what to do."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fanout-bench"


def build_wsload() -> Path:
    """bench/wsload.c, built (or cached) by `build_c`."""
    return build_c(WSLOAD_SRC, "--client raw (the Python client, limited to ~500k msgs/s)")


def build_c(source: Path, fallback: str) -> Path:
    """`cc -O2 -o <cache dir>/<name> <source>`, unless the binary is newer than the source
    (a C load client: bench/wsload.c, bench/stormload.c). Built under a temporary name and
    renamed: concurrent runs never see half a binary. `fallback`: what to run instead,
    for the error message."""
    binary = cache_dir() / source.stem
    with contextlib.suppress(OSError):
        if binary.stat().st_mtime >= source.stat().st_mtime and os.access(binary, os.X_OK):
            return binary
    cc = shutil.which("cc")
    if cc is None:
        raise SetupError("--client c needs a C compiler: `cc` is not on PATH (install one, "
                         f"e.g. `apt-get install gcc`), or run with {fallback}")
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_name(f"{source.stem}.{os.getpid()}.tmp")
    try:
        done = subprocess.run([cc, "-O2", "-o", str(tmp), str(source)],
                              capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise SetupError(f"`cc -O2 -o {tmp} {source}` failed (exit "
                             f"{done.returncode}); use {fallback} meanwhile:\n"
                             f"{(done.stdout + done.stderr).strip()[-3_000:]}")
        os.replace(tmp, binary)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return binary


class CClients(ClientSide):
    """`--client c`: bench/wsload.c, a child process pinned to the bench CPU that runs every
    client in one epoll loop, driven over its stdin/stdout one line at a time (commands:
    window, until, stats, quit; see the top of wsload.c). It gets SIGKILL if we die
    (PR_SET_PDEATHSIG, like the edge) and exits when its stdin closes; `stop()` (async) and
    `kill()` (sync, the last resort) end it on every other path."""

    REPLY_TIMEOUT = 10.0  # s for one command's answer

    def __init__(self, binary: Path, args: argparse.Namespace, port: int, cpu: int | None) -> None:
        # --channels 1: the channel is --channel; K > 1: --channel followed by 0 ... K-1
        self.cmd = [
            str(binary), "--port", str(port), "--path", "/ws", "--channel", args.channel,
            "--channels", str(args.channels), "--clients", str(args.clients),
            "--concurrency", str(args.connect_concurrency), "--timeout", "30", "--name", "bench",
        ]
        self.cpu = cpu
        self.proc: asyncio.subprocess.Process | None = None
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="bench-wsload-")  # noqa: SIM115
        self.description = (f"c: bench/wsload.c ({binary}), every client in one epoll loop "
                            "in a process of its own")

    async def start(self) -> None:
        preexec = child_preexec(self.cpu)
        self.proc = await asyncio.create_subprocess_exec(
            *self.cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=self.log, preexec_fn=preexec, start_new_session=True,
        )
        self.pid = self.proc.pid

    async def connect(self) -> None:
        if self.proc is None:
            await self.start()
        line = await self._line(None)  # wsload gives up on a client after 30 s itself
        if not line.startswith("ready "):
            raise RuntimeError(f"wsload: {line}")

    async def _line(self, timeout: float | None) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise RuntimeError(f"wsload did not answer within {timeout:g} s") from None
        if not raw:
            code = await self.proc.wait()
            raise RuntimeError(f"wsload exited with code {code}: {self.output()}")
        return raw.decode(errors="replace").strip()

    async def command(self, text: str) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            await self.proc.stdin.drain()
        except ConnectionError:
            code = await self.proc.wait()
            raise RuntimeError(f"wsload exited with code {code}: {self.output()}") from None
        line = await self._line(self.REPLY_TIMEOUT)
        if line.startswith("error"):
            raise RuntimeError(f"wsload: {text!r}: {line}")
        return line

    async def window(self, lo: float, hi: float) -> None:
        await self.command(f"window {lo!r} {hi!r}")

    async def until(self, hi: float) -> None:
        await self.command(f"until {hi!r}")

    async def snapshot(self, latency: bool = False) -> Snapshot:
        d = json.loads(await self.command("stats"))
        lat = d["lat"]
        return Snapshot(
            mono=d["mono"], pubs=d["pubs"], frames=d["frames"], gaps=d["gaps"],
            dups=d["dups"], announced=d["announced"], resyncs=d["resyncs"],
            errors=d["errors"], disconnects=d["disconnects"], open=d["open"],
            min_lasts=d["min_lasts"],
            close_codes={int(k): v for k, v in d["close_codes"].items()},
            error_samples=d["error_samples"], samples=lat["n"],
            p50=_seconds(lat["p50"]), p99=_seconds(lat["p99"]), max=_seconds(lat["max"]),
        )

    async def close(self) -> None:
        await self.stop()

    async def stop(self) -> None:
        """`quit` (every client sends a close frame), then the process ends; killed if it
        does not within 5 s."""
        if self.proc is not None:
            await quit_child(self.proc)

    def kill(self) -> None:
        """Synchronous last resort (e.g. the event loop is gone)."""
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)

    def output(self, limit: int = 2_000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:].strip() or "(no output)"


def _seconds(value: float | None) -> float:
    return math.nan if value is None else float(value)


def parse_metrics(text: str, name: str) -> list[tuple[str, float]]:
    """The samples of metric `name` (with any labels) in a Prometheus text exposition."""
    samples = []
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            sample, _, value = line.rpartition(" ")
            samples.append((sample, float(value)))
    return samples


# --- frozen clients (--frozen) ------------------------------------------------------------

FROZEN_PAD = "x" * 2000  # the fill's big messages: a few MB fill a client's socket and queue
FROZEN_ROUND = 50  # big messages per fill round (~100 KiB)
FROZEN_RCVBUF = 4096  # a frozen client's SO_RCVBUF: its kernel buffers fill sooner
FILL_ROUNDS = 2_000  # most fill rounds (~200 MB) before giving up


DELIVERY = "fanout_edge_delivery_latency_seconds_bucket"


async def delivery_buckets(edge: EdgeProcess) -> dict[float, float]:
    """The edge's delivery-latency histogram, all namespaces together: le -> count."""
    status, text = await asyncio.to_thread(http_get, edge.url("/metrics"))
    if status != 200:
        raise RuntimeError(f"edge /metrics: HTTP {status}")
    buckets: dict[float, float] = {}
    for sample, value in parse_metrics(text, DELIVERY):
        le = float(re.search(r'le="([^"]+)"', sample).group(1))  # type: ignore[union-attr]
        buckets[le] = buckets.get(le, 0.0) + value
    return buckets


def histogram_quantile(q: float, before: dict[float, float],
                       after: dict[float, float]) -> tuple[int, float]:
    """(observations, q-quantile) of what a cumulative histogram gained between two
    scrapes, interpolated within the bucket as Prometheus' histogram_quantile does."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    total = counts[-1] if counts else 0.0
    if total <= 0:
        return 0, math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound, count in zip(bounds, counts, strict=True):
        if count >= rank:
            if math.isinf(bound):
                return int(total), lower
            return int(total), lower + (bound - lower) * (rank - below) / max(count - below, 1)
        lower, below = bound, count
    return int(total), math.nan


async def edge_metrics(edge: EdgeProcess, *names: str) -> list[float]:
    """The edge's current value of each metric (its samples summed over labels; 0 if none)."""
    status, text = await asyncio.to_thread(http_get, edge.url("/metrics"))
    if status != 200:
        raise RuntimeError(f"edge /metrics: HTTP {status}")
    return [sum(v for _, v in parse_metrics(text, name)) for name in names]


class FrozenClients:
    """`--frozen N`: N clients subscribed to the measured channels and to `--frozen-channel`
    that stop reading (the transport paused, SO_RCVBUF 4 KiB), in this process. `fill()`
    publishes big messages on the frozen channel, which only they read, until their sockets,
    transports and send queues are full; from then on the edge has N stuck clients on the
    readers' channels, whose queue policy applies to every message (`drop` for trades.*:
    they stay connected, dropping). `close()` aborts them and waits until the edge let go."""

    def __init__(self, args: argparse.Namespace, edge: EdgeProcess, publisher: Publisher,
                 channels: list[str]) -> None:
        self.n: int = args.frozen
        self.channel: str = args.frozen_channel
        self.edge = edge
        self.publisher = publisher
        self.channels = [*channels, self.channel]
        self.totals = Totals()
        self.clients: list[BenchClient] = []
        self.baseline = 0  # the edge's connections before we opened ours
        self.queued = 0  # bytes in the edge's send queues once filled (all ours)

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        uri = f"ws://{HOST}:{self.edge.port}/ws"
        [connections] = await edge_metrics(self.edge, "fanout_edge_connections")
        self.baseline = int(connections)
        for _ in range(self.n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, FROZEN_RCVBUF)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (HOST, self.edge.port))
                _, client = await loop.create_connection(
                    lambda: BenchClient(self.totals, uri, self.channels, True), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            self.clients.append(client)
            await asyncio.wait_for(client.ready, 30.0)
            assert client.transport is not None
            client.transport.pause_reading()  # frozen from here on

    async def fill(self) -> int:
        """Publish FROZEN_ROUND big messages at a time on the frozen channel until two
        rounds in a row add nothing to the edge's queues (every frozen client's socket,
        transport and queue is full: its policy drops the rest). Nothing else is published
        meanwhile and the readers have drained, so what the edge queues is the frozen
        clients'. Returns the rounds published."""
        names = ("fanout_edge_live_messages_total", "fanout_edge_queue_bytes")
        live, queued = await edge_metrics(self.edge, *names)
        unchanged = 0
        for rounds in range(1, FILL_ROUNDS + 1):
            await self.publisher.publish_batch(
                [UpstreamMessage(self.channel, {"pad": FROZEN_PAD})] * FROZEN_ROUND
            )
            target = live + FROZEN_ROUND
            deadline = time.monotonic() + 30.0
            while True:  # until the edge got the round from Redis
                live, now_queued = await edge_metrics(self.edge, *names)
                if live >= target:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError("frozen fill: the edge did not get the messages")
                await asyncio.sleep(0.01)
            unchanged = unchanged + 1 if now_queued == queued and now_queued > 0 else 0
            queued = now_queued
            if unchanged >= 2:
                self.queued = int(queued)
                return rounds
        raise RuntimeError(f"frozen fill: the queues still grew after {FILL_ROUNDS} rounds")

    async def connected(self) -> int:
        """How many of ours the edge still has (its connections beyond the baseline)."""
        [connections] = await edge_metrics(self.edge, "fanout_edge_connections")
        return max(0, min(self.n, int(connections) - self.baseline))

    async def close(self) -> None:
        for client in self.clients:
            client.closing = True
            if client.transport is not None:
                client.transport.abort()
        self.clients.clear()
        deadline = time.monotonic() + 30.0
        while await self.connected() > 0:  # the edge ended their sessions
            if time.monotonic() > deadline:
                raise RuntimeError("the edge kept the frozen clients' sessions for 30 s")
            await asyncio.sleep(0.02)


async def frozen_pair(ctx: Context, frozen: FrozenClients, rate: float,
                      with_first: bool) -> list[Phase]:
    """One phase without the frozen clients and one with them, in the order given."""
    phases: list[Phase] = []
    for stuck in (with_first, not with_first):
        if not stuck:
            phases.append(await run_phase(ctx, rate))
            continue
        await frozen.open()
        rounds = await frozen.fill()
        progress(f"  {frozen.n} frozen clients filled: {rounds} rounds of {FROZEN_ROUND} x "
                 f"2 KB, {frozen.queued / 1024:,.0f} KiB queued for them")
        dropped = "fanout_edge_messages_dropped_total"
        try:
            [before] = await edge_metrics(frozen.edge, dropped)
            phase = await run_phase(ctx, rate)
            open_after = await frozen.connected()
            [after] = await edge_metrics(frozen.edge, dropped)
        finally:
            await frozen.close()
        phases.append(replace(phase, frozen=frozen.n, frozen_open=open_after,
                              frozen_dropped=int(after - before)))
    return phases


def frozen_rows(phases: list[Phase]) -> list[list[object]]:
    """Per rate: the readers' p50 / p99 without and with the frozen clients, the median
    over the runs and (in brackets) the range; and what the edge dropped for the frozen
    clients, of what was published to them during the runs (100 %: stuck throughout)."""

    def spread(values: list[float]) -> str:
        if not values or any(math.isnan(v) for v in values):
            return "n/a"
        lo, mid, hi = (round(x * 1000, 1) for x in
                       (min(values), statistics.median(values), max(values)))
        return f"{mid:g} ({lo:g}-{hi:g})" if len(values) > 1 else f"{mid:g}"

    rows: list[list[object]] = []
    for rate in dict.fromkeys(p.rate for p in phases):
        base = [p for p in phases if p.rate == rate and not p.frozen]
        stuck = [p for p in phases if p.rate == rate and p.frozen]
        if not base or not stuck:
            continue
        to_frozen = sum(p.published * p.frozen for p in stuck)
        dropped = sum(p.frozen_dropped for p in stuck) / to_frozen if to_frozen else math.nan
        rows.append([
            round(rate), f"{len(base)} + {len(stuck)}",
            spread([p.p50 for p in base]), spread([p.p50 for p in stuck]),
            spread([p.p99 for p in base]), spread([p.p99 for p in stuck]),
            f"{statistics.median(p.edge_cpu for p in base):.0f} / "
            f"{statistics.median(p.edge_cpu for p in stuck):.0f}",
            f"{sum(p.lost for p in base):,} / {sum(p.lost for p in stuck):,}",
            f"{min(p.frozen_open for p in stuck)} of {stuck[0].frozen}",
            f"{dropped:.0%}",
        ])
    return rows


FROZEN_HEADERS = [
    "publish rate/s", "runs", "p50 ms without", "p50 ms with", "p99 ms without",
    "p99 ms with", "edge CPU % without / with", "lost without / with", "frozen still connected",
    "dropped for frozen",
]


# --- a rate --------------------------------------------------------------------------------


@dataclass
class Phase:
    rate: float
    channels: int  # each client subscribed to all of them
    clients: int  # open at the start
    open_after: int
    published: int
    window_s: float  # the publisher's window
    window_published: int
    client_window_s: float  # between the clients' two counter readings
    window_pubs: int
    received: int  # publications of this phase received, all clients, after the drain
    window_frames: int
    gaps: int
    announced: int
    dups: int
    p50: float
    p99: float
    max: float
    samples: int
    edge_cpu: float
    clients_cpu: float | None  # the C client's process; None: the clients run in this one
    bench_cpu: float
    valkey_cpu: float | None
    edge_cpu_busy: float  # the whole CPU the edge is pinned to (or the machine)
    bench_cpu_busy: float  # likewise for this process's CPU
    pinned: bool  # the busy columns are one CPU each (else the machine's, 100 % per CPU)
    steal: float  # machine-wide, % of one CPU
    drain_s: float
    drained: bool
    frozen: int = 0  # frozen clients opened for this phase (--frozen)
    frozen_open: int = 0  # of them, still connected at the end of the window
    frozen_dropped: int = 0  # messages the edge dropped for them during the phase

    @property
    def delivered(self) -> float:
        return self.window_pubs / self.client_window_s

    @property
    def expected(self) -> float:
        return self.clients * self.window_published / self.window_s

    @property
    def lost(self) -> int:
        return self.clients * self.published - self.received

    @property
    def frames(self) -> float:
        return self.window_frames / self.client_window_s

    @property
    def client_side_cpu(self) -> float:
        """% of a core used by the clients and the publisher (Valkey apart)."""
        return self.bench_cpu + (self.clients_cpu or 0.0)

    @property
    def client_bound(self) -> bool:
        full = self.pinned and self.bench_cpu_busy >= CPU_BOUND
        return self.client_side_cpu >= CLIENT_BOUND or full

    def cells(self, frozen_column: bool = False) -> list[object]:
        """The row of the main table; `frozen_column`: with the --frozen column."""
        clients = (str(self.clients) if self.open_after == self.clients
                   else f"{self.clients} ({self.clients - self.open_after} disconnected)")
        if self.channels > 1:
            clients = clients.replace(str(self.clients), f"{self.clients} x {self.channels}", 1)
        drain = f"{self.drain_s:.2f}" + ("" if self.drained else " (timeout)")
        lost: object = self.lost
        if self.announced:
            lost = f"{self.lost:,} ({self.announced:,} announced)"
        frozen = []
        if frozen_column:
            frozen = [str(self.frozen) if self.frozen_open == self.frozen
                      else f"{self.frozen} ({self.frozen - self.frozen_open} disconnected)"]
        return [
            round(self.rate), clients, *frozen, round(self.delivered), round(self.expected),
            lost, f"{self.gaps}/{self.dups}", ms(self.p50), ms(self.p99), ms(self.max),
            round(self.edge_cpu), drain,
        ]

    def cpu_cells(self) -> list[object]:
        valkey = "n/a" if self.valkey_cpu is None else round(self.valkey_cpu)
        clients = "-" if self.clients_cpu is None else round(self.clients_cpu)
        return [
            round(self.rate), round(self.frames), round(self.delivered / max(self.frames, 1), 1),
            round(self.edge_cpu), round(self.edge_cpu_busy), clients,
            round(self.bench_cpu), valkey, round(self.bench_cpu_busy), round(self.steal, 1),
        ]


HEADERS = [
    "publish rate/s", "clients", "delivered msgs/s", "expected msgs/s", "lost", "gaps/dups",
    "p50 ms", "p99 ms", "max ms", "edge CPU %", "drain s",
]
CPU_HEADERS = [
    "publish rate/s", "frames/s", "msgs/frame", "edge CPU %", "edge's CPU busy %",
    "clients CPU %", "bench CPU %", "valkey CPU %", "bench's CPU busy %", "steal %",
]


def headers(channels: int, frozen: bool = False) -> list[str]:
    out = list(HEADERS)
    if frozen:
        out.insert(2, "frozen")
    if channels == 1:
        return out
    return [("clients x channels" if h == "clients" else h) for h in out]


def ms(seconds: float) -> object:
    return "n/a" if math.isnan(seconds) else round(seconds * 1000, 1)


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


@dataclass
class Context:
    args: argparse.Namespace
    publisher: Publisher
    channels: list[str]  # every client is subscribed to all; published round-robin
    last_offsets: list[int]  # per channel, the last offset published
    clients: ClientSide
    edge_pid: int
    valkey_pid: int | None
    edge_cpu: int | None  # pinned to, or None (then "busy" is the machine's)
    bench_cpu: int | None
    seq: int = 0  # messages published so far: message seq goes to channels[seq % len]

    async def publish(self, ts: float, count: int) -> None:
        """`count` messages, round-robin over the channels, in one round trip."""
        channels, n, seq = self.channels, len(self.channels), self.seq
        targets = [(seq + i) % n for i in range(count)]
        results = await self.publisher.publish_batch(
            [message(channels[j], ts, seq + i) for i, j in enumerate(targets)]
        )
        for j, result in zip(targets, results, strict=True):
            self.last_offsets[j] = result.offset
        self.seq = seq + count


def message(channel: str, ts: float, seq: int) -> UpstreamMessage:
    # A trade-sized message; ts first: the raw client's regex and the C client's fast path
    # expect it there (both fall back to a full JSON parse otherwise).
    data = {"ts": ts, "symbol": "BENCH", "price": 21_000.25 + (seq % 40) * 0.25,
            "size": 1 + seq % 7, "side": "buy" if seq % 2 else "sell"}
    return UpstreamMessage(channel, data)


async def run_phase(ctx: Context, rate: float) -> Phase:
    args, side = ctx.args, ctx.clients
    first = await side.snapshot()
    await side.window(math.inf, math.inf)  # no samples before the measured window
    edge_meter, bench_meter = CpuMeter(ctx.edge_pid), CpuMeter(os.getpid())
    clients_meter = CpuMeter(side.pid) if side.pid else None
    valkey_meter = CpuMeter(ctx.valkey_pid) if ctx.valkey_pid else None
    meters = (edge_meter, bench_meter, clients_meter, valkey_meter)
    edge_busy, bench_busy = CpuBusy(ctx.edge_cpu), CpuBusy(ctx.bench_cpu)
    steal_meter = CpuBusy()
    warmup, end = args.warmup, args.warmup + args.duration

    sent = 0
    in_window = False
    t0 = t1 = 0.0
    sent0 = sent1 = 0
    snap0 = snap1 = first
    edge_cpu = bench_cpu = edge_cpu_busy = bench_cpu_busy = steal = 0.0
    clients_cpu: float | None = None
    valkey_cpu: float | None = None
    start = time.perf_counter()
    while True:
        now = time.perf_counter()
        elapsed = now - start
        if not in_window and elapsed >= warmup:
            in_window = True
            t0, sent0 = now, sent
            await side.window(time.time(), math.inf)
            snap0 = await side.snapshot()
            for meter in (*meters, edge_busy, bench_busy, steal_meter):
                if meter is not None:
                    meter.start()
        if in_window and elapsed >= end:
            t1, sent1 = now, sent
            await side.until(time.time())
            snap1 = await side.snapshot()
            edge_cpu, bench_cpu = edge_meter.percent(), bench_meter.percent()
            clients_cpu = clients_meter.percent() if clients_meter else None
            valkey_cpu = valkey_meter.percent() if valkey_meter else None
            edge_cpu_busy, bench_cpu_busy = edge_busy.percent()[0], bench_busy.percent()[0]
            steal = steal_meter.percent()[1]
            break
        due = int(elapsed * rate) + 1  # message i is due at i / rate
        if due > sent:
            count = min(due - sent, MAX_PUBLISH_BATCH)
            await ctx.publish(time.time(), count)
            sent += count
        else:
            next_due = start + sent / rate
            boundary = start + (warmup if not in_window else end)
            await asyncio.sleep(max(0.0, min(next_due, boundary) - now))

    drain_start = time.perf_counter()
    deadline = drain_start + args.drain
    drained = False
    while time.perf_counter() < deadline:  # until every open client has every channel's
        snap = await side.snapshot()  # last offset
        if snap.min_lasts is None or all(
            got >= want for got, want in zip(snap.min_lasts, ctx.last_offsets, strict=True)
        ):
            drained = True
            break
        await asyncio.sleep(0.02)
    drain_s = time.perf_counter() - drain_start
    final = await side.snapshot(latency=True)
    return Phase(
        rate=rate, channels=len(ctx.channels), clients=first.open, open_after=final.open,
        published=sent, window_s=t1 - t0, window_published=sent1 - sent0,
        client_window_s=snap1.mono - snap0.mono, window_pubs=snap1.pubs - snap0.pubs,
        received=final.pubs - first.pubs, window_frames=snap1.frames - snap0.frames,
        gaps=final.gaps - first.gaps, announced=final.announced - first.announced,
        dups=final.dups - first.dups, p50=final.p50, p99=final.p99, max=final.max,
        samples=final.samples, edge_cpu=edge_cpu, clients_cpu=clients_cpu,
        bench_cpu=bench_cpu, valkey_cpu=valkey_cpu, edge_cpu_busy=edge_cpu_busy,
        bench_cpu_busy=bench_cpu_busy, pinned=ctx.bench_cpu is not None, steal=steal,
        drain_s=drain_s, drained=drained,
    )


def stop_reason(phase: Phase) -> str | None:
    if phase.open_after == 0:
        return "every client was disconnected"
    if phase.delivered < STOP_DELIVERED * phase.expected:
        return (f"delivered {phase.delivered:,.0f} msgs/s < 90 % of expected "
                f"{phase.expected:,.0f} msgs/s")
    if phase.p99 > STOP_P99:
        return f"p99 latency {phase.p99 * 1000:,.0f} ms > {STOP_P99 * 1000:.0f} ms"
    return None


# --- main ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, url: str, prefix: str, edge: EdgeProcess,
              side: ClientSide, valkey_pid: int | None) -> list[str]:
    """The whole benchmark; returns the report's lines."""
    out: list[str] = []
    try:
        async with asyncio.timeout(args.timeout) as limit:
            await _run(args, url, prefix, edge, side, valkey_pid, out)
    except TimeoutError:
        if limit.expired():
            raise BenchTimeout(
                f"the benchmark took longer than --timeout {args.timeout:g} s"
            ) from None
        raise
    return out


class BenchTimeout(Exception):
    pass


async def _run(args: argparse.Namespace, url: str, prefix: str, edge: EdgeProcess,
               side: ClientSide, valkey_pid: int | None, out: list[str]) -> None:
    redis = Redis.from_url(url, decode_responses=True, socket_timeout=10.0,
                           socket_connect_timeout=5.0)
    try:
        publisher = Publisher(RedisBroker(redis, Keys(prefix)))
        channels = channel_names(args)
        results = await publisher.publish_batch(  # the channels exist
            [message(channel, time.time(), 0) for channel in channels]
        )
        await wait_ready(edge)
        progress(f"connecting {args.clients} clients ...")
        started = time.perf_counter()
        await side.connect()
        snap = await side.snapshot()
        progress(f"  {snap.open} connected and subscribed in "
                 f"{time.perf_counter() - started:.1f} s")
        bench_cpu = args.bench_cpu if edge.cpu is not None else None
        ctx = Context(args, publisher, channels, [r.offset for r in results], side, edge.pid,
                      valkey_pid, edge.cpu, bench_cpu)
        phases: list[Phase] = []
        edge_latency: list[list[object]] = []  # the edge's own histogram, per rate
        why: str | None = None
        frozen = (FrozenClients(args, edge, publisher, channels) if args.frozen else None)
        for rate in args.rates:
            progress(f"rate {rate:g}/s: {args.warmup:g} s warm-up + "
                     f"{args.duration:g} s measured ...")
            if frozen is None:
                hist0 = await delivery_buckets(edge)
                batch = [await run_phase(ctx, rate)]
                hist1 = await delivery_buckets(edge)
                n, p50 = histogram_quantile(0.5, hist0, hist1)
                _, p99 = histogram_quantile(0.99, hist0, hist1)
                edge_latency.append([round(rate), f"{n:,}", ms(p50), ms(p99)])
            else:  # interleaved, the order alternating: without/with, with/without, ...
                batch = []
                for run in range(args.frozen_runs):
                    batch += await frozen_pair(ctx, frozen, rate, with_first=run % 2 == 1)
                    for phase in batch[-2:]:
                        progress("  " + " | ".join(str(c) for c in phase.cells(True)))
                    if any(stop_reason(p) for p in batch[-2:]):
                        break
            phases += batch
            if frozen is None:
                progress("  " + " | ".join(str(c) for c in batch[0].cells()))
            why = next((r for p in batch if (r := stop_reason(p))), None)
            if why:
                break
        if frozen is not None:
            out.append(f"readers' latency without and with {args.frozen} frozen clients "
                       f"(subscribed to the readers' channel and to {args.frozen_channel}, "
                       "whose big messages filled their sockets and send queues before each "
                       f"'with' run); {args.frozen_runs} interleaved runs of each per rate, "
                       "median (min-max) over the runs:")
            out.append("")
            out.append(table(FROZEN_HEADERS, frozen_rows(phases)))
            out.append("")
            out.append("Every run:")
            out.append("")
        out.append(table(headers(len(channels), frozen is not None),
                         [p.cells(frozen is not None) for p in phases]))
        out.append("")
        out.append("CPU during each measured window (100 % = one core). 'busy' is the whole "
                   "CPU: every process on it plus interrupts (loopback TCP is mostly softirq "
                   "time, charged to no process); steal is machine-wide. 'clients' is the C "
                   "client's process ('-': the clients run inside this process, in 'bench').")
        out.append("")
        out.append(table(CPU_HEADERS, [p.cpu_cells() for p in phases]))
        out.append("")
        if edge_latency:
            out.append("The edge's own delivery latency (fanout_edge_delivery_latency_seconds: "
                       "publish call -> written to every client that keeps up, one observation "
                       "per message; the whole phase, warm-up and drain included; "
                       "interpolated within buckets):")
            out.append("")
            out.append(table(["publish rate/s", "messages", "edge p50 ms", "edge p99 ms"],
                             edge_latency))
            out.append("")
        samples = ", ".join(f"{p.samples:,}" for p in phases)
        out.append(f"latency samples per row: {samples}")
        if side.pid is not None:
            costs = ", ".join(
                f"{p.rate:g}/s: {cost:,.0f} ms" for p in phases
                if (cost := clients_cost(p)) is not None
            )
            out.append(f"C client CPU per million publications received: {costs}")
        if len(channels) > 1:
            per = ", ".join(f"{p.rate / len(channels):g}" for p in phases)
            out.append(f"channels: every client subscribed to all {len(channels)} "
                       f"({channels[0]} ... {channels[-1]}); each rate published round-robin "
                       f"over them: {per} msgs/s per channel")
        cpu = "the machine" if ctx.bench_cpu is None else f"CPU {ctx.bench_cpu}"
        for p in phases:
            achieved = p.window_published / p.window_s
            if achieved < 0.95 * p.rate:
                out.append(f"note: at {p.rate:g}/s the publisher reached only {achieved:,.0f} "
                           "msgs/s (expected msgs/s uses what it reached)")
            if p.client_bound:
                valkey = "" if p.valkey_cpu is None else f", Valkey {p.valkey_cpu:.0f} %"
                who = (f"C clients {p.clients_cpu:.0f} %, publisher {p.bench_cpu:.0f} %"
                       if p.clients_cpu is not None else
                       f"clients + publisher (this process) {p.bench_cpu:.0f} %")
                out.append(
                    f"note: at {p.rate:g}/s {cpu} was {p.bench_cpu_busy:.0f} % "
                    f"busy ({who}{valkey}) and the edge used {p.edge_cpu:.0f} %: the client "
                    "side is near saturation, so delivery and latency there may be limited "
                    "by it, not by the edge"
                )
        if why:
            out.append(f"stopped rising at {phases[-1].rate:g}/s: {why}")
        else:
            out.append("every rate kept up (delivered >= 90 % of expected, p99 <= 1 s)")
        status, text = await asyncio.to_thread(http_get, edge.url("/metrics"))
        out.append("")
        out.append(f"edge /metrics at the end (HTTP {status}), before the clients closed:")
        names: tuple[str, ...] = ("fanout_edge_messages_sent_total",
                                  "fanout_edge_frames_sent_total", "fanout_edge_disconnects_total")
        if len(channels) > 1:  # a client's frames of one turn (a frame per channel): one write
            names += ("fanout_edge_writes_total",)
        for name in names:
            found = parse_metrics(text, name)
            for sample, value in found:
                out.append(f"  {sample} {value:,.0f}")
            if not found:
                out.append(f"  {name}: no samples (none counted)")
        t = await side.snapshot()
        out.append(f"clients received {t.frames:,} frames in all, holding "
                   f"{t.pubs:,} publications (plus replies and pings); "
                   f"disconnected by the edge: {t.disconnects}; "
                   f"close codes: {t.close_codes or 'none'}; resyncs: "
                   f"{t.resyncs}; unannounced gaps {t.gaps}, duplicates "
                   f"{t.dups}, announced drops {t.announced}; "
                   f"client errors: {t.errors}")
        for sample in t.error_samples:
            out.append(f"  client error: {sample}")
    finally:
        with contextlib.suppress(Exception):
            await side.close()
        with contextlib.suppress(Exception):
            await delete_prefix(redis, prefix)
        await redis.aclose()


def clients_cost(p: Phase) -> float | None:
    """ms of the C client's CPU per million publications it received in the window."""
    if p.clients_cpu is None or p.window_pubs <= 0:
        return None
    return p.clients_cpu / 100 * p.client_window_s / p.window_pubs * 1e9


def rates(text: str) -> list[float]:
    try:
        values = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 50,100,200, got {text!r}") from None
    if not values or any(not 0 < v <= 100_000 for v in values):
        raise argparse.ArgumentTypeError("rates must be > 0 and <= 100000")
    return values


def number(lo: float, cast: Callable[[str], Any] = float) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = cast(text)
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        return value

    return parse


def channel_names(args: argparse.Namespace) -> list[str]:
    """--channel itself, or --channel followed by 0 ... --channels - 1."""
    if args.channels == 1:
        return [args.channel]
    return [f"{args.channel}{i}" for i in range(args.channels)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--clients", type=number(1, int), default=500)
    p.add_argument("--rates", type=rates, default=[50, 100, 200, 400, 800],
                   help="publish rates, messages/s, comma-separated (default 50,100,200,400,800)")
    p.add_argument("--duration", type=number(0.5), default=5.0, help="measured s per rate")
    p.add_argument("--warmup", type=number(0), default=1.0, help="s per rate before measuring")
    p.add_argument("--drain", type=number(0), default=10.0,
                   help="most s to wait after a rate for every client to catch up")
    p.add_argument("--client", choices=("c", "raw", "sansio"), default="c",
                   help="the clients: c (bench/wsload.c, built with cc), raw or sansio "
                        "(Python, in this process); see the module doc")
    p.add_argument("--channel", default="trades.BENCH",
                   help="the channel; with --channels K > 1 the prefix of K channels")
    p.add_argument("--channels", type=number(1, int), default=1,
                   help="channels per client (a watchlist), at most 1000: <channel>0 ... "
                        "<channel>K-1, every client subscribed to all; the rate is spread "
                        "round-robin over them (default 1: <channel> itself)")
    p.add_argument("--connect-concurrency", type=number(1, int), default=50)
    p.add_argument("--frozen", type=number(0, int), default=0,
                   help="also measure each rate with N frozen clients (subscribed to the "
                        "readers' channels, then stop reading, their sockets and queues "
                        "filled first), interleaved with runs without them (default 0: off)")
    p.add_argument("--frozen-runs", type=number(1, int), default=3,
                   help="with --frozen: runs without and with them per rate (default 3)")
    p.add_argument("--frozen-channel", default="trades.BENCHFROZEN",
                   help="with --frozen: the channel only the frozen clients read, whose big "
                        "messages fill them (its namespace's policy must not be disconnect)")
    p.add_argument("--edge-cpu", type=int, default=0, help="CPU to pin the edge to")
    p.add_argument("--bench-cpu", type=int, default=1,
                   help="CPU to pin this process (and the embedded Valkey) to")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--edge-args", default="",
                   help="more flags for `fanout edge`, e.g. '--max-frame-messages 1'")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"),
                   help="use this Redis/Valkey instead of an embedded one [env BENCH_REDIS_URL]")
    p.add_argument("--timeout", type=number(10), default=None,
                   help="abort after this many s (default: from the other settings)")
    args = p.parse_args()
    if args.channels > MAX_CHANNELS:
        p.error(f"--channels: at most {MAX_CHANNELS} (the edge's max_subscriptions default)")
    if args.frozen and args.channels + 1 > MAX_CHANNELS:
        p.error(f"--frozen: the frozen clients take --channels + 1 subscriptions, at most "
                f"{MAX_CHANNELS}")
    try:
        parse_channel(args.frozen_channel)
    except BadChannel as exc:
        p.error(f"--frozen-channel: {exc}")
    if args.frozen_channel in channel_names(args):
        p.error("--frozen-channel must not be one of the readers' channels")
    for name in {channel_names(args)[0], channel_names(args)[-1]}:
        try:
            parse_channel(name)
        except BadChannel as exc:
            p.error(f"--channel {args.channel!r} with --channels {args.channels}: {exc}")
    if args.timeout is None:
        phases = 2 * args.frozen_runs if args.frozen else 1
        fill = 60 if args.frozen else 0  # most s to open, fill and close the frozen clients
        args.timeout = 90 + len(args.rates) * phases * (
            args.warmup + args.duration + args.drain + 5 + fill
        )
    return args


def main() -> int:
    args = parse_args()
    sigterm_as_interrupt()
    print(f"fanout benchmark: {environment()}", flush=True)
    print(source_state(), flush=True)
    wsload: Path | None = None
    if args.client == "c":
        try:
            wsload = build_wsload()
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    edge_cpu: int | None = None
    notes: list[str] = []
    can_pin = len(os.sched_getaffinity(0)) >= 2 and args.edge_cpu != args.bench_cpu
    who = "the C clients, this process (publisher)" if wsload else "this process (clients + " \
        "publisher)"
    if not args.no_pin and can_pin and pin(0, args.bench_cpu):
        edge_cpu = args.edge_cpu
        notes.append(f"edge pinned to CPU {args.edge_cpu}; {who} pinned to CPU {args.bench_cpu}")
    if edge_cpu is None:
        notes.append("nothing pinned (fewer than 2 usable CPUs, or --no-pin)")
    status = 0
    side: ClientSide | None = None
    try:
        with redis_server(args.redis_url) as server:
            if server.embedded is not None and server.pid and edge_cpu is not None:
                pin(server.pid, args.bench_cpu)
                notes.append(f"embedded valkey-server pinned to CPU {args.bench_cpu}")
            elif server.embedded is None:
                notes.append("Redis: --redis-url (not pinned, CPU not measured)")
            prefix = bench_prefix("fanout")
            edge = EdgeProcess(server.url, prefix, edge_cpu, shlex.split(args.edge_args))
            if wsload is not None:
                side = CClients(wsload, args, edge.port,
                                args.bench_cpu if edge_cpu is not None else None)
            else:
                side = PyClients(args, edge.port, channel_names(args))
            try:
                edge.start()
                print("; ".join(notes), flush=True)
                if args.edge_args:
                    print(f"edge flags: {args.edge_args}", flush=True)
                names = channel_names(args)
                on = (f"on one channel ({args.channel})" if len(names) == 1 else
                      f"each on {len(names)} channels ({names[0]} ... {names[-1]}, the rate "
                      "published round-robin over them)")
                print(f"client: {side.description}; {args.clients} clients {on}, JSON "
                      f"subprotocol, no compression; {args.warmup:g} s warm-up + "
                      f"{args.duration:g} s per rate", flush=True)
                lines = run_async(run(args, server.url, prefix, edge, side, server.pid))
                log = edge.output().strip()
                if log:
                    lines += ["", "edge log (warnings and errors; tail):", log[-3_000:]]
            except BenchTimeout as exc:
                print(f"aborted: {exc}", file=sys.stderr)
                status = 1
                lines = []
            except Exception:
                tail = edge.output() if edge.proc is not None else ""
                if tail:
                    print(f"edge output (tail):\n{tail}", file=sys.stderr)
                if isinstance(side, CClients) and side.proc is not None:
                    print(f"wsload output (tail):\n{side.output()}", file=sys.stderr)
                raise
            finally:
                if isinstance(side, CClients):
                    side.kill()  # normally gone already: `quit` in _run's finally
                edge.stop()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print("\n".join(lines))
    return status


if __name__ == "__main__":
    sys.exit(main())
