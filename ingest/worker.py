"""The ingest worker: upstream messages in, pipelined publishes out.

The upstream adapter runs in its own task and feeds a bounded queue; the publisher drains
whatever is queued (up to `batch_size`) into one round trip. At low rates a message goes
out alone at once; at high rates batches grow by themselves, which is what lets one
process sustain a high publish rate. If Redis fails, the same batch is sent again after a
backoff: idempotent message ids make that safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from redis.asyncio import Redis
from redis.exceptions import RedisError

from common.config import IngestConfig, redact_url
from common.keys import Keys
from ingest.publisher import InvalidMessage, Publisher
from ingest.sim import make_feed
from ingest.upstream import Upstream, UpstreamMessage


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.published = Counter(
            "fanout_ingest_published", "Messages published (new offsets).", registry=registry
        )
        self.duplicates = Counter(
            "fanout_ingest_duplicates", "Publishes answered as duplicates (idempotency).",
            registry=registry,
        )
        self.rejected = Counter(
            "fanout_ingest_rejected", "Upstream messages rejected as invalid.", registry=registry
        )
        self.errors = Counter(
            "fanout_ingest_publish_errors", "Failed publish round trips.", registry=registry
        )
        self.latency = Histogram(
            "fanout_ingest_publish_latency_seconds", "Time of one publish round trip.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
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


class Worker:
    def __init__(
        self,
        upstream: Upstream,
        publisher: Publisher,
        logger: logging.Logger,
        metrics: IngestMetrics | None = None,
        batch_size: int = 500,
        queue_size: int = 10_000,
    ) -> None:
        self.upstream = upstream
        self.publisher = publisher
        self.log = logger
        self.metrics = metrics or IngestMetrics(CollectorRegistry())
        self.batch_size = batch_size
        self.queue: asyncio.Queue[UpstreamMessage | None] = asyncio.Queue(queue_size)

    async def run(self) -> None:
        reader = asyncio.create_task(self._read(), name="ingest-upstream")
        try:
            await self._publish_loop()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self) -> None:
        async for msg in self.upstream.messages():
            await self.queue.put(msg)
        await self.queue.put(None)  # the upstream ended

    async def _publish_loop(self) -> None:
        ended = False
        while not ended:
            first = await self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.batch_size and not self.queue.empty():
                item = self.queue.get_nowait()
                if item is None:
                    ended = True
                    break
                batch.append(item)
            self.metrics.queue.set(self.queue.qsize())
            await self._publish(batch)

    async def _publish(self, batch: list[UpstreamMessage]) -> None:
        delay = 0.05
        while True:
            started = time.perf_counter()
            try:
                results = await self.publisher.publish_batch(batch)
            except InvalidMessage as exc:
                # Drop the bad message(s) one by one, never the whole batch.
                if len(batch) == 1:
                    self.metrics.rejected.inc()
                    self.log.warning("rejected upstream message error=%s", exc)
                    return
                for msg in batch:
                    await self._publish([msg])
                return
            except (OSError, RedisError, TimeoutError) as exc:
                self.metrics.errors.inc()
                self.log.warning("publish failed size=%d error=%r retry_in=%.2f",
                                 len(batch), exc, delay)
                await asyncio.sleep(random.uniform(0, delay))
                delay = min(delay * 2, 5.0)
                continue
            self.metrics.latency.observe(time.perf_counter() - started)
            self.metrics.batch.observe(len(batch))
            dups = sum(r.duplicate for r in results)
            self.metrics.published.inc(len(results) - dups)
            if dups:
                self.metrics.duplicates.inc(dups)
            return


async def serve(config: IngestConfig, logger: logging.Logger) -> None:
    redis = Redis.from_url(config.redis.url, decode_responses=True, socket_timeout=10.0,
                           socket_connect_timeout=5.0)
    registry = CollectorRegistry()
    metrics = IngestMetrics(registry)
    if config.metrics_port:
        start_http_server(config.metrics_port, registry=registry)
    publisher = Publisher(
        redis, Keys(config.redis.key_prefix), config.history, config.redis.meta_ttl,
        config.idempotency_ttl,
    )
    upstream = make_feed(config)
    logger.info(
        "ingest starting feed=%s symbols=%d rate=%.1f redis=%s",
        config.feed, len(config.symbols), config.rate, redact_url(config.redis.url),
    )
    worker = Worker(upstream, publisher, logger, metrics, config.batch_size)
    try:
        await worker.run()
    finally:
        await redis.aclose()


def run_worker(config: IngestConfig) -> int:
    logger = logging.getLogger("fanout.ingest")

    async def main() -> None:
        task = asyncio.create_task(serve(config, logger))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        logger.info("ingest stopped")

    asyncio.run(main())
    return 0
