"""Connection tokens against an edge with a secret: who gets in, what they may read, the
close at expiry and refresh; and `fanout token` signing what the edge accepts."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from common.auth import (
    PrivateKey,
    sign_token,
    verify_token,
)
from common.config import EDGE_SETTINGS, EdgeConfig, build, check_edge
from common.errors import ConfigError
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.integration.conftest import EdgeFactory, EdgeServer
from tests.support.jwtkeys import pem, private_pem
from tests.support.wsclient import ProtoClient
from tests.unit.test_auth import SECRET, jwks_of


def test_fanout_token_command_signs_what_the_edge_accepts() -> None:
    env = {**os.environ, "FANOUT_AUTH_SECRET": SECRET.decode()}
    out = subprocess.run(
        [sys.executable, "-m", "fanout", "token", "--sub", "bob", "--ttl", "60",
         "--accounts", "42", "--channels", "quotes.*"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    claims = verify_token(out, SECRET, now=time.time(), default_channels=())
    assert claims.subject == "bob" and claims.allows("account.42.orders")
    assert claims.allows("quotes.X") and not claims.allows("trades.X")
    env.pop("FANOUT_AUTH_SECRET")
    done = subprocess.run([sys.executable, "-m", "fanout", "token", "--sub", "bob"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "FANOUT_AUTH_SECRET" in done.stderr


def test_fanout_token_reads_the_secret_from_a_file_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fanout.cli import main

    path = tmp_path / "secret"
    path.write_bytes(SECRET + b"\n")
    monkeypatch.delenv("FANOUT_AUTH_SECRET", raising=False)
    monkeypatch.setenv("FANOUT_AUTH_SECRET_FILE", str(path))
    assert main(["token", "--sub", "eve", "--ttl", "60"]) == 0
    claims = verify_token(capsys.readouterr().out.strip(), SECRET, now=time.time(),
                          default_channels=())
    assert claims.subject == "eve"


def test_public_key_settings(tmp_path: Path, keys: dict[str, PrivateKey]) -> None:
    public = tmp_path / "public.pem"
    public.write_bytes(pem(keys["p256"]))
    private = tmp_path / "private.pem"
    private.write_bytes(private_pem(keys["p256"]))

    def edge(**env: str) -> EdgeConfig:
        config = build(EdgeConfig, EDGE_SETTINGS, env=env)
        check_edge(config)
        return config

    config = edge(FANOUT_AUTH_PUBLIC_KEY_FILE=str(public), FANOUT_AUTH_ALGORITHMS="ES256")
    assert config.auth_public_key_file == str(public) and config.auth_algorithms == ("ES256",)
    url = "https://idp.example/.well-known/jwks.json"
    assert edge(FANOUT_AUTH_JWKS_URL=url).auth_jwks_url == url
    assert edge(FANOUT_AUTH_JWKS_URL="http://127.0.0.1:8080/jwks").auth_jwks_refresh == 600
    assert edge(FANOUT_AUTH_JWKS_URL="http://[::1]:8080/jwks").auth_jwks_min_interval == 30
    cases = [
        ({"FANOUT_AUTH_PUBLIC_KEY_FILE": str(tmp_path / "missing.pem")},
         "FANOUT_AUTH_PUBLIC_KEY_FILE: cannot read"),
        ({"FANOUT_AUTH_PUBLIC_KEY_FILE": str(private)},
         "FANOUT_AUTH_PUBLIC_KEY_FILE: .*private key"),
        ({"FANOUT_AUTH_PUBLIC_KEY_FILE": str(public), "FANOUT_AUTH_ALGORITHMS": "RS256"},
         "FANOUT_AUTH_PUBLIC_KEY_FILE: .*verifies only ES256"),
        ({"FANOUT_AUTH_PUBLIC_KEY_FILE": str(public), "FANOUT_AUTH_ALGORITHMS": "HS256"},
         "FANOUT_AUTH_ALGORITHMS: HS256 need FANOUT_AUTH_SECRET"),
        ({"FANOUT_AUTH_SECRET": SECRET.decode(), "FANOUT_AUTH_ALGORITHMS": "HS256,RS256"},
         "FANOUT_AUTH_ALGORITHMS: only HS256"),
        ({"FANOUT_AUTH_ALGORITHMS": "none"}, "FANOUT_AUTH_ALGORITHMS: unknown or refused"),
        ({"FANOUT_AUTH_ALGORITHMS": "ES256"}, "FANOUT_AUTH_ALGORITHMS: needs a key"),
        ({"FANOUT_AUTH_SECRET": SECRET.decode(), "FANOUT_AUTH_JWKS_URL": url},
         "FANOUT_AUTH_JWKS_URL: set only one of FANOUT_AUTH_SECRET, FANOUT_AUTH_JWKS_URL"),
        ({"FANOUT_AUTH_JWKS_URL": "http://idp.example/jwks"},
         "FANOUT_AUTH_JWKS_URL: must be an https:// URL"),
        ({"FANOUT_AUTH_JWKS_URL": "http://127.evil.example/jwks"},
         "FANOUT_AUTH_JWKS_URL: must be an https:// URL"),
        ({"FANOUT_AUTH_JWKS_URL": "file:///etc/jwks.json"},
         "FANOUT_AUTH_JWKS_URL: must be an https:// URL"),
        ({"FANOUT_AUTH_JWKS_URL": url, "FANOUT_AUTH_JWKS_REFRESH": "10"},
         "FANOUT_AUTH_JWKS_MIN_INTERVAL: must not exceed FANOUT_AUTH_JWKS_REFRESH"),
        ({"FANOUT_AUTH_JWKS_TIMEOUT": "0"}, "FANOUT_AUTH_JWKS_TIMEOUT: must be a finite"),
    ]
    for env, error in cases:
        with pytest.raises(ConfigError, match=error):
            edge(**env)


def test_fanout_token_signs_with_a_private_key(
    tmp_path: Path, keys: dict[str, PrivateKey]
) -> None:
    private = tmp_path / "signing.pem"
    private.write_bytes(private_pem(keys["p384"]))
    env = {k: v for k, v in os.environ.items() if k != "FANOUT_AUTH_SECRET"}
    out = subprocess.run(
        [sys.executable, "-m", "fanout", "token", "--sub", "carol", "--ttl", "60",
         "--private-key-file", str(private), "--kid", "2024-06"],
        env=env, capture_output=True, text=True, timeout=30, check=True,
    ).stdout.strip()
    header = json.loads(base64.urlsafe_b64decode(out.split(".")[0] + "=="))
    assert header == {"alg": "ES384", "typ": "JWT", "kid": "2024-06"}
    claims = verify_token(out, jwks_of(keys, p384="2024-06"), now=time.time(),
                          default_channels=())
    assert claims.subject == "carol"
    done = subprocess.run(
        [sys.executable, "-m", "fanout", "token", "--sub", "carol",
         "--private-key-file", str(private), "--alg", "RS256"],
        env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "--alg: 'RS256' does not fit this key" in done.stderr


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
    edge_factory: EdgeFactory, tok: str | None, reason: str
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
    edge_factory: EdgeFactory, publisher: Publisher
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
async def test_connection_closes_3006_when_its_token_expires(edge_factory: EdgeFactory) -> None:
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
async def test_without_a_secret_everyone_reads_everything(edge: EdgeServer) -> None:
    client, reply = await _connect(edge, None)
    assert reply is not None and reply["type"] == "connected"
    assert (await client.subscribe("account.7.orders"))["type"] == "subscribed"
    await client.close()


@pytest.mark.integration
async def test_refresh_extends_the_connection_for_the_same_subject(
    edge_factory: EdgeFactory,
) -> None:
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
async def test_refresh_refusals_keep_the_connection_and_its_token(
    edge_factory: EdgeFactory,
) -> None:
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
async def test_refresh_without_authentication_is_a_bad_request(edge: EdgeServer) -> None:
    client, reply = await _connect(edge, None)
    assert reply is not None and "expires_in" not in reply
    answer = await client.request({"type": "refresh", "token": "x.y.z"})
    assert answer["code"] == "bad_request"
    await client.close()
