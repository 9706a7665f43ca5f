"""A connection's authentication: the token's claims, what they allow, their expiry, and
the `refresh` command that replaces them.

Without keys configured (no verifier) every client may read every channel (development);
with them, the token's claims decide, and the connection ends when it expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from common import protocol
from common.auth import LEEWAY, Claims, TokenError, permits
from common.channels import Channel, parse_channel
from common.errors import (
    BadRequest,
    CloseCode,
    Disconnect,
    PermissionDenied,
    Unauthorized,
    Unavailable,
)
from edge.tokens import KeysUnavailable, TokenVerifier


class Credentials:
    __slots__ = ("_expiry", "_loop", "claims", "client_id", "log", "verifier")

    def __init__(
        self, verifier: TokenVerifier | None, logger: logging.Logger, client_id: str
    ) -> None:
        self.verifier = verifier  # None: authentication is off
        self.log = logger
        self.client_id = client_id
        self.claims: Claims | None = None  # None: authentication is off
        self._expiry: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    async def authenticate(self, token: str | None, on_expiry: Callable[[Disconnect], None]
                           ) -> None:
        """The connect's token. An edge that has no keys yet (JWKS not loaded) asks the
        client to come back: 3004. `on_expiry` is called when the claims expire."""
        if self.verifier is None:
            return
        try:
            claims = await self.verifier.verify(token)
        except TokenError as exc:
            self.log.info("unauthorized client=%s error=%s", self.client_id, exc)
            raise Disconnect(CloseCode.UNAUTHORIZED, exc.reason) from None
        except KeysUnavailable as exc:
            self.log.warning("cannot authenticate client=%s: %s", self.client_id, exc)
            raise Disconnect(CloseCode.SERVER_ERROR, "authentication unavailable") from None
        self.log.debug("authenticated client=%s sub=%s", self.client_id, claims.subject)
        self._set_claims(claims, on_expiry)

    def _set_claims(self, claims: Claims, on_expiry: Callable[[Disconnect], None]) -> None:
        self.claims = claims
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_later(
            max(self.expires_in() or 0.0, 0.0), on_expiry,
            Disconnect(CloseCode.TOKEN_EXPIRED, "token expired"),
        )

    def expires_in(self) -> float | None:
        """Seconds this connection may live on its token (as long as verify_token accepts
        it); None without authentication."""
        if self.claims is None:
            return None
        return max(self.claims.expires + LEEWAY - time.time(), 0.0)

    async def refresh(
        self, command: protocol.Refresh, channels: Iterable[str],
        on_expiry: Callable[[Disconnect], None],
    ) -> dict[str, Any]:
        """A new token for the same subject; it must allow every channel subscribed now
        (unsubscribe first), so that a refresh never silently ends a subscription."""
        if self.claims is None or self.verifier is None:
            raise BadRequest("authentication is off: nothing to refresh")
        try:
            claims = await self.verifier.verify(command.token)
        except TokenError as exc:
            self.log.info("refresh refused client=%s error=%s", self.client_id, exc)
            raise Unauthorized(exc.reason) from None
        except KeysUnavailable as exc:
            self.log.warning("cannot check refresh client=%s: %s", self.client_id, exc)
            raise Unavailable("authentication unavailable: retry later") from None
        if claims.subject != self.claims.subject:
            raise Unauthorized("token is for another subject")
        for name in sorted(channels):
            if not permits(claims, parse_channel(name)):
                raise PermissionDenied(f"the new token does not allow {name}: unsubscribe first")
        self._set_claims(claims, on_expiry)
        return protocol.refreshed(command.id, self.expires_in() or 0.0)

    def check_allowed(self, channel: Channel) -> None:
        if self.claims is not None and not permits(self.claims, channel):
            raise PermissionDenied(f"not allowed to read {channel.name}")

    def close(self) -> None:
        """The connection ended: no expiry callback any more."""
        if self._expiry is not None:
            self._expiry.cancel()
