"""The edge's token verifier: the keys of common/auth.py's pure verification, from a
configured secret or public key, or from a JWKS URL kept up to date here.

A JWKS (RFC 7517) is fetched at start, then again when it is due: after
``FANOUT_AUTH_JWKS_REFRESH``, or sooner if the response's ``Cache-Control: max-age`` says
so, but never sooner than ``FANOUT_AUTH_JWKS_MIN_INTERVAL``. A token naming a ``kid`` the
cached set lacks (the identity provider rotated its keys) makes the edge fetch the set once
more before refusing it; such fetches are rate-limited to one per min interval, so a flood
of tokens with made-up kids costs the identity provider at most one request per interval
per edge. Concurrent verifications that need a fetch share one.

When a fetch fails (timeout, HTTP error, not a JWKS) the keys already held stay in use,
and the next attempt comes after a capped backoff (1 s doubling up to the min interval).
Until a first key set is loaded the edge is not ready (/readyz 503) and a connection it
gets anyway is closed with 3004 (reconnect with backoff), not 3501: the token may be
fine, the edge cannot tell yet. The same holds when a token's unknown kid asks for a
fetch that fails: the client is told to come back, not that its token is bad.

The fetch is urllib's, in a worker thread (`asyncio.to_thread`), under a timeout: the
event loop never waits on the network. Redirects are not followed (a JWKS URL is
configured exactly) and a body over 1 MiB is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.auth import (
    Claims,
    KeySet,
    UnknownKey,
    load_public_key,
    parse_jwks,
    static_keys,
    verify_token,
)
from common.backoff import Backoff
from common.config import EdgeConfig, check_edge, redact_url
from common.errors import ConfigError
from edge.stats import EdgeStats

MAX_JWKS_BYTES = 1024 * 1024
RETRY_BASE = 1.0  # s: ceiling of the first retry delay after a failed fetch

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)


class KeysUnavailable(Exception):
    """No key set to check a token against: the JWKS has not been loaded yet, or the fetch
    that a token's unknown kid asked for failed. Not the token's fault."""


@dataclass(frozen=True, slots=True)
class Fetched:
    body: bytes
    max_age: float | None  # from Cache-Control, s


Fetch = Callable[[str, float], Awaitable[Fetched]]


def max_age(cache_control: str | None) -> float | None:
    """``max-age`` of a Cache-Control header value, None without one."""
    match = _MAX_AGE.search(cache_control or "")
    return float(match.group(1)) if match else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises HTTPError with the 3xx status


_OPENER = urllib.request.build_opener(_NoRedirect)


def _get(url: str, timeout: float) -> Fetched:
    request = urllib.request.Request(url, headers={
        "Accept": "application/jwk-set+json, application/json", "User-Agent": "fanout-edge",
    })
    with _OPENER.open(request, timeout=timeout) as response:
        body = response.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"larger than {MAX_JWKS_BYTES} bytes")
        return Fetched(body, max_age(response.headers.get("Cache-Control")))


async def fetch_url(url: str, timeout: float) -> Fetched:
    """GET `url` in a worker thread; TimeoutError after `timeout` s (the thread itself
    ends by its socket timeout, the same)."""
    return await asyncio.wait_for(asyncio.to_thread(_get, url, timeout), timeout)


class JwksCache:
    """The key set of a JWKS URL: fetched, refreshed, refetched for unknown kids."""

    def __init__(
        self,
        url: str,
        *,
        algorithms: tuple[str, ...] = (),
        refresh: float = 600.0,
        min_interval: float = 30.0,
        timeout: float = 5.0,
        stats: EdgeStats | None = None,
        logger: logging.Logger | None = None,
        fetch: Fetch = fetch_url,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.algorithms = algorithms or None
        self.refresh = refresh
        self.min_interval = min(min_interval, refresh)
        self.timeout = timeout
        self.stats = stats or EdgeStats()
        self.log = logger or logging.getLogger("fanout.edge.jwks")
        self._fetch_url = fetch
        self._clock = clock
        self.keys: KeySet | None = None  # None until a first fetch succeeds
        self.fetches = 0  # attempts, successful or not
        self._last_attempt = -math.inf  # clock() when the last fetch started
        self._last_refetch = -math.inf  # ... and the last one an unknown kid asked for
        self._last_ok = True  # the last fetch's outcome (True before the first)
        self._next_delay = 0.0  # s after _last_attempt the next periodic fetch is due
        self._backoff = Backoff(RETRY_BASE, max(self.min_interval, RETRY_BASE))
        self._inflight: asyncio.Future[KeySet | None] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def refresh_delay(self) -> float:
        """Seconds after the last fetch started that the next one is due: the refresh
        interval (or max-age, within bounds) after a success, a backoff after a failure."""
        return self._next_delay

    async def start(self) -> None:
        """Start fetching in the background: start-up does not wait for the identity
        provider (the edge is not ready until the keys are in)."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def load(self) -> KeySet | None:
        """Fetch now (or join the fetch under way): the new key set, None if it failed."""
        return await self._fetch_shared()

    async def _run(self) -> None:
        while True:
            # Due this long after the last fetch started; a refetch for an unknown kid
            # meanwhile moves the due time on, so it is computed again after each sleep.
            wait = self._last_attempt + self._next_delay - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)
            else:
                await self._fetch_shared()

    async def refetch(self, seen: KeySet | None) -> KeySet | None:
        """The key set after fetching it again, for a token whose kid `seen` lacks (or for
        the first token, `seen` None, when nothing is loaded yet).

        Returns a newer set at once if one arrived since `seen`; joins a fetch under way;
        else starts one if the rate limit allows: one such fetch per min interval (the
        scheduled refreshes come on top, themselves at least a min interval apart). None
        when the limit forbids one and the last fetch succeeded: the token's kid is
        unknown (refuse it). KeysUnavailable when the fetch failed, or is forbidden and
        the last one failed, or nothing is loaded."""
        if self.keys is not None and self.keys is not seen:
            return self.keys
        if self._inflight is None:
            now = self._clock()
            if now - self._last_refetch < self.min_interval:
                if self.keys is None or not self._last_ok:
                    raise KeysUnavailable("the JWKS could not be fetched")
                return None
            self._last_refetch = now
        keys = await self._fetch_shared()
        if keys is None:
            raise KeysUnavailable("the JWKS could not be fetched")
        return keys

    async def _fetch_shared(self) -> KeySet | None:
        """One fetch at a time: a caller arriving during one waits for its outcome (a
        cancelled waiter does not cancel it)."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(self._fetch())
            self._inflight.add_done_callback(self._fetched)
        return await asyncio.shield(self._inflight)

    def _fetched(self, future: asyncio.Future[KeySet | None]) -> None:
        self._inflight = None

    async def _fetch(self) -> KeySet | None:
        """The new key set (also stored), or None if the fetch failed (the keys held are
        kept)."""
        self._last_attempt = self._clock()
        self.fetches += 1
        try:
            fetched = await self._fetch_url(self.url, self.timeout)
            keys, skipped = parse_jwks(fetched.body, self.algorithms)
        except Exception as exc:  # network, HTTP status, timeout, not JSON, not a JWKS
            self._failed(exc)
            return None
        for reason in skipped:
            self.log.warning("jwks url=%s key skipped: %s", redact_url(self.url), reason)
        if not keys.keys:
            self._failed(ValueError("no usable key in the JWKS"))
            return None
        interval = self.refresh if fetched.max_age is None else fetched.max_age
        self._next_delay = min(max(interval, self.min_interval), self.refresh)
        self._last_ok = True
        self._backoff.reset()
        self.stats.count_jwks_fetch("ok")
        before = {k.kid for k in self.keys.keys} if self.keys is not None else set()
        kids = {k.kid for k in keys.keys}
        if kids != before:
            self.log.info("jwks url=%s keys=%d kids=%s next_in=%.0fs", redact_url(self.url),
                          len(keys.keys), sorted(str(k) for k in kids), self._next_delay)
        self.keys = keys
        self.stats.jwks_keys = len(keys.keys)
        return keys

    def _failed(self, exc: BaseException) -> None:
        self._last_ok = False
        self._next_delay = max(self._backoff.next_delay(), 0.1)
        self.stats.count_jwks_fetch("error")
        kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        detail = exc.code if isinstance(exc, urllib.error.HTTPError) else exc
        self.log.warning("jwks fetch failed url=%s error=%s %s; %s, retry in %.1fs",
                         redact_url(self.url), kind, detail,
                         "keeping the keys held" if self.keys else "no keys yet",
                         self._next_delay)


class TokenVerifier:
    """Checks the tokens of one edge's connections: `verify` is what sessions call."""

    def __init__(self, config: EdgeConfig, keys: KeySet | None = None,
                 jwks: JwksCache | None = None) -> None:
        assert (keys is None) != (jwks is None)
        self.config = config
        self._keys = keys
        self.jwks = jwks

    @classmethod
    def from_config(
        cls, config: EdgeConfig, stats: EdgeStats, logger: logging.Logger
    ) -> TokenVerifier | None:
        """The verifier the settings ask for; None without any key (no authentication).
        ConfigError for settings that do not fit together."""
        check_edge(config)
        algorithms = config.auth_algorithms or None
        if config.auth_secret:
            return cls(config, keys=static_keys(config.auth_secret.encode(), algorithms))
        if config.auth_public_key_file:
            try:
                with open(config.auth_public_key_file, "rb") as file:
                    key = load_public_key(file.read(MAX_JWKS_BYTES), algorithms)
            except (OSError, ValueError) as exc:
                raise ConfigError("FANOUT_AUTH_PUBLIC_KEY_FILE", str(exc)) from None
            return cls(config, keys=static_keys(key))
        if config.auth_jwks_url:
            return cls(config, jwks=JwksCache(
                config.auth_jwks_url, algorithms=config.auth_algorithms,
                refresh=config.auth_jwks_refresh, min_interval=config.auth_jwks_min_interval,
                timeout=config.auth_jwks_timeout, stats=stats, logger=logger,
            ))
        return None

    @property
    def ready(self) -> bool:
        """False until there are keys to verify with (a JWKS not loaded yet)."""
        return self._keys is not None or (self.jwks is not None and self.jwks.keys is not None)

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def stop(self) -> None:
        if self.jwks is not None:
            await self.jwks.stop()

    def _check(self, token: object, keys: KeySet) -> Claims:
        c = self.config
        return verify_token(token, keys, now=time.time(), default_channels=c.auth_channels,
                            issuer=c.auth_issuer, audience=c.auth_audience)

    async def verify(self, token: object) -> Claims:
        """The token's claims. TokenError if it does not authenticate (UnknownKey included:
        its kid is not in the key set, even after fetching it again); KeysUnavailable if
        the edge has no keys to tell."""
        if self._keys is not None:
            return self._check(token, self._keys)
        assert self.jwks is not None
        keys = self.jwks.keys
        if keys is None:
            keys = await self.jwks.refetch(None)
            assert keys is not None
        try:
            return self._check(token, keys)
        except UnknownKey:
            fresh = await self.jwks.refetch(keys)
            if fresh is None:
                raise
        return self._check(token, fresh)
