"""Per-frame cost with one subscriber per channel: the edge against a minimal relay.

The shape of per-account channels: `--clients` WebSocket clients (bench/wsload.c with
`--per-client`), client i subscribed only to `<channel><i mod K>` (K = `--channels`, default
one channel per client), and a publisher spreading a fixed total rate round-robin over the K
channels. Nothing coalesces across clients: every message is one frame to one client, so
what is measured is the per-message path (pub/sub parse, dispatch, session, write).

Two servers, both pinned to the edge CPU, both running the whole time: a fanout edge
(`python -m fanout edge`) and bench/relay.py (a plain `websockets` server forwarding Redis
pub/sub, the floor). Runs alternate between them (edge, relay, relay, edge, ...), each with a
fresh wsload process of the same settings against that server; the clients, the publisher
and Valkey are on the bench CPU. Per run: `--warmup` s, `--duration` s measured, then a drain
until every client has its channel's last offset. The server's CPU (utime + stime from
/proc/<pid>/stat) over the window divided by the frames the clients received in it is the
**CPU per frame**; the table gives each run and the median per server, and the ratio
edge / relay of the medians.

    .venv/bin/python bench/perframe.py [--clients 500] [--rates 2000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _common import (
    HOST,
    EdgeProcess,
    bench_prefix,
    child_preexec,
    delete_prefix,
    environment,
    pin,
    progress,
    redis_server,
    run_async,
    sigterm_as_interrupt,
    source_root,
    source_state,
    table,
    wait_ready,
)
from delivery import CClients, Context, Phase, SetupError, build_wsload, message, run_phase
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.loop import LOOPS, resolve
from ingest.publisher import Publisher

RELAY = Path(__file__).resolve().parent / "relay.py"
NODE_RELAY = Path(__file__).resolve().parent / "noderelay"


class RelayProcess(EdgeProcess):
    """bench/relay.py on a free loopback port, pinned like the edge, killed with us: an
    edge's lifecycle (stop, output, pid), another command."""

    name = "relay"

    def __init__(self, redis_url: str, prefix: str, cpu: int | None, loop: str) -> None:
        super().__init__(redis_url, prefix, cpu, [])
        self.loop = loop

    def command(self) -> list[str]:
        return [sys.executable, str(RELAY), "--host", HOST, "--port", str(self.port),
                "--redis-url", self.redis_url, "--key-prefix", self.prefix, "--loop", self.loop]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command(), cwd=source_root(), stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, preexec_fn=child_preexec(self.cpu),
            start_new_session=True,
        )

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(HOST, self.port)
                writer.close()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s")
            await asyncio.sleep(0.1)


class NodeRelayProcess(RelayProcess):
    """bench/noderelay/relay.mjs (Node.js: `ws` + node-redis, its packages installed with
    `npm ci` from the committed lock): the same relay in the runtime the issue's
    reference figure came from."""

    name = "node"

    @staticmethod
    def install() -> None:
        """`npm ci` once (the versions and hashes of bench/noderelay/package-lock.json)."""
        if (NODE_RELAY / "node_modules" / "ws").is_dir():
            return
        if shutil.which("npm") is None:
            raise SetupError("--relays node needs Node.js and npm on the PATH")
        done = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"],
                              cwd=NODE_RELAY, capture_output=True, text=True, check=False)
        if done.returncode:
            raise SetupError(f"npm ci in {NODE_RELAY} failed: {done.stderr.strip()[-500:]}")

    def command(self) -> list[str]:
        return ["node", str(NODE_RELAY / "relay.mjs"), "--host", HOST, "--port",
                str(self.port), "--redis-url", self.redis_url, "--key-prefix", self.prefix]


@dataclass
class Run:
    server: str
    rate: float
    phase: Phase
    expected: int  # publications the clients should have received in the phase

    @property
    def us_per_pub(self) -> float:
        """µs of the server's CPU per publication delivered (one frame each: nothing
        coalesces with one subscriber per channel at these rates)."""
        p = self.phase
        if not p.window_pubs:
            return float("nan")
        return p.edge_cpu / 100 * p.client_window_s / p.window_pubs * 1e6

    @property
    def lost(self) -> int:
        return self.expected - self.phase.received


def order(runs: int, servers: list[str]) -> list[str]:
    """edge, relay, relay, edge, edge, relay, ...: each server first in half the rounds
    (with more servers: the round's order reversed every other round)."""
    out: list[str] = []
    for i in range(runs):
        out += servers if i % 2 == 0 else servers[::-1]
    return out


async def one_run(args: argparse.Namespace, server: str, port: int, pid: int,
                  publisher: Publisher, channels: list[str], last: list[int],
                  wsload: Path, cpus: tuple[int | None, int | None],
                  valkey_pid: int | None) -> list[Run]:
    side = CClients(wsload, args, port, cpus[1])
    side.cmd.append("--per-client")
    try:
        await side.connect()
        snap = await side.snapshot()
        if snap.open != args.clients:
            raise RuntimeError(f"{server}: only {snap.open} of {args.clients} clients subscribed")
        ctx = Context(args, publisher, channels, last, side, pid, valkey_pid, cpus[0],
                      cpus[1])
        out = []
        for rate in args.rates:
            phase = await run_phase(ctx, rate)
            per_channel = args.clients // len(channels)
            out.append(Run(server, rate, phase, phase.published * per_channel))
            r = out[-1]
            progress(f"  {server} {rate:g}/s: {r.us_per_pub:.1f} us/pub, "
                     f"{phase.edge_cpu:.0f} % CPU, {phase.frames:,.0f} frames/s, "
                     f"lost {r.lost}, gaps/dups {phase.gaps}/{phase.dups}, drain "
                     f"{phase.drain_s:.2f} s{'' if phase.drained else ' (timeout)'}")
        return out
    finally:
        await side.stop()
        side.kill()


