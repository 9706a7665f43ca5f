"""Connection tokens and channel permissions. Pure: no I/O, the clock is passed in.

A client proves who it is with a JWT (RFC 7519, JWS compact form) in `connect`, signed
either by the application's backend with a secret it shares with the edges (HMAC: HS256,
HS384, HS512) or by an identity provider with a private key whose public half the edges
hold (a PEM file, or a JWKS the edge fetches: RS256/384/512, PS256/384/512, ES256/384/512,
EdDSA). Which algorithms are accepted is the edge's configuration, never the token's
choice: a `Key` only ever verifies the algorithms its own type allows (an HMAC secret
HS*, an RSA key RS*/PS*, a P-256 key ES256, ...) and the configured list narrows that
further. So ``none`` is refused always, and an HS256 token "signed" with an RSA public key
used as an HMAC secret (algorithm confusion) is refused, since no RSA key verifies HS256.

Claims:

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

What a namespace asks of a token is its ``subscribe`` setting (common/namespaces.py):
``public`` nothing, ``token`` a matching ``channels`` pattern, ``account`` a matching
pattern or its account segment among the token's ``accounts`` (or equal to ``sub``, when
the namespace's ``account_claims`` say so); see `permits`.

Why a token and not a session lookup: the edge stays stateless, and a token minted by the
backend that knows the user's accounts is all it needs to decide a subscribe.

The cryptography is PyJWT's: its algorithm objects (on top of `cryptography`) check and
make signatures, and its JWK parser reads key sets. The compact form is taken apart here
first, because the key is chosen from the header (``kid``, ``alg``) before any signature
is checked, and the claims are checked against the clock passed in (PyJWT's ``decode``
reads the wall clock).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt import PyJWK
from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError

from common.channels import Channel

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
EDDSA = "EdDSA"
ALGORITHMS = (*HMAC_ALGORITHMS, *RSA_ALGORITHMS, *EC_ALGORITHMS.values(), EDDSA)
PUBLIC_KEY_ALGORITHMS = ALGORITHMS[len(HMAC_ALGORITHMS):]
MAX_TOKEN = 8192  # characters; the protocol's limit on the connect field
LEEWAY = 30.0  # s of clock difference tolerated on exp and nbf
MIN_SECRET = 32  # bytes: HS256 wants a key as long as its hash
MIN_RSA_BITS = 2048  # NIST SP 800-131A; shorter RSA keys are refused, not just warned about
MAX_JWKS_KEYS = 64  # keys read from one JWKS; an identity provider publishes a handful

# PyJWT's implementations of the accepted algorithms (and of no other: not "none").
_IMPLEMENTATIONS: dict[str, Algorithm] = {
    name: impl for name, impl in get_default_algorithms().items() if name in ALGORITHMS
}

PublicKey: TypeAlias = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
    | ed448.Ed448PublicKey
)
PrivateKey: TypeAlias = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)

_PATTERN = re.compile(r"^[A-Za-z0-9_.:*-]{1,200}$")
_ACCOUNT = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class TokenError(ValueError):
    """A token that does not authenticate. `reason` is safe to send to the client
    ("invalid token" or "token expired"); the message is the detail, for the log."""

    def __init__(self, detail: str, reason: str = "invalid token") -> None:
        super().__init__(detail)
        self.reason = reason


class UnknownKey(TokenError):
    """The token names a key (``kid``) the key set does not hold, or names none and no key
    fits its algorithm: a key set fetched from a URL may be out of date (rotation), so the
    edge fetches it again (rate-limited) before refusing the token."""


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants."""

    subject: str
    expires: float  # s since the epoch
    channels: tuple[str, ...]  # patterns, the accounts' included
    accounts: tuple[str, ...] = ()  # the accounts claim

    def allows(self, channel: str) -> bool:
        return any(fnmatchcase(channel, pattern) for pattern in self.channels)


