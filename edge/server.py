"""Serving the edge app with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import sys
from types import FrameType

import uvicorn

from common.config import EdgeConfig
from common.loop import resolve
from edge.accept import Acceptor, bind_listeners
from edge.app import WS_PATH, Edge, create_app
from edge.handshake import AdmittedWebSocketProtocol, edge_http_protocol

STARTUP_FAILURE = 3  # uvicorn's exit status when its startup fails (uvicorn/server.py)


def uvicorn_config(config: EdgeConfig) -> uvicorn.Config:
    """uvicorn settings for fan-out: the event loop FANOUT_LOOP names (common/loop.py),
    websockets-sansio (it has write backpressure), no
    protocol-level pings (the app pings), permessage-deflate off unless asked for. Both
    protocols are the edge's subclasses: edge/handshake.py (a deadline for the request head,
    and admission, origin and connection limits, decided before the upgrade) and, for the
    WebSocket, edge/wsprotocol.py (close frames not lost to a reset, no traceback for text
    that is not UTF-8), for what the edge's own lean path (edge/leanws.py, taken in
    edge/handshake.py for plain /ws upgrades) leaves to uvicorn. No proxy headers: uvicorn
    would believe X-Forwarded-For from 127.0.0.1 by default, and the edge decides whom to
    believe (FANOUT_TRUSTED_PROXIES)."""
    app = create_app(config)
    edge: Edge = app.state.edge
    return uvicorn.Config(
        app,
        # EdgeApp's __call__ is no coroutine function (edge/app.py): uvicorn would take it
        # for an ASGI2 app.
        interface="asgi3",
        host=config.host,
        port=config.port,
        backlog=config.backlog,  # uvicorn's default (2048) overflows in a mass reconnect
        http=edge_http_protocol(edge.admission, config.handshake_timeout, WS_PATH),
        proxy_headers=False,
        ws=AdmittedWebSocketProtocol,
        ws_max_size=config.max_message_size,
        ws_per_message_deflate=config.compression,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        loop=resolve(config.loop),  # FANOUT_LOOP: uvicorn's "auto" would pick uvloop by itself
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def tune_gc(thresholds: tuple[int, int, int] | None) -> None:
    """Fewer, not slower, collections. With thousands of connections the heap holds about a
    million tracked objects, and a full collection stops the event loop for most of a
    second (measured: 10,000 clients, p99 0.96-1.1 s with Python's 700,10,10; 0.23-0.33 s
    with 50000,50,100, as with the collector off). Objects are still freed by reference
    counting at once; only cycles wait longer. Objects from startup are frozen out of
    every collection."""
    if thresholds is None:
        return
    gc.freeze()
    gc.set_threshold(*thresholds)


class DrainingServer(uvicorn.Server):
    """uvicorn, with two changes. It accepts connections itself, many per event-loop
    iteration (edge/accept.py: uvloop's libuv accepts one per iteration, which throttled a
    reconnect storm to ~500 connections/s), and serves each with uvicorn's protocol as
    before. And the first SIGTERM/SIGINT drains the edge (`Edge.drain`) before the usual
    shutdown: a rolling restart moves clients to the other edges gradually. A second
    signal during the drain exits at once, as uvicorn does."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float,
                 logger: logging.Logger | None = None) -> None:
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self.log = logger or logging.getLogger("fanout.edge.server")
        self.acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None
        self._drain_started = False

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Bind (unless given bound `sockets`), run uvicorn's startup with no listener of
        its own, then listen and accept here."""
        loop = self._loop = asyncio.get_running_loop()
        config = self.config
        if sockets is None:
            try:
                listeners = bind_listeners(config.host, config.port)
            except OSError as exc:
                self.log.error("cannot listen event=bind_failed error=%s", exc)
                sys.exit(STARTUP_FAILURE)
        else:
            listeners = list(sockets)
        acceptor = Acceptor(loop, self._protocol, listeners, self.log)
        try:
            await super().startup(sockets=[])
        except BaseException:
            acceptor.close()
            raise
        acceptor.listen(config.backlog)
        self.acceptor = acceptor
        if sockets is None:
            for sock in listeners:
                host, port = sock.getsockname()[:2]
                self.log.info("listening event=listening host=%s port=%s backlog=%s",
                              host, port, config.backlog)

    def _protocol(self) -> asyncio.Protocol:
        """uvicorn's protocol for one accepted connection (what its `startup` makes)."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state,
            app_state=self.lifespan.state, _loop=self._loop)
        return protocol

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.acceptor is not None:
            self.acceptor.close()  # no new connections; uvicorn then closes the open ones
        await super().shutdown(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if self.drain_seconds <= 0 or loop is None or self.should_exit or self._drain_started:
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # re-raised after the shutdown, as uvicorn does
        self._drain_started = True
        loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            app = self.config.loaded_app
            while app is not None and not hasattr(app, "state"):
                app = getattr(app, "app", None)
            edge = getattr(getattr(app, "state", None), "edge", None)
            if edge is not None:
                await edge.drain(self.drain_seconds)
        finally:
            self.should_exit = True


def run_edge(config: EdgeConfig) -> int:
    tune_gc(config.gc_thresholds)
    server = DrainingServer(uvicorn_config(config), config.drain_seconds)
    # uvicorn re-raises the signal after its graceful shutdown.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1

