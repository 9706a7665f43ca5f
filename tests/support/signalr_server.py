"""A SignalR JSON hub protocol server for the tests, on a loopback ephemeral port.

It speaks the real protocol, written apart from the client in `ingest.feeds.signalr` so that the
two check each other: negotiate (POST .../negotiate, answered by `process_request`), the
handshake and its response, invocations answered with completions (results or errors),
pings every `ping_interval`, Close messages, and server-to-client invocations (the
gateway's events) sent on demand with `emit` (every client) or `send_to` (one connection).
`after_call` runs after each invocation is answered, with the connection it came on: a
gateway sends its current state there when a client subscribes (tests/support/gateway_sim.py).
`kill` drops every connection without a word and stops listening, as a crashed server does;
`start` again listens on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

RS = "\x1e"
LOG = logging.getLogger("tests.support.signalr_server")


@dataclass(frozen=True)
class Call:
    """One invocation a client made."""

    hub: str  # the hub's path: /hubs/market
    target: str
    arguments: list[Any]
    invocation_id: str | None
    connection: int  # which connection (numbered from 1 in accept order)


@dataclass
class _Conn:
    number: int
    hub: str
    query: dict[str, str]
    ws: ServerConnection
    pinger: asyncio.Task[None] | None = None


def _record(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":")) + RS


@dataclass
class HubServer:
    """The server. Methods answer invocations: a callable of the arguments returning the
    result, or raising `HubFault` for an error completion; unknown methods return null."""

    hubs: tuple[str, ...] = ("/hubs/market", "/hubs/user")
    token: str | None = None  # when set, required as access_token (or a Bearer header)
    ping_interval: float = 15.0
    methods: dict[str, Callable[..., Any]] = field(default_factory=dict)
    port: int = 0
    # What happened, for the tests to check.
    calls: list[Call] = field(default_factory=list)
    client_completions: list[dict[str, Any]] = field(default_factory=list)
    client_closes: list[dict[str, Any]] = field(default_factory=list)
    pings_received: int = 0
    pings_sent: int = 0
    negotiations: int = 0
    handshakes: int = 0
    rejected: int = 0  # upgrade or negotiate requests refused (bad token, unknown id)
    # Knobs.
    muted: bool = False  # send nothing on our own: no pings, no completions
    handshake_error: str | None = None  # answer handshakes with this error
    hang: set[str] = field(default_factory=lambda: {"Hang"})  # never completed
    # Called after an invocation was answered (unless muted); its sends to that connection
    # come after the completion and before anything the connection sends next is read.
    after_call: Callable[[Call], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        self.connections: dict[int, _Conn] = {}
        self._server: Server | None = None
        self._numbers = itertools.count(1)
        self._connection_tokens: set[str] = set()

    # -- lifecycle

    @property
    def running(self) -> bool:
        return self._server is not None

    def url(self, hub: str = "/hubs/market", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{hub}"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (on the same port as before, after a kill)."""
        assert self._server is None, "already running"
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._process_request,
            ping_interval=None,
            logger=LOG,
        )
        if not self.port:
            self.port = self._server.sockets[0].getsockname()[1]

    async def kill(self) -> None:
        """Drop every connection at once (no Close message, no close frame); stop listening."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close(close_connections=False)
        for conn in list(self.connections.values()):
            conn.ws.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    # -- acting on clients

    def live(self, hub: str | None = None) -> list[_Conn]:
        return [c for c in self.connections.values() if hub is None or c.hub == hub]

    async def emit(self, target: str, *args: Any, hub: str | None = None) -> int:
        """Invoke `target(*args)` on every client of `hub` (all hubs if None); how many."""
        conns = self.live(hub)
        record = _record({"type": 1, "target": target, "arguments": list(args)})
        for conn in conns:
            with contextlib.suppress(ConnectionClosed):
                await conn.ws.send(record)
        return len(conns)

    async def send_to(self, connection: int, target: str, *args: Any) -> bool:
        """Invoke `target(*args)` on one connection; False if it is gone."""
        conn = self.connections.get(connection)
        if conn is None:
            return False
        try:
            await conn.ws.send(_record({"type": 1, "target": target, "arguments": list(args)}))
        except ConnectionClosed:
            return False
        return True

    async def invoke_client(self, target: str, *args: Any, hub: str | None = None) -> str:
        """Invoke with an invocationId (a client result); the answer lands in
        `client_completions`."""
        invocation_id = uuid.uuid4().hex[:8]
        record = _record(
            {"type": 1, "invocationId": invocation_id, "target": target, "arguments": list(args)}
        )
        for conn in self.live(hub):
            await conn.ws.send(record)
        return invocation_id

    async def send_raw(self, text: str, hub: str | None = None) -> None:
        """Send `text` as one frame as it is (several records, or part of one)."""
        for conn in self.live(hub):
            await conn.ws.send(text)

    async def close_all(
        self, error: str | None = None, allow_reconnect: bool | None = None
    ) -> None:
        """Send a Close message to every client, then close the WebSocket."""
        body: dict[str, Any] = {"type": 7}
        if error is not None:
            body["error"] = error
        if allow_reconnect is not None:
            body["allowReconnect"] = allow_reconnect
        for conn in list(self.connections.values()):
            with contextlib.suppress(ConnectionClosed):
                await conn.ws.send(_record(body))
                await conn.ws.close()

    def calls_to(self, target: str) -> list[Call]:
        return [c for c in self.calls if c.target == target]

    # -- protocol

    def _authorized(self, request: Request, query: dict[str, str]) -> bool:
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        return query.get("access_token") == self.token or header == f"Bearer {self.token}"

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        if request.method == "POST" and parts.path.endswith("/negotiate"):
            hub = parts.path[: -len("/negotiate")]
            if hub not in self.hubs:
                return self._reject(connection, HTTPStatus.NOT_FOUND, "no such hub")
            if not self._authorized(request, query):
                return self._reject(connection, HTTPStatus.UNAUTHORIZED, "Unauthorized")
            self.negotiations += 1
            token = uuid.uuid4().hex
            self._connection_tokens.add(token)
            body = {
                "connectionId": uuid.uuid4().hex,
                "connectionToken": token,
                "negotiateVersion": 1,
                "availableTransports": [
                    {"transport": "WebSockets", "transferFormats": ["Text", "Binary"]},
                    {"transport": "LongPolling", "transferFormats": ["Text", "Binary"]},
                ],
            }
            response = connection.respond(HTTPStatus.OK, json.dumps(body))
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        if request.method != "GET" or parts.path not in self.hubs:
            return self._reject(connection, HTTPStatus.NOT_FOUND, "no such hub")
        if not self._authorized(request, query):
            return self._reject(connection, HTTPStatus.UNAUTHORIZED, "Unauthorized")
        if "id" in query and query["id"] not in self._connection_tokens:
            return self._reject(connection, HTTPStatus.NOT_FOUND, "No Connection with that ID")
        return None

    def _reject(self, connection: ServerConnection, status: HTTPStatus, text: str) -> Response:
        self.rejected += 1
        return connection.respond(status, text + "\n")

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        parts = urlsplit(ws.request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        conn = _Conn(next(self._numbers), parts.path, query, ws)
        buffer = ""
        try:
            while RS not in buffer:
                buffer += _text(await ws.recv())
            first, _, buffer = buffer.partition(RS)
            handshake = json.loads(first)
            if handshake != {"protocol": "json", "version": 1}:
                await ws.send(_record({"error": f"unsupported handshake {handshake!r}"}))
                return
            if self.handshake_error is not None:
                await ws.send(_record({"error": self.handshake_error}))
                return
            await ws.send("{}" + RS)
            self.handshakes += 1
            self.connections[conn.number] = conn
            conn.pinger = asyncio.create_task(self._ping(conn))
            while True:
                *records, buffer = buffer.split(RS)
                for record in records:
                    if record:
                        await self._on_record(conn, json.loads(record))
                buffer += _text(await ws.recv())
        except ConnectionClosed:
            pass
        finally:
            self.connections.pop(conn.number, None)
            if conn.pinger is not None:
                conn.pinger.cancel()

    async def _on_record(self, conn: _Conn, body: dict[str, Any]) -> None:
        kind = body.get("type")
        if kind == 1:
            call = Call(
                conn.hub, body["target"], body.get("arguments", []), body.get("invocationId"),
                conn.number,
            )
            self.calls.append(call)
            if self.muted:
                return
            if call.invocation_id is not None and call.target not in self.hang:
                await self._complete(conn, call)
            if self.after_call is not None:
                await self.after_call(call)
        elif kind == 3:
            self.client_completions.append(body)
        elif kind == 6:
            self.pings_received += 1
        elif kind == 7:
            self.client_closes.append(body)
            await conn.ws.close()

    async def _complete(self, conn: _Conn, call: Call) -> None:
        reply: dict[str, Any] = {"type": 3, "invocationId": call.invocation_id}
        method = self.methods.get(call.target)
        try:
            result = method(*call.arguments) if method is not None else None
            if isinstance(result, Awaitable):
                result = await result
        except HubFault as exc:
            reply["error"] = str(exc)
        else:
            if result is not None:
                reply["result"] = result
        await conn.ws.send(_record(reply))

    async def _ping(self, conn: _Conn) -> None:
        with contextlib.suppress(ConnectionClosed):
            while True:
                await asyncio.sleep(self.ping_interval)
                if not self.muted:
                    await conn.ws.send(_record({"type": 6}))
                    self.pings_sent += 1


class HubFault(Exception):
    """Raised by a test method: the invocation completes with this error."""


def _text(frame: str | bytes) -> str:
    return frame if isinstance(frame, str) else frame.decode("utf-8")


async def wait_for(
    predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition"
) -> None:
    """Poll `predicate` until true; fail the test after `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout} s waiting for {what}") from None


__all__ = ["Call", "HubFault", "HubServer", "wait_for"]
