"""Leader election with fencing against a real Valkey: the lease scripts, the `Leader`, the
fence in publish.lua, and a worker that steps down when fenced out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from common.broker import BrokerUnavailable, Fence
from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.broker.scripts import register
from ingest.leader import Leader, LeaderMetrics, NotLeader
from ingest.publisher import FencedOut, Publisher
from ingest.upstream import Resumable, SnapshotReader, UpstreamMessage
from ingest.worker import IngestMetrics, Worker
from tests.support.seqfeed import SequenceFeed, check_clean, published

pytestmark = pytest.mark.integration

LOG = logging.getLogger("tests.leader")
FEED = "f1"


async def until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


class Running:
    """Leaders (or workers) run as tasks, cancelled at the end of a test."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self.tasks.append(task)
        return task

    async def stop(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = Running()
    yield r
    for task in r.tasks:
        task.cancel()
    await asyncio.gather(*r.tasks, return_exceptions=True)


def leader(redis: Redis, key_prefix: str, owner: str, ttl: float = 1.0,
           **kwargs: Any) -> Leader:
    return Leader(RedisBroker(redis, Keys(key_prefix)), FEED, LOG,
                  LeaderMetrics(CollectorRegistry()), ttl=ttl, owner=owner, **kwargs)


def metric(lead: Leader, name: str) -> float:
    return float(getattr(lead.metrics, name)._value.get())


# --- the lease -----------------------------------------------------------------------------


async def test_one_leader_tokens_increase_release_hands_over(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    keys = Keys(key_prefix)
    elected: list[int] = []
    lost: list[str] = []
    a = leader(redis, key_prefix, "a", on_elected=lambda t: elected.append(t.token),
               on_lost=lambda t: lost.append(t.reason))
    b = leader(redis, key_prefix, "b")
    task_a = running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)
    assert term.token == 1 and a.token == 1 and a.is_leader.is_set()
    assert await redis.get(keys.lease(FEED)) == "1:a"
    assert metric(a, "leader") == 1 and metric(a, "changes") == 1 and elected == [1]
    assert a.fence().token == 1

    running.start(b.run())
    await asyncio.sleep(0.5)  # b campaigned (every ttl/3) and lost
    assert not b.is_leader.is_set() and b.token is None
    with pytest.raises(NotLeader):
        b.fence()

    # A clean shutdown releases the lease: b takes over at its next try, not at expiry.
    loop = asyncio.get_running_loop()
    started = loop.time()
    await running.stop(task_a)
    assert lost == ["shutdown"] and not a.is_leader.is_set() and metric(a, "leader") == 0
    assert term.ended.is_set() and term.reason == "shutdown"
    term_b = await asyncio.wait_for(b.elected(), 5)
    assert loop.time() - started < b.retry_interval + 0.3
    assert term_b.token == 2 and await redis.get(keys.lease(FEED)) == "2:b"
    assert await redis.get(keys.fence(FEED)) == "2"


async def test_lease_is_renewed_well_before_expiry(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    a = leader(redis, key_prefix, "a", ttl=0.6)
    running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)
    await asyncio.sleep(1.5)  # 2.5 TTLs
    assert a.term is term and not term.ended.is_set()
    assert metric(a, "renewals") >= 5 and metric(a, "renewal_failures") == 0
    pttl = await redis.pttl(Keys(key_prefix).lease(FEED))
    assert 0 < pttl <= 600
    # The fence's deadline is the server's clock plus the TTL, less the guard.
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    assert now_ms < a.fence().deadline_ms <= now_ms + 600  # type: ignore[operator]


async def test_standby_takes_over_when_the_holder_dies(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    keys = Keys(key_prefix)
    # A holder that never renews (a process killed with -9): its lease runs out in 800 ms.
    acquire = register(redis, "acquire")
    raw = await acquire(keys=[keys.lease(FEED), keys.fence(FEED)], args=["dead", 800])
    assert int(raw[0]) == 1 and raw[3] == ""
    b = leader(redis, key_prefix, "b", ttl=5.0)  # its own retry interval (1.7 s) is longer
    loop = asyncio.get_running_loop()
    started = loop.time()
    running.start(b.run())
    term = await asyncio.wait_for(b.elected(), 5)
    took = loop.time() - started
    # It tried again when the holder's lease would expire, not a retry interval later.
    assert 0.7 < took < 1.2, took
    assert term.token == 2


async def test_acquire_by_the_same_owner_takes_a_new_token(redis: Redis, key_prefix: str) -> None:
    keys = Keys(key_prefix)
    acquire = register(redis, "acquire")
    args = [keys.lease(FEED), keys.fence(FEED)]
    tokens = [int((await acquire(keys=args, args=["x", 5000]))[0]) for _ in range(3)]
    assert tokens == [1, 2, 3]
    held = await acquire(keys=args, args=["y", 5000])
    assert int(held[0]) == 0 and held[3] == "3:x" and 0 < int(held[2]) <= 5000


async def test_refused_renewal_ends_the_term(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    a = leader(redis, key_prefix, "a", ttl=0.6)
    running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)
    await redis.set(Keys(key_prefix).lease(FEED), "99:thief")  # someone else holds it now
    await asyncio.wait_for(term.wait_ended(), 2)
    assert term.reason == "lost" and a.term is None and not a.is_leader.is_set()
    assert metric(a, "renewal_failures") >= 1 and metric(a, "changes") == 2
    with pytest.raises(NotLeader):
        a.fence()


async def test_failing_renewals_end_the_term_before_the_lease_expires(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    keys = Keys(key_prefix)
    a = leader(redis, key_prefix, "a", ttl=0.6)
    running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)

    async def broken(**kwargs: Any) -> Any:
        raise RedisConnectionError("down")

    broker = a.broker
    assert isinstance(broker, RedisBroker)
    broker._renew = broken  # type: ignore[assignment]
    broker._release = broken  # type: ignore[assignment]
    await asyncio.wait_for(term.wait_ended(), 2)
    assert term.reason == "expired"
    assert metric(a, "renewal_failures") >= 2
    # It stopped while its lease, never renewed nor released, was still valid in Redis.
    assert await redis.get(keys.lease(FEED)) == "1:a"
    assert await redis.pttl(keys.lease(FEED)) > 0
    # Campaigning again, it takes its own lease over with a new token.
    again = await asyncio.wait_for(a.elected(), 5)
    assert again.token == 2


async def test_local_clock_ends_the_term_and_it_campaigns_again(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    now = [1000.0]
    a = leader(redis, key_prefix, "a", ttl=5.0, clock=lambda: now[0])
    running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)
    assert a.valid() and a.fence().token == 1
    now[0] += 5.0 - a.guard - 0.001
    assert a.valid()
    now[0] += 0.002  # past sent + ttl - guard: a paused process that wakes up
    with pytest.raises(NotLeader):
        a.fence()
    assert term.reason == "expired" and not a.is_leader.is_set()
    # It released the lease it still held, and won it again with a new token.
    again = await asyncio.wait_for(a.elected(), 5)
    assert again.token == 2 and again is not term


async def test_step_down_raises_the_fence_counter_to_the_floor(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    a = leader(redis, key_prefix, "a")
    running.start(a.run())
    term = await asyncio.wait_for(a.elected(), 5)
    a.step_down("fenced", fence_floor=10)
    assert term.reason == "fenced"
    again = await asyncio.wait_for(a.elected(), 5)
    assert again.token == 11


# --- the fence in publish.lua ---------------------------------------------------------------


async def _state(redis: Redis, keys: Keys, channel: str) -> tuple[Any, ...]:
    idem = [(k, await redis.hgetall(k)) for k in sorted(
        [k async for k in redis.scan_iter(match=f"{keys.prefix}:{{{channel}}}:ids:*")])]
    return (
        await redis.hgetall(keys.meta(channel)),
        await redis.xrange(keys.stream(channel)),
        await redis.hgetall(keys.snapshot(channel)),
        idem,
    )


async def test_stale_token_is_refused_and_writes_nothing(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    ch = "trades.ES"
    first = UpstreamMessage(ch, {"p": 1}, msg_id="u1")
    r = await publisher.publish(first, Fence(2))
    assert (r.offset, r.duplicate) == (1, False)
    assert await redis.hget(keys.meta(ch), "fence") == "2"
    before = await _state(redis, keys, ch)

    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.live(ch))
    await pubsub.get_message(timeout=1)  # the subscribe confirmation

    with pytest.raises(FencedOut) as refused:
        await publisher.publish(UpstreamMessage(ch, {"p": 2}, msg_id="u2"), Fence(1))
    assert (refused.value.reason, refused.value.token, refused.value.fence) == ("token", 1, 2)
    assert refused.value.channel == ch and refused.value.results == []
    with pytest.raises(FencedOut):  # a duplicate is refused too: nothing at all happens
        await publisher.publish(first, Fence(1))
    with pytest.raises(FencedOut):  # and a message without id
        await publisher.publish(UpstreamMessage(ch, {"p": 3}), Fence(1))
    assert await _state(redis, keys, ch) == before  # offsets, history, snapshot, ids
    assert await pubsub.get_message(timeout=0.2) is None  # no live message
    await pubsub.aclose()

    # The current token publishes; a higher one raises the fence; unfenced always passes.
    assert (await publisher.publish(UpstreamMessage(ch, {"p": 4}), Fence(2))).offset == 2
    assert (await publisher.publish(UpstreamMessage(ch, {"p": 5}), Fence(3))).offset == 3
    assert await redis.hget(keys.meta(ch), "fence") == "3"
    with pytest.raises(FencedOut):
        await publisher.publish(UpstreamMessage(ch, {"p": 6}), Fence(2))
    assert (await publisher.publish(UpstreamMessage(ch, {"p": 7}))).offset == 4
    assert await redis.hget(keys.meta(ch), "fence") == "3"


async def test_a_newer_leader_replaying_a_duplicate_fences_the_channel(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    ch = "quotes.NQ"
    msg = UpstreamMessage(ch, {"bid": 1}, msg_id="q1")
    await publisher.publish(msg, Fence(1))
    again = await publisher.publish(msg, Fence(2))
    assert again.duplicate and again.offset == 1
    assert await redis.hget(Keys(key_prefix).meta(ch), "fence") == "2"
    with pytest.raises(FencedOut):
        await publisher.publish(UpstreamMessage(ch, {"bid": 2}, msg_id="q2"), Fence(1))


async def test_a_passed_deadline_is_refused_on_the_server(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    seconds, micros = await redis.time()
    now_ms = seconds * 1000 + micros // 1000
    msg = UpstreamMessage("bars.1m.ES", {"c": 1}, msg_id="b1")
    with pytest.raises(FencedOut) as refused:
        await publisher.publish(msg, Fence(1, now_ms - 1))
    assert refused.value.reason == "expired"
    assert await redis.exists(keys.meta("bars.1m.ES"), keys.stream("bars.1m.ES")) == 0
    assert (await publisher.publish(msg, Fence(1, now_ms + 60_000))).offset == 1


async def test_a_batch_is_refused_per_channel(
    redis: Redis, key_prefix: str, publisher: Publisher
) -> None:
    keys = Keys(key_prefix)
    await publisher.publish(UpstreamMessage("trades.A", {"p": 0}), Fence(5))
    with pytest.raises(FencedOut) as refused:
        await publisher.publish_batch([
            UpstreamMessage("trades.B", {"p": 1}, msg_id="b1"),
            UpstreamMessage("trades.A", {"p": 2}, msg_id="a2"),
            UpstreamMessage("trades.B", {"p": 3}, msg_id="b3"),
        ], Fence(4))
    # Only the fenced channel refused: the caller stops, and the next leader replays.
    assert refused.value.channel == "trades.A" and refused.value.fence == 5
    assert [(r.channel, r.offset) for r in refused.value.results] == [
        ("trades.B", 1), ("trades.B", 2)
    ]
    assert await redis.xlen(keys.stream("trades.A")) == 1


# --- the worker -------------------------------------------------------------------------------


async def test_worker_leads_hands_over_and_steps_down_when_fenced(
    redis: Redis, key_prefix: str, running: Running
) -> None:
    keys = Keys(key_prefix)
    tasks: dict[str, asyncio.Task[None]] = {}
    leaders: dict[str, Leader] = {}
    metrics: dict[str, IngestMetrics] = {}
    for name in ("a", "b"):
        leaders[name] = Leader(RedisBroker(redis, keys), "seq", LOG,
                               LeaderMetrics(CollectorRegistry()), ttl=1.0, owner=name)
        metrics[name] = IngestMetrics(CollectorRegistry())
        feed = SequenceFeed(redis, keys, worker=name, rate=2000.0)
        worker = Worker(feed, Publisher(RedisBroker(redis, keys)), LOG, metrics[name],
                        leader=leaders[name])
        tasks[name] = running.start(worker.run())
        if name == "a":
            await asyncio.wait_for(leaders["a"].elected(), 5)

    async def total() -> int:
        return sum(len(rows) for rows in (await published(redis, keys)).values())

    async def grows(by: int) -> None:
        target = await total() + by
        async with asyncio.timeout(10):
            while await total() < target:
                await asyncio.sleep(0.01)

    await grows(500)
    assert leaders["a"].token == 1 and not leaders["b"].is_leader.is_set()

    # A newer leader's write on one channel (simulated: its fence is raised there). a's
    # next batch is partly fenced: refused on trades.S1, published on the other channels.
    await redis.hset(keys.meta("trades.S1"), "fence", 50)
    await until(lambda: metrics["a"].fenced._value.get() >= 1)
    # a stepped down and released, raising the fence counter to 50: the next leader has 51,
    # and its upstream replays from below the first of the batch's refused messages.
    await until(lambda: 51 in (leaders["a"].token, leaders["b"].token))
    await grows(500)

    # A clean shutdown hands over at once; nothing lost or doubled across both handovers:
    # the refused messages of trades.S1 were published by the next leader, in order.
    current = "a" if leaders["a"].token == 51 else "b"
    other = "b" if current == "a" else "a"
    await running.stop(tasks[current])
    term = await asyncio.wait_for(leaders[other].elected(), 5)
    assert term.token == 52
    await grows(500)
    await running.stop(tasks[other])
    assert await redis.exists(keys.lease("seq")) == 0
    streams = await published(redis, keys)
    assert check_clean(streams) > 1500
    assert {w for rows in streams.values() for _, _, w in rows} == {"a", "b"}


async def test_a_partly_fenced_batch_is_published_by_the_next_term_from_its_hole(
    redis: Redis, key_prefix: str
) -> None:
    """A batch refused on one channel (its fence is above the token) and published on the
    others: per channel the published messages stay a prefix, while across channels the
    highest published message is far past the first unpublished one. The next term's
    upstream replays from that hole (the lowest unpublished message), not from the top."""
    keys = Keys(key_prefix)
    # An earlier, unfenced publisher: m0..m299 on trades.S0..S3.
    await Worker(SequenceFeed(redis, keys, worker="z", rate=1e9, limit=300),
                 Publisher(RedisBroker(redis, keys)), LOG).run()
    # trades.S1 carries a fence above the fence counter (a counter lost, say): the next
    # leader's token 1 is refused there, and only there.
    await redis.hset(keys.meta("trades.S1"), "fence", 50)

    tokens: list[int] = []
    lead = Leader(RedisBroker(redis, keys), "seq", LOG, LeaderMetrics(CollectorRegistry()), ttl=5.0,
                  owner="a", on_elected=lambda t: tokens.append(t.token))
    metrics = IngestMetrics(CollectorRegistry())
    # Every message is due at once: the first batch is 500 long (m97..m596).
    feed = SequenceFeed(redis, keys, worker="a", rate=1e9, limit=1200)
    worker = Worker(feed, Publisher(RedisBroker(redis, keys)), LOG, metrics, batch_size=500,
                    leader=lead)
    await asyncio.wait_for(worker.run(), 20)  # until the feed ends at m1199

    # Term 1 (token 1) was fenced out on its first batch and stepped down; term 2 (token 51,
    # above the channel's fence) published the rest.
    assert tokens == [1, 51] and metrics.fenced._value.get() == 1
    assert len(feed.starts) == 2
    first, second = feed.resumed_at
    assert first == {"trades.S0": 296, "trades.S1": 297, "trades.S2": 298, "trades.S3": 299}
    # What term 1 left: nothing new on trades.S1 (the first unpublished message is m301),
    # the other channels published up to the batch's end, more than `replay` beyond it.
    hole = second["trades.S1"] + 4
    assert hole == 301 and max(second.values()) - hole >= feed.replay
    assert feed.starts[1] <= hole  # replaying from the top (m397 on) would lose m301..m393
    streams = await published(redis, keys)
    assert check_clean(streams) == 1200
    s1 = streams["trades.S1"]
    assert [i for _, i, _ in s1] == list(range(1, 1200, 4))
    assert {w for _, i, w in s1 if i >= hole} == {"a"}


class ResumingFeed:
    """Two depth levels; `resume` reads the depth snapshot first (or fails, as Redis may)."""

    name = "resuming"

    def __init__(self, fail: bool) -> None:
        self.fail = fail
        self.resumed: list[dict[str, Any]] = []

    async def resume(self, snapshot: SnapshotReader) -> None:
        if self.fail:
            raise BrokerUnavailable("Redis is down")
        self.resumed.append(await snapshot("depth.ES"))

    async def messages(self) -> AsyncIterator[UpstreamMessage]:
        for price, size in ((1, 1), (2, 2)):
            yield UpstreamMessage("depth.ES", {"size": size}, f"bid:{price}", if_changed=True)


async def test_worker_resumes_the_upstream_and_counts_unchanged_states(
    redis: Redis, key_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    publisher = Publisher(RedisBroker(redis, Keys(key_prefix)))
    await publisher.publish(UpstreamMessage("depth.ES", {"size": 1}, "bid:1"))
    counts = []
    for fail in (False, True):
        feed = ResumingFeed(fail)
        metrics = IngestMetrics(CollectorRegistry())
        await Worker(feed, publisher, LOG, metrics).run()  # no leader: until the feed ends
        assert isinstance(feed, Resumable)
        counts.append((feed.resumed, metrics.published._value.get(),
                       metrics.unchanged._value.get()))
    assert counts == [
        ([{"bid:1": {"size": 1}}], 1, 1),  # bid:1 was in the snapshot already
        ([], 0, 2),  # resume failed (logged, not fatal); both levels are there now
    ]
    assert "upstream resume failed feed=resuming" in caplog.text
