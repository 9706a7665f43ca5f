"""The ingest worker's operations endpoints: /metrics, /healthz and /readyz on one port.

They are served by uvicorn inside the worker's own event loop on purpose: a loop that is
blocked or wedged cannot answer /healthz, so the liveness probe fails exactly when the
worker has stopped working (prometheus-client's metrics thread would go on answering).
/readyz says whether Redis answers and which role this worker has, so an orchestrator and
an operator can tell the leader from the standbys.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from common.broker import Broker
from ingest.feeds import StateCallback
from ingest.leader import Leader

PING_TIMEOUT = 1.0  # s a Redis PING may take before /readyz says 503


class UpstreamStates:
    """The latest state of each upstream connection, for /readyz (wraps the metric's
    callback, so adapters report once to both)."""

    def __init__(self, inner: StateCallback) -> None:
        self.inner = inner
        self.states: dict[str, str] = {}

    def __call__(self, connection: str, state: str) -> None:
        self.states[connection] = state
        self.inner(connection, state)


def create_ops_app(
    registry: CollectorRegistry, broker: Broker, leader: Leader, feed: str,
    upstream_states: Callable[[], dict[str, str]],
) -> Starlette:
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        redis_ok = False
        with contextlib.suppress(Exception):
            redis_ok = bool(await asyncio.wait_for(broker.ping(), PING_TIMEOUT))
        body = {
            "redis": redis_ok,
            "role": "leader" if leader.is_leader.is_set() else "standby",
            "feed": feed,
            "owner": leader.owner,
            "upstream": upstream_states(),
        }
        return JSONResponse(body, status_code=200 if redis_ok else 503)

    return Starlette(routes=[
        Route("/metrics", metrics),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ])
