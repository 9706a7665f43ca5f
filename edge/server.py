"""Serving the edge app with uvicorn."""

from __future__ import annotations

import contextlib

import uvicorn

from common.config import EdgeConfig
from edge.app import create_app


def uvicorn_config(config: EdgeConfig) -> uvicorn.Config:
    """uvicorn settings for fan-out: websockets-sansio (it has write backpressure), no
    protocol-level pings (the app pings), permessage-deflate off unless asked for."""
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        ws="websockets-sansio",
        ws_max_size=config.max_message_size,
        ws_per_message_deflate=config.compression,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


def run_edge(config: EdgeConfig) -> int:
    server = uvicorn.Server(uvicorn_config(config))
    # uvicorn re-raises the signal after its graceful shutdown.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    return 0 if server.started else 1