def permits(claims: Claims, channel: Channel) -> bool:
    """Whether `claims` may read `channel`, as its namespace's ``subscribe`` says."""
    spec = channel.spec
    if spec.subscribe == "public":
        return True
    if claims.allows(channel.name):
        return True
    if spec.subscribe == "account":
        value = channel.param(spec.account_segment)
        return value is not None and (
            ("accounts" in spec.account_claims and value in claims.accounts)
            or ("sub" in spec.account_claims and value == claims.subject)
        )
    return False


# --- keys ------------------------------------------------------------------------------------


def key_algorithms(key: bytes | PublicKey | PrivateKey) -> tuple[str, ...]:
    """The algorithms a key of this type can verify (or sign): its family, nothing else."""
    if isinstance(key, bytes):
        return HMAC_ALGORITHMS
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        alg = EC_ALGORITHMS.get(key.curve.name)
        return (alg,) if alg else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey
                  | ed448.Ed448PublicKey | ed448.Ed448PrivateKey):
        return (EDDSA,)
    return ()


def check_algorithms(names: Iterable[str]) -> tuple[str, ...]:
    """Algorithm names as configured, checked: ValueError names an unknown one (``none``
    included)."""
    out = []
    for name in names:
        if name not in ALGORITHMS:
            raise ValueError(f"unknown or refused algorithm {name!r}: expected some of "
                             f"{', '.join(ALGORITHMS)}")
        out.append(name)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Key:
    """One verification key, the algorithms it may verify and its id (``kid``). Build it
    with `make_key`, which never grants an algorithm outside the key's family."""

    key: bytes | PublicKey
    algorithms: frozenset[str]
    kid: str | None = None


def make_key(
    key: bytes | PublicKey | PrivateKey,
    algorithms: Collection[str] | None = None,
    kid: str | None = None,
) -> Key:
    """A `Key` for `key` (an HMAC secret, or a public key; a private key stands for its
    public half), accepting the algorithms of its family that are also in `algorithms`
    (all of them when None). ValueError if none is left or the key is too weak."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                  | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        key = key.public_key()
    family = key_algorithms(key)
    if not family:
        raise ValueError(f"unsupported key type {type(key).__name__}")
    allowed = [alg for alg in family if algorithms is None or alg in algorithms]
    if not allowed:
        raise ValueError(f"a {_describe(key)} verifies only {', '.join(family)}, none of "
                         f"the accepted algorithms ({', '.join(algorithms or ())})")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA key of {key.key_size} bits: at least {MIN_RSA_BITS} needed")
    for alg in allowed:
        try:
            # PyJWT's own checks: an HMAC secret must not be a PEM, SSH or DER public key
            # (the classic confusion), an EC key's curve must be the algorithm's.
            _IMPLEMENTATIONS[alg].prepare_key(key)
        except Exception as exc:  # PyJWT raises InvalidKeyError, TypeError, ValueError
            raise ValueError(f"not usable with {alg}: {exc}") from None
    return Key(key, frozenset(allowed), kid)


def _describe(key: bytes | PublicKey) -> str:
    if isinstance(key, bytes):
        return "HMAC secret"
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC key ({key.curve.name})"
    return "EdDSA key"


def load_public_key(data: bytes, algorithms: Collection[str] | None = None) -> Key:
    """The key of a PEM public key (``BEGIN PUBLIC KEY``, or ``BEGIN RSA PUBLIC KEY``) or
    of an X.509 certificate (``BEGIN CERTIFICATE``). ValueError if it is neither, or is a
    private key (an edge needs only the public half: keep the private one off it)."""
    if b"PRIVATE KEY-----" in data:
        raise ValueError("this is a private key: give the edge the public key only")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public: object = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a PEM public key or certificate ({exc})") from None
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise ValueError(f"unsupported key type {type(public).__name__}")
    return make_key(public, algorithms)


def load_private_key(data: bytes) -> PrivateKey:
    """A PEM private key (unencrypted) for signing: development and tests."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
                      | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return key


