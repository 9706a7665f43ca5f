"""The broker contract: the same tests against the Redis broker (a real Valkey), the Redis
Cluster broker (a real 3+3 Valkey cluster) and the in-memory one, so that pure tests on the
memory broker mean what they say."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from common.broker import (
    Broker,
    Fence,
    HistoryRead,
    HistoryResult,
    Live,
    Publication,
    PublishReply,
    PublishRequest,
    PublishStatus,
    RebaseStatus,
    SnapshotWant,
)
from common.broker.cluster import ClusterLive, RedisClusterBroker, cluster_client
from common.broker.keys import Keys
from common.broker.live import decode_live, encode_live, encode_live_one
from common.broker.memory import MemoryBroker
from common.broker.redisbroker import RedisBroker
from tests.integration.conftest import ClusterServer, RedisServer

TTL = 3600
CH = "trades.C"
P = PublishStatus


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration),
                        pytest.param("cluster", marks=pytest.mark.integration)])
async def broker(
    request: pytest.FixtureRequest, key_prefix: str
) -> AsyncIterator[Broker]:
    if request.param == "memory":
        yield MemoryBroker()
        return
    if request.param == "cluster":
        cluster: ClusterServer = request.getfixturevalue("redis_cluster")
        rc = cluster_client(cluster.settings(key_prefix))
        yield RedisClusterBroker(rc, Keys(key_prefix), inline_history=5)
        await rc.aclose()
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    client = Redis.from_url(server.url, decode_responses=True)
    # A small inline limit: longer reads take the XRANGE path.
    yield RedisBroker(client, Keys(key_prefix), inline_history=5)
    await client.aclose()


def req(value: object, channel: str = CH, **kw: Any) -> PublishRequest:
    return PublishRequest(channel, json.dumps(value, separators=(",", ":")), **kw)


async def pub(broker: Broker, *reqs: PublishRequest, fence: Fence | None = None
              ) -> list[PublishReply]:
    return await broker.publish(list(reqs), fence, meta_ttl=TTL, idempotency_ttl=TTL)


async def hist(
    broker: Broker, since: int, snapshot: SnapshotWant = "0", *, channel: str = CH,
    epoch: str = "", until: int | None = None, limit: int = 100,
) -> HistoryResult:
    return await broker.history(channel, since, snapshot, epoch=epoch, until=until,
                                limit=limit, meta_ttl=TTL)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


# --- publish -----------------------------------------------------------------------------


async def test_offsets_are_consecutive_in_one_epoch(broker: Broker) -> None:
    replies = await pub(broker, *(req({"i": i}) for i in range(12)))
    assert [r.offset for r in replies] == list(range(1, 13))
    assert {r.epoch for r in replies} == {replies[0].epoch} and replies[0].epoch
    assert {r.status for r in replies} == {P.PUBLISHED}
    result = await hist(broker, 0)
    assert (result.epoch, result.top, result.first, result.recoverable) == (
        replies[0].epoch, 12, 1, True)
    assert [p.offset for p in result.entries] == list(range(1, 13))  # past the inline limit
    assert [json.loads(p.data)["i"] for p in result.entries] == list(range(12))


async def test_a_message_id_is_published_once(broker: Broker) -> None:
    first = await pub(broker, req(1, msg_id="m1"), req(2))
    again = await pub(broker, req(1, msg_id="m1"))
    assert again[0] == PublishReply(1, first[0].epoch, P.DUPLICATE)
    assert (await hist(broker, -1)).top == 2


async def test_fences(broker: Broker) -> None:
    assert (await pub(broker, req(1), fence=Fence(5)))[0].status is P.PUBLISHED
    lower = await pub(broker, req(2), fence=Fence(4))
    assert lower[0] == PublishReply(0, "5", P.FENCED)
    assert (await pub(broker, req(3), fence=Fence(6)))[0].offset == 2
    assert (await pub(broker, req(4), fence=Fence(5)))[0].status is P.FENCED
    assert (await pub(broker, req(5)))[0].offset == 3  # unfenced: always
    past = int(time.time() * 1000) - 1000
    expired = await pub(broker, req(6), fence=Fence(7, past))
    assert expired[0] == PublishReply(0, "", P.EXPIRED)
    future = int(time.time() * 1000) + 60_000
    assert (await pub(broker, req(7), fence=Fence(7, future)))[0].offset == 4


async def test_a_duplicate_from_a_newer_leader_raises_the_fence(broker: Broker) -> None:
    await pub(broker, req(1, msg_id="x"), fence=Fence(1))
    assert (await pub(broker, req(1, msg_id="x"), fence=Fence(2)))[0].status is P.DUPLICATE
    assert (await pub(broker, req(2), fence=Fence(1)))[0] == PublishReply(0, "2", P.FENCED)


async def test_if_changed(broker: Broker) -> None:
    ch = "depth.C"
    deleted = await pub(broker, req({}, ch, key="a", snapshot_mode="keyed", delete=True,
                                    if_changed=True))
    assert deleted[0] == PublishReply(0, "", P.UNCHANGED)  # no epoch yet
    a = await pub(broker, req({"s": 1}, ch, key="a", snapshot_mode="keyed", if_changed=True))
    assert a[0].status is P.PUBLISHED
    same = await pub(broker, req({"s": 1}, ch, key="a", snapshot_mode="keyed", if_changed=True))
    assert same[0] == PublishReply(1, a[0].epoch, P.UNCHANGED)
    other = await pub(broker, req({"s": 2}, ch, key="a", snapshot_mode="keyed",
                                  if_changed=True))
    assert other[0].status is P.PUBLISHED
    gone = [req({}, ch, key="b", snapshot_mode="keyed", delete=True, if_changed=True)]
    assert (await pub(broker, *gone))[0].status is P.UNCHANGED
    m = "account.1.positions"
    await pub(broker, req({"q": 1, "p": {"x": [1, 2]}}, m, snapshot_mode="merge"))
    part = await pub(broker, req({"p": {"x": [1, 2]}}, m, snapshot_mode="merge",
                                 if_changed=True))
    assert part[0].status is P.UNCHANGED  # every field it has is the state's already
    changed = await pub(broker, req({"q": True}, m, snapshot_mode="merge", if_changed=True))
    assert changed[0].status is P.PUBLISHED  # true is not 1
    n = await pub(broker, req(1, "trades.N", snapshot_mode="none", if_changed=True),
                  req(1, "trades.N", snapshot_mode="none", if_changed=True))
    assert [r.status for r in n] == [P.PUBLISHED, P.PUBLISHED]  # no state: always news


async def test_snapshot_modes(broker: Broker) -> None:
    await pub(broker, req({"a": 1}, "quotes.L"), req({"a": 2}, "quotes.L"))
    assert await broker.snapshot("quotes.L") == {"": '{"a":2}'}
    await pub(broker, req(1, "depth.K", key="x", snapshot_mode="keyed"),
              req(2, "depth.K", key="y", snapshot_mode="keyed"),
              req(0, "depth.K", key="x", snapshot_mode="keyed", delete=True))
    assert await broker.snapshot("depth.K") == {"y": "2"}
    await pub(broker, req({"a": 1, "b": 1}, "account.2.m", snapshot_mode="merge"),
              req({"b": 2, "c": 3}, "account.2.m", snapshot_mode="merge"))
    merged = await broker.snapshot("account.2.m")
    assert json.loads(merged[""]) == {"a": 1, "b": 2, "c": 3}
    await pub(broker, req(1, "trades.Z", snapshot_mode="none"))
    assert await broker.snapshot("trades.Z") == {}


async def test_a_batch_across_channels_keeps_each_channels_order(broker: Broker) -> None:
    # Redis: one publish.lua call per channel; replies still come in batch order.
    names = ["trades.A", "trades.B", "trades.C"]
    batch = [req({"n": i}, names[i % 3 if i < 9 else 0]) for i in range(12)]
    replies = await pub(broker, *batch)
    assert [r.status for r in replies] == [P.PUBLISHED] * 12
    expected = {"trades.A": [0, 3, 6, 9, 10, 11], "trades.B": [1, 4, 7], "trades.C": [2, 5, 8]}
    for name, indexes in expected.items():
        assert [replies[i].offset for i in indexes] == list(range(1, len(indexes) + 1))
        r = await hist(broker, 0, channel=name)
        assert [json.loads(p.data)["n"] for p in r.entries] == indexes


async def test_idempotent_replays_inside_one_batch(broker: Broker) -> None:
    first = await pub(broker, req(1, msg_id="m1"), req(2, msg_id="m2"),
                      req(1, msg_id="m1"),  # the same id twice in one batch
                      req(3), req(4, msg_id="m4"))
    epoch = first[0].epoch
    assert first == [PublishReply(1, epoch, P.PUBLISHED), PublishReply(2, epoch, P.PUBLISHED),
                     PublishReply(1, epoch, P.DUPLICATE), PublishReply(3, epoch, P.PUBLISHED),
                     PublishReply(4, epoch, P.PUBLISHED)]
    # The batch sent again (a retry after a lost reply), with a new message in the middle.
    again = await pub(broker, req(1, msg_id="m1"), req(2, msg_id="m2"), req(5, msg_id="m5"),
                      req(4, msg_id="m4"), req(5, msg_id="m5"))
    assert again == [PublishReply(1, epoch, P.DUPLICATE), PublishReply(2, epoch, P.DUPLICATE),
                     PublishReply(5, epoch, P.PUBLISHED), PublishReply(4, epoch, P.DUPLICATE),
                     PublishReply(5, epoch, P.DUPLICATE)]
    r = await hist(broker, 0)
    assert [p.data for p in r.entries] == ["1", "2", "3", "4", "5"]
    # Ids are per channel: the same id on another channel in the same batch is news there.
    other = await pub(broker, req(9, "trades.O", msg_id="m1"), req(1, msg_id="m1"))
    assert [r.status for r in other] == [P.PUBLISHED, P.DUPLICATE]


async def test_a_partly_fenced_batch(broker: Broker) -> None:
    await pub(broker, req(0, "trades.F"), fence=Fence(5))  # a newer leader wrote trades.F
    await pub(broker, req(0, "trades.G"), fence=Fence(3))
    replies = await pub(broker, req(1, "trades.F"), req(1, "trades.G"), req(2, "trades.F"),
                        req(2, "trades.G", msg_id="g2"), fence=Fence(4))
    epoch_g = replies[1].epoch
    assert replies[0] == replies[2] == PublishReply(0, "5", P.FENCED)
    assert replies[1] == PublishReply(2, epoch_g, P.PUBLISHED)
    assert replies[3] == PublishReply(3, epoch_g, P.PUBLISHED)
    assert (await hist(broker, -1, channel="trades.F")).top == 1  # nothing written
    # trades.G's fence is 4 now, from the first message of the batch on: 3 is refused.
    assert (await pub(broker, req(3, "trades.G"), fence=Fence(3)))[0].status is P.FENCED
    # A duplicate answered to a newer leader inside a batch raises the fence too.
    dup = await pub(broker, req(2, "trades.G", msg_id="g2"), fence=Fence(6))
    assert dup[0] == PublishReply(3, epoch_g, P.DUPLICATE)
    assert (await pub(broker, req(4, "trades.G"), fence=Fence(5)))[0] == PublishReply(
        0, "6", P.FENCED)
    past = int(time.time() * 1000) - 1000
    expired = await pub(broker, req(5, "trades.G"), req(5, "trades.H"), fence=Fence(9, past))
    assert expired == [PublishReply(0, "", P.EXPIRED)] * 2


async def test_state_changes_inside_one_batch(broker: Broker) -> None:
    m, k = "account.3.balance", "depth.S"
    merge = {"snapshot_mode": "merge", "if_changed": True}
    replies = await pub(
        broker,
        req({"a": 1, "b": 1}, m, **merge),
        req({"b": 2}, m, **merge),
        req({"a": 1}, m, **merge),  # unchanged: a merge earlier in the batch set it
        req({"b": 1}, m, **merge),  # A, B, A: news
        req({"a": 1, "b": 1}, m, **merge),  # unchanged again
        req([1, 2], m, **merge),  # not an object: replaces the state
        req([1, 2], m, **merge),  # the same text
        req({"c": 1}, m, **merge),  # on an array: replaces it
        req({"x": 1}, k, key="x", snapshot_mode="keyed", if_changed=True),
        req({}, k, key="x", snapshot_mode="keyed", delete=True, if_changed=True),
        req({}, k, key="x", snapshot_mode="keyed", delete=True, if_changed=True),
        req({"x": 1}, k, key="x", snapshot_mode="keyed", if_changed=True),
        req({"y": 1}, k, key="y", snapshot_mode="keyed", if_changed=True),
        req({"y": 1}, k, key="y", snapshot_mode="keyed", if_changed=True),
    )
    assert [r.status for r in replies] == [
        P.PUBLISHED, P.PUBLISHED, P.UNCHANGED, P.PUBLISHED, P.UNCHANGED, P.PUBLISHED,
        P.UNCHANGED, P.PUBLISHED,
        P.PUBLISHED, P.PUBLISHED, P.UNCHANGED, P.PUBLISHED, P.PUBLISHED, P.UNCHANGED]
    assert [r.offset for r in replies] == [1, 2, 2, 3, 3, 4, 4, 5, 1, 2, 2, 3, 4, 4]
    assert {key: json.loads(v) for key, v in (await broker.snapshot(m)).items()} == {
        "": {"c": 1}}
    assert {key: json.loads(v) for key, v in (await broker.snapshot(k)).items()} == {
        "x": {"x": 1}, "y": {"y": 1}}
    merged = await pub(broker, req({"a": 1}, m, snapshot_mode="merge"),
                       req({"b": {"z": [1]}}, m, snapshot_mode="merge"),
                       req({"a": 2}, m, snapshot_mode="merge"))
    assert [r.offset for r in merged] == [6, 7, 8]
    assert json.loads((await broker.snapshot(m))[""]) == {"c": 1, "a": 2, "b": {"z": [1]}}


# --- history -----------------------------------------------------------------------------


async def test_history_positions_and_snapshots(broker: Broker) -> None:
    replies = await pub(broker, *(req(i, key="k") for i in range(10)))
    epoch = replies[0].epoch
    r = await hist(broker, 7, "r", epoch=epoch)
    assert r.recoverable and [p.offset for p in r.entries] == [8, 9, 10] and r.snapshot == {}
    r = await hist(broker, 7, "r", epoch="other")
    assert not r.recoverable and r.entries == [] and r.snapshot == {"k": "9"}
    r = await hist(broker, 2, "1", until=4)
    assert [p.offset for p in r.entries] == [3, 4] and r.snapshot == {"k": "9"}
    assert r.entries[0].key == "k" and r.entries[0].epoch == epoch
    r = await hist(broker, 0, limit=5)  # more missing than the limit
    assert not r.recoverable and r.entries == []
    r = await hist(broker, 11)  # ahead of the top
    assert not r.recoverable
    r = await hist(broker, 10)  # at the top: nothing missing
    assert r.recoverable and r.entries == []
    r = await hist(broker, -1, "1")
    assert r.top == 10 and not r.recoverable and r.snapshot == {"k": "9"}


def view(r: HistoryResult) -> tuple[object, ...]:
    return (r.epoch, r.top, r.first, r.recoverable, r.snapshot,
            [(p.channel, p.epoch, p.offset, p.key, p.data, p.deleted) for p in r.entries])


async def test_history_many_answers_each_read_as_history_does(broker: Broker) -> None:
    """Many reads in one call (one pipeline; a cluster's across its masters) give what
    each read gives alone: positions, entries (the long one past the inline limit too),
    snapshots, epochs, a channel created by its read."""
    names = [f"trades.M{i}" for i in range(12)]
    epochs = {}
    for i, name in enumerate(names):
        replies = await pub(broker, *(req(j, name, key="k") for j in range(i + 1)))
        epochs[name] = replies[0].epoch
    reads = [HistoryRead(name, i // 2, "r", epochs[name]) for i, name in enumerate(names)]
    reads += [HistoryRead(names[11], 0, "0"),  # 12 entries: past the inline limit (5)
              HistoryRead(names[3], 1, "r", "other-epoch"),
              HistoryRead(names[5], 1, "1", until=3),
              HistoryRead("trades.MNEW", -1, "0")]
    if isinstance(broker, RedisBroker):
        await broker.redis.script_flush()  # NOSCRIPT: loaded and sent again
    many = await broker.history_many(reads, limit=100, meta_ttl=TTL)
    assert len(many) == len(reads)
    for read, got in zip(reads, many, strict=True):
        assert isinstance(got, HistoryResult), got
        alone = await hist(broker, read.since, read.snapshot, channel=read.channel,
                           epoch=read.epoch, until=read.until)
        if read.channel == "trades.MNEW":
            assert got.top == 0 and got.epoch == alone.epoch  # created by the first read
        assert view(got) == view(alone), read
    long, other, until_3 = many[12], many[13], many[14]
    assert isinstance(long, HistoryResult) and isinstance(other, HistoryResult)
    assert isinstance(until_3, HistoryResult)
    assert [p.offset for p in long.entries] == list(range(1, 13))
    assert not other.recoverable and other.snapshot == {"k": "3"}
    assert [p.offset for p in until_3.entries] == [2, 3] and until_3.snapshot == {"k": "5"}
    assert await broker.history_many([], limit=100, meta_ttl=TTL) == []


async def test_history_is_trimmed_by_length_and_age(broker: Broker) -> None:
    await pub(broker, *(req(i, max_length=4) for i in range(10)))
    r = await hist(broker, 5)
    assert r.first == 7 and not r.recoverable
    r = await hist(broker, 6)
    assert r.recoverable and [p.offset for p in r.entries] == [7, 8, 9, 10]
    await pub(broker, req(0, "trades.AGE", max_age_ms=50))
    await asyncio.sleep(0.1)
    await pub(broker, req(1, "trades.AGE", max_age_ms=50))
    r = await hist(broker, 0, channel="trades.AGE")
    assert r.first == 2 and not r.recoverable


async def test_deleted_flags_survive_history(broker: Broker) -> None:
    await pub(broker, req(1, key="a", snapshot_mode="keyed"),
              *(req(0, key="a", snapshot_mode="keyed", delete=True) for _ in range(6)))
    r = await hist(broker, 0)
    assert [p.deleted for p in r.entries] == [False] + [True] * 6


async def test_a_read_creates_the_epoch_the_first_publish_keeps(broker: Broker) -> None:
    r = await hist(broker, -1, channel="trades.FRESH")
    assert r.top == 0 and r.first == 1 and r.epoch
    assert (await pub(broker, req(1, "trades.FRESH")))[0] == PublishReply(1, r.epoch,
                                                                          P.PUBLISHED)


async def test_rebase(broker: Broker) -> None:
    replies = await pub(broker, req(1), req(2), fence=Fence(3))
    epoch = replies[0].epoch
    assert (await broker.rebase(CH, epoch, 2, meta_ttl=TTL)).status is RebaseStatus.FENCED
    done = await broker.rebase(CH, epoch, 3, meta_ttl=TTL)
    assert done.status is RebaseStatus.REBASED and done.epoch != epoch
    again = await broker.rebase(CH, epoch, None, meta_ttl=TTL)
    assert again.status is RebaseStatus.NOT_NEEDED and again.epoch == done.epoch
    r = await hist(broker, 0, "1")
    assert (r.epoch, r.top, r.first) == (done.epoch, 2, 3)  # the top and state stay
    assert r.snapshot == {"": "2"}
    assert (await pub(broker, req(3)))[0] == PublishReply(3, done.epoch, P.PUBLISHED)


# --- live --------------------------------------------------------------------------------


class Listener:
    def __init__(self) -> None:
        self.pubs: list[Publication] = []
        self.subscribed: list[str] = []
        self.connected = 0

    def on_publication(self, pub: Publication) -> None:
        self.pubs.append(pub)

    def on_subscribed(self, channel: str) -> None:
        self.subscribed.append(channel)

    def on_connected(self, channels: int) -> None:
        self.connected += 1

    def on_lost(self, error: BaseException, retry_in: float) -> None:
        pass

    def pace(self) -> float:
        return 0.0


async def test_live_messages_in_order(broker: Broker) -> None:
    listener = Listener()
    live: Live = broker.live(listener, "node")
    await live.start()
    try:
        await asyncio.wait_for(live.wait_connected(), 5)
        # One connection, or one per shard master.
        shards = len(live.shards) if isinstance(live, ClusterLive) else 1
        assert live.connected and listener.connected == shards
        await live.subscribe(CH)
        await until(lambda: listener.subscribed == [CH])
        assert await live.probe(2.0)
        await pub(broker, *(req(i, key="k", received_ms=1_700_000_000_123) for i in range(20)))
        await pub(broker, req(5, "trades.OTHER"))  # not subscribed
        await until(lambda: len(listener.pubs) == 20)
        assert [p.offset for p in listener.pubs] == list(range(1, 21))
        first = listener.pubs[0]
        assert (first.channel, first.key, first.data, first.deleted) == (CH, "k", "0", False)
        assert first.received == 1_700_000_000.123
        live.unsubscribe(CH)
        await asyncio.sleep(0.05)
        await pub(broker, req(99))
        await asyncio.sleep(0.1)
        assert len(listener.pubs) == 20
    finally:
        await live.close()


async def test_many_subscribes_at_once_are_each_confirmed(broker: Broker) -> None:
    """A turn's subscribes go out together (one SUBSCRIBE where the server allows it):
    each channel is confirmed and gets its live messages."""
    listener = Listener()
    live: Live = broker.live(listener, "node")
    await live.start()
    names = [f"trades.S{i}" for i in range(300)]
    try:
        await asyncio.wait_for(live.wait_connected(), 5)
        await asyncio.gather(*(live.subscribe(name) for name in names))
        await until(lambda: len(listener.subscribed) == len(names))
        assert sorted(listener.subscribed) == sorted(names)
        await pub(broker, *(req(1, name) for name in names))
        await until(lambda: len(listener.pubs) == len(names))
        assert sorted(p.channel for p in listener.pubs) == sorted(names)
    finally:
        await live.close()


async def test_a_paced_reader_hands_over_what_gathered_in_one_turn(broker: Broker) -> None:
    """A listener whose `pace` asks for a hold: the reader holds the reply it just read
    that long before handing it over; what is published meanwhile (separate PUBLISHes) is
    then handed over in the same event-loop turn (no turn boundary between the
    publications, as the hub's end-of-turn flush sees them), in order, none lost."""
    if isinstance(broker, MemoryBroker):
        pytest.skip("the memory broker delivers from publish: it never paces")
    hold = 0.3
    loop = asyncio.get_running_loop()
    turns: list[list[int]] = []  # offsets handed over per event-loop turn
    paced_at: list[float] = []

    class Pacing(Listener):
        armed = False
        turn_open = False

        def on_publication(self, pub: Publication) -> None:
            super().on_publication(pub)
            if not self.turn_open:  # the first of a turn: the turn ends at the next one
                self.turn_open = True
                turns.append([])
                loop.call_soon(self.end_turn)
            turns[-1].append(pub.offset)

        def end_turn(self) -> None:
            self.turn_open = False

        def pace(self) -> float:
            if self.armed:
                self.armed = False
                paced_at.append(time.monotonic())
                return hold
            return 0.0

    listener = Pacing()
    live: Live = broker.live(listener, "node")
    await live.start()
    try:
        await asyncio.wait_for(live.wait_connected(), 5)
        await live.subscribe(CH)
        await until(lambda: listener.subscribed == [CH])
        listener.armed = True
        await pub(broker, req(1))
        await until(lambda: bool(paced_at))  # the reader holds publication 1
        for i in range(2, 11):  # one PUBLISH each, sent while it holds
            await pub(broker, req(i))
        sent = time.monotonic()
        assert sent - paced_at[0] < hold, "published too slowly to test the hold"
        assert listener.pubs == []  # held
        await until(lambda: len(listener.pubs) == 10)
        assert time.monotonic() - paced_at[0] >= hold * 0.9
        assert turns == [list(range(1, 11))]  # all ten in one turn
        for i in range(11, 21):  # unpaced: all arrive, in order
            await pub(broker, req(i))
        await until(lambda: len(listener.pubs) == 20)
        assert [p.offset for p in listener.pubs] == list(range(1, 21))
        assert sum(map(len, turns)) == 20 and turns[0] == list(range(1, 11))
    finally:
        await live.close()


async def test_reconnect_wakes_a_reader_blocked_in_its_read(broker: Broker) -> None:
    """`reconnect()` (the hub's liveness probe failed) drops the pub/sub connection of a
    reader blocked in a read with nothing arriving, reports the loss, resubscribes every
    channel and delivers again; closing afterwards still ends the reader."""
    if not isinstance(broker, RedisBroker) or isinstance(broker, RedisClusterBroker):
        pytest.skip("one pub/sub connection: RedisLive")
    lost: list[BaseException] = []

    class Losing(Listener):
        def on_lost(self, error: BaseException, retry_in: float) -> None:
            lost.append(error)

    listener = Losing()
    live = broker.live(listener, "node")
    await live.start()
    try:
        await asyncio.wait_for(live.wait_connected(), 5)
        await live.subscribe(CH)
        await until(lambda: listener.subscribed == [CH])
        live.reconnect()
        live.reconnect()  # twice before the reader runs: one reconnect
        await until(lambda: listener.connected == 2 and live.connected)
        assert len(lost) == 1 and "liveness probe failed" in repr(lost[0])
        await until(lambda: listener.subscribed == [CH, CH])  # resubscribed
        assert await live.probe(2.0)
        await pub(broker, req(1))
        await until(lambda: [p.offset for p in listener.pubs] == [1])
        assert listener.connected == 2 and len(lost) == 1
    finally:
        await live.close()
    assert live._reader is not None and live._reader.done()


def test_the_live_codec_round_trips() -> None:
    """Both formats (more in tests/unit/test_live_codec.py)."""
    for text in (encode_live_one("e1", 7, "bid:1", '{"a":"x\\ny"}\n', deleted=True,
                                 received_ms=1500),
                 encode_live("e1", 7, [("bid:1", '{"a":"x\\ny"}\n', True, 1500)])):
        [p] = decode_live("depth.X", text)
        assert (p.channel, p.epoch, p.offset, p.key, p.data, p.deleted, p.received) == (
            "depth.X", "e1", 7, "bid:1", '{"a":"x\\ny"}\n', True, 1.5)
    assert decode_live("c", encode_live_one("e", 1, "", "1"))[0].received == 0.0


# --- leases ------------------------------------------------------------------------------


async def test_leases(broker: Broker) -> None:
    a = await broker.acquire("feed", "a", 5000)
    assert a.token == 1 and a.ttl_ms == 5000 and a.holder == "" and a.now_ms > 0
    b = await broker.acquire("feed", "b", 5000)
    assert b.token == 0 and b.holder == "1:a" and 0 < b.ttl_ms <= 5000
    assert (await broker.renew("feed", "1:a", 5000)).renewed
    refused = await broker.renew("feed", "1:b", 5000)
    assert not refused.renewed and refused.holder == "1:a"
    again = await broker.acquire("feed", "a", 5000)  # an earlier term of the same owner
    assert again.token == 2
    assert not await broker.release("feed", "1:a")
    assert await broker.release("feed", "2:a", fence_floor=10)
    assert not (await broker.renew("feed", "2:a", 5000)).renewed
    assert (await broker.acquire("feed", "b", 5000)).token == 11  # above the floor


async def test_a_lease_expires(broker: Broker) -> None:
    assert (await broker.acquire("short", "a", 50)).token == 1
    await asyncio.sleep(0.12)
    assert (await broker.acquire("short", "b", 5000)).token == 2


async def test_ping(broker: Broker) -> None:
    assert await broker.ping()