async def _main(args: argparse.Namespace, url: str, valkey_pid: int | None, wsload: Path,
                cpus: tuple[int | None, int | None]) -> list[str]:
    prefix = bench_prefix("perframe")
    redis = Redis.from_url(url, decode_responses=True)
    # The same event loop for both, so that the comparison stays fair.
    edge = EdgeProcess(url, prefix, cpus[0], ["--loop", args.loop, *shlex.split(args.edge_args)])
    relays = {"relay": RelayProcess(url, prefix, cpus[0], resolve(args.loop))}
    if "node" in args.relays:
        relays["node"] = NodeRelayProcess(url, prefix, cpus[0], "node")
    names = ["edge", *relays]
    runs: list[Run] = []
    try:
        publisher = Publisher(RedisBroker(redis, Keys(prefix)))
        channels = [f"{args.channel}{j}" for j in range(args.channels)]
        results = await publisher.publish_batch([message(c, time.time(), 0) for c in channels])
        last = [r.offset for r in results]
        edge.start()
        for relay in relays.values():
            relay.start()
        await wait_ready(edge)
        for relay in relays.values():
            await relay.wait_ready()
        servers = {"edge": (edge.port, edge.pid),
                   **{name: (relay.port, relay.pid) for name, relay in relays.items()}}
        for i, server in enumerate(order(args.runs, names)):
            progress(f"run {i + 1}/{len(names) * args.runs}: {server}")
            port, pid = servers[server]
            runs += await one_run(args, server, port, pid, publisher, channels, last, wsload,
                                  cpus, valkey_pid)
    finally:
        logs = {"edge": edge.output().strip(),
                **{name: relay.output().strip() for name, relay in relays.items()}}
        edge.stop()
        for relay in relays.values():
            relay.stop()
        with contextlib.suppress(Exception):
            await delete_prefix(redis, prefix)
        await redis.aclose()
    out = [table(
        ["server", "publish rate/s", "frames/s", "msgs/frame", "server CPU %", "us CPU/pub",
         "lost", "gaps/dups", "p50 ms", "p99 ms"],
        [[r.server, round(r.rate), round(r.phase.frames),
          round(r.phase.window_pubs / max(r.phase.window_frames, 1), 2),
          round(r.phase.edge_cpu), round(r.us_per_pub, 1), r.lost,
          f"{r.phase.gaps}/{r.phase.dups}", round(r.phase.p50 * 1e3, 1),
          round(r.phase.p99 * 1e3, 1)] for r in runs],
    ), ""]
    rows = []
    for rate in args.rates:
        med = {s: statistics.median(r.us_per_pub for r in runs
                                    if r.server == s and r.rate == rate)
               for s in names}
        rows.append([round(rate), *(round(med[s], 1) for s in names),
                     *(round(med["edge"] / med[s], 2) for s in names[1:])])
    out += ["Median CPU per frame (us) over the runs (relay: bench/relay.py, Python; node: "
            "bench/noderelay/relay.mjs):", "",
            table(["publish rate/s", *names, *(f"edge / {s}" for s in names[1:])], rows)]
    for name, log in logs.items():
        if log:
            out += ["", f"{name} log (tail):", log[-2_000:]]
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=500)
    p.add_argument("--channels", type=int, default=None,
                   help="channels (default: --clients); client i on channel i mod K")
    p.add_argument("--rates", default="2000",
                   help="total publish rates (msgs/s, comma-separated), each run")
    p.add_argument("--runs", type=int, default=3, help="runs per server (interleaved)")
    p.add_argument("--relays", default="python",
                   help="relays beside the edge: python (bench/relay.py), or python,node "
                        "(also bench/noderelay/relay.mjs: needs node and npm)")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--drain", type=float, default=10.0)
    p.add_argument("--channel", default="trades.PF", help="prefix of the channel names")
    p.add_argument("--connect-concurrency", type=int, default=50)
    p.add_argument("--edge-cpu", type=int, default=0)
    p.add_argument("--bench-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--edge-args", default="", help="extra flags for `fanout edge`")
    p.add_argument("--loop", default="auto", choices=LOOPS,
                   help="event loop of both the edge (--loop) and the relay")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"))
    args = p.parse_args()
    args.channels = args.channels or args.clients
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    if args.relays not in (["python"], ["python", "node"]):
        p.error("--relays: python or python,node")
    if args.clients % args.channels:
        p.error("--clients must be a multiple of --channels")
    if args.channels > 10_000:
        p.error("--channels: at most 10000 (wsload)")
    return args


def main() -> int:
    args = parse_args()
    sigterm_as_interrupt()
    print(f"fanout benchmark: {environment()}", flush=True)
    print(source_state(), flush=True)
    try:
        wsload = build_wsload()
        if "node" in args.relays:
            NodeRelayProcess.install()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cpus: tuple[int | None, int | None] = (None, None)
    if not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and pin(0, args.bench_cpu):
        cpus = (args.edge_cpu, args.bench_cpu)
    print(f"{args.clients} clients on {args.channels} channels ({args.channel}0 ...), "
          f"client i on channel i mod {args.channels}; servers pinned to CPU {cpus[0]}, "
          f"clients, publisher and Valkey to CPU {cpus[1]}; {args.warmup:g} s warm-up + "
          f"{args.duration:g} s per run; event loop {resolve(args.loop)} for both", flush=True)
    try:
        with redis_server(args.redis_url) as server:
            if server.pid and cpus[1] is not None:
                pin(server.pid, cpus[1])
            lines = run_async(_main(args, server.url, server.pid, wsload, cpus))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
