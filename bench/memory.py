"""Memory per idle connection of one edge process.

For each of `--connections` (1k, 5k, 10k): a fresh edge (`python -m fanout edge`, pinned to
the edge CPU), its RSS read from /proc/<pid>/status once it is ready, then N WebSocket
clients from a separate process (bench/wsload.c with `--per-client`: client i sends
`connect`, then subscribes to `<channel><i mod K>`, K = N by default: one subscription each,
on a channel of its own, the shape of per-account channels), and the edge's RSS again once
every client is subscribed and `--settle` seconds have passed. Nothing is published: the
connections are idle (the edge's pings, every `ping_interval`, are answered). KiB per
connection = (RSS after - RSS before) / N. Socket buffers are kernel memory, not in the RSS.

    .venv/bin/python bench/memory.py [--connections 1000,5000,10000] [--channels-per N]
    .venv/bin/python bench/memory.py --connections 2000 --tracemalloc 15   # where it goes

`--tracemalloc F` runs the edge under tracemalloc (F frames per traceback: slower, and its
RSS is not comparable) and prints, per connection, the Python allocations that the N
connections added, by source line and by file (snapshots before and after, each after a
full garbage collection; bench/tracededge.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pickle
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

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
from delivery import CClients, SetupError, build_wsload
from redis.asyncio import Redis

TRACED = Path(__file__).resolve().parent / "tracededge.py"


class TracedEdge(EdgeProcess):
    """The edge under tracemalloc (bench/tracededge.py): `snapshot()` writes one."""

    def __init__(self, frames: int, *args: Any) -> None:
        super().__init__(*args)
        self.frames = frames
        self.dir = tempfile.mkdtemp(prefix="bench-tracemalloc-")
        self.taken = 0

    def start(self) -> None:
        cmd = [
            sys.executable, str(TRACED), f"{self.dir}/snap", str(self.frames), "edge",
            "--host", HOST, "--port", str(self.port), "--key-prefix", self.prefix,
            "--log-level", "warning", "--max-connections", "0",
            "--max-connections-per-ip", "0", *self.extra,
        ]
        env = {**os.environ, "FANOUT_REDIS_URL": self.redis_url}
        env.pop("FANOUT_REDIS_URL_FILE", None)
        self.proc = subprocess.Popen(
            cmd, cwd=source_root(), env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT, preexec_fn=child_preexec(self.cpu),
            start_new_session=True,
        )

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @staticmethod
    def _load(path: Path) -> tracemalloc.Snapshot:
        snap = tracemalloc.Snapshot.load(str(path))
        path.unlink()
        return snap

    async def snapshot(self) -> tracemalloc.Snapshot:
        path = Path(f"{self.dir}/snap.{self.taken}")
        self.taken += 1
        os.kill(self.pid, signal.SIGUSR1)
        for _ in range(600):  # written by the edge after a full collection
            await asyncio.sleep(0.1)
            with contextlib.suppress(OSError, EOFError, pickle.UnpicklingError):
                return await asyncio.to_thread(self._load, path)
        raise RuntimeError("no tracemalloc snapshot from the edge")


def breakdown(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, n: int,
              top: int) -> list[str]:
    """What the connections added, per connection: by line, then by file."""
    lines = []
    for key in ("lineno", "filename"):
        stats = after.compare_to(before, key)
        total = sum(s.size_diff for s in stats)
        lines.append(f"tracemalloc, by {key}: {total / n / 1024:.2f} KiB per connection")
        for stat in stats[:top]:
            frame = stat.traceback[0]
            where = frame.filename.split("site-packages/")[-1].split("/python3.11/")[-1]
            where = where.removeprefix(str(source_root()) + "/")
            if key == "lineno":
                where += f":{frame.lineno}"
            lines.append(f"  {stat.size_diff / n:7.0f} B {stat.count_diff / n:6.2f} blocks  "
                         f"{where}")
    return lines


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def measure(args: argparse.Namespace, url: str, wsload: Path, n: int,
                  cpus: tuple[int | None, int | None]) -> list[object]:
    prefix = bench_prefix("memory")
    edge_args = (url, prefix, cpus[0], shlex.split(args.edge_args))
    edge = TracedEdge(args.tracemalloc, *edge_args) if args.tracemalloc else EdgeProcess(
        *edge_args)
    redis = Redis.from_url(url, decode_responses=True)
    side: CClients | None = None
    try:
        edge.start()
        await wait_ready(edge)
        await asyncio.sleep(args.settle)
        before = rss_kib(edge.pid)
        snap_before = await edge.snapshot() if isinstance(edge, TracedEdge) else None
        channels = args.channels or n
        ns = argparse.Namespace(channel=args.channel, channels=channels, clients=n,
                                connect_concurrency=args.connect_concurrency)
        side = CClients(wsload, ns, edge.port, cpus[1])
        side.cmd.append("--per-client")
        started = time.perf_counter()
        await side.connect()
        took = time.perf_counter() - started
        snap = await side.snapshot()
        if snap.open != n:
            raise RuntimeError(f"only {snap.open} of {n} clients subscribed")
        await asyncio.sleep(args.settle)
        after = rss_kib(edge.pid)
        if isinstance(edge, TracedEdge) and snap_before is not None:
            print("\n".join(breakdown(snap_before, await edge.snapshot(), n, args.top)),
                  flush=True)
        snap = await side.snapshot()
        progress(f"  {n:,} connections: {before / 1024:.1f} -> {after / 1024:.1f} MiB, "
                 f"{(after - before) / n:.1f} KiB each (connected in {took:.1f} s)")
        return [f"{n:,}", channels, round(before / 1024, 1), round(after / 1024, 1),
                round((after - before) / n, 1), snap.open, snap.disconnects]
    finally:
        if side is not None:
            await side.stop()
            side.kill()
        edge.stop()
        with contextlib.suppress(Exception):
            await delete_prefix(redis, prefix)
        await redis.aclose()


async def _main(args: argparse.Namespace, url: str, wsload: Path,
                cpus: tuple[int | None, int | None]) -> list[str]:
    rows = []
    for _ in range(args.runs):
        for n in args.connections:
            rows.append(await measure(args, url, wsload, n, cpus))
    return [table(["connections", "channels", "RSS before MiB", "RSS after MiB",
                   "KiB per connection", "open at the end", "disconnected"], rows)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", default="1000,5000,10000",
                   help="idle connections per row (comma-separated)")
    p.add_argument("--channels", type=int, default=0,
                   help="channels (client i on channel i mod K); default: one per connection")
    p.add_argument("--channel", default="trades.MEM", help="prefix of the channel names")
    p.add_argument("--runs", type=int, default=1, help="times each row is measured")
    p.add_argument("--settle", type=float, default=2.0,
                   help="s to wait before each RSS reading")
    p.add_argument("--connect-concurrency", type=int, default=200)
    p.add_argument("--edge-cpu", type=int, default=0)
    p.add_argument("--bench-cpu", type=int, default=1)
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--edge-args", default="", help="extra flags for `fanout edge`")
    p.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                   help="trace the edge's allocations (FRAMES per traceback) and print "
                        "where the connections' memory goes (0 = off)")
    p.add_argument("--top", type=int, default=30, help="lines of the --tracemalloc breakdown")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"))
    args = p.parse_args()
    args.connections = [int(c) for c in args.connections.split(",") if c.strip()]
    if any(c > 10_000 for c in args.connections) and not args.channels:
        p.error("more than 10000 connections need --channels (wsload: at most 10000)")
    return args


def main() -> int:
    args = parse_args()
    sigterm_as_interrupt()
    print(f"fanout benchmark: {environment()}", flush=True)
    print(source_state(), flush=True)
    try:
        wsload = build_wsload()
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The edge inherits this limit: 10,000 connections need more than the usual 1,024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max(args.connections) + 1_000
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(need, soft)), hard))
    cpus: tuple[int | None, int | None] = (None, None)
    if not args.no_pin and len(os.sched_getaffinity(0)) >= 2 and pin(0, args.bench_cpu):
        cpus = (args.edge_cpu, args.bench_cpu)
    print(f"idle connections, one subscription each; edge pinned to CPU {cpus[0]}, clients "
          f"and Valkey to CPU {cpus[1]}; RSS from /proc/<pid>/status", flush=True)
    try:
        with redis_server(args.redis_url) as server:
            if server.pid and cpus[1] is not None:
                pin(server.pid, cpus[1])
            lines = run_async(_main(args, server.url, wsload, cpus))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
