"""The upstream feed adapters, by name, and their connection state as a metric.

A feed is a module here that defines ``FEED``, a `Feed`: its settings (a frozen dataclass,
and the table that reads it from the config file, environment and flags), the check of
those settings when the feed is chosen, and how to open its `ingest.upstream.Upstream`.
`FEEDS` maps each name ``FANOUT_FEED`` may take to the import string of its ``FEED``, as
uvicorn's config maps "h11" or "websockets" to theirs; `feed(name)` resolves one. Adding a
feed: a module with ``FEED``, a line in `FEEDS`, a field of its settings in
`ingest.config.IngestConfig`.

Every adapter implements `ingest.upstream.Upstream`; the worker does not know which one it
runs. Adapters report their connection state (connecting, live, backing_off, stopped)
through a callback, exported as ``fanout_ingest_upstream_state{connection, state}``.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Gauge

from common.backoff import Backoff
from common.config import Setting
from ingest.upstream import Upstream

if TYPE_CHECKING:
    from ingest.config import IngestConfig

STATES = ("connecting", "live", "backing_off", "stopped")

StateCallback = Callable[[str, str], None]  # (connection, state)

# name -> "module:attribute" of its Feed; the order is the one --help and errors list.
FEEDS: dict[str, str] = {
    "sim": "ingest.feeds.sim:FEED",
    "ws": "ingest.feeds.ws:FEED",
    "projectx": "ingest.feeds.projectx:FEED",
}

S = TypeVar("S")


@dataclass(frozen=True, slots=True)
class FeedContext:
    """What every adapter gets from the worker besides its own settings."""

    logger: logging.Logger  # the worker's: an adapter logs under a child of it
    backoff: Callable[[], Backoff]  # a fresh reconnect backoff (FANOUT_RECONNECT_*)
    on_state: StateCallback  # (connection, state) -> fanout_ingest_upstream_state


@dataclass(frozen=True, slots=True)
class Feed(Generic[S]):
    """A feed adapter as the registry knows it.

    `settings` is a frozen dataclass, the `name` field of `IngestConfig`; `table` reads
    it, each `Setting` with attr ``<name>.<field>`` and its flat `file_key` (so its flag,
    variable and config file key stay ``--ws-url``, ``FANOUT_WS_URL``, ``[ingest] ws_url``).
    `check` raises ConfigError for what one setting alone cannot tell, when this feed is
    the one chosen; `open` builds the upstream (and may raise ConfigError for settings
    only the adapter can check)."""

    name: str
    settings: type[S]
    table: tuple[Setting, ...]
    open: Callable[[S, FeedContext], Upstream]
    check: Callable[[S], None] = lambda settings: None


class UnknownFeed(ValueError):
    """A feed name that is not in `FEEDS`; the message lists the known ones."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown feed {name!r}: expected one of {', '.join(FEEDS)}")
        self.name = name


def feed(name: str) -> Feed[Any]:
    """The feed registered as `name`. Raises UnknownFeed."""
    target = FEEDS.get(name)
    if target is None:
        raise UnknownFeed(name)
    return _import(target)


@functools.cache
def _import(target: str) -> Feed[Any]:
    module, _, attribute = target.partition(":")
    found = getattr(importlib.import_module(module), attribute)
    if not isinstance(found, Feed):
        raise TypeError(f"{target} is not a Feed")
    return found


def all_feeds() -> tuple[Feed[Any], ...]:
    """Every registered feed, in `FEEDS` order: their settings are known (to --help, the
    unknown-variable check, the config file) whichever feed runs."""
    return tuple(feed(name) for name in FEEDS)


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
    """The adapter `config.feed` names, with its settings (`config.<feed>`). Raises
    ConfigError for settings only the adapter can check, UnknownFeed for a name not
    registered (`load` refuses those first)."""
    chosen = feed(config.feed)
    context = FeedContext(
        logger=logger,
        backoff=functools.partial(Backoff, config.reconnect_base, config.reconnect_cap),
        on_state=on_state or (lambda connection, state: None),
    )
    return chosen.open(config.feed_settings(chosen.name), context)
