"""Per-shard publish efficiency: sequenced publishes/s per Redis core, as a ratio to raw
XADD on the same server in the same run.

One embedded Valkey (or `--redis-url` with `--valkey-pid`) serves every row, round after
round (`--rounds`), the code trees (`--tree`, e.g. this checkout and a detached worktree of
an older commit) interleaved within each round:

- **XADD** (`redis-benchmark`, 50 clients, unpipelined as redis-benchmark runs by default,
  and with `-P 16`): the server's raw append rate, the reference.
- **Lua** (`redis-benchmark` sending EVALSHA, 50 clients, `-P 16`): a do-nothing script
  (bench/noop.lua), and the tree's publish.lua with 1 message and with `--lua-messages`
  messages per call (a tree whose publish.lua takes one message per call gets only the
  1-message rows). The messages are the simulated feed's trades (snapshot mode `last`) or
  quotes (`merge`) of one symbol, each with a fresh upstream id (`__rand_int__`). What the
  server alone can do, without any Python.
- **publish_batch** (the tree's `Publisher.publish_batch`, one connection, one batch at a
  time, over pre-built messages of the simulated feed, 8 symbols, 24 channels): the
  sequenced publish path of one ingest process, per `--batch-sizes`. Every channel's `top`
  is summed afterwards: it must equal the messages published, or the run fails.

Per row: msgs/s, the server's CPU (from /proc/<valkey pid>), msgs/s per Redis core (msgs/s
÷ the server's CPU in cores), that as a ratio to XADD's per core in the same round, and for
publish_batch the CPU µs per message of the publishing process and of the server.

    .venv/bin/python bench/shard.py --tree new=. --tree old=/tmp/base [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
REDIS_BENCHMARK = "redis-benchmark"
CLIENTS = 50
SYMBOLS = ("MNQ", "MES", "NQ", "ES", "M2K", "MYM", "RTY", "YM")
RAND = "__rand_int__"

# Run this file as a child on another code tree: drop the editable install's finder (it
# would import this checkout whatever sys.path says), put the tree first, run as __main__.
_BOOT = """\
import runpy, sys
tree, script = sys.argv[1], sys.argv[2]
sys.meta_path = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith(
    '__editable__')]
