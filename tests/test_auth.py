"""Connection tokens and channel permissions: the verification itself (pure), then an edge
with a secret (integration): who gets in, what they may read, and the close at expiry."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from common.auth import Claims, TokenError, sign_token, verify_token
from common.config import EDGE_SETTINGS, EdgeConfig, build
from common.errors import ConfigError
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.wsclient import ProtoClient

SECRET = b"0123456789abcdef0123456789abcdef"
DEFAULTS = ("quotes.*", "trades.*")
NOW = 1_800_000_000.0


def verify(token: object, **kw: Any) -> Claims:
    kw.setdefault("now", NOW)
    kw.setdefault("default_channels", DEFAULTS)
    return verify_token(token, SECRET, **kw)


def token(**claims: Any) -> str:
    claims.setdefault("sub", "alice")
    claims.setdefault("exp", NOW + 60)
    return sign_token({k: v for k, v in claims.items() if v is not None}, SECRET)


def _b64(obj: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


# --- pure ------------------------------------------------------------------------------------


def test_rfc7519_example_token_signature_checks_out() -> None:
    """RFC 7519 section 3.1's HS256 example (its header holds CR LF): the signature verifies
    with the RFC's key, and what stops it afterwards is the missing sub, not the MAC."""
    rfc = ("eyJ0eXAiOiJKV1QiLA0KICJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqb2UiLA0KICJleHAiOjEzMDA4MTkz"
           "ODAsDQogImh0dHA6Ly9leGFtcGxlLmNvbS9pc19yb290Ijp0cnVlfQ.dBjftJeZ4CVP-mB92K27uhbUJU1p"
           "1r_wW1gFWFOEjXk")
    key = base64.urlsafe_b64decode("AyM1SysPpbyDfgZld3umj1qzKObwVMkoqQ-EstJQLr_T-1qS0gZH75aKtMN3"
                                   "Yj0iPS4hcgUuTwjAzZr1Z9CAow==")
    with pytest.raises(TokenError, match="sub missing"):
        verify_token(rfc, key, now=1_300_819_000, default_channels=())
    with pytest.raises(TokenError, match="bad signature"):
        verify_token(rfc, SECRET, now=1_300_819_000, default_channels=())


def test_valid_token_grants_defaults_or_its_own_patterns_and_accounts() -> None:
    claims = verify(token())
    assert claims.subject == "alice" and claims.expires == NOW + 60
    assert claims.allows("quotes.MNQ") and claims.allows("trades.ES")
    assert not claims.allows("depth.MNQ") and not claims.allows("account.1.orders")
    own = verify(token(channels=["depth.MNQ", "bars.*"], accounts=[42, "7a"]))
    assert own.allows("depth.MNQ") and own.allows("bars.1m.ES")
    assert not own.allows("quotes.MNQ")  # its own list replaces the defaults
    assert own.allows("account.42.orders") and own.allows("account.7a.positions")
    assert not own.allows("account.4.orders") and not own.allows("account.420.orders")


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_algorithms(alg: str) -> None:
    assert verify(sign_token({"sub": "a", "exp": NOW + 5}, SECRET, alg)).subject == "a"


@pytest.mark.parametrize(
    ("bad", "detail"),
    [
        (None, "no token"),
        ("", "no token"),
        (42, "no token"),
        ("a.b", "not a JWS"),
        ("x" * 9000, "too long"),
        ("!!.e30.AA", "not base64url"),
        (f"{_b64([1])}.e30.AA", "header is not a JSON object"),
        (f"{_b64({'alg': 'none'})}.{_b64({'sub': 'a', 'exp': NOW + 5})}.", "not accepted"),
        (f"{_b64({'alg': 'RS256'})}.{_b64({'sub': 'a', 'exp': NOW + 5})}.AA", "not accepted"),
    ],
)
def test_malformed_tokens(bad: object, detail: str) -> None:
    with pytest.raises(TokenError, match=detail) as info:
        verify(bad)
    assert info.value.reason == "invalid token"


def test_signature_and_algorithm_cannot_be_swapped() -> None:
    good = token()
    header, payload, sig = good.split(".")
    with pytest.raises(TokenError, match="bad signature"):
        verify_token(good, b"another secret of thirty-two bytes!", now=NOW, default_channels=())
    forged = _b64({"sub": "mallory", "exp": NOW + 60, "channels": ["*"]})
    with pytest.raises(TokenError, match="bad signature"):
        verify(f"{header}.{forged}.{sig}")
    hs512_header = _b64({"alg": "HS512", "typ": "JWT"})
    with pytest.raises(TokenError, match="bad signature"):
        verify(f"{hs512_header}.{payload}.{sig}")


