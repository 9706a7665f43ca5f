"""A small asyncio client for the ASP.NET Core SignalR JSON hub protocol over WebSocket.

Why our own: the maintained Python clients (pysignalr, signalrcore, signalr-async) either
pull in aiohttp or a thread-based websocket library, reconnect with their own fixed
schedules (not capped exponential backoff with full jitter), do not re-run subscriptions
after a reconnect, or have no server-timeout detection. Upstream adapters need all of that
and an exportable state, and the protocol is small, so this module implements exactly it:

- negotiate (``POST {url}/negotiate?negotiateVersion=1``), or skip it as ProjectX clients do;
- the handshake ``{"protocol":"json","version":1}`` and its response, records ending in
  the record separator ``\\x1e`` (several per WebSocket frame, or one split across frames);
- Invocation (1, with an invocationId when a result is expected), Completion (3),
  Ping (6) and Close (7, with ``error`` and ``allowReconnect``); other types are ignored,
  as the protocol asks of clients that do not use them (streams, acks);
- a Ping to the server when nothing was sent for ``ping_interval``, and a connection held
  dead when nothing arrived for ``server_timeout`` while we were listening;
- reconnects with `Backoff`, re-running the registered subscriptions after each connect.

The JWT goes in the ``access_token`` query parameter of the WebSocket URL (what browsers
and the ProjectX gateway use) and as a Bearer header of the negotiate request.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from common.aio import wait_event
from common.backoff import Backoff

RECORD_SEPARATOR = "\x1e"
MAX_NEGOTIATE_REDIRECTS = 10  # the protocol allows redirects (Azure SignalR); bound them


class MessageType(IntEnum):
    INVOCATION = 1
    STREAM_ITEM = 2
    COMPLETION = 3
    STREAM_INVOCATION = 4
    CANCEL_INVOCATION = 5
    PING = 6
    CLOSE = 7


class SignalRError(Exception):
    """Base of this module's errors."""


class ProtocolError(SignalRError):
    """A record that is not a valid hub protocol message."""


class HandshakeError(SignalRError):
    """The server answered the handshake with an error."""


class NegotiateError(SignalRError):
    """The negotiate request failed or its answer cannot be used."""


class HubError(SignalRError):
    """The server completed an invocation with an error."""


class HubNotConnected(SignalRError):
    """An invocation was attempted while no connection is open."""


class HubConnectionLost(SignalRError):
    """The connection closed before the invocation completed."""


class ServerTimeout(SignalRError):
    """Nothing arrived from the server within the server timeout."""


class HubClosedError(SignalRError):
    """The server closed the connection and did not allow a reconnect."""


# --- messages and framing (pure) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Invocation:
    target: str
    arguments: list[Any] = field(default_factory=list)
    invocation_id: str | None = None  # None: the caller expects no completion


@dataclass(frozen=True, slots=True)
class Completion:
    invocation_id: str
    result: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Close:
    error: str | None = None
    allow_reconnect: bool = False


@dataclass(frozen=True, slots=True)
class Other:
    """A message type this client does not use (stream items, cancels, acks): ignored."""

    type: int
    raw: dict[str, Any]


HubMessage = Invocation | Completion | Ping | Close | Other


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def handshake_request(protocol: str = "json", version: int = 1) -> str:
    """The first record a client sends."""
    return _dumps({"protocol": protocol, "version": version}) + RECORD_SEPARATOR


def _json_object(record: str, error: type[Exception], what: str) -> dict[str, Any]:
    """`record` as a JSON object, else `error` saying what it is (`what`: its name)."""
    try:
        body = json.loads(record)
    except ValueError as exc:
        raise error(f"{what} is not JSON: {record[:200]!r}") from exc
    if not isinstance(body, dict):
        raise error(f"{what} is not a JSON object: {record[:200]!r}")
    return body


def parse_handshake_response(record: str) -> None:
    """Accept ``{}``; raise HandshakeError on ``{"error": ...}`` or anything else."""
    body = _json_object(record, HandshakeError, "handshake response")
    if body.get("error"):
        raise HandshakeError(str(body["error"]))