sys.path[:0] = [tree]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name='__main__')
"""


def _common() -> Any:
    sys.path.insert(0, str(HERE))
    import _common

    return _common


# --- redis-benchmark -----------------------------------------------------------------------


def redis_benchmark(url: str, pid: int, requests: int, pipeline: int,
                    command: Sequence[str | int], *, rand: bool = False) -> tuple[float, float]:
    """(requests/s, the server's CPU in cores) of one redis-benchmark run."""
    where = urlsplit(url)
    meter = _common().CpuMeter(pid)
    args = [REDIS_BENCHMARK, "-h", where.hostname or "127.0.0.1",
            "-p", str(where.port or 6379), "-n", str(requests), "-c", str(CLIENTS),
            "-P", str(pipeline), "--csv"]
    if rand:
        args += ["-r", "2000000000"]
    out = subprocess.run([*args, *map(str, command)], capture_output=True, text=True,
                         timeout=600, check=True).stdout
    cores = meter.percent() / 100
    rows = [line for line in out.splitlines() if line and not line.startswith('"test"')]
    rate = float(rows[-1].rsplit('","', 7)[1])  # the test's name may hold '","'
    return rate, cores


# --- child: one code tree ------------------------------------------------------------------


async def prebuilt(messages: int, seed: int) -> list[Any]:
    from ingest.feeds.sim import SimulatedFeed

    feed = SimulatedFeed(SYMBOLS, 1e9, seed, max_messages=messages)
    return [m async for m in feed.messages()]


def publish_script_args(requests: list[Any], prefix: str) -> list[list[str | int]]:
    """The EVALSHA arguments (numkeys, KEYS, ARGV) this tree's publish.lua gets for
    `requests` (one channel), one list per call, each upstream id made `__rand_int__`."""
    from common.broker import scripts
    from common.broker.keys import Keys

    keys = Keys(prefix)
    calls: list[tuple[list[str], list[str | int]]] = []
    if hasattr(scripts, "group_publishes"):
        for call in scripts.group_publishes(requests):
            calls.append(scripts.publish_call(keys, call, requests, "e0", None, meta_ttl=86_400,
                                              idempotency_ttl=3_600))
    else:  # an older tree: one message per call, publish_call(keys, request, epoch, fence)
        one: Any = scripts.publish_call
        calls = [one(keys, r, "e0", None, meta_ttl=86_400, idempotency_ttl=3_600)
                 for r in requests]
    ids = {r.msg_id for r in requests}
    out = []
    for ks, argv in calls:
        # An older publish.lua gets one key per id (made random); a newer one the ids'
        # hashes per time bucket (kept), and the ids themselves in ARGV (made random).
        ks = [k.replace(":idem:", ":idem:" + RAND + RAND)
              if k.rpartition(":idem:")[2] in ids else k for k in ks]
        argv = [RAND + RAND if a in ids else a for a in argv]
        out.append([len(ks), *ks, *argv])
    return out


async def lua_rows(args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    from redis.asyncio import Redis

    from common.broker import scripts
    from ingest.publisher import Publisher

    redis = Redis.from_url(args.redis_url, decode_responses=True)
    rows: list[dict[str, Any]] = []
    try:
        noop = (HERE / "noop.lua").read_text(encoding="utf-8")
        sha_noop = await redis.script_load(noop)
        sha = await redis.script_load(scripts.source("publish"))
        one_per_call = not hasattr(scripts, "group_publishes")
        rate, cores = redis_benchmark(args.redis_url, args.valkey_pid, args.lua_calls, 16,
                                      ["EVALSHA", sha_noop, 0])
        rows.append(row(label, "EVALSHA noop.lua", 1, rate, cores))
        messages = await prebuilt(20_000, args.seed)
        publisher = Publisher(None)  # type: ignore[arg-type]  # only to build requests
        for channel in ("trades.MNQ", "quotes.MNQ"):
            reqs = [publisher._request(m) for m in messages if m.channel == channel]
            for per_call in sorted({1, *args.lua_messages}):
                if per_call > 1 and one_per_call:
                    continue
                if per_call > len(reqs):
                    raise SystemExit(f"only {len(reqs)} messages of {channel}")
                calls = publish_script_args(reqs[:per_call], f"bench-shard-{os.getpid()}")
                assert len(calls) == 1
                n = max(args.lua_calls // per_call, 200)
                rate, cores = redis_benchmark(args.redis_url, args.valkey_pid, n, 16,
                                              ["EVALSHA", sha, *calls[0]], rand=True)
                mode = reqs[0].snapshot_mode
                rows.append(row(label, f"EVALSHA publish.lua, {channel} ({mode})", per_call,
                                rate * per_call, cores))
                await redis.flushall()
    finally:
        await redis.aclose()
    return rows


async def publish_rows(args: argparse.Namespace, label: str) -> list[dict[str, Any]]:
    from redis.asyncio import Redis

    from common.broker.keys import Keys
    from common.broker.redisbroker import RedisBroker
    from ingest.publisher import Publisher

    c = _common()
    messages = await prebuilt(args.messages, args.seed)
    rows: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        redis = Redis.from_url(args.redis_url, decode_responses=True, socket_timeout=30.0)
        prefix = c.bench_prefix("shard")
        try:
            publisher = Publisher(RedisBroker(redis, Keys(prefix)))
            await publisher.publish_batch(messages[:1])  # connect, load the script
            me, server = c.CpuMeter(os.getpid()), c.CpuMeter(args.valkey_pid)
            started = time.perf_counter()
            for i in range(1, len(messages), batch):
                await publisher.publish_batch(messages[i : i + batch])
            seconds = time.perf_counter() - started
            mine, cores = me.percent() / 100, server.percent() / 100
            keys = [k async for k in redis.scan_iter(match=f"{prefix}:{{*}}:meta", count=1000)]
            total = 0
            for k in keys:
                total += int(await redis.hget(k, "top") or 0)
            if total != len(messages):
                raise SystemExit(f"FAILED: sum(top)={total} for {len(messages)} messages")
            n = len(messages) - 1
            r = row(label, "publish_batch (sim feed, 24 channels)", batch, n / seconds, cores)
            r["ingest_us"] = mine * seconds / n * 1e6
            rows.append(r)
        finally:
            await c.delete_prefix(redis, prefix)
            await redis.aclose()
    return rows


def row(tree: str, what: str, size: int, rate: float, cores: float) -> dict[str, Any]:
    return {"tree": tree, "what": what, "size": size, "rate": rate, "cores": cores,
            "redis_us": cores / rate * 1e6 if rate else 0.0, "ingest_us": None}


def child(args: argparse.Namespace) -> int:
    rows = asyncio.run(lua_rows(args, args.label))
    rows += asyncio.run(publish_rows(args, args.label))
    print(json.dumps(rows))
    return 0


# --- parent --------------------------------------------------------------------------------


def run_tree(args: argparse.Namespace, label: str, tree: Path, url: str,
             pid: int) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-c", _BOOT, str(tree), str(tree / "bench" / "shard.py"), "--child",
           "--label", label, "--redis-url", url, "--valkey-pid", str(pid),
           "--messages", str(args.messages), "--lua-calls", str(args.lua_calls),
           "--batch-sizes", ",".join(map(str, args.batch_sizes)),
           "--lua-messages", ",".join(map(str, args.lua_messages)), "--seed", str(args.seed)]
    if not (tree / "bench" / "shard.py").exists():  # an older tree: run this file on it
        cmd[4] = str(Path(__file__).resolve())
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise SystemExit(f"{label}: exit {out.returncode}\n{out.stderr[-3000:]}")
    rows: list[dict[str, Any]] = json.loads(out.stdout.splitlines()[-1])
    return rows


def parent(args: argparse.Namespace) -> int:
    c = _common()
    trees = [(label, Path(path).resolve()) for label, path in args.tree]
    print(f"shard benchmark: {c.environment()}", flush=True)
    for label, path in trees:
        print(f"  {label}: {tree_state(path)}", flush=True)
    results: list[dict[str, Any]] = []
    with c.redis_server(args.redis_url) as server:
        pid = server.pid or args.valkey_pid
        if pid is None:
            raise SystemExit("--redis-url needs --valkey-pid (the server's CPU is measured)")
        for rnd in range(args.rounds):
            for pipeline in (1, 16):
                c.progress(f"round {rnd + 1}: XADD -P {pipeline}")
                rate, cores = redis_benchmark(server.url, pid, args.xadd_requests, pipeline,
                                              ["XADD", "bench-shard-xadd", "*", "f", "v"])
                results.append({**row("-", f"XADD (redis-benchmark -P {pipeline})", 1, rate,
                                      cores), "round": rnd})
                flushall(server.url)
            order = trees if rnd % 2 == 0 else trees[::-1]
            for label, path in order:
                c.progress(f"round {rnd + 1}: {label}")
                results += [{**r, "round": rnd}
                            for r in run_tree(args, label, path, server.url, pid)]
    print()
    print(report(results))
    return 0


def flushall(url: str) -> None:
    from redis import Redis

    client = Redis.from_url(url)
    try:
        client.flushall()
    finally:
        client.close()


def tree_state(path: Path) -> str:
    try:
        head = subprocess.run(["git", "-C", str(path), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10, check=True)
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--",
                                "common", "ingest"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return str(path)
    return f"{path} at {head.stdout.strip()[:70]}{' (+ local changes)' if dirty else ''}"


def report(results: list[dict[str, Any]]) -> str:
    """Medians over the rounds; the ratio is per round (to that round's XADD), then the
    median."""
    c = _common()
    xadd = {(r["round"], r["what"]): r["rate"] / r["cores"] for r in results
            if r["what"].startswith("XADD") and r["cores"] > 0}
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["what"], r["tree"], r["size"]), []).append(r)
    lines = []
    med = statistics.median

    def median_or_dash(values: list[float], digits: int) -> object:
        return round(med(values), digits) if values else "-"

    for (what, tree, size), rs in groups.items():
        measured = [r for r in rs if r["cores"] > 0]  # too short a run reads 0 CPU ticks
        per_core = [r["rate"] / r["cores"] for r in measured]
        ratio = [[r["rate"] / r["cores"] / xadd[key]
                  for r in measured if (key := (r["round"], f"XADD (redis-benchmark -P {p})"))
                  in xadd] for p in (1, 16)]
        ingest = [r["ingest_us"] for r in rs if r["ingest_us"] is not None]
        lines.append([what, tree, size, round(med(r["rate"] for r in rs)),
                      round(100 * med(r["cores"] for r in rs)), median_or_dash(per_core, 0),
                      median_or_dash(ratio[0], 2), median_or_dash(ratio[1], 3),
                      median_or_dash([r["redis_us"] for r in measured], 1),
                      median_or_dash(ingest, 1), len(rs)])
    headers = ["row", "tree", "msgs/call or batch", "msgs/s", "valkey CPU %",
               "msgs/s per Redis core", "÷ XADD -P1 per core", "÷ XADD -P16 per core",
               "Redis µs/msg", "ingest µs/msg", "runs"]
    return str(c.table(headers, lines))


def size_list(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,50,500, got {text!r}") from None
    if not sizes or any(not 1 <= s <= 10_000 for s in sizes):
        raise argparse.ArgumentTypeError("sizes must be between 1 and 10000")
    return sizes


def tree_arg(text: str) -> tuple[str, str]:
    label, sep, path = text.partition("=")
    if not sep or not label or not (Path(path) / "common" / "broker").is_dir():
        raise argparse.ArgumentTypeError(f"expected LABEL=PATH of a checkout, got {text!r}")
    return label, path


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tree", type=tree_arg, action="append",
                   help="LABEL=PATH of a checkout to measure (repeatable; default: new=this "
                   "checkout)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--messages", type=int, default=50_000,
                   help="messages per publish_batch row (default 50000)")
    p.add_argument("--batch-sizes", type=size_list, default=[1, 50, 500],
                   help="publish_batch batch sizes (default 1,50,500)")
    p.add_argument("--lua-messages", type=size_list, default=[10, 100],
                   help="messages per publish.lua call in the Lua rows, besides 1 "
                   "(default 10,100)")
    p.add_argument("--lua-calls", type=int, default=100_000,
                   help="EVALSHA calls of the 1-message Lua rows (fewer with more messages "
                   "per call, the same messages) (default 100000)")
    p.add_argument("--xadd-requests", type=int, default=300_000,
                   help="XADDs per redis-benchmark row (default 300000)")
    p.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL"),
                   help="a server to use instead of an embedded one: it must run on this "
                   "machine, with --valkey-pid, and it gets FLUSHALL [env BENCH_REDIS_URL]")
    p.add_argument("--valkey-pid", type=int, default=None)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--label", default="new", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tree is None:
        args.tree = [("new", str(HERE.parent))]
    return args


def main() -> int:
    args = parse_args()
    if args.child:
        return child(args)
    try:
        return parent(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
