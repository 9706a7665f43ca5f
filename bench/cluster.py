"""Redis Cluster against one Redis, in one session, rounds interleaved:

- **publish**: sequenced publishes/s (`Publisher.publish_batch`, `--batch` messages per
  batch over `--channels` trades channels of fresh names, spread over the shards, each
  message with an upstream id as the simulated feed's trades have) from
  `--publishers` processes at once, on one Valkey (`single`, RedisBroker), on a cluster of
  1 master and on a cluster of 3 masters (RedisClusterBroker; a replica per master, as
  deployed). Per row: msgs/s, the servers' CPU (all nodes, replicas included, and
  the masters', in cores), msgs/s per master core, the publishers' CPU µs per message.
  Every channel's last offset must equal the messages published to it, or the run fails.
- **delivery**: one `fanout edge` process on the single Valkey and on the 3-master
  cluster, `--clients` WebSocket clients (in this process) each subscribed to the same
  `--channels` channels (on all shards), a publisher at `--rate` msgs/s for `--duration`
  s: messages/s delivered to the clients in total, and the edge's CPU. Every client must
  get every message, in order (offsets contiguous), or the run fails.

    .venv/bin/python bench/cluster.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import websockets
from _common import (
    EdgeProcess,
    cpu_seconds,
    environment,
    progress,
    source_state,
    table,
    wait_ready,
    watchdog,
)

from common.broker.redisbroker import RedisBroker
from common.config import RedisSettings
from fanout.embedded import EmbeddedValkey, EmbeddedValkeyCluster
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage


class Target:
    """A data tier to publish to: its URL and its server processes."""

    def __init__(self, name: str, url: str, pids: list[int], masters: list[int]) -> None:
        self.name = name
        self.url = url
        self.pids = pids  # every server process
        self.masters = masters  # the masters' (replicas not included)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: of every server process, of the masters."""
        return (sum(cpu_seconds(pid) for pid in self.pids),
                sum(cpu_seconds(pid) for pid in self.masters))


@contextmanager
def targets(names: Sequence[str]) -> Iterator[dict[str, Target]]:
    out: dict[str, Target] = {}
    with ExitStack() as stack:
        for name in names:
            if name == "single":
                single = EmbeddedValkey()
                single.start()
                stack.callback(single.stop)
                assert single.pid is not None
                stack.enter_context(watchdog(single.pid))
                out[name] = Target(name, single.url, [single.pid], [single.pid])
            else:
                masters = int(name.split("-")[1])
                # One replica per master: a cluster of one master and no replica never
                # reaches cluster_state:ok here (nothing MEETs it).
                cluster = EmbeddedValkeyCluster(masters=masters, replicas=1)
                cluster.start()
                stack.callback(cluster.stop)
                pids = [n.pid for n in cluster.nodes if n.pid is not None]
                for pid in pids:
                    stack.enter_context(watchdog(pid))
                cluster.wait_healthy(60.0)
                masters_pids = [cluster.nodes[i].pid for i in cluster.masters()]
                out[name] = Target(name, cluster.url, pids,
                                   [pid for pid in masters_pids if pid is not None])
        yield out


# --- publish ---------------------------------------------------------------------------------


def _publisher_main(url: str, prefix: str, channels: list[str], messages: int, batch: int,
                    start: Any, out: Any) -> None:
    out.put(asyncio.run(_publish(url, prefix, channels, messages, batch, start)))


async def _publish(url: str, prefix: str, channels: list[str], messages: int, batch: int,
                   start: Any) -> tuple[float, float]:
    broker = RedisBroker.from_settings(RedisSettings(url=url, key_prefix=prefix),
                                       socket_timeout=10.0)
    publisher = Publisher(broker)
    # The channels exist (and the script is loaded) before the clock starts.
    await publisher.publish_batch([UpstreamMessage(ch, {"p": 0}) for ch in channels])
    # Like the simulated feed's trades: each with an upstream id (an idempotency key).
    msgs = [UpstreamMessage(channels[i % len(channels)], {"p": i, "px": 100.25, "sz": 3},
                            msg_id=f"{prefix}-{channels[0]}-{i}") for i in range(messages)]
    await asyncio.to_thread(start.wait)
    cpu0 = time.process_time()
    last: dict[str, int] = {}
    for i in range(0, messages, batch):
        for r in await publisher.publish_batch(msgs[i:i + batch]):
            last[r.channel] = r.offset
    cpu = time.process_time() - cpu0
    await broker.close()
    expected = {ch: 1 + sum(1 for i in range(messages) if i % len(channels) == k)
                for k, ch in enumerate(channels)}
    if last != expected:
        raise RuntimeError(f"offsets do not match the messages published: {last} {expected}")
    return time.monotonic(), cpu


