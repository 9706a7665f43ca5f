"""Token keys from a JWKS URL: the cache (fetch, refresh, refetch for an unknown kid, rate
limit, failures) with a fake identity provider and clock."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from common.auth import PrivateKey, TokenError, UnknownKey, sign_token
from common.config import EdgeConfig
from edge.tokens import Fetched, JwksCache, KeysUnavailable, TokenVerifier, max_age
from tests.support.jwtkeys import jwks_document


def tok(keys: dict[str, PrivateKey], name: str, kid: str, alg: str | None = None,
        **claims: Any) -> str:
    return sign_token({"sub": "alice", "exp": time.time() + 60, **claims}, keys[name], alg,
                      kid=kid)


class FakeIdP:
    """The identity provider's JWKS endpoint, as the cache's fetch function."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.calls = 0
        self.fail = False
        self.max_age: float | None = None
        self.gate: asyncio.Event | None = None  # when set: fetches wait for it

    async def __call__(self, url: str, timeout: float) -> Fetched:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise OSError("connection refused")
        return Fetched(json.dumps(self.document).encode(), self.max_age)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def verifier_for(idp: FakeIdP, clock: Clock, **kw: Any) -> tuple[TokenVerifier, JwksCache]:
    kw.setdefault("refresh", 600.0)
    kw.setdefault("min_interval", 30.0)
    cache = JwksCache("https://idp.example/jwks", fetch=idp, clock=clock, **kw)
    config = EdgeConfig(auth_jwks_url=cache.url)
    return TokenVerifier(config, jwks=cache), cache


# --- the cache -------------------------------------------------------------------------------


async def test_an_unknown_kid_refetches_once_per_min_interval(
    keys: dict[str, PrivateKey]
) -> None:
    idp, clock = FakeIdP(jwks_document(keys, rsa="r1")), Clock()
    verifier, cache = verifier_for(idp, clock)
    assert not verifier.ready
    await cache.load()  # as at start
    assert (await verifier.verify(tok(keys, "rsa", "r1"))).subject == "alice"
    assert idp.calls == 1 and verifier.ready
    idp.document = jwks_document(keys, rsa2="r2")  # rotation: r1 out, r2 in
    assert (await verifier.verify(tok(keys, "rsa2", "r2"))).subject == "alice"
    assert idp.calls == 2  # exactly one refetch
    # Within the min interval: refused without asking the identity provider again.
    for kid in ("r3", "r1", "r4"):
        with pytest.raises(UnknownKey):
            await verifier.verify(tok(keys, "rsa", kid))
    assert idp.calls == 2
    clock.now += 29.9
    with pytest.raises(UnknownKey):
        await verifier.verify(tok(keys, "rsa", "r3"))
    assert idp.calls == 2
    clock.now += 0.1  # the interval has passed: one more fetch, and still unknown
    idp.document = jwks_document(keys, rsa2="r2", p256="e1")
    with pytest.raises(UnknownKey, match="unknown kid 'r3'"):
        await verifier.verify(tok(keys, "rsa", "r3"))
    assert idp.calls == 3
    # ...which brought e1 along: accepted without a fetch. Rotated-out r1 stays refused.
    assert (await verifier.verify(tok(keys, "p256", "e1"))).subject == "alice"
    with pytest.raises(UnknownKey):
        await verifier.verify(tok(keys, "rsa", "r1"))
    assert idp.calls == 3
    assert cache.stats.jwks_fetches == {"ok": 3} and cache.stats.jwks_keys == 2


async def test_concurrent_tokens_with_a_new_kid_share_one_fetch(
    keys: dict[str, PrivateKey]
) -> None:
    idp, clock = FakeIdP(jwks_document(keys, rsa="r1")), Clock()
    verifier, cache = verifier_for(idp, clock)
    await cache.load()
    idp.document = jwks_document(keys, rsa="r1", p256="e1")
    idp.gate = asyncio.Event()
    pending = [asyncio.create_task(verifier.verify(tok(keys, "p256", "e1", n=i)))
               for i in range(20)]
    async with asyncio.timeout(5):
        while idp.calls < 2:
            await asyncio.sleep(0)
    assert not any(t.done() for t in pending)
    pending[0].cancel()  # one waiter giving up does not cancel the fetch for the others
    idp.gate.set()
    results = await asyncio.gather(*pending[1:])
    assert {c.subject for c in results} == {"alice"} and idp.calls == 2


