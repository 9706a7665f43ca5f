"""Keys for token tests and a JWKS served over HTTP on loopback (not a test module)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from http import HTTPStatus
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from common.auth import PrivateKey


@functools.cache
def generate_keys() -> dict[str, PrivateKey]:
    """Generated on first use, once per test process: two RSA 2048 keys, EC P-256 and
    P-384, Ed25519."""
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }


def pem(key: Any) -> bytes:
    """The PEM of a public key (or of a private key's public half)."""
    public = key.public_key() if hasattr(key, "private_bytes") else key
    out: bytes = public.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    return out


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def jwks_document(keys: dict[str, PrivateKey], **kids: str) -> dict[str, Any]:
    """A JWKS as an identity provider publishes it: the public halves of the named keys,
    each under the kid given (``rsa="r1"``)."""
    out = []
    for name, kid in kids.items():
        public = keys[name].public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
        elif isinstance(public, ec.EllipticCurvePublicKey):
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
        out.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": out}


class JwksServer:
    """A JWKS over HTTP/1.1 on a loopback ephemeral port, served from the test's event
    loop: `document` is what it serves (replace it to rotate keys), `hits` counts requests,
    `status` other than 200 makes it fail, `stall` makes it hold requests unanswered."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document
        self.hits = 0
        self.status = 200
        self.cache_control: str | None = None
        self.stall = False
        self.received = asyncio.Event()  # set at each request
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def start(self) -> JwksServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.hits += 1
            self.received.set()
            if self.stall:
                await self._release.wait()
            status = HTTPStatus(self.status)
            body = json.dumps(self.document if status == 200 else {"error": "down"}).encode()
            lines = [f"HTTP/1.1 {status.value} {status.phrase}",
                     "Content-Type: application/json", f"Content-Length: {len(body)}",
                     "Connection: close"]
            if self.cache_control is not None:
                lines.append(f"Cache-Control: {self.cache_control}")
            if status.value in (301, 302, 307, 308):
                lines.append("Location: http://127.0.0.1:9/elsewhere")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
