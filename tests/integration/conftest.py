"""Integration fixtures: a real Valkey server (or REDIS_URL), edges served by uvicorn on
ephemeral loopback ports, and a publisher.

With REDIS_URL set, tests run against that server instead of starting one; each test uses
a key prefix of its own, and only the epoch-change tests empty the database (FLUSHDB), so
point REDIS_URL at a disposable database.

Cluster tests get a real 3-master + 3-replica Valkey cluster (`redis_cluster`, started once
per session), or the cluster REDIS_CLUSTER_URL names (redis+cluster://host:port,...): then
the tests that kill nodes or move slots skip, as they need to control the nodes.

FANOUT_TEST_LOOP=uvloop runs every test, and so the edges served in it, on uvloop instead
of asyncio's loop (FANOUT_LOOP, common/loop.py); edges started as processes follow
FANOUT_LOOP (default auto: uvloop where installed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

import hypothesis  # noqa: F401  (loaded up front: a lazy import at session end trips a CPython 3.11 AST bug)
import pytest
from redis.asyncio import Redis

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.config import EdgeConfig, RedisSettings
from edge.app import Edge
from edge.server import DrainingServer, uvicorn_config
from fanout.embedded import EmbeddedValkey, EmbeddedValkeyCluster
from ingest.publisher import Publisher

if os.environ.get("FANOUT_TEST_LOOP", "asyncio") == "uvloop":
    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """Every test's loop is uvloop's (FANOUT_TEST_LOOP)."""
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


@dataclass
class RedisServer:
    url: str
    embedded: EmbeddedValkey | None

    async def wipe(self) -> None:
        """Lose everything, as a Redis restart without persistence does."""
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.restart)
        else:
            client = Redis.from_url(self.url)
            await client.flushdb()
            await client.aclose()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield RedisServer(url, None)
        return
    server = EmbeddedValkey()
    server.start()
    try:
        yield RedisServer(server.url, server)
    finally:
        server.stop()


@dataclass
class ClusterServer:
    url: str  # redis+cluster://host:port,...
    embedded: EmbeddedValkeyCluster | None

    def settings(self, key_prefix: str) -> RedisSettings:
        return RedisSettings(url=self.url, key_prefix=key_prefix)


@pytest.fixture(scope="session")
def redis_cluster_session() -> Iterator[ClusterServer]:
    url = os.environ.get("REDIS_CLUSTER_URL")
    if url:
        yield ClusterServer(url, None)
        return
    # cluster-node-timeout 1.5 s: a killed master is failed over within a few seconds.
    cluster = EmbeddedValkeyCluster(masters=3, replicas=1, node_timeout_ms=1500)
    cluster.start()
    try:
        yield ClusterServer(cluster.url, cluster)
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster(redis_cluster_session: ClusterServer) -> Iterator[ClusterServer]:
    """The session's cluster, healthy (every slot served, replicas in sync) before and
    after the test: a test that killed a node gets it started again (as a replica)."""
    cluster = redis_cluster_session.embedded
    if cluster is not None:
        cluster.wait_healthy(60.0)
    yield redis_cluster_session
    if cluster is not None:
        for i, running in enumerate(cluster.running):
            if not running:
                cluster.restart_node(i)
        cluster.wait_healthy(60.0)


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest) -> str:
    return f"t{os.urandom(4).hex()}"


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def publisher(redis: Redis, key_prefix: str) -> Publisher:
    return Publisher(RedisBroker(redis, Keys(key_prefix)))


class EdgeServer:
    """An edge served as `fanout edge` serves it (edge/server.py: uvicorn, connections
    accepted by edge/accept.py) on an ephemeral loopback port, in this event loop."""

    def __init__(self, config: EdgeConfig) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.config = replace(config, port=self.port)
        self.server = DrainingServer(uvicorn_config(self.config), drain_seconds=0)
        self.task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def edge(self) -> Edge:
        app = self.server.config.loaded_app if self.server.config.loaded else None
        target = getattr(app, "app", app)
        while target is not None and not hasattr(target, "state"):
            target = getattr(target, "app", None)
        assert target is not None
        edge: Edge = target.state.edge
        return edge

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        async with asyncio.timeout(10):
            while not self.server.started:
                if self.task.done():
                    self.task.result()
                await asyncio.sleep(0.01)
            while not self.edge.hub or not self.edge.hub.ready:
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.task, 10)
        self.sock.close()


class EdgeFactory(Protocol):
    """What the `edge_factory` fixture gives: start an edge with these EdgeConfig fields
    changed (keyword arguments); the fixture stops it after the test."""

    async def __call__(self, **overrides: Any) -> EdgeServer: ...


@pytest.fixture
def edge_config(redis_server: RedisServer, key_prefix: str) -> EdgeConfig:
    return EdgeConfig(
        redis=RedisSettings(url=redis_server.url, key_prefix=key_prefix),
        ping_interval=25.0,
        pong_timeout=10.0,
    )


@pytest.fixture
async def edge_factory(edge_config: EdgeConfig) -> AsyncIterator[EdgeFactory]:
    started: list[EdgeServer] = []

    async def make(**overrides: Any) -> EdgeServer:
        server = EdgeServer(replace(edge_config, **overrides))
        await server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        await server.stop()


@pytest.fixture
async def edge(edge_factory: EdgeFactory) -> EdgeServer:
    return await edge_factory()
