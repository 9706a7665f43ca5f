"""Failover of ingest: two worker processes on one feed (tests/support/failover_worker.py, which
runs `fanout ingest`'s worker on a deterministic feed), a real Valkey, and a consumer.

- kill -9 of the leader during a steady publish: the standby takes over within the lease
  TTL, and the consumer sees contiguous offsets and every upstream message exactly once;
- a leader paused (SIGSTOP) past its TTL, then resumed: it publishes nothing more (its own
  clock ends its term; a write it had already started is refused by the fence) and
  becomes a standby;
- kill -9 of a `fanout ingest` leader on the ProjectX feed, against a gateway
  (tests/support/gateway_sim.py) that sends every subscriber its current state and recent trades:
  the new leader publishes no state that is already the snapshot's and no trade twice,
  and the snapshots end up as the gateway's state (levels gone meanwhile deleted).

Run `pytest -s tests/integration/test_failover.py` to see the measured failover times.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from common.broker.keys import Keys
from fanout.embedded import free_port
from ingest.feeds.projectx import parse_ts
from tests.support.gateway_sim import GatewaySim
from tests.support.seqfeed import Rows, channel_of, check_clean, published
from tests.support.signalr_server import HubServer
from tests.support.streams import get, hgetall, xrange, xrevrange
from tests.support.wsclient import ProtoClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc"),
]

ROOT = Path(__file__).resolve().parents[2]
# s: the lease TTL of these tests (`fanout ingest`'s default is 5; FAILOVER_TEST_TTL=5 runs
# them with it)
TTL = float(os.environ.get("FAILOVER_TEST_TTL", "2.0"))
RATE = 500  # messages/s of the feed
CHANNELS = [channel_of(c, 4) for c in range(4)]
FEED_ID = "seq"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


SEQ_WORKER = ("-m", "tests.support.failover_worker")  # `fanout ingest`'s worker on SequenceFeed
INGEST_COMMAND = ("-m", "fanout", "ingest")  # `fanout ingest` itself


class WorkerProcess:
    def __init__(self, name: str, redis_url: str, prefix: str, tmp_path: Path,
                 command: Sequence[str] = SEQ_WORKER, **extra: str) -> None:
        self.name = name
        self.log_path = tmp_path / f"worker-{name}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FANOUT_REDIS_URL")}
        env.update({
            "FANOUT_REDIS_URL": redis_url,
            "FANOUT_KEY_PREFIX": prefix,
            "FANOUT_FEED_ID": FEED_ID,
            "FANOUT_LEASE_TTL": str(TTL),
            "FANOUT_LOG_LEVEL": "info",
            "FAILOVER_NAME": name,
            "FAILOVER_RATE": str(RATE),
            **extra,
        })
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *command], cwd=ROOT, env=env,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> str:
        """The process state letter from /proc (R, S, T = stopped, Z, ...)."""
        text = Path(f"/proc/{self.proc.pid}/stat").read_text()
        return text[text.rindex(")") + 2]

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                return self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return -9
        return self.proc.returncode


@pytest.fixture
async def workers(redis_server: object, key_prefix: str,
                  tmp_path: Path) -> AsyncIterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def start(name: str, command: Sequence[str] = SEQ_WORKER, **extra: str) -> WorkerProcess:
        w = WorkerProcess(name, redis_server.url, key_prefix, tmp_path, command,  # type: ignore[attr-defined]
                          **extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()


async def until(cond: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def lease_token(redis: Redis, keys: Keys, feed: str = FEED_ID) -> int:
    value = await get(redis, keys.lease(feed))
    return int(value.split(":", 1)[0]) if value else 0


async def total(redis: Redis, keys: Keys) -> int:
    return sum([await redis.xlen(keys.stream(ch)) for ch in CHANNELS])


async def top_message(redis: Redis, keys: Keys) -> int:
    rows = await published(redis, keys)
    return max((i for r in rows.values() for _, i, _ in r), default=-1)


async def server_ms(redis: Redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def first_publish_ms(redis: Redis, keys: Keys, worker: str) -> int | None:
    """The server time (the stream entry's `t`) of the first message `worker` published."""
    firsts = []
    for ch in CHANNELS:
        for _, fields in await xrange(redis, keys.stream(ch)):
            if f'"w":"{worker}"' in fields["d"]:
                firsts.append(int(fields["t"]))
                break
    return min(firsts) if firsts else None


def writers(streams: Rows) -> dict[str, str]:
    """Per channel, who published, run-length encoded: "ab" = a's messages, then b's."""
    out = {}
    for ch, rows in streams.items():
        seq = "".join(w for _, _, w in rows)
        out[ch] = re.sub(r"(.)\1*", r"\1", seq)
    return out


async def subscribe_all(url: str) -> ProtoClient:
    client = await ProtoClient.open(url)
    for ch in CHANNELS:
        reply = await client.subscribe(ch)
        assert reply["type"] == "subscribed", reply
    return client


async def check_consumer(client: ProtoClient, streams: Rows) -> None:
    """The consumer got every offset of every channel, in order, once."""
    await client.wait_for(
        lambda: all(len(client.offsets[ch]) >= len(streams[ch]) for ch in CHANNELS), 20
    )
    for ch in CHANNELS:
        assert client.offsets[ch] == list(range(1, len(streams[ch]) + 1)), ch
    data = [m["data"] for m in client.messages if m.get("type") == "pub"]
    ids = [d["i"] for d in data]
    assert len(ids) == len(set(ids)) == sum(len(r) for r in streams.values())
    assert client.resyncs == []


async def test_kill_9_of_the_leader_standby_takes_over_within_the_ttl(
    redis: Redis, key_prefix: str, edge: object, workers: Callable[..., WorkerProcess]
) -> None:
    keys = Keys(key_prefix)
    client = await subscribe_all(edge.url)  # type: ignore[attr-defined]
    metrics_port = free_port()
    a = workers("a")
    await until(lambda: "leader elected" in a.log(), 30, "a leads")
    b = workers("b", FANOUT_INGEST_METRICS_PORT=str(metrics_port))
    await until(lambda: "standby" in b.log(), 30, "b is a standby")
    await until(lambda: _more(total(redis, keys), 1000), 10, "a publishes steadily")

    # At a random moment of the leader's renewal cycle (it renews every TTL/3): the lease
    # has between 2/3 of the TTL and all of it left.
    await asyncio.sleep(random.uniform(0, TTL / 3))
    lease_left = await redis.pttl(keys.lease(FEED_ID)) / 1000
    killed_ms = await server_ms(redis)
    killed = time.monotonic()
    a.signal(signal.SIGKILL)
    await until(lambda: _eq(lease_token(redis, keys), 2), TTL + 5, "b takes the lease")
    takeover = time.monotonic() - killed
    await until(lambda: first_publish_ms(redis, keys, "b"), 10, "b publishes")
    first_ms = await first_publish_ms(redis, keys, "b")
    assert first_ms is not None
    failover = (first_ms - killed_ms) / 1000
    print(f"\nfailover after kill -9 (lease TTL {TTL:.1f} s, {lease_left:.3f} s of it left, "
          f"{RATE} msg/s): lease taken over after {takeover:.3f} s, first message published "
          f"by the standby after {failover:.3f} s")
    assert takeover <= TTL + 0.3, takeover
    assert failover <= TTL + 1.0, failover

    count = await total(redis, keys)
    await until(lambda: _more(total(redis, keys), count + 1000), 10, "b publishes steadily")
    body = _OPENER.open(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert "fanout_ingest_leader 1.0" in body
    assert "fanout_ingest_leader_changes_total 1.0" in body
    assert "fanout_ingest_lease_renewals_total" in body

    assert b.stop() == 0  # a clean shutdown releases the lease
    assert await redis.exists(keys.lease(FEED_ID)) == 0
    streams = await published(redis, keys)
    assert check_clean(streams) > 2000
    assert set(writers(streams).values()) == {"ab"}
    await check_consumer(client, streams)
    await client.close()


async def test_a_paused_leader_cannot_publish_and_steps_down(
    redis: Redis, key_prefix: str, edge: object, workers: Callable[..., WorkerProcess]
) -> None:
    keys = Keys(key_prefix)
    client = await subscribe_all(edge.url)  # type: ignore[attr-defined]
    a = workers("a")
    await until(lambda: "leader elected" in a.log(), 30, "a leads")
    b = workers("b")
    await until(lambda: "standby" in b.log(), 30, "b is a standby")
    await until(lambda: _more(total(redis, keys), 500), 10, "a publishes steadily")

    a.signal(signal.SIGSTOP)
    paused = time.monotonic()
    await until(lambda: a.state() == "T", 5, "a stopped")
    await until(lambda: _eq(lease_token(redis, keys), 2), TTL + 5, "b takes the lease")
    count = await total(redis, keys)
    await until(lambda: _more(total(redis, keys), count + 500), 10, "b publishes")
    await asyncio.sleep(max(0.0, paused + TTL + 1.0 - time.monotonic()))
    a.signal(signal.SIGCONT)
    await until(lambda: "leadership ended feed=seq token=1" in a.log(), 10, "a steps down")
    await until(lambda: a.log().count("standby") >= 1, 10, "a is a standby")
    count = await total(redis, keys)
    await until(lambda: _more(total(redis, keys), count + 500), 10, "b goes on")
    assert a.proc.poll() is None and await lease_token(redis, keys) == 2

    # The standby first: b's clean shutdown hands the lease over at once, and a new term
    # of a would rightly publish after b's messages.
    assert a.stop() == 0 and b.stop() == 0
    streams = await published(redis, keys)
    check_clean(streams)
    assert set(writers(streams).values()) == {"ab"}  # nothing of a's after b's first
    await check_consumer(client, streams)
    await client.close()


async def test_a_write_started_before_a_pause_is_fenced_out(
    redis: Redis, key_prefix: str, edge: object, workers: Callable[..., WorkerProcess]
) -> None:
    """The leader stops itself between its last check and its write: when it resumes, past
    its TTL and after the standby took over, the batch reaches Redis with the old token and
    the publish script refuses all of it."""
    keys = Keys(key_prefix)
    client = await subscribe_all(edge.url)  # type: ignore[attr-defined]
    stop_at = 600
    a = workers("a", FAILOVER_STOP_AT=str(stop_at))
    await until(lambda: "leader elected" in a.log(), 30, "a leads")
    b = workers("b")
    await until(lambda: "standby" in b.log(), 30, "b is a standby")
    await until(lambda: "pausing before the write" in a.log() and a.state() == "T", 10,
                "a paused in its write")
    before = await top_message(redis, keys)
    assert before < stop_at

    await until(lambda: _eq(lease_token(redis, keys), 2), TTL + 5, "b takes the lease")
    await until(lambda: _more(top_message(redis, keys), stop_at + 500), 10, "b publishes past")
    a.signal(signal.SIGCONT)
    await until(lambda: "publish fenced out" in a.log(), 10, "a's write refused")
    line = next(x for x in a.log().splitlines() if "publish fenced out" in x)
    assert "token=1 " in line and "reason=token" in line, line
    await until(lambda: "leadership ended feed=seq token=1" in a.log(), 10, "a steps down")
    await until(lambda: a.log().count("standby") >= 1, 10, "a is a standby")
    assert a.proc.poll() is None

    # The standby first: b's clean shutdown hands the lease over at once, and a new term
    # of a would rightly publish after b's messages.
    assert a.stop() == 0 and b.stop() == 0
    streams = await published(redis, keys)
    check_clean(streams)
    assert set(writers(streams).values()) == {"ab"}
    by = {i: w for rows in streams.values() for _, i, w in rows}
    assert by[stop_at] == "b"  # the refused batch was published by the new leader instead
    await check_consumer(client, streams)
    await client.close()


async def _more(value: object, n: int) -> bool:
    return bool(await value > n)  # type: ignore[misc]


async def _eq(value: object, n: int) -> bool:
    return bool(await value == n)  # type: ignore[misc]


# --- the ProjectX feed: messages without upstream ids -------------------------------------

PX_CONTRACT = "CON.F.US.MNQ.Z25"
PX_ACCOUNT = 123
PX_FEED = "px"
PX_STATES = {  # state channels and their snapshot modes
    f"quotes.{PX_CONTRACT}": "merge",
    f"depth.{PX_CONTRACT}": "keyed",
    f"account.{PX_ACCOUNT}.balance": "merge",
    f"account.{PX_ACCOUNT}.positions": "keyed",
}
PX_TRADES = f"trades.{PX_CONTRACT}"
PX_CHANNELS = [*PX_STATES, PX_TRADES, f"bars.1s.{PX_CONTRACT}", f"bars.1m.{PX_CONTRACT}"]

Entry = tuple[int, str, bool, Any]  # offset, key, deleted, data


async def entries(redis: Redis, keys: Keys, channel: str) -> list[Entry]:
    return [
        (int(entry_id.split("-")[0]), f["k"], f["x"] == "1", json.loads(f["d"]))
        for entry_id, f in await xrange(redis, keys.stream(channel))
    ]


def repeats(stream: list[Entry], mode: str) -> list[int]:
    """Offsets of the entries that left their key's state as it was: republished states."""
    state: dict[str, Any] = {}
    out = []
    for offset, key, deleted, data in stream:
        old = state.get(key)
        if mode == "keyed" and deleted:
            same = key not in state
            state.pop(key, None)
        else:
            new = {**old, **data} if mode == "merge" and isinstance(old, dict) and isinstance(
                data, dict) else data
            same = key in state and new == old
            state[key] = new
        if same:
            out.append(offset)
    return out


async def snapshot(redis: Redis, keys: Keys, channel: str) -> dict[str, Any]:
    raw = await hgetall(redis, keys.snapshot(channel))
    return {k: json.loads(v) for k, v in raw.items()}


async def px_converged(redis: Redis, keys: Keys, sim: GatewaySim) -> bool:
    """The snapshots say what the gateway says, and its last trade is published."""
    depth = await snapshot(redis, keys, f"depth.{PX_CONTRACT}")
    quote = (await snapshot(redis, keys, f"quotes.{PX_CONTRACT}")).get("", {})
    last_trades = await xrevrange(redis, keys.stream(PX_TRADES), count=1)
    trade = sim.recent[-1][-1] if sim.recent else None
    return (
        {k: v["size"] for k, v in depth.items()} == sim.expected_depth()
        and {k: quote.get(k) for k in sim.expected_quote()} == sim.expected_quote()
        and await snapshot(redis, keys, f"account.{PX_ACCOUNT}.positions")
        == {PX_CONTRACT: sim.position}
        and await snapshot(redis, keys, f"account.{PX_ACCOUNT}.balance") == {"": sim.account}
        and trade is not None and bool(last_trades)
        and json.loads(last_trades[0][1]["d"])["price"] == trade["price"]
        and json.loads(last_trades[0][1]["d"])["ts"] == round(
            (parse_ts(trade["timestamp"]) or 0) * 1000)
    )


def metric(port: int, name: str) -> float:
    body = _OPENER.open(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf"^{name} (\S+)$", body, re.MULTILINE)
    assert found, name
    return float(found.group(1))


async def test_projectx_failover_publishes_no_state_or_trade_twice(
    redis: Redis, key_prefix: str, workers: Callable[..., WorkerProcess]
) -> None:
    keys = Keys(key_prefix)
    seed = random.randrange(1 << 30)
    server = HubServer(token="jwt-px")
    sim = GatewaySim(server, PX_CONTRACT, PX_ACCOUNT, seed=seed)
    await server.start()
    market = asyncio.create_task(sim.run(rate=50))
    env = {
        "FANOUT_FEED": "projectx", "FANOUT_FEED_ID": PX_FEED,
        "FANOUT_PROJECTX_URL": server.base_url, "FANOUT_PROJECTX_TOKEN": "jwt-px",
        "FANOUT_PROJECTX_CONTRACTS": PX_CONTRACT, "FANOUT_PROJECTX_ACCOUNTS": str(PX_ACCOUNT),
        "FANOUT_RECONNECT_BASE": "0.05", "FANOUT_RECONNECT_CAP": "0.5",
    }
    metrics_port = free_port()

    async def published(minimum: int) -> bool:
        counts = [await redis.xlen(keys.stream(ch)) for ch in [*PX_STATES, PX_TRADES]]
        return min(counts) >= minimum

    try:
        a = workers("a", INGEST_COMMAND, **env)
        await until(lambda: "leader elected" in a.log(), 30, "a leads")
        b = workers("b", INGEST_COMMAND, FANOUT_INGEST_METRICS_PORT=str(metrics_port), **env)
        await until(lambda: "standby" in b.log(), 30, "b is a standby")
        await until(lambda: published(5), 20, "a publishes every kind of message")

        await asyncio.sleep(random.uniform(0, TTL / 3))  # anywhere in the renewal cycle
        a.signal(signal.SIGKILL)
        await until(lambda: not server.live(), 10, "a's connections closed")
        # The market goes quiet but for a few changes nobody hears: what b is re-sent on
        # subscribe is then mostly what a published, which b must not publish again.
        sim.paused = True
        removed = await sim.change_unheard()
        await until(lambda: _eq(lease_token(redis, keys, PX_FEED), 2), TTL + 5,
                    "b takes the lease")
        await until(lambda: px_converged(redis, keys, sim), 20, f"b catches up (seed {seed})")
        assert removed not in await snapshot(redis, keys, f"depth.{PX_CONTRACT}")
        # b was re-sent states a had published (skipped) and trades a had published
        # (duplicates): the test exercised both.
        assert metric(metrics_port, "fanout_ingest_unchanged_total") >= 3
        assert metric(metrics_port, "fanout_ingest_duplicates_total") >= 1

        sim.paused = False
        count = await redis.xlen(keys.stream(PX_TRADES))
        await until(lambda: _more(redis.xlen(keys.stream(PX_TRADES)), count + 20), 15,
                    "b publishes steadily")
        sim.paused = True
        await until(lambda: px_converged(redis, keys, sim), 10, f"b is done (seed {seed})")
        assert b.stop() == 0
    finally:
        market.cancel()
        await asyncio.gather(market, return_exceptions=True)
        await server.kill()

    subscribed = {c for c, target in sim.snapshots_sent
                  if target == "SubscribeContractMarketDepth"}
    assert len(subscribed) >= 2  # a's connection and b's, each sent the book
    for channel in PX_CHANNELS:
        stream = await entries(redis, keys, channel)
        assert [e[0] for e in stream] == list(range(1, len(stream) + 1)), channel
    for channel, mode in PX_STATES.items():
        stream = await entries(redis, keys, channel)
        assert len(stream) >= 5, channel
        assert repeats(stream, mode) == [], f"{channel}: republished states (seed {seed})"
    trades = Counter(
        (d["price"], d["size"], d["side"], d["ts"]) for _, _, _, d in
        await entries(redis, keys, PX_TRADES)
    )
    assert sum(trades.values()) > 25  # a's before the kill, b's 20 after
    assert trades - sim.trades == Counter(), f"trades published twice (seed {seed})"
