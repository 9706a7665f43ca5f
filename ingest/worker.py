"""The ingest worker: upstream messages in, pipelined publishes out.

The upstream adapter runs in its own task and feeds a bounded queue; the publisher drains
whatever is queued (up to `batch_size`) into one round trip. At low rates a message goes
out alone at once; at high rates batches grow by themselves, which is what lets one
process sustain a high publish rate. If Redis fails, the same batch is sent again after a
backoff: idempotent message ids make that safe.

With a `Leader` (as `fanout ingest` runs it), the worker is a standby until it wins its
feed's lease, holds the upstream only while it leads (connect on election, disconnect when
the term ends) and publishes with the term's fence. A term ends when the lease is lost or
expires by the local clock, or when a publish is fenced out (a newer leader wrote first):
the worker then drops what it had not published (the next leader's upstream replays it),
and campaigns again. A batch fenced out on one channel may have been published on others,
past the refused messages: what was not published then starts up to a batch below the
highest message published (docs/architecture.md, "A partly fenced batch"). Before it
connects, a `Resumable` upstream is handed the channels' snapshots: what the previous
leader published is the new one's starting point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Generator

import uvicorn
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from starlette.types import ASGIApp

from common.aio import raise_if_cancelling, stop_tasks, wait_event
from common.backoff import Backoff
from common.broker import Broker, BrokerUnavailable, Fence
from common.broker.redisbroker import RedisBroker
from common.config import redact_url
from common.loop import loop_factory, loop_name
from common.namespaces import use_file
from ingest.config import IngestConfig
from ingest.feeds import make_upstream, state_metric
from ingest.health import UpstreamStates, create_ops_app
from ingest.leader import Leader, LeaderMetrics, NotLeader, Term
from ingest.publisher import FencedOut, InvalidMessage, Publisher, PublishResult
from ingest.upstream import Resumable, Upstream, UpstreamMessage

IN_FLIGHT_GRACE = 5.0  # s a publish round trip already sent may take to complete after a term
# Seconds: a publish round trip; from the upstream to published adds the longer tail.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "fanout_ingest_published", "Messages published (new offsets).", registry=registry
        )
        self.duplicates = Counter(
            "fanout_ingest_duplicates", "Publishes answered as duplicates (idempotency).",
            registry=registry,
        )
        self.unchanged = Counter(
            "fanout_ingest_unchanged", "State messages not published: they did not change the "
            "channel's snapshot (if_changed).", registry=registry,
        )
        self.rebased = Counter(
            "fanout_ingest_rebased", "Channels given a new epoch because their offsets went "
            "back (Redis lost acknowledged writes).", registry=registry,
        )
        self.rejected = Counter(
            "fanout_ingest_rejected", "Upstream messages rejected as invalid.", registry=registry
        )
        self.errors = Counter(
            "fanout_ingest_publish_errors", "Failed publish round trips.", registry=registry
        )
        self.latency = Histogram(
            "fanout_ingest_publish_latency_seconds", "Time of one publish round trip.",
            buckets=LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_latency = Histogram(
            "fanout_ingest_upstream_latency_seconds", "From receiving a message from the "
            "upstream to Redis having published it (queueing, batching, the round trip).",
            buckets=(*LATENCY_BUCKETS, 2.5, 10.0),
            registry=registry,
        )
        self.batch = Histogram(
            "fanout_ingest_batch_size", "Messages per publish round trip.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=registry,
        )
        self.queue = Gauge(
            "fanout_ingest_queue_depth", "Upstream messages waiting to be published.",
            registry=registry,
        )
        self.fenced = Counter(
            "fanout_ingest_fenced_out", "Publish round trips refused by fencing (a newer "
            "leader published, or the lease deadline passed).", registry=registry,
        )


class Worker:
    def __init__(
        self,
        upstream: Upstream,
        publisher: Publisher,
        logger: logging.Logger,
        metrics: IngestMetrics | None = None,
        batch_size: int = 500,
        queue_size: int = 10_000,
        leader: Leader | None = None,
    ) -> None:
        self.upstream = upstream
        self.publisher = publisher
        self.log = logger
        self.metrics = metrics or IngestMetrics(CollectorRegistry())
        self.batch_size = batch_size
        self.queue_size = queue_size
        self.leader = leader
        self.queue: asyncio.Queue[UpstreamMessage | None] = asyncio.Queue(queue_size)
        self._idle = asyncio.Event()  # set unless a publish round trip is in flight
        self._idle.set()

    async def run(self) -> None:
        """Without a leader: publish the upstream until it ends. With one: lead whenever
        elected, until the upstream ends or the task is cancelled (which stops publishing
        first, then releases the lease)."""
        if self.leader is None:
            await self._serve_term(None)
            return
        campaign = asyncio.create_task(self.leader.run(), name="ingest-leader")
        try:
            while True:
                elected = asyncio.create_task(self.leader.elected())
                try:
                    await asyncio.wait({campaign, elected}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    elected.cancel()
                if campaign.done():
                    campaign.result()  # the campaign failed: raise its error
                    return
                term = elected.result()
                if not term.ended.is_set() and await self._serve_term(term):
                    return  # the upstream ended
        finally:
            # After the term's tasks stopped: nothing is published once the lease is released.
            await stop_tasks([campaign], self.log)

    async def _serve_term(self, term: Term | None) -> bool:
        """Read the upstream and publish while `term` lasts (forever without one). True if
        the upstream ended. A fresh queue per term: nothing read in an earlier term is
        published in a later one."""
        self.queue = asyncio.Queue(self.queue_size)
        if term is not None:
            self.log.info("upstream connecting feed=%s token=%d", self.upstream.name, term.token)
        reader = asyncio.create_task(self._read(), name="ingest-upstream")
        publisher = asyncio.create_task(self._publish_loop(), name="ingest-publish")
        ended = asyncio.create_task(term.ended.wait()) if term is not None else None
        tasks = {t for t in (reader, publisher, ended) if t is not None}
        try:
            while not publisher.done() and not (ended is not None and ended.done()):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if reader.done():
                    reader.result()  # raises if the upstream adapter failed
                    tasks.discard(reader)  # it ended: the publisher drains the queue
            if not publisher.done():
                # The term ended. Disconnect the upstream now; a round trip already sent
                # may complete (its outcome, fenced or not, is counted and logged), and
                # nothing more is sent: every attempt checks the term first.
                reader.cancel()
                await wait_event(self._idle, IN_FLIGHT_GRACE)
        finally:
            # An upstream adapter disconnects as its generator closes.
            await stop_tasks([reader, publisher, ended], self.log)
        upstream_ended = False
        if not publisher.cancelled():
            exc = publisher.exception()
            if isinstance(exc, FencedOut):
                assert self.leader is not None
                self.leader.step_down("fenced", exc.fence)
            elif exc is not None and not isinstance(exc, NotLeader):
                raise exc
            upstream_ended = exc is None
        if term is not None:
            self.metrics.queue.set(0)
            self.log.info("upstream disconnected feed=%s token=%d reason=%s",
                          self.upstream.name, term.token,
                          "upstream ended" if upstream_ended else term.reason)
        return upstream_ended

    async def _resume(self) -> None:
        """Hand a `Resumable` upstream the published state before it connects. Best effort:
        without it the upstream only knows less (a depth level the old leader left may
        linger), so a Redis failure here is logged, not fatal."""
        if not isinstance(self.upstream, Resumable):
            return
        try:
            await self.upstream.resume(self.publisher.snapshot)
        except (BrokerUnavailable, OSError, TimeoutError) as exc:
            self.log.warning("upstream resume failed feed=%s error=%r", self.upstream.name, exc)

    async def _read(self) -> None:
        queue = self.queue
        await self._resume()
        messages = self.upstream.messages()
        try:
            async for msg in messages:
                raise_if_cancelling()
                await queue.put(msg)
        finally:
            aclose = getattr(messages, "aclose", None)  # an async generator: disconnect now
            if aclose is not None:
                await aclose()
        await queue.put(None)  # the upstream ended

    async def _publish_loop(self) -> None:
        queue = self.queue
        ended = False
        while not ended:
            first = await queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.batch_size and not queue.empty():
                item = queue.get_nowait()
                if item is None:
                    ended = True
                    break
                batch.append(item)
            self.metrics.queue.set(queue.qsize())
            await self._publish(batch)

    async def _publish(self, batch: list[UpstreamMessage]) -> None:
        backoff = Backoff(base=0.05, cap=5.0)
        while True:
            # Checked before every attempt: a term that ended or ran out publishes nothing.
            fence = self.leader.fence() if self.leader is not None else None
            started = time.perf_counter()
            try:
                results = await self._round_trip(batch, fence)
            except FencedOut as exc:
                self._count(exc.results)
                self.metrics.fenced.inc()
                # Messages after a refused one may have been published on other channels
                # (docs/architecture.md, "A partly fenced batch"): size and refused say so.
                self.log.warning("publish fenced out feed=%s token=%d channel=%s fence=%d "
                                 "reason=%s size=%d refused=%d",
                                 self.leader.feed if self.leader else "-", exc.token,
                                 exc.channel, exc.fence, exc.reason, len(batch),
                                 len(batch) - len(exc.results))
                raise
            except InvalidMessage as exc:
                # Drop the bad message(s) one by one, never the whole batch.
                if len(batch) == 1:
                    self.metrics.rejected.inc()
                    self.log.warning("rejected upstream message error=%s", exc)
                    return
                for msg in batch:
                    await self._publish([msg])
                return
            except (BrokerUnavailable, OSError, TimeoutError) as exc:
                self.metrics.errors.inc()
                delay = backoff.next_delay()
                self.log.warning("publish failed size=%d error=%r retry_in=%.2f",
                                 len(batch), exc, delay)
                await asyncio.sleep(delay)
                continue
            self.metrics.latency.observe(time.perf_counter() - started)
            self.metrics.batch.observe(len(batch))
            now = time.time()
            for msg in batch:
                self.metrics.upstream_latency.observe(max(now - msg.received_at, 0.0))
            self._count(results)
            return

    async def _round_trip(
        self, batch: list[UpstreamMessage], fence: Fence | None
    ) -> list[PublishResult]:
        self._idle.clear()
        try:
            results = await self.publisher.publish_batch(batch, fence)
        finally:
            self._idle.set()
        raise_if_cancelling()
        return results

    def _count(self, results: list[PublishResult]) -> None:
        dups = sum(r.duplicate for r in results)
        unchanged = sum(r.unchanged for r in results)
        self.metrics.published.inc(len(results) - dups - unchanged)
        if dups:
            self.metrics.duplicates.inc(dups)
        if unchanged:
            self.metrics.unchanged.inc(unchanged)


async def serve(
    config: IngestConfig, logger: logging.Logger, upstream: Upstream | None = None,
    broker: Broker | None = None,
) -> None:
    """Run one ingest worker for `config` (and `upstream`, default: the configured feed)
    until cancelled: standby, or leader of `config.feed_id`. `broker`: default, a Redis
    broker of its own for `config.redis` (closed on the way out)."""
    use_file(config.namespaces_file)  # channel names are parsed with these from now on
    own_broker = broker is None
    if broker is None:
        broker = RedisBroker.from_settings(config.redis, socket_timeout=10.0,
                                           logger=logger.getChild("broker"))
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_*: RSS, CPU, open descriptors
    metrics = IngestMetrics(registry)
    publisher = Publisher(
        broker, config.history, config.redis.meta_ttl,
        config.idempotency_ttl, logger=logger.getChild("publisher"),
        on_rebase=metrics.rebased.inc,
    )
    states = UpstreamStates(state_metric(registry))
    if upstream is None:
        upstream = make_upstream(config, logger, states)
    feed_id = config.feed_id or config.feed
    leader = Leader(broker, feed_id, logger,
                    LeaderMetrics(registry), ttl=config.lease_ttl)
    logger.info(
        "ingest starting feed=%s feed_id=%s owner=%s lease_ttl=%.2f redis=%s loop=%s",
        upstream.name, feed_id, leader.owner, config.lease_ttl, redact_url(config.redis.url),
        loop_name(asyncio.get_running_loop()),
    )
    worker = Worker(upstream, publisher, logger, metrics, config.batch_size, leader=leader)
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    if config.metrics_port:
        ops = create_ops_app(registry, broker, leader, feed_id, lambda: dict(states.states))
        logger.info("ops endpoints host=%s port=%d paths=/metrics,/healthz,/readyz",
                    config.metrics_host, config.metrics_port)
        servers.append(_embedded(ops, config.metrics_host, config.metrics_port, "ingest-ops"))
    if config.api_port:
        from ingest.http_api import create_api_app

        # The publish API publishes unfenced (backend services publish to their own
        # channels, not the feed's), so it serves on standbys too.
        api = create_api_app(publisher, config.api_keys, logger=logger.getChild("api"))
        logger.info("publish api host=%s port=%d", config.api_host, config.api_port)
        servers.append(_embedded(api, config.api_host, config.api_port, "ingest-api"))
    try:
        await worker.run()
    finally:
        for server, task in servers:
            server.should_exit = True
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
        if own_broker:
            await broker.close()


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the worker's event loop: the worker, not uvicorn, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _embedded(
    app: ASGIApp, host: str, port: int, name: str
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    """An HTTP server for `app` beside the worker, started as a task of this loop."""
    server = _EmbeddedServer(uvicorn.Config(
        app, host=host, port=port, lifespan="off", log_config=None, access_log=False,
    ))
    return server, asyncio.create_task(server.serve(), name=name)


def run_worker(config: IngestConfig, upstream: Upstream | None = None) -> int:
    logger = logging.getLogger("fanout.ingest")

    async def main() -> None:
        task = asyncio.create_task(serve(config, logger, upstream))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.info("ingest stopped")

    with asyncio.Runner(loop_factory=loop_factory(config.loop)) as runner:  # FANOUT_LOOP
        runner.run(main())
    return 0
