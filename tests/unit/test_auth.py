"""Connection tokens and channel permissions: the verification itself, pure (an edge with a
secret, and `fanout token`: tests/integration/test_auth.py)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from common.auth import (
    Claims,
    KeySet,
    PrivateKey,
    TokenError,
    UnknownKey,
    load_public_key,
    make_key,
    parse_jwks,
    sign_token,
    static_keys,
    verify_token,
)
from common.config import EDGE_SETTINGS, EdgeConfig, build
from common.errors import ConfigError
from tests.support.jwtkeys import jwks_document, pem, private_pem

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


# --- public keys (pure) ----------------------------------------------------------------------



def claims_now(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": NOW + 60, **extra}


@pytest.mark.parametrize(
    ("alg", "name"),
    [("RS256", "rsa"), ("RS384", "rsa"), ("RS512", "rsa"), ("PS256", "rsa"), ("PS512", "rsa"),
     ("ES256", "p256"), ("ES384", "p384"), ("EdDSA", "ed25519")],
)
def test_public_key_algorithms_verify_with_the_public_half_only(
    keys: dict[str, PrivateKey], alg: str, name: str
) -> None:
    tok = sign_token(claims_now(accounts=[42]), keys[name], alg, kid="k1")
    assert json.loads(base64.urlsafe_b64decode(tok.split(".")[0] + "=="))["alg"] == alg
    public = load_public_key(pem(keys[name]))  # the PEM an edge is given
    claims = verify_token(tok, public, now=NOW, default_channels=DEFAULTS)
    assert claims.subject == "alice" and claims.allows("account.42.orders")
    # The same key type, another key: the signature does not check out.
    other = "rsa2" if name == "rsa" else name
    if other != name:
        with pytest.raises(TokenError, match="bad signature"):
            verify_token(tok, load_public_key(pem(keys[other])), now=NOW, default_channels=())
    forged = tok.rsplit(".", 1)[0] + "." + sign_token(claims_now(), keys[name], alg).split(".")[2]
    with pytest.raises(TokenError, match="bad signature"):
        verify_token(forged, public, now=NOW, default_channels=())


def test_a_key_verifies_only_its_own_family_whatever_is_configured(
    keys: dict[str, PrivateKey]
) -> None:
    rsa_key = load_public_key(pem(keys["rsa"]))
    assert rsa_key.algorithms == {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}
    assert load_public_key(pem(keys["p256"])).algorithms == {"ES256"}
    assert load_public_key(pem(keys["p384"])).algorithms == {"ES384"}
    assert load_public_key(pem(keys["ed25519"])).algorithms == {"EdDSA"}
    # Configuration narrows; it never widens: HS256 is not granted to an RSA key.
    assert make_key(rsa_key.key, ["HS256", "RS256"]).algorithms == {"RS256"}
    with pytest.raises(ValueError, match="none of the accepted"):
        make_key(rsa_key.key, ["HS256"])
    with pytest.raises(ValueError, match="none of the accepted"):
        load_public_key(pem(keys["p256"]), ["ES384"])  # ES384 needs P-384
    with pytest.raises(ValueError, match="private key"):
        load_public_key(private_pem(keys["rsa"]))
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(ValueError, match="at least 2048"):
        load_public_key(pem(weak))
    tok = sign_token(claims_now(), keys["rsa"], "PS256")
    with pytest.raises(TokenError, match="'PS256' not accepted"):
        verify_token(tok, make_key(rsa_key.key, ["RS256"]), now=NOW, default_channels=())


def test_alg_none_is_refused_with_any_key(keys: dict[str, PrivateKey]) -> None:
    body = _b64({"sub": "mallory", "exp": NOW + 60, "channels": ["*"]})
    for header in ({"alg": "none"}, {"alg": "none", "kid": "r1"}, {"alg": "None"}, {}):
        tok = f"{_b64(header)}.{body}."
        for key_set in (static_keys(SECRET), static_keys(load_public_key(pem(keys["rsa"]))),
                        jwks_of(keys, rsa="r1")):
            with pytest.raises(TokenError, match="not accepted"):
                verify_token(tok, key_set, now=NOW, default_channels=())


def test_hs256_signed_with_the_public_key_is_refused(keys: dict[str, PrivateKey]) -> None:
    """Algorithm confusion: the attacker knows the RSA public key and uses its PEM as an
    HMAC secret. No RSA key verifies HS256, whatever the token or the settings say."""
    public_pem = pem(keys["rsa"])
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": "r1"})
    body = _b64({"sub": "mallory", "exp": NOW + 60, "channels": ["*"]})
    mac = hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{body}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    rsa_key = load_public_key(pem(keys["rsa"]))
    for key_set in (static_keys(rsa_key), jwks_of(keys, rsa="r1"),
                    KeySet((make_key(rsa_key.key, ["HS256", "RS256"], "r1"),))):
        with pytest.raises(TokenError, match="'HS256' not accepted"):
            verify_token(forged, key_set, now=NOW, default_channels=())
    # Nor can the public key be configured as the secret.
    with pytest.raises(ValueError, match="asymmetric key"):
        make_key(public_pem)
    with pytest.raises(ConfigError, match=r"FANOUT_AUTH_SECRET: .*asymmetric key"):
        build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_AUTH_SECRET": public_pem.decode()})


def jwks_of(keys: dict[str, PrivateKey], **kids: str) -> KeySet:
    """A JWKS (as an identity provider publishes it) of the named keys, parsed: kid=name."""
    key_set, skipped = parse_jwks(json.dumps(jwks_document(keys, **kids)))
    assert skipped == []
    return key_set


def test_jwks_keys_are_chosen_by_kid(keys: dict[str, PrivateKey]) -> None:
    key_set = jwks_of(keys, rsa="r1", p256="e1", ed25519="d1")
    for name, alg, kid in (("rsa", "RS256", "r1"), ("p256", "ES256", "e1"),
                           ("ed25519", "EdDSA", "d1"), ("rsa", "PS256", "r1")):
        tok = sign_token(claims_now(), keys[name], alg, kid=kid)
        assert verify_token(tok, key_set, now=NOW, default_channels=()).subject == "alice"
    # A kid the set does not hold: UnknownKey (the edge's JWKS cache refetches once).
    with pytest.raises(UnknownKey, match="unknown kid 'r2'"):
        verify_token(sign_token(claims_now(), keys["rsa2"], "RS256", kid="r2"), key_set,
                     now=NOW, default_channels=())
    # A known kid, signed by another key: a bad signature, no refetch.
    with pytest.raises(TokenError, match="bad signature") as info:
        verify_token(sign_token(claims_now(), keys["rsa2"], "RS256", kid="r1"), key_set,
                     now=NOW, default_channels=())
    assert not isinstance(info.value, UnknownKey)
    # The kid of an RSA key with an EC algorithm.
    with pytest.raises(TokenError, match="ES256 not accepted for kid 'r1'"):
        verify_token(sign_token(claims_now(), keys["p256"], "ES256", kid="r1"), key_set,
                     now=NOW, default_channels=())
    # No kid: the keys of the token's algorithm are tried.
    assert verify_token(sign_token(claims_now(), keys["p256"], "ES256"), key_set, now=NOW,
                        default_channels=()).subject == "alice"
    with pytest.raises(UnknownKey, match="no key for algorithm ES384"):
        verify_token(sign_token(claims_now(), keys["p384"], "ES384"), key_set, now=NOW,
                     default_channels=())
    # A configured key ignores the kid: whatever `fanout token --kid` put there.
    assert verify_token(sign_token(claims_now(), keys["rsa"], "RS256", kid="anything"),
                        load_public_key(pem(keys["rsa"])), now=NOW,
                        default_channels=()).subject == "alice"


def test_an_expired_public_key_token_is_refused_with_leeway(
    keys: dict[str, PrivateKey]
) -> None:
    key_set = jwks_of(keys, p256="e1")
    late = sign_token(claims_now(exp=NOW - 31), keys["p256"], kid="e1")
    with pytest.raises(TokenError, match="expired") as info:
        verify_token(late, key_set, now=NOW, default_channels=())
    assert info.value.reason == "token expired"
    skew = sign_token(claims_now(exp=NOW - 29), keys["p256"], kid="e1")
    assert verify_token(skew, key_set, now=NOW, default_channels=()).subject == "alice"


def test_jwks_parsing_reads_signature_keys_only(keys: dict[str, PrivateKey]) -> None:
    from jwt.algorithms import RSAAlgorithm

    doc = jwks_document(keys, rsa="r1", p256="e1")
    rsa2 = keys["rsa2"]
    assert isinstance(rsa2, rsa.RSAPrivateKey)
    private = RSAAlgorithm.to_jwk(rsa2, as_dict=True)
    weak = RSAAlgorithm.to_jwk(rsa.generate_private_key(public_exponent=65537, key_size=1024)
                               .public_key(), as_dict=True)
    doc["keys"] += [
        {**doc["keys"][0], "kid": "enc", "use": "enc"},
        {"kty": "oct", "k": base64.urlsafe_b64encode(SECRET).decode(), "kid": "hmac"},
        {**private, "kid": "priv"},
        {**weak, "kid": "weak"},
        {**doc["keys"][0], "kid": "oaep", "alg": "RSA-OAEP"},
        {**doc["keys"][0], "kid": "ops", "key_ops": ["encrypt"]},
        {"kty": "RSA", "kid": "broken", "n": "AQAB"},
        "not a key",
        {**doc["keys"][0], "kid": "pinned", "alg": "RS256"},
    ]
    key_set, skipped = parse_jwks(json.dumps(doc).encode())
    assert sorted(str(k.kid) for k in key_set.keys) == ["e1", "pinned", "r1"]
    assert len(skipped) == 8 and any("oct" in s for s in skipped)
    assert any("private" in s for s in skipped) and any("2048" in s for s in skipped)
    # A key's alg is the only one it verifies.
    ps = sign_token(claims_now(), keys["rsa"], "PS256", kid="pinned")
    with pytest.raises(TokenError, match="PS256 not accepted for kid 'pinned'"):
        verify_token(ps, key_set, now=NOW, default_channels=())
    # The configured algorithms narrow a JWKS too.
    narrowed, _ = parse_jwks(json.dumps(doc), ["ES256"])
    assert [k.kid for k in narrowed.keys] == ["e1"]
    for bad in (b"[]", b"{}", b"not json", b'{"keys": 1}'):
        with pytest.raises(ValueError):
            parse_jwks(bad)