def publish_row(target: Target, args: argparse.Namespace, run: int) -> list[object]:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out = ctx.Queue()
    prefix = f"bc{os.getpid()}r{run}"
    procs = [ctx.Process(target=_publisher_main, args=(
        target.url, prefix, [f"trades.B{p}X{c}" for c in range(args.channels)],
        args.messages, args.batch, start, out)) for p in range(args.publishers)]
    for proc in procs:
        proc.start()
    time.sleep(3)  # the publishers import and connect before the clock starts
    cpu0 = target.cpu()
    t0 = time.monotonic()
    start.set()
    results = [out.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a publisher failed with exit code {proc.exitcode}")
    elapsed = max(end for end, _ in results) - t0
    total = args.messages * args.publishers
    cpu1 = target.cpu()
    server_cores = (cpu1[0] - cpu0[0]) / elapsed
    master_cores = (cpu1[1] - cpu0[1]) / elapsed
    rate = total / elapsed
    pub_us = 1e6 * sum(cpu for _, cpu in results) / total
    return [target.name, total, round(rate), round(server_cores, 2), round(master_cores, 2),
            round(rate / master_cores) if master_cores else "-", round(pub_us, 1)]


# --- delivery --------------------------------------------------------------------------------


async def _client(url: str, channels: list[str], counts: list[int], ready: asyncio.Event,
                  n_ready: list[int], total_clients: int, stop: asyncio.Event) -> None:
    async with websockets.connect(url, subprotocols=["fanout.json"],  # type: ignore[list-item]
                                  max_size=None, ping_interval=None) as ws:
        await ws.send(json.dumps({"type": "connect", "name": "bench", "id": 0}))
        for i, ch in enumerate(channels):
            await ws.send(json.dumps({"type": "subscribe", "channel": ch, "id": i + 1}))
        pos: dict[str, int] = {}
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except TimeoutError:
                continue
            msg = json.loads(raw)
            for m in msg if isinstance(msg, list) else [msg]:
                kind = m.get("type")
                if kind == "subscribed":
                    pos[m["channel"]] = m["offset"]
                    if len(pos) == len(channels):
                        n_ready[0] += 1
                        if n_ready[0] == total_clients:
                            ready.set()
                elif kind == "pub":
                    ch = m["channel"]
                    if m["offset"] != pos[ch] + 1:
                        raise RuntimeError(f"{ch}: offset {m['offset']} after {pos[ch]}")
                    pos[ch] = m["offset"]
                    counts[0] += 1
                elif kind in ("resync", "error"):
                    raise RuntimeError(f"unexpected {m}")


async def _delivery(target: Target, args: argparse.Namespace, run: int) -> list[object]:
    prefix = f"bd{os.getpid()}r{run}"
    channels = [f"trades.D{c}" for c in range(args.channels)]
    broker = RedisBroker.from_settings(RedisSettings(url=target.url, key_prefix=prefix),
                                       socket_timeout=10.0)
    publisher = Publisher(broker)
    await publisher.publish_batch([UpstreamMessage(ch, {"p": 0}) for ch in channels])
    edge = EdgeProcess(target.url, prefix, None, [])
    edge.start()
    try:
        await wait_ready(edge)
        counts = [0]
        ready, stop = asyncio.Event(), asyncio.Event()
        n_ready = [0]
        url = f"ws://127.0.0.1:{edge.port}/ws"
        tasks = [asyncio.create_task(_client(url, channels, counts, ready, n_ready,
                                             args.clients, stop))
                 for _ in range(args.clients)]
        await asyncio.wait_for(ready.wait(), 60)
        tick = 0.01
        per_tick = args.rate * tick
        sent = 0
        cpu0, t0 = cpu_seconds(edge.pid), time.monotonic()
        while (now := time.monotonic()) - t0 < args.duration:
            due = int((now - t0) * args.rate) - sent
            if due > 0:
                await publisher.publish_batch(
                    [UpstreamMessage(channels[(sent + k) % len(channels)], {"p": sent + k})
                     for k in range(due)])
                sent += due
            await asyncio.sleep(tick if per_tick >= 1 else 1 / args.rate)
        expected = sent * args.clients
        async with asyncio.timeout(30):
            while counts[0] < expected:
                for t in tasks:
                    if t.done():
                        t.result()
                await asyncio.sleep(0.05)
        elapsed = time.monotonic() - t0
        edge_cpu = (cpu_seconds(edge.pid) - cpu0) / elapsed
        stop.set()
        await asyncio.gather(*tasks)
        if counts[0] != expected:
            raise RuntimeError(f"delivered {counts[0]}, expected {expected}")
        return [target.name, sent, round(counts[0] / elapsed), round(100 * edge_cpu),
                round(1e6 * edge_cpu * elapsed / counts[0], 2)]
    finally:
        edge.stop()
        await broker.close()


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--publishers", type=int, default=2, help="publishing processes")
    p.add_argument("--messages", type=int, default=40_000, help="per publisher per row")
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--channels", type=int, default=24)
    p.add_argument("--clients", type=int, default=100, help="delivery: WebSocket clients")
    p.add_argument("--rate", type=float, default=400, help="delivery: published msgs/s")
    p.add_argument("--duration", type=float, default=5.0, help="delivery: s")
    p.add_argument("--skip", choices=("publish", "delivery"), default=None)
    return p.parse_args()


def main() -> int:
    args = parse_args()
    names = ["single", "cluster-1", "cluster-3"]
    publish: dict[str, list[list[object]]] = {n: [] for n in names}
    delivery: dict[str, list[list[object]]] = {n: [] for n in ("single", "cluster-3")}
    with targets(names) as tiers:
        for rnd in range(args.rounds):
            order = names if rnd % 2 == 0 else names[::-1]
            if args.skip != "publish":
                for name in order:
                    progress(f"round {rnd + 1}: publish on {name} ...")
                    publish[name].append(publish_row(tiers[name], args, rnd))
            if args.skip != "delivery":
                for name in [n for n in order if n in delivery]:
                    progress(f"round {rnd + 1}: delivery on {name} ...")
                    delivery[name].append(asyncio.run(_delivery(tiers[name], args, rnd)))
    print(environment())
    print(source_state())
    if args.skip != "publish":
        print(f"\npublish: {args.publishers} processes x {args.messages} messages, batch "
              f"{args.batch}, {args.channels} channels each (median of {args.rounds} rounds)")
        rows = []
        for name in names:
            runs = publish[name]
            rows.append([name, runs[0][1],
                         *(statistics.median(float(r[i]) for r in runs  # type: ignore[arg-type]
                                             if r[i] != "-") for i in (2, 3, 4, 5, 6))])
        print(table(["tier", "messages", "msgs/s", "server cores (all)", "master cores",
                     "msgs/s per master core", "publisher µs/msg"], rows))
    if args.skip != "delivery":
        print(f"\ndelivery: one edge, {args.clients} clients x {args.channels} channels, "
              f"{args.rate:g} msgs/s published for {args.duration:g} s "
              f"(median of {args.rounds} rounds)")
        rows = [[name, statistics.median(float(r[2]) for r in runs),  # type: ignore[arg-type]
                 statistics.median(float(r[3]) for r in runs),  # type: ignore[arg-type]
                 statistics.median(float(r[4]) for r in runs)]  # type: ignore[arg-type]
                for name, runs in delivery.items()]
        print(table(["tier", "delivered msgs/s", "edge CPU %", "edge CPU µs per delivered msg"],
                    rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
