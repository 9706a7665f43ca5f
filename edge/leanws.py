"""A lean RFC 6455 server path for the edge's /ws: the handshake and the frames in our own
code, giving the app exactly the ASGI interface uvicorn's websockets-sansio protocol gives.

Why: a reconnect storm (10,000 clients back within seconds) is bound by the edge's CPU, and
uvicorn's path parses each handshake twice (h11 parses the request head, uvicorn serializes
it again for websockets' ServerProtocol, which parses it again and builds the 101 answer as
a ``Headers`` object), then runs every frame through websockets' generator-based parser and
uvicorn's event objects. Here `parse_upgrade` reads the head once (split on CRLF), the 101
answer is a few joined bytes, and `LeanWebSocket.data_received` parses every frame one read
holds in one pass over a buffer, with the C unmasking of websockets (`apply_mask`).

edge/handshake.py decides which requests take this path: a complete, valid upgrade head for
/ws in the connection's first bytes. Anything else (another path, a head split over reads,
an invalid or unusual request, extensions offered while compression is on) goes to uvicorn's
h11 and websockets path, so that every answer it gives stays as it is.

What edge/wsprotocol.py fixed in uvicorn's protocol holds here by construction: a failed
connection writes its close frame, half-closes and reads on (discarding) until the client's
EOF or ``close_timeout``, so the close frame is never lost to a TCP reset; a text message
that is not UTF-8 closes with 3500 and no traceback; the app's receive events wait in a
`LightQueue`, backpressure is a `LightEvent`, and nothing of the request (headers, scope
copy) is kept once the connection is accepted.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import unquote

from uvicorn.protocols.utils import ClientDisconnected

from edge.admission import Slot
from edge.wsprotocol import FAILED, INVALID_UTF8_REASON, LightEvent, LightQueue


def py_apply_mask(data: bytes | bytearray | memoryview, mask: bytes) -> bytes:
    """XOR `data` with the repeated 4-byte `mask` (RFC 6455 5.3), as one big integer."""
    n = len(data)
    if not n:
        return b""
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "little") ^ int.from_bytes(key, "little")).to_bytes(n, "little")


apply_mask: Callable[[Any, bytes], bytes] = py_apply_mask
# The C unmasking of websockets (a locked dependency); pure Python if it is missing.
with contextlib.suppress(ImportError):
    from websockets.speedups import apply_mask

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16 * 1024  # bytes: a longer request head goes to h11 (its own limit answers it)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# Close codes a peer may send (RFC 6455 7.4.1 and IANA's registry, as websockets checks).
_PEER_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                         1014))

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
# The whole head at once: the request line, then header lines with a token name and a value
# of visible characters, spaces and tabs (no obs-fold: a line may not start with a space).
_HEAD = re.compile(rb"GET (/[!-~]*) HTTP/1\.1\r\n((?:" + _TOKEN + rb":[\t -~\x80-\xff]*\r\n)*)")
_TOKEN_RE = re.compile(_TOKEN)
_KEY_RE = re.compile(rb"[A-Za-z0-9+/]{22}==")
# Headers whose second copy makes h11, uvicorn or websockets answer otherwise than one copy.
_SINGLE = frozenset((b"host", b"upgrade", b"connection", b"sec-websocket-key",
                     b"sec-websocket-version", b"content-length", b"transfer-encoding"))

Headers = list[tuple[bytes, bytes]]


class UpgradeRequest:
    """What the lean path needs of a valid upgrade request."""

    __slots__ = ("headers", "key", "query_string", "raw_path", "subprotocols")

    def __init__(self, raw_path: bytes, query_string: bytes, headers: Headers, key: bytes,
                 subprotocols: list[str]) -> None:
        self.raw_path = raw_path
        self.query_string = query_string
        self.headers = headers  # (lower-case name, value) pairs, as uvicorn gives them
        self.key = key  # Sec-WebSocket-Key
        self.subprotocols = subprotocols


def parse_upgrade(head: bytes, ws_path: str, compression: bool) -> UpgradeRequest | None:
    """The WebSocket upgrade request for `ws_path` in `head` (the request head without its
    final blank line), or None for anything the lean path must leave to uvicorn: another
    method, path or HTTP version, bad syntax, a request that is no valid WebSocket upgrade
    (uvicorn and websockets answer those), a body, or extensions offered while the edge
    compresses (websockets negotiates permessage-deflate)."""
    if len(head) > MAX_HEAD:
        return None
    m = _HEAD.fullmatch(head + b"\r\n")
    if m is None:
        return None
    target = m.group(1)
    raw_path, _, query = target.partition(b"?")
    if raw_path != ws_path.encode():
        return None
    headers: Headers = []
    seen: set[bytes] = set()
    key = upgrade = connection = version = None
    protocols: list[bytes] = []
    block = m.group(2)
    for line in block[:-2].split(b"\r\n") if block else ():
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.strip(b" \t")
        if name in _SINGLE:
            if name in seen:
                return None
            seen.add(name)
            if name == b"sec-websocket-key":
                key = value
            elif name == b"upgrade":
                upgrade = value
            elif name == b"connection":
                connection = value
            elif name == b"sec-websocket-version":
                version = value
            else:
                if name != b"host":
                    return None  # a body: not for this path
        elif name == b"sec-websocket-protocol":
            protocols.append(value)
        elif name == b"sec-websocket-extensions" and compression:
            return None
        headers.append((name, value))
    if (b"host" not in seen or version != b"13" or upgrade is None
            or upgrade.lower() != b"websocket" or connection is None
            or key is None or _KEY_RE.fullmatch(key) is None):
        return None
    if not any(t.strip(b" \t").lower() == b"upgrade" for t in connection.split(b",")):
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None  # pragma: no cover - the pattern allows 16 bytes only
    except binascii.Error:  # pragma: no cover - idem
        return None
    subprotocols: list[str] = []
    for value in protocols:
        for token in value.split(b","):
            token = token.strip(b" \t")
            if _TOKEN_RE.fullmatch(token) is None:
                return None  # websockets answers 400 for a malformed header
            subprotocols.append(token.decode("ascii"))
    return UpgradeRequest(raw_path, query, headers, key, subprotocols)


def accept_value(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def frame(opcode: int, payload: bytes) -> bytes:
    """A final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    if n < 0x10000:
        return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload
    return bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big") + payload


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; code 1005 (no code) has an empty payload."""
    if code == 1005:
        return frame(OP_CLOSE, b"")
    return frame(OP_CLOSE, code.to_bytes(2, "big") + reason.encode()[:123])


def http_response(status: int, phrase: str, headers: Iterable[tuple[bytes, bytes]],
                  body: bytes = b"") -> bytes:
    """An HTTP/1.1 answer, for refusals and answers before an upgrade."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode())]
    for name, value in headers:
        out += [name, b": ", value, b"\r\n"]
    out += [b"\r\n", body]
    return b"".join(out)


