"""The edge's connection protocols: uvicorn's h11 and websockets-sansio protocols, with a
deadline for the request head and admission (edge/admission.py) decided before the upgrade.

The deadline. uvicorn applies no timeout to a request head that arrives slowly, or not at
all: a connection that sends half a request (or nothing) stays open for as long as its peer
likes, and the edge's own `connect_timeout` only starts once the WebSocket is open. A few
hundred such connections hold as many descriptors and protocol objects (a slowloris). Here
each connection has one timer: armed when it is made, cancelled as soon as its request head
is complete (for ``/ws``: when it is admitted and handed to the WebSocket protocol, whose app
answers at once), and if it fires first the connection is closed with no answer and counted
(``fanout_edge_connections_refused_total{reason="handshake_timeout"}``). On a kept-alive
HTTP connection the first byte of the next request arms it again; an idle keep-alive
connection is left to uvicorn's ``timeout_keep_alive``.

Admission. A ``/ws`` handshake is decided as soon as h11 has its head: refused ones are
answered right here (403, or 503 with Retry-After) without a WebSocket protocol, a task or
the app, so that a burst of them costs little. An admitted one takes a slot, which rides on
its WebSocket protocol and is given back in that protocol's ``connection_lost``: asyncio
calls it exactly once per connection, however the connection ends (the client closing, an
error, the drain, a WebSocket handshake the library refused, a shutdown). So the count is
the number of admitted TCP connections still open, exact without any bookkeeping in the app.

The lean path. A connection whose first bytes hold a whole, valid WebSocket upgrade for
``/ws`` (and nothing h11 has started on) skips h11 and uvicorn's WebSocket protocol:
edge/leanws.py parses the head once, admission decides as above, and the transport is
switched to `LeanWebSocket` (docs/architecture.md, "The WebSocket layer"). Everything
else goes to h11 untouched, and from there to `AdmittedWebSocketProtocol` as before.

This relies on uvicorn's internals (``handle_events``, ``handle_websocket_upgrade``,
``self.scope``/``self.headers`` set per request, ``self.conn`` being h11's, the upgrade
switching the transport's protocol), which tests/integration/test_admission.py exercises against the
installed uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

from edge.admission import Admission, Refusal, Slot
from edge.leanws import LeanServer, LeanWebSocket, http_response, parse_upgrade
from edge.wsprotocol import EdgeWebSocketProtocol


class AdmittedWebSocketProtocol(EdgeWebSocketProtocol):
    """The edge's WebSocket protocol (edge/wsprotocol.py), holding its connection's
    admission slot."""

    slot: Slot | None = None

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            super().connection_lost(exc)
        finally:
            slot, self.slot = self.slot, None
            if slot is not None:
                slot.release()


class EdgeHttpProtocol(H11Protocol):
    handshake_timeout: ClassVar[float] = 5.0
    admission: ClassVar[Admission | None] = None
    ws_path: ClassVar[str] = "/ws"

    # The lean WebSocket path (edge/leanws.py) for valid upgrades to ws_path; False: every
    # request through h11 and uvicorn's WebSocket protocol.
    lean: ClassVar[bool] = True
    # The lean path's shared settings, made by the first connection of a server.
    _lean_server: ClassVar[LeanServer | None] = None

    _deadline: asyncio.TimerHandle | None = None
    _armed_at = 0.0  # time.monotonic() when the deadline was armed

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        # The first bytes of a kept-alive connection's next request start its deadline.
        conn = self.conn
        if conn.their_state is h11.IDLE:
            if self._deadline is None:
                self._arm()
            if (self.lean and conn.our_state is h11.IDLE and not conn.trailing_data[0]
                    and self._lean_upgrade(data)):
                return
        super().data_received(data)

    def _lean_upgrade(self, data: bytes) -> bool:
        """Serve a complete, valid upgrade request for ws_path in `data` on the lean path
        (edge/leanws.py); False leaves `data` to h11, untouched."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        config = self.config
        request = parse_upgrade(data[:end], self.ws_path, bool(config.ws_per_message_deflate))
        if request is None:
            return False
        self._disarm()
        self._unset_keepalive_if_required()
        slot: Slot | None = None
        admission = self.admission
        if admission is not None:
            decision = admission.admit(request.headers, self.client)
            if isinstance(decision, Refusal):
                self.transport.write(refusal_response(decision))
                self.transport.close()
                return True
            slot = decision
        server = self._lean_server
        if server is None or server.server_state is not self.server_state:
            server = LeanServer(self.app, self.server_state, self.app_state,
                                config.ws_max_size, self.root_path, self.asgi_version,
                                logging.getLogger("fanout.edge.ws"))
            type(self)._lean_server = server
        self.connections.discard(self)
        transport = self.transport
        protocol = LeanWebSocket(server, transport, self.loop, slot)
        try:
            transport.set_protocol(protocol)
            protocol.start(request, "wss" if self.scheme == "https" else "ws", self.client,
                           self.server, data[end + 4:])
        except BaseException:
            protocol.connection_lost(None)  # gives the slot back and closes
            raise
        return True

    def handle_events(self) -> None:
        scope = self.scope
        super().handle_events()
        if self.scope is not scope:  # a request head was read (uvicorn made its scope)
            self._disarm()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm()
        admission = self.admission
        if admission is None or self.scope["path"] != self.ws_path:
            super().handle_websocket_upgrade(event)  # not ours to count (the app answers 403)
            return
        decision = admission.admit(self.headers, self.client)
        if isinstance(decision, Refusal):
            self._refuse(decision)
            return
        try:
            super().handle_websocket_upgrade(event)
        except BaseException:
            decision.release()
            raise
        # The transport now runs the WebSocket protocol. Even if that one has closed it
        # already (a handshake it refused), its connection_lost is still to come.
        protocol = self.transport.get_protocol()
        if isinstance(protocol, AdmittedWebSocketProtocol):
            protocol.slot = decision
        else:  # pragma: no cover - configured with another WebSocket protocol
            decision.release()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self, refusal: Refusal) -> None:
        body, headers = refusal_parts(refusal)
        conn = self.conn
        response = h11.Response(status_code=refusal.status, headers=headers,
                                reason=STATUS_PHRASES[refusal.status])
        with contextlib.suppress(h11.LocalProtocolError):  # h11 would not answer: just close
            self.transport.write(conn.send(response) + conn.send(h11.Data(data=body))
                                 + conn.send(h11.EndOfMessage()))
        self.transport.close()

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        self._deadline = self.loop.call_later(self.handshake_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        left = self._armed_at + self.handshake_timeout - time.monotonic()
        if left > 0:
            # uvloop's clock counts whole milliseconds and its timers start from the time
            # the loop's turn began, so one can fire a little early: the deadline is never
            # shorter than the setting.
            self._deadline = self.loop.call_later(left, self._expired)
            return
        if self.transport.is_closing():
            return
        if self.admission is not None:
            self.admission.handshake_timed_out(self.client)
        self.transport.close()


def refusal_parts(refusal: Refusal) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A refusal's answer body and headers."""
    body = (refusal.message + "\n").encode()
    headers = [(b"content-type", b"text/plain; charset=utf-8"),
               (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    if refusal.retry_after:
        headers.append((b"retry-after", str(refusal.retry_after).encode()))
    return body, headers


def refusal_response(refusal: Refusal) -> bytes:
    """A refusal's whole answer, the bytes h11 writes for it (`EdgeHttpProtocol._refuse`)."""
    body, headers = refusal_parts(refusal)
    return http_response(refusal.status, STATUS_PHRASES[refusal.status].decode(), headers,
                         body)


def edge_http_protocol(admission: Admission, handshake_timeout: float,
                       ws_path: str) -> type[H11Protocol]:
    """The protocol class for uvicorn's ``http`` setting, bound to one edge (uvicorn's
    ``ws`` setting must then be `AdmittedWebSocketProtocol`)."""
    return type("EdgeHttp", (EdgeHttpProtocol,), {
        "handshake_timeout": handshake_timeout, "admission": admission, "ws_path": ws_path,
    })
