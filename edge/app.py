"""The edge's ASGI application: /ws, the demo page, health and metrics.

A WebSocket connection to /ws goes straight from the server to the edge (`EdgeApp`), past
Starlette's middleware stack and router: each layer is a coroutine frame that stays for the
connection's whole life (~3.5 KiB per idle connection for the six of them). Everything else
(the HTTP routes, lifespan, WebSockets to other paths) is Starlette's, as before."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import AsyncIterator, Awaitable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from common.broker import Broker
from common.broker.redisbroker import RedisBroker
from common.config import EdgeConfig, redact_url
from common.errors import CloseCode, Disconnect
from common.loop import loop_name
from common.namespaces import use_file
from common.protocol import SUBPROTOCOLS, Codec
from edge.admission import Admission, Gate
from edge.gcpolicy import STORM_READS, storm_gc
from edge.hub import Hub
from edge.session import Session
from edge.stats import EdgeCollector, EdgeStats
from edge.tokens import TokenVerifier
from edge.webstatic import STATIC, static_files
from edge.wire import RAW_SEND

WS_PATH = "/ws"


class Edge:
    """Everything one edge node holds: its broker, hub, stats and sessions."""

    def __init__(
        self, config: EdgeConfig, logger: logging.Logger | None = None,
        broker: Broker | None = None,
    ) -> None:
        self.config = config
        self.log = logger or logging.getLogger("fanout.edge")
        self.node_id = config.node_id or os.urandom(4).hex()
        self.stats = EdgeStats()
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_*: RSS, CPU, open descriptors
        # None: no key configured, no authentication. ConfigError for settings that do not
        # fit together (the command checks them first; this covers an app built directly).
        self.verifier = TokenVerifier.from_config(config, self.stats, self.log.getChild("jwks"))
        # None: a Redis broker of its own, made by `start` (and closed by `stop`).
        self.broker: Broker | None = broker
        self._own_broker = broker is None
        self.hub: Hub | None = None
        self.sessions: dict[Session, asyncio.Task[object]] = {}
        self.admission = Admission(config, self.stats, self.log.getChild("admission"))
        self.draining = False  # shutting down: not ready, new connections closed at once
        self.registry.register(EdgeCollector(self.stats, ready=self.ready))

    async def start(self) -> None:
        url = self.config.redis.url
        self.log.info("edge starting node=%s redis=%s loop=%s", self.node_id, redact_url(url),
                      loop_name(asyncio.get_running_loop()))
        if self.verifier is None:
            self.log.warning("authentication is off (no FANOUT_AUTH_SECRET, "
                             "FANOUT_AUTH_PUBLIC_KEY_FILE or FANOUT_AUTH_JWKS_URL): any client "
                             "may subscribe to any channel, account channels included")
        else:
            await self.verifier.start()
        self.admission.warn_at_start()
        if self.broker is None:
            self.broker = RedisBroker.from_settings(
                self.config.redis, socket_timeout=5.0, live=True,
                logger=self.log.getChild("broker"),
            )
        self.hub = Hub(
            self.broker, self.stats, self.log.getChild("hub"), node_id=self.node_id,
            recovery_limit=self.config.recovery_limit,
            # What a subscribe creates lives this long until a publish refreshes it.
            meta_ttl=min(self.config.redis.meta_ttl, self.config.unpublished_ttl),
            window_messages=self.config.recent_window_messages,
            window_bytes=self.config.recent_window_bytes,
            linger=self.config.channel_linger,
            live_share=self.config.live_share,
            live_coalesce_max=self.config.live_coalesce_max,
            gate=Gate("recovery", self.config.max_recoveries, self.config.recovery_queue,
                      self.config.recovery_retry, self.stats,
                      on_busy=(storm_gc(self.config.gc_storm_gen0)
                               if self.config.gc_thresholds is not None else None),
                      busy_at=STORM_READS),
        )
        await self.hub.start()

    async def drain(self, seconds: float) -> None:
        """Close every connection (3000, reconnect), spread evenly over up to `seconds` (at
        least one per 50 ms), in random order: the clients reconnect to the other edges a
        few at a time, not all in the same instant (each reconnect reads history for each of
        its channels). /readyz answers 503 from the start, so the load balancer sends no new
        ones here."""
        self.draining = True
        self.log.info("draining connections=%d seconds=%.1f", len(self.sessions), seconds)
        sessions = list(self.sessions)
        random.shuffle(sessions)
        tick = 0.05
        ticks = max(int(seconds / tick), 1)
        per_tick = max(-(-len(sessions) // ticks), 1)  # at least one per tick
        for i in range(0, len(sessions), per_tick):
            for session in sessions[i:i + per_tick]:
                session.fail(Disconnect(CloseCode.SHUTDOWN, "server shutting down"))
            await asyncio.sleep(tick)
        self.log.info("drained")

    async def stop(self) -> None:
        for session in list(self.sessions):
            session.fail(Disconnect(CloseCode.SHUTDOWN, "server shutting down"))
        if self.sessions:
            await asyncio.wait(list(self.sessions.values()), timeout=3.0)
        if self.verifier is not None:  # after the sessions: one may wait on a JWKS fetch
            await self.verifier.stop()
        if self.hub is not None:
            await self.hub.close()
        if self.broker is not None and self._own_broker:
            await self.broker.close()

    # --- endpoints -----------------------------------------------------------------------

    async def connection(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket connection to /ws admitted by the server's protocol
        (edge/handshake.py: origin and connection limits are decided there, before the
        upgrade), called by `EdgeApp` as the ASGI app itself: no frame in between (each
        stays for the connection's life)."""
        assert self.hub is not None
        scope[RAW_SEND] = send  # the server's own send: its protocol (edge/wire.py)
        try:
            ws: WebSocket = WebSocket(scope, receive, send)
            offered = list(scope.get("subprotocols") or [])
            codec, subprotocol = Codec.for_subprotocols(offered)
            await ws.accept(subprotocol=subprotocol)
            if self.draining:  # the load balancer has not noticed yet: try another edge
                await ws.close(int(CloseCode.SHUTDOWN), "server shutting down")
                return
            session = Session(
                ws, self.hub, self.config, self.stats, self.log.getChild("session"), codec,
                f"{self.node_id}-{os.urandom(6).hex()}", self.verifier, receive,
            )
            task = asyncio.current_task()
            assert task is not None
            self.sessions[session] = task
            try:
                await session.run()
            finally:
                self.sessions.pop(session, None)
        finally:
            # uvicorn's protocol holds this scope, and `send` is its own method: left in
            # place, every connection would end as a reference cycle (protocol, transport,
            # buffers) that only a full garbage collection frees.
            scope.pop(RAW_SEND, None)

    async def websocket(self, ws: WebSocket) -> None:
        """The same as a Starlette endpoint (its route is listed, but `EdgeApp` serves
        /ws itself)."""
        await self.connection(ws.scope, ws._receive, ws._send)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.node_id})

    def ready(self) -> bool:
        """What /readyz checks but its Redis PING (the fanout_edge_ready gauge too)."""
        return (self.hub is not None and self.hub.ready and not self.draining
                and (self.verifier is None or self.verifier.ready))

    async def readyz(self, request: Request) -> Response:
        redis_ok = False
        if self.broker is not None:
            with contextlib.suppress(Exception):
                redis_ok = bool(await asyncio.wait_for(self.broker.ping(), 1.0))
        live_ok = self.hub is not None and self.hub.ready
        # Keys to verify tokens with: false only while a JWKS has not been loaded yet.
        auth_ok = self.verifier is None or self.verifier.ready
        body = {"redis": redis_ok, "pubsub": live_ok, "auth": auth_ok,
                "draining": self.draining, "node": self.node_id}
        ok = redis_ok and live_ok and auth_ok and not self.draining
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")