@dataclass(frozen=True, slots=True)
class KeySet:
    """The keys a token may be verified with.

    A configured key (a secret, a PEM file: ``match_any_kid``) verifies a token whatever
    its ``kid`` says. Keys from a JWKS are chosen by ``kid``: a kid the set does not hold
    is an `UnknownKey`. A token without a kid is tried against the keys that accept its
    algorithm (identity providers with one key sometimes leave the kid out)."""

    keys: tuple[Key, ...]
    match_any_kid: bool = False
    # The algorithms a token may name; None: its keys' own. A JWKS accepts every configured
    # one, so that a token of an algorithm no key has yet is an UnknownKey (a rotation to
    # another key type), not a refusal without a refetch.
    accepted: frozenset[str] | None = None

    @property
    def algorithms(self) -> frozenset[str]:
        if self.accepted is not None:
            return self.accepted
        return frozenset(alg for key in self.keys for alg in key.algorithms)

    def candidates(self, kid: str | None, alg: str) -> list[Key]:
        if kid is None or self.match_any_kid:
            found = [k for k in self.keys if alg in k.algorithms]
            if not found:
                raise UnknownKey(f"no key for algorithm {alg}")
            return found
        named = [k for k in self.keys if k.kid == kid]
        if not named:
            raise UnknownKey(f"unknown kid {kid[:64]!r}")
        found = [k for k in named if alg in k.algorithms]
        if not found:
            raise TokenError(f"algorithm {alg} not accepted for kid {kid[:64]!r}")
        return found


def static_keys(key: bytes | Key, algorithms: Collection[str] | None = None) -> KeySet:
    """The key set of one configured key (an HMAC secret, or a `Key` from a PEM file),
    narrowed to `algorithms` if given."""
    if isinstance(key, Key):
        if algorithms is not None:
            key = make_key(key.key, [a for a in key.algorithms if a in algorithms], key.kid)
        return KeySet((key,), True)
    return KeySet((make_key(key, algorithms),), True)


