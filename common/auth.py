"""Connection tokens and channel permissions. Pure: no I/O, the clock is passed in.

A client proves who it is with a JWT (RFC 7519) in `connect`, signed by the application's
backend with a secret it shares with the edges (HMAC: HS256, HS384 or HS512; ``none`` and
public-key algorithms are refused, so a token can never choose a weaker check). Claims:

- ``sub`` (required): who the client is (logged; never a metric label);
- ``exp`` (required): when the token expires; the edge closes the connection then, with a
  reconnect code, and the client reconnects with a fresh token;
- ``nbf``, ``iat`` (optional), ``iss`` and ``aud`` (checked when the edge is configured
  with an issuer or audience);
- ``channels`` (optional): glob patterns of the channels the client may subscribe to
  (``*`` matches any run of characters, dots included: ``quotes.*``, ``account.42.*``);
  without it, the edge's default patterns (market data for every authenticated client);
- ``accounts`` (optional): account ids whose channels (``account.<id>.*``) the client may
  read, on top of the patterns.

Why a token and not a session lookup: the edge stays stateless, and a token minted by the
backend that knows the user's accounts is all it needs to decide a subscribe.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

ALGORITHMS = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
MAX_TOKEN = 8192  # characters; the protocol's limit on the connect field
LEEWAY = 30.0  # s of clock difference tolerated on exp and nbf
MIN_SECRET = 32  # bytes: HS256 wants a key as long as its hash

_PATTERN = re.compile(r"^[A-Za-z0-9_.:*-]{1,200}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TokenError(ValueError):
    """A token that does not authenticate. `reason` is safe to send to the client
    ("invalid token" or "token expired"); the message is the detail, for the log."""

    def __init__(self, detail: str, reason: str = "invalid token") -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants."""

    subject: str
    expires: float  # s since the epoch
    channels: tuple[str, ...]  # patterns, the accounts' included

    def allows(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.channels)


def _b64decode(part: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", part):
        raise TokenError("not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("not base64url") from None


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise TokenError(f"{what} is not JSON") from None
    if not isinstance(value, dict):
        raise TokenError(f"{what} is not a JSON object")
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenError(f"{name} is not a number")
    return float(value)


def check_patterns(patterns: Iterable[object], what: str = "channels") -> tuple[str, ...]:
    """Channel patterns as given (a claim or a setting), checked: ValueError names the bad
    one."""
    out = []
    for pattern in patterns:
        if not isinstance(pattern, str) or not _PATTERN.match(pattern):
            raise ValueError(f"{what}: bad channel pattern {pattern!r}")
        out.append(pattern)
    return tuple(out)


def verify_token(
    token: object,
    secret: bytes,
    *,
    now: float,
    default_channels: tuple[str, ...],
    issuer: str = "",
    audience: str = "",
    leeway: float = LEEWAY,
) -> Claims:
    """The claims of a valid token; TokenError otherwise."""
    if not isinstance(token, str) or not token:
        raise TokenError("no token")
    if len(token) > MAX_TOKEN:
        raise TokenError("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a JWS compact token")
    header = _json_object(_b64decode(parts[0]), "header")
    alg = header.get("alg")
    digest = ALGORITHMS.get(alg) if isinstance(alg, str) else None
    if digest is None:
        raise TokenError(f"algorithm {alg!r} not accepted")
    if "crit" in header:
        raise TokenError("critical header extensions are not supported")
    signature = _b64decode(parts[2])
    expected = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), digest).digest()
    if not hmac.compare_digest(signature, expected):
        raise TokenError("bad signature")
    claims = _json_object(_b64decode(parts[1]), "payload")

    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise TokenError("sub missing")
    expires = _number(claims, "exp")
    if expires is None:
        raise TokenError("exp missing")
    if now >= expires + leeway:
        raise TokenError("expired", "token expired")
    not_before = _number(claims, "nbf")
    if not_before is not None and now + leeway < not_before:
        raise TokenError("not valid yet (nbf)")
    if issuer and claims.get("iss") != issuer:
        raise TokenError("wrong issuer")
    if audience:
        aud = claims.get("aud")
        if not (aud == audience or (isinstance(aud, list) and audience in aud)):
            raise TokenError("wrong audience")

    raw_channels = claims.get("channels")
    if raw_channels is None:
        patterns = default_channels
    elif isinstance(raw_channels, list):
        try:
            patterns = check_patterns(raw_channels)
        except ValueError as exc:
            raise TokenError(str(exc)) from None
    else:
        raise TokenError("channels is not a list")
    accounts = claims.get("accounts", [])
    if not isinstance(accounts, list):
        raise TokenError("accounts is not a list")
    for account in accounts:
        if isinstance(account, bool) or not isinstance(account, int | str) or not _ACCOUNT.match(
            str(account)
        ):
            raise TokenError(f"bad account {account!r}")
    patterns += tuple(f"account.{a}.*" for a in accounts)
    return Claims(subject, expires, patterns)


def sign_token(claims: Mapping[str, Any], secret: bytes, algorithm: str = "HS256") -> str:
    """A signed token (for backends in Python, `fanout token`, and tests)."""
    digest = ALGORITHMS[algorithm]
    header = _b64encode(json.dumps({"alg": algorithm, "typ": "JWT"}, separators=(",", ":"))
                        .encode())
    payload = _b64encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), digest).digest()
    return f"{header}.{payload}.{_b64encode(signature)}"