class EdgeApp:
    """WebSocket connections to /ws straight to `Edge.connection`, with the server's own
    ``send`` in the scope (edge/wire.py); anything else to the Starlette app. An exception
    of the endpoint reaches the server as it did through Starlette (whose middleware
    re-raises everything but its own HTTP/WebSocket exceptions on a WebSocket): uvicorn
    logs it and closes with 1011."""

    def __init__(self, edge: Edge, app: Starlette) -> None:
        self.edge = edge
        self.app = app
        self.state: State = app.state

    @property
    def routes(self) -> list[BaseRoute]:
        """The Starlette app's routes, and /ws."""
        return self.app.routes

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: the server awaits the edge's (or Starlette's) directly.
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            return self.edge.connection(scope, receive, send)
        return self.app(scope, receive, send)


def create_app(config: EdgeConfig, logger: logging.Logger | None = None) -> EdgeApp:
    use_file(config.namespaces_file)  # channel names are parsed with these from now on
    edge = Edge(config, logger)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await edge.start()
        try:
            yield
        finally:
            await edge.stop()

    app = Starlette(
        routes=[
            Route("/", edge.index),
            Route("/healthz", edge.healthz),
            Route("/readyz", edge.readyz),
            Route("/metrics", edge.metrics),
            # Not reached from a server (`EdgeApp` takes /ws first): listed for the
            # route table (tests/integration/test_k8s.py) and `url_path_for`.
            WebSocketRoute(WS_PATH, edge.websocket),
            Mount("/static", static_files(), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.edge = edge
    return EdgeApp(edge, app)


__all__ = ["SUBPROTOCOLS", "Edge", "EdgeApp", "create_app"]