def parse_jwks(
    data: bytes | str, algorithms: Collection[str] | None = None
) -> tuple[KeySet, list[str]]:
    """The key set of a JWKS document (RFC 7517) and why keys were left out (for the log).

    Only signature keys are read: a key whose ``use`` is not ``sig``, whose ``key_ops``
    lack ``verify``, that is symmetric (``oct``: a shared secret has no business in a
    published key set), private, of an unsupported type, shorter than allowed, or whose
    ``alg`` is not accepted is skipped. A key's ``alg``, when given, is the only algorithm
    it verifies. ValueError if the document is not a JWKS at all."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("not JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWKS (no keys list)")
    keys: list[Key] = []
    skipped: list[str] = []
    for i, jwk in enumerate(doc["keys"]):
        if len(keys) >= MAX_JWKS_KEYS:
            skipped.append(f"keys after the first {MAX_JWKS_KEYS}")
            break
        try:
            keys.append(_jwk_key(jwk, algorithms))
        except ValueError as exc:
            kid = jwk.get("kid") if isinstance(jwk, dict) else None
            name = f"key {i}" + (f" (kid {str(kid)[:64]!r})" if kid is not None else "")
            skipped.append(f"{name}: {exc}")
    accepted = frozenset(a for a in PUBLIC_KEY_ALGORITHMS if algorithms is None or a in algorithms)
    return KeySet(tuple(keys), accepted=accepted), skipped


def _jwk_key(jwk: object, algorithms: Collection[str] | None) -> Key:
    if not isinstance(jwk, dict):
        raise ValueError("not a JSON object")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ValueError("kid is not a string")
    if jwk.get("use", "sig") != "sig":
        raise ValueError(f"use {jwk.get('use')!r}, not sig")
    kty = jwk.get("kty")
    if kty not in ("RSA", "EC", "OKP"):
        raise ValueError(f"key type {kty!r} not accepted")
    if "d" in jwk:
        raise ValueError("holds a private key: a JWKS must publish public keys only")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise ValueError("key_ops without verify")
    alg = jwk.get("alg")
    if alg is not None and alg not in PUBLIC_KEY_ALGORITHMS:
        raise ValueError(f"alg {alg!r} not accepted")
    try:
        public = PyJWK(jwk).key
    except (PyJWTError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__})") from None
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey
                      | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        raise ValueError(f"unsupported key type {type(public).__name__}")
    narrowed = [a for a in ([alg] if alg else PUBLIC_KEY_ALGORITHMS)
                if algorithms is None or a in algorithms]
    return make_key(public, narrowed, kid)


# --- verification ----------------------------------------------------------------------------


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
    except (ValueError, UnicodeDecodeError, RecursionError):
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


def _signature_ok(alg: str, key: Key, signing_input: bytes, signature: bytes) -> bool:
    try:
        return bool(_IMPLEMENTATIONS[alg].verify(signing_input, key.key, signature))
    except (InvalidSignature, ValueError, TypeError):
        return False


def verify_token(
    token: object,
    keys: bytes | Key | KeySet,
    *,
    now: float,
    default_channels: tuple[str, ...],
    issuer: str = "",
    audience: str = "",
    leeway: float = LEEWAY,
    algorithms: Collection[str] | None = None,
) -> Claims:
    """The claims of a valid token; TokenError otherwise (`UnknownKey` when the key it
    names is not in `keys`).

    `keys` is a key set, one key, or an HMAC secret (HS256/384/512). `algorithms` narrows
    what a bare secret or key accepts; a `KeySet` carries its own (see `make_key`)."""
    if not isinstance(keys, KeySet):
        keys = static_keys(keys, algorithms)
    if not isinstance(token, str) or not token:
        raise TokenError("no token")
    if len(token) > MAX_TOKEN:
        raise TokenError("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("not a JWS compact token")
    header = _json_object(_b64decode(parts[0]), "header")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in keys.algorithms:
        raise TokenError(f"algorithm {alg!r:.40} not accepted")
    if "crit" in header:
        raise TokenError("critical header extensions are not supported")
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenError("kid is not a string")
    candidates = keys.candidates(kid, alg)
    signature = _b64decode(parts[2])
    signing_input = f"{parts[0]}.{parts[1]}".encode()
    if not any(_signature_ok(alg, key, signing_input, signature) for key in candidates):
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
    return Claims(subject, expires, patterns, tuple(str(a) for a in accounts))


def default_algorithm(key: bytes | PrivateKey) -> str:
    """What `sign_token` uses for a key unless told: HS256 for a secret, RS256 for RSA, the
    curve's ES algorithm for EC, EdDSA for Ed25519/Ed448."""
    family = key_algorithms(key)
    if not family:
        raise ValueError(f"unsupported key type {type(key).__name__}")
    return family[0]


def sign_token(
    claims: Mapping[str, Any],
    key: bytes | PrivateKey,
    algorithm: str | None = None,
    kid: str | None = None,
) -> str:
    """A signed token (for backends in Python, `fanout token`, and tests): with an HMAC
    secret (HS256 unless told) or a private key (its family's first algorithm unless
    told); ValueError for an algorithm the key's family does not have."""
    alg = algorithm or default_algorithm(key)
    if alg not in key_algorithms(key):
        raise ValueError(f"algorithm {alg!r} does not fit this key "
                         f"(it signs {', '.join(key_algorithms(key)) or 'nothing'})")
    impl = _IMPLEMENTATIONS[alg]
    head: dict[str, str] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        head["kid"] = kid
    header = _b64encode(json.dumps(head, separators=(",", ":")).encode())
    payload = _b64encode(json.dumps(dict(claims), separators=(",", ":")).encode())
    signature = impl.sign(f"{header}.{payload}".encode(), impl.prepare_key(key))
    return f"{header}.{payload}.{_b64encode(signature)}"