@pytest.mark.parametrize(
    ("claims", "detail"),
    [
        ({"sub": None}, "sub missing"),
        ({"sub": ""}, "sub missing"),
        ({"exp": None}, "exp missing"),
        ({"exp": "soon"}, "exp is not a number"),
        ({"exp": True}, "exp is not a number"),
        ({"nbf": NOW + 120}, "not valid yet"),
        ({"channels": "quotes.*"}, "channels is not a list"),
        ({"channels": ["quotes.*", "bad pattern"]}, "bad channel pattern"),
        ({"accounts": 42}, "accounts is not a list"),
        ({"accounts": ["4.2"]}, "bad account"),
        ({"accounts": [True]}, "bad account"),
    ],
)
def test_bad_claims(claims: dict[str, Any], detail: str) -> None:
    with pytest.raises(TokenError, match=detail):
        verify(token(**claims))


def test_expiry_with_leeway() -> None:
    assert verify(token(exp=NOW - 29)).subject == "alice"  # within 30 s of clock skew
    with pytest.raises(TokenError, match="expired") as info:
        verify(token(exp=NOW - 31))
    assert info.value.reason == "token expired"
    assert verify(token(nbf=NOW + 29)).subject == "alice"


def test_issuer_and_audience_checked_only_when_configured() -> None:
    t = token(iss="https://auth.example", aud=["fanout", "other"])
    assert verify(t).subject == "alice"
    assert verify(t, issuer="https://auth.example", audience="fanout").subject == "alice"
    with pytest.raises(TokenError, match="wrong issuer"):
        verify(t, issuer="https://evil.example")
    with pytest.raises(TokenError, match="wrong audience"):
        verify(t, audience="billing")
    with pytest.raises(TokenError, match="wrong audience"):
        verify(token(), audience="fanout")


def test_config_names_bad_auth_settings_without_printing_the_secret() -> None:
    with pytest.raises(ConfigError, match="FANOUT_AUTH_SECRET: must be at least 32") as info:
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_AUTH_SECRET": "hunter2"})
    assert "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match=r"FANOUT_AUTH_CHANNELS: .*bad channel pattern"):
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_AUTH_CHANNELS": "quotes.*,a b"})
    config = build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_AUTH_SECRET": SECRET.decode(),
                                                   "FANOUT_AUTH_CHANNELS": "quotes.*"})
    assert config.auth_channels == ("quotes.*",)
    assert SECRET.decode() not in repr(config)


