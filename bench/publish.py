"""Publish throughput of one ingest process.

Runs the real ingest `Worker` over a `SimulatedFeed` whose rate is so high that pacing never
holds it back (it ends after `--messages`), at each `--batch-sizes`, against an embedded
Valkey (or `--redis-url`). Every publish goes through the real Lua publish script (offset,
history append + trim, snapshot, idempotency, one live PUBLISH per call). Afterwards the
`top` of every channel's meta hash is summed: it must equal the number of messages, or the
run fails.

Two more rows put the worker's rate in context: the feed alone (simulate and iterate, no
publishing), and `Publisher.publish_batch` in a plain loop over pre-built messages (the
publish ceiling without the feed and the worker's queue).

    .venv/bin/python bench/publish.py [--messages 200000] [--batch-sizes 1,50,500]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

from _common import (
    CpuBusy,
    CpuMeter,
    bench_prefix,
    delete_prefix,
    environment,
    redis_server,
    run_async,
    sigterm_as_interrupt,
    source_state,
    table,
)
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from ingest.feeds.sim import SimulatedFeed
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from ingest.worker import IngestMetrics, Worker

SYMBOLS = ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM")
FEED_RATE = 1e9  # per symbol: the feed is always "behind schedule", so it never sleeps

log = logging.getLogger("bench.publish")


@dataclass
class Row:
    mode: str
    batch: int
    messages: int
    seconds: float
    bench_cpu: float
    valkey_cpu: float | None
    machine: tuple[float, float]  # (busy %, steal %) of the whole machine, 100 % per CPU
    check: str
    mean_batch: float | None = None  # messages per round trip, as the worker formed them

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def cells(self) -> list[object]:
        valkey = "n/a" if self.valkey_cpu is None else round(self.valkey_cpu)
        busy, steal = self.machine
        others = busy - self.bench_cpu - (self.valkey_cpu or 0.0)
        mean = "-" if self.mean_batch is None else round(self.mean_batch, 1)
        return [self.mode, self.batch or "-", mean, self.messages, round(self.seconds, 2),
                round(self.rate), round(self.bench_cpu), valkey, round(max(others, 0.0)),
                round(steal, 1), self.check]


HEADERS = ["mode", "batch size", "mean batch", "messages", "seconds", "msgs/s", "bench CPU %",
           "valkey CPU %", "rest CPU %", "steal %", "check"]


def new_feed(messages: int, seed: int) -> SimulatedFeed:
    return SimulatedFeed(SYMBOLS, FEED_RATE, seed, max_messages=messages)


async def channel_tops(redis: Redis, prefix: str) -> tuple[int, int]:
    """(channels, sum of their `top`): every offset assigned under `prefix`."""
    keys = [k async for k in redis.scan_iter(match=f"{prefix}:{{*}}:meta", count=1_000)]
    if not keys:
        return 0, 0
    async with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(key, "top")
        tops = await pipe.execute()
    return len(keys), sum(int(t or 0) for t in tops)


class Meters:
    """CPU of this process, of the embedded Valkey, and of the whole machine."""

    def __init__(self, valkey_pid: int | None) -> None:
        self.me = CpuMeter(os.getpid())
        self.valkey = CpuMeter(valkey_pid) if valkey_pid else None
        self.machine = CpuBusy()

    def read(self) -> tuple[float, float | None, tuple[float, float]]:
        return (self.me.percent(), self.valkey.percent() if self.valkey else None,
                self.machine.percent())


async def run_worker(url: str, valkey_pid: int | None, messages: int, batch: int,
                     seed: int) -> Row:
    redis = Redis.from_url(url, decode_responses=True, socket_timeout=10.0,
                           socket_connect_timeout=5.0)
    prefix = bench_prefix("publish")
    try:
        registry = CollectorRegistry()
        worker = Worker(new_feed(messages, seed), Publisher(RedisBroker(redis, Keys(prefix))), log,
                        IngestMetrics(registry), batch_size=batch)
        await redis.ping()  # connect before the clock starts
        meters = Meters(valkey_pid)
        started = time.perf_counter()
        await worker.run()
        seconds = time.perf_counter() - started
        cpu = meters.read()
        channels, total = await channel_tops(redis, prefix)

        def metric(name: str) -> int:
            return int(registry.get_sample_value(f"fanout_ingest_{name}_total") or 0)

        published, dups = metric("published"), metric("duplicates")
        rejected, errors = metric("rejected"), metric("publish_errors")
        ok = total == messages == published and not (dups or rejected)
        check = (f"ok: {channels} channels, sum(top)={total:,}" if ok else
                 f"FAILED: sum(top)={total:,} published={published:,} duplicates={dups} "
                 f"rejected={rejected}")
        if errors:
            check += f" ({errors} retried round trips)"
        trips = registry.get_sample_value("fanout_ingest_batch_size_count") or 0
        mean = (registry.get_sample_value("fanout_ingest_batch_size_sum") or 0) / max(trips, 1)
        return Row("Worker + SimulatedFeed", batch, messages, seconds, *cpu, check, mean)
    finally:
        await delete_prefix(redis, prefix)
        await redis.aclose()


async def prebuilt(messages: int, seed: int) -> list[UpstreamMessage]:
    return [m async for m in new_feed(messages, seed).messages()]


async def run_feed_only(messages: int, seed: int) -> Row:
    meters = Meters(None)
    started = time.perf_counter()
    count = len(await prebuilt(messages, seed))
    seconds = time.perf_counter() - started
    check = "ok" if count == messages else f"FAILED: {count:,} messages"
    return Row("SimulatedFeed only (no publish)", 0, count, seconds, *meters.read(), check)


async def run_raw(url: str, valkey_pid: int | None, messages: int, batch: int,
                  seed: int) -> Row:
    batch_list = await prebuilt(messages, seed)
    redis = Redis.from_url(url, decode_responses=True, socket_timeout=10.0,
                           socket_connect_timeout=5.0)
    prefix = bench_prefix("publish")
    try:
        publisher = Publisher(RedisBroker(redis, Keys(prefix)))
        await redis.ping()
        meters = Meters(valkey_pid)
        started = time.perf_counter()
        fresh = 0
        for i in range(0, len(batch_list), batch):
            results = await publisher.publish_batch(batch_list[i : i + batch])
            fresh += sum(not r.duplicate for r in results)
        seconds = time.perf_counter() - started
        cpu = meters.read()
        channels, total = await channel_tops(redis, prefix)
        ok = total == messages == fresh
        check = (f"ok: {channels} channels, sum(top)={total:,}" if ok else
                 f"FAILED: sum(top)={total:,} new offsets={fresh:,}")
        mean = messages / -(-messages // batch)
        return Row("raw publish_batch loop (pre-built)", batch, messages, seconds, *cpu, check,
                   mean)
    finally:
        await delete_prefix(redis, prefix)
        await redis.aclose()


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,50,500, got {text!r}") from None
    if not sizes or any(not 1 <= s <= 10_000 for s in sizes):
        raise argparse.ArgumentTypeError("batch sizes must be between 1 and 10000")
    return sizes


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=positive, default=200_000,
                   help="messages per row (default 200000)")
    p.add_argument("--batch-sizes", type=batch_sizes, default=[1, 50, 500],
                   help="Worker batch sizes, comma-separated (default 1,50,500)")
    p.add_argument("--raw-batch", type=positive, default=None,
                   help="batch size of the raw publish_batch row (default: the largest)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"),
                   help="use this Redis/Valkey instead of an embedded one (keys go under a "
                   "bench-publish-* prefix and are deleted afterwards) [env BENCH_REDIS_URL]")
    p.add_argument("--seed", type=int, default=1)
    return p.parse_args()


async def run(args: argparse.Namespace, url: str, valkey_pid: int | None) -> list[Row]:
    rows: list[Row] = []
    for batch in args.batch_sizes:
        print(f"  Worker, batch size {batch} ...", file=sys.stderr, flush=True)
        rows.append(await run_worker(url, valkey_pid, args.messages, batch, args.seed))
    print("  SimulatedFeed only ...", file=sys.stderr, flush=True)
    rows.append(await run_feed_only(args.messages, args.seed))
    raw_batch = args.raw_batch or max(args.batch_sizes)
    print(f"  raw publish_batch, batch size {raw_batch} ...", file=sys.stderr, flush=True)
    rows.append(await run_raw(url, valkey_pid, args.messages, raw_batch, args.seed))
    return rows


def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
    sigterm_as_interrupt()
    print(f"publish benchmark: {environment()}", flush=True)
    print(source_state(), flush=True)
    try:
        with redis_server(args.redis_url) as server:
            where = "embedded valkey-server" if server.embedded else "--redis-url server"
            print(f"{where}; {len(SYMBOLS)} symbols; {args.messages:,} messages per row; "
                  "one Python process, one event loop", flush=True)
            rows = run_async(run(args, server.url, server.pid))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(table(HEADERS, [r.cells() for r in rows]))
    print()
    print("CPU, 100 % = one core: bench = this process (feed, worker, publisher, redis-py); "
          "valkey = the server (n/a with --redis-url); rest = everything else busy on the "
          "machine meanwhile (other processes, interrupts, a --redis-url server running here); "
          "steal = time the hypervisor gave to other VMs.")
    failed = [r for r in rows if not r.check.startswith("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