def split_records(data: str) -> tuple[list[str], str]:
    """Complete records of `data`, and the incomplete rest to prepend to the next frame."""
    parts = data.split(RECORD_SEPARATOR)
    return [p for p in parts[:-1] if p], parts[-1]


def encode_message(message: HubMessage) -> str:
    """One message as a JSON record, separator included."""
    body: dict[str, Any]
    if isinstance(message, Invocation):
        body = {"type": MessageType.INVOCATION.value}
        if message.invocation_id is not None:
            body["invocationId"] = message.invocation_id
        body["target"] = message.target
        body["arguments"] = list(message.arguments)
    elif isinstance(message, Completion):
        body = {"type": MessageType.COMPLETION.value, "invocationId": message.invocation_id}
        if message.error is not None:
            body["error"] = message.error
        elif message.result is not None:
            body["result"] = message.result
    elif isinstance(message, Ping):
        body = {"type": MessageType.PING.value}
    elif isinstance(message, Close):
        body = {"type": MessageType.CLOSE.value}
        if message.error is not None:
            body["error"] = message.error
        if message.allow_reconnect:
            body["allowReconnect"] = True
    else:
        body = dict(message.raw)
        body["type"] = message.type
    return _dumps(body) + RECORD_SEPARATOR


def parse_message(record: str) -> HubMessage:
    """One record (without its separator) as a message; ProtocolError if it is not one."""
    body = _json_object(record, ProtocolError, "record")
    kind = body.get("type")
    if isinstance(kind, bool) or not isinstance(kind, int):
        raise ProtocolError(f"record without an integer type: {record[:200]!r}")
    if kind == MessageType.INVOCATION:
        target, arguments = body.get("target"), body.get("arguments", [])
        invocation_id = body.get("invocationId")
        if not isinstance(target, str) or not isinstance(arguments, list):
            raise ProtocolError(f"invocation without target or arguments: {record[:200]!r}")
        if invocation_id is not None and not isinstance(invocation_id, str):
            raise ProtocolError(f"invocation id is not a string: {record[:200]!r}")
        return Invocation(target, arguments, invocation_id)
    if kind == MessageType.COMPLETION:
        invocation_id = body.get("invocationId")
        if not isinstance(invocation_id, str):
            raise ProtocolError(f"completion without invocation id: {record[:200]!r}")
        error = body.get("error")
        return Completion(invocation_id, body.get("result"), None if error is None else str(error))
    if kind == MessageType.PING:
        return Ping()
    if kind == MessageType.CLOSE:
        error = body.get("error")
        return Close(None if error is None else str(error), body.get("allowReconnect") is True)
    return Other(kind, body)


# --- URLs and negotiate --------------------------------------------------------------------


def _with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _scheme(url: str, *, websocket: bool) -> str:
    parts = urlsplit(url)
    secure = parts.scheme in ("https", "wss")
    if parts.scheme not in ("http", "https", "ws", "wss"):
        raise ValueError(f"hub URL must be http(s) or ws(s): {redact(url)}")
    scheme = ("wss" if secure else "ws") if websocket else ("https" if secure else "http")
    return urlunsplit(parts._replace(scheme=scheme))


def websocket_url(
    url: str, *, access_token: str | None = None, connection_token: str | None = None
) -> str:
    """The WebSocket URL of a hub: ws(s) scheme, ``id`` and ``access_token`` in the query."""
    params: dict[str, str] = {}
    if connection_token is not None:
        params["id"] = connection_token
    if access_token:
        params["access_token"] = access_token
    return _with_query(_scheme(url, websocket=True), **params)


def negotiate_url(url: str) -> str:
    """``{url}/negotiate?negotiateVersion=1`` over http(s), the hub's query kept."""
    parts = urlsplit(_scheme(url, websocket=False))
    path = parts.path.rstrip("/") + "/negotiate"
    return _with_query(urlunsplit(parts._replace(path=path)), negotiateVersion="1")