def test_fanout_token_command_signs_what_the_edge_accepts() -> None:
    env = {**os.environ, "FANOUT_AUTH_SECRET": SECRET.decode()}
    out = subprocess.run(
        [sys.executable, "-m", "common.cli", "token", "--sub", "bob", "--ttl", "60",
         "--accounts", "42", "--channels", "quotes.*"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    claims = verify_token(out, SECRET, now=time.time(), default_channels=())
    assert claims.subject == "bob" and claims.allows("account.42.orders")
    assert claims.allows("quotes.X") and not claims.allows("trades.X")
    env.pop("FANOUT_AUTH_SECRET")
    done = subprocess.run([sys.executable, "-m", "common.cli", "token", "--sub", "bob"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "FANOUT_AUTH_SECRET" in done.stderr


# --- an edge with a secret -------------------------------------------------------------------


async def _connect(edge: Any, tok: object) -> tuple[ProtoClient, dict[str, Any] | None]:
    """(client, its `connected` reply or None if the edge closed it instead)."""
    client = await ProtoClient.open(edge.url, connect=False)
    await client.send({"type": "connect", "id": 1, "token": tok})

    def reply() -> dict[str, Any] | None:
        return next((m for m in client.messages if m.get("type") == "connected"), None)

    await client.wait_for(lambda: client.closed.done() or reply() is not None, 5)
    return client, reply()


@pytest.mark.integration
@pytest.mark.parametrize(
    ("tok", "reason"),
    [(None, "invalid token"), ("garbage", "invalid token"),
     ("expired", "token expired"), ("forged", "invalid token")],
)
async def test_connect_without_a_valid_token_is_closed_3501(
    edge_factory, tok: str | None, reason: str
) -> None:
    edge = await edge_factory(auth_secret=SECRET.decode())
    if tok == "expired":
        tok = sign_token({"sub": "a", "exp": time.time() - 120}, SECRET)
    elif tok == "forged":
        tok = sign_token({"sub": "a", "exp": time.time() + 60}, b"x" * 32)
    client, reply = await _connect(edge, tok)
    assert reply is None
    assert await asyncio.wait_for(client.closed, 5) == (3501, reason)
    await client.close()


@pytest.mark.integration
async def test_subscribes_and_history_follow_the_claims(
    edge_factory, publisher: Publisher
) -> None:
    edge = await edge_factory(auth_secret=SECRET.decode())
    now = time.time()
    alice, reply = await _connect(edge, sign_token(
        {"sub": "alice", "exp": now + 60, "accounts": [42]}, SECRET))
    assert reply is not None and reply["type"] == "connected"
    await publisher.publish(UpstreamMessage("account.7.orders", {"secret": True}, "o1"))
    r = await publisher.publish(UpstreamMessage("account.42.orders", {"mine": True}, "o2"))

    denied = await alice.request({"type": "subscribe", "channel": "account.7.orders",
                                  "snapshot": True})
    assert denied["type"] == "error" and denied["code"] == "permission_denied"
    denied = await alice.request({"type": "history", "channel": "account.7.orders",
                                  "epoch": r.epoch, "from": 1, "to": 1})
    assert denied["type"] == "error" and denied["code"] == "permission_denied"
    denied = await alice.request({"type": "subscribe", "channel": "account.420.orders"})
    assert denied["code"] == "permission_denied"  # account.42.* is not a prefix match

    mine = await alice.subscribe("account.42.orders", snapshot=True)
    assert mine["type"] == "subscribed" and mine["snapshot"]["o2"] == {"mine": True}
    assert (await alice.subscribe("quotes.MNQ"))["type"] == "subscribed"
    pub = await publisher.publish(UpstreamMessage("account.42.orders", {"n": 2}, "o2"))
    await alice.wait_for(lambda: alice.offsets["account.42.orders"][-1:] == [pub.offset], 5)
    assert not alice.closed.done()  # denials are replies; the connection serves on
    assert not any(m.get("channel") == "account.7.orders" and m.get("type") == "pub"
                   for m in alice.messages)
    await alice.close()


@pytest.mark.integration
async def test_connection_closes_3006_when_its_token_expires(edge_factory) -> None:
    edge = await edge_factory(auth_secret=SECRET.decode())
    # exp 31 s ago is still accepted (30 s of leeway): the connection may live 1 more s.
    tok = sign_token({"sub": "a", "exp": time.time() - 29}, SECRET)
    client, reply = await _connect(edge, tok)
    assert reply is not None and reply["type"] == "connected"
    started = time.monotonic()
    assert await asyncio.wait_for(client.closed, 10) == (3006, "token expired")
    assert time.monotonic() - started < 5
    await client.close()


@pytest.mark.integration
async def test_without_a_secret_everyone_reads_everything(edge) -> None:
    client, reply = await _connect(edge, None)
    assert reply is not None and reply["type"] == "connected"
    assert (await client.subscribe("account.7.orders"))["type"] == "subscribed"
    await client.close()


@pytest.mark.integration
async def test_refresh_extends_the_connection_for_the_same_subject(edge_factory) -> None:
    edge = await edge_factory(auth_secret=SECRET.decode())
    now = time.time()
    # Accepted thanks to the leeway, with about a second to live.
    client, reply = await _connect(edge, sign_token({"sub": "a", "exp": now - 29}, SECRET))
    assert reply is not None and 0 < reply["expires_in"] <= 1.5
    fresh = sign_token({"sub": "a", "exp": now + 60}, SECRET)
    answer = await client.request({"type": "refresh", "token": fresh})
    assert answer["type"] == "refreshed" and 85 < answer["expires_in"] <= 90
    await asyncio.sleep(2)  # past the first token's end: still open, still served
    assert not client.closed.done()
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    await client.close()


@pytest.mark.integration
async def test_refresh_refusals_keep_the_connection_and_its_token(edge_factory) -> None:
    edge = await edge_factory(auth_secret=SECRET.decode())
    now = time.time()
    client, reply = await _connect(edge, sign_token(
        {"sub": "a", "exp": now + 60, "accounts": [1]}, SECRET))
    assert reply is not None
    assert (await client.subscribe("account.1.orders"))["type"] == "subscribed"
    cases = [
        (sign_token({"sub": "b", "exp": now + 60, "accounts": [1]}, SECRET), "unauthorized"),
        (sign_token({"sub": "a", "exp": now - 60}, SECRET), "unauthorized"),
        (sign_token({"sub": "a", "exp": now + 60}, b"y" * 32), "unauthorized"),
        # Valid, but it would not allow the subscription the connection holds.
        (sign_token({"sub": "a", "exp": now + 60}, SECRET), "permission_denied"),
        (123, "bad_request"),
    ]
    for tok, code in cases:
        answer = await client.request({"type": "refresh", "token": tok})
        assert answer["type"] == "error" and answer["code"] == code, (tok, answer)
    assert not client.closed.done()
    await client.close()


@pytest.mark.integration
async def test_refresh_without_authentication_is_a_bad_request(edge) -> None:
    client, reply = await _connect(edge, None)
    assert reply is not None and "expires_in" not in reply
    answer = await client.request({"type": "refresh", "token": "x.y.z"})
    assert answer["code"] == "bad_request"
    await client.close()