class ProtocolError(Exception):
    """What a client sent breaks RFC 6455: close with `code`."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameParser:
    """RFC 6455 frames from a client, as many as each chunk of data holds, in one pass.

    `feed` returns the complete messages and control frames as (opcode, payload) pairs: a
    text message's payload is its str (UTF-8 checked once the message is whole), a binary
    message's and a control frame's bytes; fragmented messages come out whole. It raises
    `ProtocolError` for anything RFC 6455 forbids; a message over `max_size` fails as soon
    as its header says so, before its payload is buffered."""

    __slots__ = ("_buf", "_op", "_parts", "_size", "max_size")

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buf: bytearray | None = None  # an incomplete frame's bytes
        self._op = 0  # the opcode of a fragmented message under way (0: none)
        self._parts: list[bytes] | None = None
        self._size = 0  # its size so far

    def feed(self, data: bytes) -> tuple[list[tuple[int, Any]], ProtocolError | None]:
        """The messages and control frames complete so far, and the error that ended the
        parse, if any (the frames before it still count)."""
        out: list[tuple[int, Any]] = []
        try:
            self._feed(data, out)
        except ProtocolError as exc:
            self._buf = None
            # Its traceback holds this frame, and through the callers' frames the
            # transport: a cycle that would keep a failed connection until a full collection.
            exc.__traceback__ = exc.__context__ = None
            return out, exc
        return out, None

    def _feed(self, data: bytes, out: list[tuple[int, Any]]) -> None:
        buf = self._buf
        view: bytes | bytearray
        if buf:
            buf += data
            view = buf
        else:
            view = data
        n = len(view)
        pos = 0
        max_size = self.max_size
        while n - pos >= 2:
            b0 = view[pos]
            b1 = view[pos + 1]
            if not b1 & 0x80:
                raise ProtocolError(1002, "incorrect masking")
            if b0 & 0x70:
                raise ProtocolError(1002, "reserved bits must be 0")
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            length = b1 & 0x7F
            head = 6
            if length == 126:
                head = 8
                if n - pos < 8:
                    break
                length = int.from_bytes(view[pos + 2:pos + 4], "big")
            elif length == 127:
                head = 14
                if n - pos < 14:
                    break
                length = int.from_bytes(view[pos + 2:pos + 10], "big")
                if length >> 63:
                    raise ProtocolError(1002, "invalid frame length")
            if opcode >= 8:
                if opcode > OP_PONG:
                    raise ProtocolError(1002, f"invalid opcode: {opcode}")
                if not fin:
                    raise ProtocolError(1002, "fragmented control frame")
                if length > 125:
                    raise ProtocolError(1002, "control frame too long")
            else:
                if opcode == OP_CONT:
                    if not self._op:
                        raise ProtocolError(1002, "unexpected continuation frame")
                elif opcode > OP_BINARY:
                    raise ProtocolError(1002, f"invalid opcode: {opcode}")
                elif self._op:
                    raise ProtocolError(1002, "expected a continuation frame")
                if self._size + length > max_size:
                    raise ProtocolError(
                        1009, f"message too big: over {max_size} bytes")
            end = pos + head + length
            if end > n:
                break
            mask = bytes(view[pos + head - 4:pos + head])
            payload = apply_mask(view[pos + head:end], mask) if length else b""
            pos = end
            if opcode >= 8:
                out.append((opcode, payload))
            elif opcode == OP_CONT:
                assert self._parts is not None
                self._parts.append(payload)
                if fin:
                    op, parts = self._op, self._parts
                    self._op, self._parts, self._size = 0, None, 0
                    out.append(_message(op, b"".join(parts)))
                else:
                    self._size += length
            elif fin:
                out.append(_message(opcode, payload))
            else:
                self._op, self._parts, self._size = opcode, [payload], length
        if pos == n:
            if buf:
                buf.clear()
        elif buf:
            del buf[:pos]
        else:
            self._buf = bytearray(memoryview(view)[pos:])


def _message(opcode: int, payload: bytes) -> tuple[int, Any]:
    if opcode == OP_TEXT:
        try:
            return OP_TEXT, payload.decode()
        except UnicodeDecodeError:
            raise ProtocolError(3500, INVALID_UTF8_REASON) from None
    return OP_BINARY, payload


def parse_close(payload: bytes) -> tuple[int, str]:
    """A client's close frame's code and reason (RFC 6455 5.5.1, 7.4)."""
    if not payload:
        return 1005, ""
    if len(payload) == 1:
        raise ProtocolError(1002, "close frame too short")
    code = int.from_bytes(payload[:2], "big")
    if code not in _PEER_CODES and not 3000 <= code < 5000:
        raise ProtocolError(1002, f"invalid status code {code}")
    try:
        return code, payload[2:].decode()
    except UnicodeDecodeError:
        raise ProtocolError(1007, "invalid close reason: not UTF-8") from None


class LeanServer:
    """What every lean connection of one uvicorn server shares (one object, not a field
    per connection)."""

    __slots__ = ("app", "app_state", "asgi_version", "close_timeout", "log", "max_size",
                 "root_path", "server_state", "uvicorn_log")

    def __init__(self, app: Callable[..., Awaitable[Any]], server_state: Any,
                 app_state: dict[str, Any], max_size: int, root_path: str,
                 asgi_version: str, log: logging.Logger, close_timeout: float = 10.0) -> None:
        self.app = app
        self.server_state = server_state  # uvicorn's: connections, tasks, default_headers
        self.app_state = app_state
        self.max_size = max_size
        self.root_path = root_path
        self.asgi_version = asgi_version
        self.log = log
        self.close_timeout = close_timeout
        # uvicorn's own lines ("WebSocket /ws" [accepted] / 403), on its logger, as before.
        self.uvicorn_log = logging.getLogger("uvicorn.error")


class LeanWebSocket(asyncio.Protocol):
    """One upgraded connection: the transport's protocol from the upgrade on, the ASGI
    ``receive``/``send`` of its app task (edge/app.py `Edge.connection`).

    `transport`, `writable`, `close_sent` and `disconnected` are what edge/wire.py
    `RawWebSocket` writes frames past ``send`` with."""

    __slots__ = ("_accept", "_app_closed", "_close_timer", "_ended", "_initial",
                 "_parser", "_slot", "client", "close_sent", "disconnected",
                 "handshake_complete", "loop", "queue", "read_paused", "scope", "server",
                 "transport", "writable")

    def __init__(self, server: LeanServer, transport: asyncio.Transport,
                 loop: asyncio.AbstractEventLoop, slot: Slot | None) -> None:
        self.server = server
        self.transport = transport
        self.loop = loop
        self._slot = slot
        self.client: tuple[str, int] | None = None
        self.queue: LightQueue[dict[str, Any]] = LightQueue()
        writable = LightEvent()
        writable.set()
        self.writable = writable
        self.handshake_complete = False
        self.close_sent = False
        self.disconnected = False
        self.read_paused = False
        self._app_closed = False  # the app sent websocket.close
        self._ended = False  # a disconnect event is queued
        self._accept: bytes | None = None
        self._initial: tuple[int, Headers, list[bytes]] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._parser: FrameParser | None = FrameParser(server.max_size)
        self.scope: dict[str, Any] | None = None

    # --- start: called by edge/handshake.py once the transport is ours ---------------------

    def start(self, request: UpgradeRequest, scheme: str, client: tuple[str, int] | None,
              local: tuple[str, int | None] | None, rest: bytes) -> None:
        """Serve an upgrade request: the app's task, and any bytes that came after the
        request head (frames a client sent before our 101)."""
        server = self.server
        server.server_state.connections.add(self)
        self.client = client
        self._accept = request.key
        raw_path = request.raw_path.decode("ascii")
        root = server.root_path
        scope: dict[str, Any] = {
            "type": "websocket",
            "asgi": {"version": server.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": scheme,
            "server": local,
            "client": client,
            "root_path": root,
            "path": root + (unquote(raw_path) if "%" in raw_path else raw_path),
            "raw_path": root.encode("ascii") + request.raw_path,
            "query_string": request.query_string,
            "headers": request.headers,
            "subprotocols": request.subprotocols,
            "state": server.app_state.copy(),
            "extensions": {"websocket.http.response": {}},
        }
        self.scope = scope
        self.queue.put_nowait({"type": "websocket.connect"})
        tasks = server.server_state.tasks
        task = self.loop.create_task(self._run(scope))
        task.add_done_callback(tasks.discard)
        tasks.add(task)
        if rest:
            self.data_received(rest)

    async def _run(self, scope: dict[str, Any]) -> None:
        server = self.server
        try:
            result = await server.app(scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            server.log.exception("Exception in ASGI application")
            if not self.handshake_complete:
                self._answer(500, [], b"Internal Server Error")
            elif not self.close_sent and not self.disconnected:
                self._close(1011, "")
        else:
            if not self.handshake_complete:
                server.log.error("ASGI callable returned without completing handshake.")
                self._answer(500, [], b"Internal Server Error")
            elif result is not None:
                server.log.error("ASGI callable should return None, but returned '%s'.",
                                 result)
        if self._close_timer is None:
            self.transport.close()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:  # failed or closed: read on until EOF, discarding (RFC 6455 7.1.7)
            return
        events, error = parser.feed(data)
        if events:
            self._handle(events)
        if error is not None and self._parser is not None:
            self._fail(error.code, error.reason)

    def _handle(self, events: list[tuple[int, Any]]) -> None:
        queue = self.queue
        for opcode, payload in events:
            if self._parser is None:
                return
            if opcode == OP_TEXT:
                if not self.close_sent:
                    queue.put_nowait({"type": "websocket.receive", "text": payload})
                    if not self.read_paused:
                        self.read_paused = True
                        self.transport.pause_reading()
            elif opcode == OP_BINARY:
                if not self.close_sent:
                    queue.put_nowait({"type": "websocket.receive", "bytes": payload})
                    if not self.read_paused:
                        self.read_paused = True
                        self.transport.pause_reading()
            elif opcode == OP_PING:
                if not self.close_sent and not self.transport.is_closing():
                    self.transport.write(frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                try:
                    code, reason = parse_close(payload)
                except ProtocolError as exc:
                    self._fail(exc.code, exc.reason)
                    return
                self._parser = None
                if self.close_sent:  # the client's answer to ours: the handshake is done
                    self._cancel_timer()
                    self.transport.close()
                    return
                self._queue_end(code, reason)
                self.close_sent = True
                self.transport.write(close_frame(code, reason))
                self.transport.close()
                return
            # OP_PONG: no pings of ours to match (the app pings in its own frames)

    def eof_received(self) -> bool | None:
        return None  # the transport closes itself; connection_lost follows

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disconnected = True
        self.close_sent = True
        self._queue_end(1006, "")
        self.server.server_state.connections.discard(self)
        self.writable.set()  # a paused transport that is lost never resumes
        self._cancel_timer()
        self._parser = None
        self._accept = None
        self.scope = None
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()
        if exc is None:
            self.transport.close()
        # asyncio's transport keeps a bound method of its own once lost (a cycle through
        # the socket and its buffers); uvloop's is a C object without that attribute.
        state = getattr(self.transport, "__dict__", None) or {}
        if state.get("_read_ready_cb") is not None:
            state["_read_ready_cb"] = None

    def shutdown(self) -> None:
        """uvicorn's server shutdown: 1012 to an open connection, as its own protocols."""
        if self.close_sent:
            self._cancel_timer()
            self.transport.close()
            return
        if self.handshake_complete and self._initial is None:
            self._queue_end(1012, "")
            self.close_sent = True
            self.transport.write(close_frame(1012))
        elif not self.handshake_complete:
            self._answer(500, [], b"Internal Server Error")
        self.transport.close()

    # --- ASGI ------------------------------------------------------------------------------

    async def receive(self) -> dict[str, Any]:
        queue = self.queue
        message = await queue.get()
        if self.read_paused and queue.empty():
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: Any) -> None:
        writable = self.writable
        if not writable.is_set():
            await writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        kind = message["type"]
        if self.handshake_complete and self._initial is None:
            if kind == "websocket.send":
                if self.close_sent:
                    if self._app_closed:
                        raise RuntimeError("Unexpected ASGI message 'websocket.send', "
                                           "after sending 'websocket.close'.")
                    raise ClientDisconnected()  # failed, or closed by the client
                data = message.get("bytes")
                if data is not None:
                    self.transport.write(frame(OP_BINARY, data))
                else:
                    text = message.get("text")
                    if text is not None:
                        self.transport.write(frame(OP_TEXT, text.encode()))
            elif kind == "websocket.close":
                if self._app_closed:
                    raise RuntimeError("Unexpected ASGI message 'websocket.close', "
                                       "after sending 'websocket.close'.")
                self._app_closed = True
                if not self.close_sent and not self.transport.is_closing():
                    self._close(message.get("code", 1000), message.get("reason") or "")
            else:
                raise RuntimeError("Expected ASGI message 'websocket.send' or "
                                   f"'websocket.close', but got '{kind}'.")
        elif not self.handshake_complete:
            if kind == "websocket.accept":
                self._send_accept(message)
            elif kind == "websocket.close":
                self._queue_end(1006, "")
                self._app_closed = True
                self._log_answer("403")
                self._answer(403, [], b"")
            elif kind == "websocket.http.response.start":
                status = message["status"]
                if not 100 <= status < 600:
                    raise RuntimeError(f"Invalid HTTP status code '{status}' in response.")
                self._initial = (status, list(message.get("headers", [])), [])
                self.handshake_complete = True
            else:
                raise RuntimeError("Expected ASGI message 'websocket.accept', "
                                   "'websocket.close' or 'websocket.http.response.start' "
                                   f"but got '{kind}'.")
        elif self._initial is not None and not self.close_sent:
            if kind != "websocket.http.response.body":
                raise RuntimeError("Expected ASGI message 'websocket.http.response.body' "
                                   f"but got '{kind}'.")
            self._initial[2].append(message.get("body", b""))
            if not message.get("more_body", False):
                status, headers, parts = self._initial
                self._queue_end(1006, "")
                self._answer(status, headers, b"".join(parts))
        else:
            raise RuntimeError(f"Unexpected ASGI message '{kind}', after sending "
                               "'websocket.close'.")

    def _send_accept(self, message: Any) -> None:
        key = self._accept
        assert key is not None
        out = [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nSec-WebSocket-Accept: ", accept_value(key), b"\r\n"]
        for name, value in self.server.server_state.default_headers:
            out += [name, b": ", value, b"\r\n"]
        for name, value in message.get("headers") or ():
            out += [name.lower(), b": ", value, b"\r\n"]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            out += [b"Sec-WebSocket-Protocol: ", subprotocol.encode(), b"\r\n"]
        out.append(b"\r\n")
        if not self.transport.is_closing():
            self.handshake_complete = True
            self.transport.write(b"".join(out))
            self._log_answer("[accepted]")
        self._accept = None
        # The scope's request headers are never read again (admission read them before
        # the upgrade): not kept for the connection's life.
        scope = self.scope
        if scope is not None:
            scope["headers"] = []
        self.scope = None

    def _log_answer(self, what: str) -> None:
        log = self.server.uvicorn_log
        scope = self.scope
        if scope is None or not log.isEnabledFor(logging.INFO):
            return
        path = scope["raw_path"].decode("latin-1")
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("ascii", "replace")
        client = f"{self.client[0]}:{self.client[1]}" if self.client else ""
        log.info('%s - "WebSocket %s" %s', client, path.replace('"', "%22"), what)

    # --- ending ----------------------------------------------------------------------------

    def _queue_end(self, code: int, reason: str, failed: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        event: dict[str, Any] = {"type": "websocket.disconnect", "code": code,
                                 "reason": reason}
        if failed:
            event[FAILED] = True
        self.queue.put_nowait(event)

    def _close(self, code: int, reason: str) -> None:
        """The server's close: the frame, then the client's answer or `close_timeout`."""
        self._queue_end(code, reason)
        self.close_sent = True
        self.transport.write(close_frame(code, reason))
        if self.read_paused:  # read on, to see the client's close frame
            self.read_paused = False
            self.transport.resume_reading()
        self._close_timer = self.loop.call_later(self.server.close_timeout,
                                                 self.transport.close)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection for what the client sent (RFC 6455 7.1.7): the close frame,
        a half-close, then discard what comes until the client's EOF or `close_timeout`,
        so that closing never resets the connection with the close frame unread."""
        self._parser = None
        if code == 3500:
            self.server.log.debug("text frame is not UTF-8 client=%s", self.client)
        else:
            self.server.log.debug("websocket failed code=%d reason=%s client=%s",
                                  code, reason, self.client)
        self._queue_end(code, reason, failed=True)
        if self.close_sent:
            return
        self.close_sent = True
        transport = self.transport
        transport.write(close_frame(code, reason))
        if transport.can_write_eof():
            transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        if self._close_timer is None:
            self._close_timer = self.loop.call_later(self.server.close_timeout,
                                                     transport.close)

    def _answer(self, status: int, headers: Headers, body: bytes) -> None:
        """An HTTP answer instead of the upgrade (403 for a close before accept, 500 for
        an app that failed first, or the app's own through websocket.http.response)."""
        if self.handshake_complete and self._initial is None:
            return
        self.handshake_complete = True
        self.close_sent = True
        names = {name.lower() for name, _ in headers}
        out = list(headers)
        if b"date" not in names:
            out.append((b"Date", email.utils.formatdate(usegmt=True).encode()))
        if b"connection" not in names:
            out.append((b"Connection", b"close"))
        if b"content-length" not in names:
            out.append((b"Content-Length", str(len(body)).encode()))
        if b"content-type" not in names:
            out.append((b"Content-Type", b"text/plain; charset=utf-8"))
        phrase = _PHRASES.get(status, "")
        self.transport.write(http_response(status, phrase, out, body))
        self.transport.close()

    def _cancel_timer(self) -> None:
        timer, self._close_timer = self._close_timer, None
        if timer is not None:
            timer.cancel()


def _phrases() -> dict[int, str]:
    from http import HTTPStatus
    return {int(s): s.phrase for s in HTTPStatus}


_PHRASES = _phrases()