def redact(url: str) -> str:
    """A URL safe to log: the access token (and connection token) replaced."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = [
        (k, "***" if k in ("access_token", "id") else v)
        for k, v in parse_qsl(parts.query, keep_blank_values=True)
    ]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


@dataclass(frozen=True, slots=True)
class Negotiated:
    """What a negotiate answer says: connect with this token, or go to another URL."""

    connection_token: str | None = None
    redirect_url: str | None = None
    access_token: str | None = None


def parse_negotiate_response(body: object) -> Negotiated:
    """Read a negotiate answer (versions 0 and 1, and redirects); NegotiateError if unusable."""
    if not isinstance(body, dict):
        raise NegotiateError(f"negotiate answer is not an object: {body!r:.200}")
    if body.get("error"):
        raise NegotiateError(f"negotiate refused: {body['error']}")
    if isinstance(body.get("url"), str):
        token = body.get("accessToken")
        return Negotiated(redirect_url=body["url"], access_token=token if token else None)
    version = body.get("negotiateVersion", 0)
    token = body.get("connectionToken") if version else body.get("connectionId")
    if not isinstance(token, str) or not token:
        raise NegotiateError(f"negotiate answer without a connection token: {body!r:.200}")
    transports = body.get("availableTransports")
    if isinstance(transports, list) and not any(
        isinstance(t, dict)
        and t.get("transport") == "WebSockets"
        and "Text" in (t.get("transferFormats") or [])
        for t in transports
    ):
        raise NegotiateError("the server offers no WebSockets transport with text frames")
    return Negotiated(connection_token=token)


def negotiate(url: str, access_token: str | None, timeout: float) -> tuple[str, str | None]:
    """Negotiate (blocking; run it in a thread): the WebSocket URL to open, and the token."""
    for _ in range(MAX_NEGOTIATE_REDIRECTS + 1):
        headers = {"Content-Type": "text/plain;charset=UTF-8"}
        if access_token:
            headers["Authorization"] = f"Bearer {access_token}"
        request = urllib.request.Request(negotiate_url(url), b"", headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                body = json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as exc:
            exc.close()  # it holds the response, and so the socket
            raise NegotiateError(f"negotiate answered HTTP {exc.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise NegotiateError(f"negotiate failed: {exc}") from exc
        answer = parse_negotiate_response(body)
        if answer.redirect_url is not None:
            url = answer.redirect_url
            access_token = answer.access_token or access_token
            continue
        return websocket_url(url, connection_token=answer.connection_token), access_token
    raise NegotiateError(f"more than {MAX_NEGOTIATE_REDIRECTS} negotiate redirects")


# --- the connection ------------------------------------------------------------------------


class HubState(StrEnum):
    """What a hub connection is doing; exported by the worker as a metric."""

    CONNECTING = "connecting"  # negotiating, opening, handshaking, subscribing
    LIVE = "live"  # handshake done and subscriptions sent
    BACKING_OFF = "backing_off"  # waiting before the next attempt
    STOPPED = "stopped"  # not running


Handler = Callable[..., object]  # called with the invocation's arguments; may be async
TokenSource = str | Callable[[], str] | None
_TRANSIENT = (OSError, WebSocketException, TimeoutError, SignalRError)


class HubConnection:
    """One SignalR hub over WebSocket, reconnecting forever until `stop`.

    Register handlers (`on`) and subscriptions (`subscribe`) first, then `run()` in a task.
    Subscriptions are invocations re-run after every connect, before the state turns
    LIVE: a hub keeps no subscriptions across connections. Handlers run in the reader, in
    arrival order; an async handler that blocks (a full queue) stops reading, which is
    TCP backpressure, and does not count against the server timeout.
    """

    def __init__(
        self,
        url: str,
        *,
        logger: logging.Logger,
        access_token: TokenSource = None,
        skip_negotiation: bool = True,
        backoff: Backoff | None = None,
        ping_interval: float = 15.0,
        server_timeout: float = 30.0,
        open_timeout: float = 10.0,
        invoke_timeout: float = 30.0,
        max_size: int | None = 16 * 2**20,
        reconnect_when_refused: bool = True,
        on_state: Callable[[HubState], None] | None = None,
        name: str = "hub",
    ) -> None:
        if ping_interval <= 0 or server_timeout <= 0 or open_timeout <= 0 or invoke_timeout <= 0:
            raise ValueError("intervals and timeouts must be > 0")
        self.url = url
        self.name = name
        self.log = logger
        self.skip_negotiation = skip_negotiation
        self.backoff = backoff if backoff is not None else Backoff()
        self.ping_interval = ping_interval
        self.server_timeout = server_timeout
        self.open_timeout = open_timeout
        self.invoke_timeout = invoke_timeout
        self.max_size = max_size
        self.reconnect_when_refused = reconnect_when_refused
        self._token = access_token
        self._on_state = on_state
        self.state = HubState.STOPPED
        self.connects = 0  # successful handshakes, for tests and logs
        self._handlers: dict[str, list[Handler]] = {}
        self._on_open: list[Callable[[], object]] = []
        self._subscriptions: list[tuple[str, tuple[Any, ...]]] = []
        self._ws: ClientConnection | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ids = itertools.count()
        self._unhandled: set[str] = set()
        self._stop = asyncio.Event()
        self._live = asyncio.Event()
        self._running = False
        self._last_sent = 0.0
        self._listening_since: float | None = None  # loop time the reader began to wait

    # -- registration

    def on(self, target: str, handler: Handler) -> None:
        """Call `handler(*arguments)` for each invocation of `target` (case-insensitive)."""
        self._handlers.setdefault(target.lower(), []).append(handler)

    def on_open(self, callback: Callable[[], object]) -> None:
        """Call `callback()` (may be async) after each handshake, before the subscriptions."""
        self._on_open.append(callback)

    def subscribe(self, target: str, *args: Any) -> None:
        """Invoke `target(*args)` after every connect; register before `run` (or `invoke` it
        too, to subscribe on the live connection as well)."""
        self._subscriptions.append((target, args))

    # -- calls

    async def invoke(self, target: str, *args: Any, timeout: float | None = None) -> Any:
        """Invoke a hub method and wait for its completion: its result, or HubError."""
        loop = asyncio.get_running_loop()
        invocation_id = str(next(self._ids))
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[invocation_id] = future
        try:
            await self._send(Invocation(target, list(args), invocation_id))
            async with asyncio.timeout(self.invoke_timeout if timeout is None else timeout):
                return await future
        finally:
            self._pending.pop(invocation_id, None)

    async def send(self, target: str, *args: Any) -> None:
        """Invoke a hub method without waiting: the server sends no completion, even on error."""
        await self._send(Invocation(target, list(args)))

    async def wait_live(self) -> None:
        """Until the connection is LIVE (handshake done, subscriptions sent)."""
        await self._live.wait()

    # -- lifecycle

    async def run(self) -> None:
        """Connect, and reconnect after every loss, until `stop`.

        Raises HubClosedError if the server closes without allowing a reconnect and
        `reconnect_when_refused` is off; then the caller decides (a bad token, say).
        """
        if self._running:
            raise RuntimeError(f"hub {self.name} is already running")
        self._running = True
        self._stop.clear()
        try:
            while not self._stop.is_set():
                self._set_state(HubState.CONNECTING)
                refused = False
                try:
                    close = await self._connect_once()
                except _TRANSIENT as exc:
                    if not self._stop.is_set():
                        self.log.warning(
                            "signalr connection failed hub=%s error=%s",
                            self.name, _describe(exc),
                        )
                else:
                    if close is not None:
                        refused = self._closed_by_server(close)
                if self._stop.is_set():
                    break
                if refused:
                    # Not allowed to reconnect now: wait the longest delays, still jittered.
                    self.backoff.attempt = max(self.backoff.attempt, 62)
                delay = self.backoff.next_delay()
                self._set_state(HubState.BACKING_OFF)
                self.log.info(
                    "signalr backing off hub=%s attempt=%d delay=%.3f",
                    self.name, self.backoff.attempt, delay,
                )
                await wait_event(self._stop, delay)
        finally:
            self._running = False
            self._set_state(HubState.STOPPED)

    async def stop(self) -> None:
        """End `run`: close the connection (a WebSocket close, no hub Close message)."""
        self._stop.set()
        ws = self._ws
        if ws is not None:
            await ws.close()

    # -- internals

    def _set_state(self, state: HubState) -> None:
        if state is self.state:
            return
        self.state = state
        if state is HubState.LIVE:
            self._live.set()
        else:
            self._live.clear()
        self.log.info("signalr state hub=%s state=%s", self.name, state.value)
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                self.log.exception("signalr state callback failed hub=%s", self.name)

    def _access_token(self) -> str | None:
        token = self._token
        return token() if callable(token) else token

    def _closed_by_server(self, close: Close) -> bool:
        """Log a server Close; True if it refused a reconnect."""
        if close.allow_reconnect:
            self.log.warning(
                "signalr closed by server hub=%s error=%s allow_reconnect=true",
                self.name, close.error,
            )
            return False
        if not self.reconnect_when_refused:
            raise HubClosedError(close.error or "closed by the server")
        self.log.error(
            "signalr closed by server hub=%s error=%s allow_reconnect=false", self.name, close.error
        )
        return True

    async def _connect_once(self) -> Close | None:
        """One connection, from negotiate to its end; the server's Close message, if any."""
        token = self._access_token()
        if self.skip_negotiation:
            url = websocket_url(self.url, access_token=token)
        else:
            url, token = await asyncio.to_thread(negotiate, self.url, token, self.open_timeout)
            url = websocket_url(url, access_token=token)
        self.log.info("signalr connecting hub=%s url=%s", self.name, redact(url))
        async with connect(
            url,
            open_timeout=self.open_timeout,
            ping_interval=None,  # the hub protocol's own pings and server timeout instead
            max_size=self.max_size,
            close_timeout=2.0,
        ) as ws:
            rest = await self._handshake(ws)
            if self._stop.is_set():
                return None
            loop = asyncio.get_running_loop()
            self._ws = ws
            self._last_sent = loop.time()
            self._listening_since = None
            self.connects += 1
            reader = asyncio.create_task(self._read(ws, rest), name=f"signalr-read-{self.name}")
            keepalive = asyncio.create_task(self._keepalive(), name=f"signalr-ping-{self.name}")
            try:
                try:
                    await self._opened()
                except HubConnectionLost:
                    # The reader ended first: report its reason (a Close, a socket error).
                    if reader.done() and not reader.cancelled():
                        return reader.result()
                    raise
                self.backoff.reset()
                self._set_state(HubState.LIVE)
                done, _ = await asyncio.wait(
                    {reader, keepalive}, return_when=asyncio.FIRST_COMPLETED
                )
                if reader in done:
                    return reader.result()
                keepalive.result()  # raises ServerTimeout
                return None
            finally:
                self._ws = None
                for task in (reader, keepalive):
                    task.cancel()
                await asyncio.gather(reader, keepalive, return_exceptions=True)
                self._fail_pending(HubConnectionLost(f"hub {self.name} connection closed"))

    async def _handshake(self, ws: ClientConnection) -> str:
        """Send the handshake and read its response; what followed it in the same frames."""
        await ws.send(handshake_request())
        buffer = ""
        async with asyncio.timeout(self.open_timeout):
            while RECORD_SEPARATOR not in buffer:
                buffer += _text(await ws.recv())
        first, _, rest = buffer.partition(RECORD_SEPARATOR)
        parse_handshake_response(first)
        return rest

    async def _opened(self) -> None:
        """After a handshake: the open callbacks, then every subscription (concurrently)."""
        for callback in self._on_open:
            result = callback()
            if inspect.isawaitable(result):
                await result
        if not self._subscriptions:
            return
        results = await asyncio.gather(
            *(self.invoke(target, *args) for target, args in self._subscriptions),
            return_exceptions=True,
        )
        for (target, args), result in zip(self._subscriptions, results, strict=True):
            if isinstance(result, HubError):
                # The hub refused this subscription (unknown contract, say): the others stand.
                self.log.error(
                    "signalr subscription refused hub=%s target=%s args=%r error=%s",
                    self.name, target, args, result,
                )
            elif isinstance(result, BaseException):
                raise result
        self.log.info(
            "signalr subscribed hub=%s subscriptions=%d", self.name, len(self._subscriptions)
        )

    async def _read(self, ws: ClientConnection, buffer: str) -> Close | None:
        """Dispatch records until the server's Close (returned) or the socket closes (raises)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                records, buffer = split_records(buffer)
                for record in records:
                    message = parse_message(record)
                    if isinstance(message, Close):
                        return message
                    await self._dispatch(message)
                self._listening_since = loop.time()
                frame = await ws.recv()
                self._listening_since = None
                buffer += _text(frame)
        finally:
            self._listening_since = None
            self._fail_pending(HubConnectionLost(f"hub {self.name} connection closed"))

    async def _dispatch(self, message: HubMessage) -> None:
        if isinstance(message, Invocation):
            await self._invoked(message)
        elif isinstance(message, Completion):
            future = self._pending.pop(message.invocation_id, None)
            if future is None or future.done():
                self.log.debug(
                    "signalr completion for no pending invocation hub=%s id=%s",
                    self.name, message.invocation_id,
                )
            elif message.error is not None:
                future.set_exception(HubError(message.error))
            else:
                future.set_result(message.result)
        elif isinstance(message, Other):
            self.log.debug("signalr ignored message hub=%s type=%d", self.name, message.type)
        # Ping: receiving it was the point.

    async def _invoked(self, message: Invocation) -> None:
        """Run the handlers of a server invocation; answer it if it carries an id."""
        handlers = self._handlers.get(message.target.lower())
        result: object = None
        error: str | None = None
        if not handlers:
            error = "Client didn't provide a result."
            if message.target not in self._unhandled:
                self._unhandled.add(message.target)
                self.log.warning(
                    "signalr no handler hub=%s target=%s", self.name, message.target
                )
        for handler in handlers or ():
            try:
                result = handler(*message.arguments)
                if inspect.isawaitable(result):
                    result = await result
            except Exception as exc:
                error = f"Error thrown invoking client method '{message.target}'."
                self.log.exception(
                    "signalr handler failed hub=%s target=%s error=%r",
                    self.name, message.target, exc,
                )
        if message.invocation_id is not None:
            reply = Completion(message.invocation_id, None if error else result, error)
            await self._send(reply)

    async def _keepalive(self) -> None:
        """Ping when we have been silent; raise ServerTimeout when the server has been."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            listening = self._listening_since
            if listening is not None and now - listening >= self.server_timeout:
                raise ServerTimeout(
                    f"hub {self.name}: nothing from the server for {self.server_timeout:g} s"
                )
            ping_due = self._last_sent + self.ping_interval
            if now >= ping_due:
                await self._send(Ping())
                continue
            dead_at = (listening if listening is not None else now) + self.server_timeout
            await asyncio.sleep(max(min(ping_due, dead_at) - now, 0.001))

    async def _send(self, message: HubMessage) -> None:
        ws = self._ws
        if ws is None:
            raise HubNotConnected(f"hub {self.name} is not connected")
        await ws.send(encode_message(message))
        self._last_sent = asyncio.get_running_loop().time()

    def _fail_pending(self, exc: Exception) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
                future.exception()  # retrieved: no "never retrieved" warning if abandoned
        self._pending.clear()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else repr(exc)


def _text(frame: str | bytes) -> str:
    return frame if isinstance(frame, str) else frame.decode("utf-8")
