"""The upstream adapter a configuration names, and its state as a metric.

Every adapter implements `ingest.upstream.Upstream`; the worker does not know which one
it runs. Adapters report their connection state (connecting, live, backing_off, stopped)
through a callback, exported as ``fanout_ingest_upstream_state{connection, state}``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from common.backoff import Backoff
from common.config import IngestConfig
from common.errors import ConfigError
from ingest.upstream import Upstream

STATES = ("connecting", "live", "backing_off", "stopped")

StateCallback = Callable[[str, str], None]  # (connection, state)


def state_metric(registry: CollectorRegistry) -> StateCallback:
    """A callback that keeps a 0/1 gauge per connection and state."""
    gauge = Gauge(
        "fanout_ingest_upstream_state",
        "Upstream connection state (1 for the current one).",
        ["connection", "state"],
        registry=registry,
    )

    def set_state(connection: str, state: str) -> None:
        for s in STATES:
            gauge.labels(connection, s).set(1 if s == state else 0)

    return set_state


def make_upstream(
    config: IngestConfig, logger: logging.Logger, on_state: StateCallback | None = None
) -> Upstream:
    """The adapter `config.feed` names. Raises ConfigError for settings only the adapter
    can check (the mapping and subscribe JSON of the WebSocket feed)."""
    report: StateCallback = on_state or (lambda connection, state: None)
    if config.feed == "ws":
        from ingest.wsfeed import WebSocketFeed, parse_mappings, parse_subscribe

        try:
            mappings = parse_mappings(config.ws_mapping)
        except ValueError as exc:
            raise ConfigError("FANOUT_WS_MAPPING", str(exc)) from None
        try:
            subscribe = parse_subscribe(config.ws_subscribe) if config.ws_subscribe else ()
        except ValueError as exc:
            raise ConfigError("FANOUT_WS_SUBSCRIBE", str(exc)) from None
        return WebSocketFeed(
            config.ws_url, subscribe, mappings,
            logger=logger.getChild("ws"),
            backoff=Backoff(config.reconnect_base, config.reconnect_cap),
            idle_timeout=config.ws_idle_timeout,
            headers=dict(config.ws_headers),
            on_state=lambda state: report("ws", state.value),
        )
    if config.feed == "projectx":
        from ingest.projectx import ProjectXFeed

        return ProjectXFeed(
            config.projectx_url, config.projectx_token, config.projectx_contracts,
            config.projectx_accounts,
            logger=logger.getChild("projectx"),
            backoff=functools.partial(Backoff, config.reconnect_base, config.reconnect_cap),
            on_state=lambda hub, state: report(hub, state.value),
        )
    from ingest.sim import SimulatedFeed

    report("sim", "live")
    return SimulatedFeed(config.symbols, config.rate, config.seed)