async def test_failures_keep_the_keys_held_and_do_not_blame_the_token(
    keys: dict[str, PrivateKey]
) -> None:
    idp, clock = FakeIdP(jwks_document(keys, rsa="r1")), Clock()
    verifier, cache = verifier_for(idp, clock)
    await cache.load()
    idp.fail = True
    # The keys held still verify, without a fetch.
    assert (await verifier.verify(tok(keys, "rsa", "r1"))).subject == "alice"
    # A new kid asks for a fetch, which fails: not the token's fault (the edge says 3004).
    with pytest.raises(KeysUnavailable):
        await verifier.verify(tok(keys, "p256", "e1"))
    assert idp.calls == 2 and cache.refresh_delay <= 30.0
    with pytest.raises(KeysUnavailable):  # rate-limited, and the last fetch failed
        await verifier.verify(tok(keys, "p256", "e1"))
    assert idp.calls == 2 and cache.stats.jwks_fetches == {"ok": 1, "error": 1}
    assert (await verifier.verify(tok(keys, "rsa", "r1"))).subject == "alice"
    idp.fail = False
    idp.document = jwks_document(keys, rsa="r1", p256="e1")
    clock.now += 30
    assert (await verifier.verify(tok(keys, "p256", "e1"))).subject == "alice"
    assert idp.calls == 3 and verifier.ready


async def test_without_any_keys_loaded_every_token_waits_for_the_identity_provider(
    keys: dict[str, PrivateKey]
) -> None:
    idp, clock = FakeIdP({"keys": []}), Clock()  # a JWKS without a usable key: a failure
    verifier, cache = verifier_for(idp, clock)
    for _ in range(3):
        with pytest.raises(KeysUnavailable):
            await verifier.verify(tok(keys, "rsa", "r1"))
    assert idp.calls == 1 and not verifier.ready
    idp.fail = True
    clock.now += 30
    with pytest.raises(KeysUnavailable):
        await verifier.verify(tok(keys, "rsa", "r1"))
    assert idp.calls == 2 and cache.keys is None
    # A garbage token is refused as such once there are keys, not before.
    idp.fail = False
    idp.document = jwks_document(keys, rsa="r1")
    clock.now += 30
    with pytest.raises(TokenError, match="not a JWS"):
        await verifier.verify("garbage")
    assert idp.calls == 3 and verifier.ready


@pytest.mark.parametrize(
    ("header", "delay"),
    [(None, 600.0), (5, 30.0), (120, 120.0), (86_400, 600.0), (0, 30.0)],
)
async def test_refresh_follows_max_age_within_bounds(
    keys: dict[str, PrivateKey], header: float | None, delay: float
) -> None:
    idp, clock = FakeIdP(jwks_document(keys, rsa="r1")), Clock()
    idp.max_age = header
    _, cache = verifier_for(idp, clock)
    await cache.load()
    assert cache.refresh_delay == delay


def test_cache_control_max_age_is_read() -> None:
    assert max_age("public, max-age=3600, must-revalidate") == 3600
    assert max_age('max-age="60"') == 60 and max_age("MAX-AGE = 7") == 7
    assert max_age("s-maxage=10") is None and max_age("no-store") is None
    assert max_age(None) is None


async def test_the_cache_refreshes_in_the_background_and_retries_failures(
    keys: dict[str, PrivateKey]
) -> None:
    """Real time, short intervals: a failed fetch is retried within the min interval; a
    good one is refreshed every refresh interval."""
    idp = FakeIdP(jwks_document(keys, rsa="r1"))
    idp.fail = True
    cache = JwksCache("https://idp.example/jwks", fetch=idp, refresh=0.3, min_interval=0.1)
    await cache.start()
    try:
        async with asyncio.timeout(10):
            while idp.calls < 3:
                await asyncio.sleep(0.01)
            assert cache.keys is None
            idp.fail = False
            while cache.keys is None:
                await asyncio.sleep(0.01)
            calls = idp.calls
            while idp.calls < calls + 2:
                await asyncio.sleep(0.01)
    finally:
        await cache.stop()
    assert cache.stats.jwks_fetches["error"] >= 3 and cache.stats.jwks_fetches["ok"] >= 3
