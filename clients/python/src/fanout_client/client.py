"""An asyncio client for fanout's edges, with the browser client's (fanout.js) semantics.

The package fanout-client (clients/python); it depends on websockets and msgpack only.

Why a client library and not raw frames: the protocol leaves correctness to the client.
It must remember a position (epoch, offset) per channel, resubscribe with ``recover``
after every reconnect, tell a duplicate from a skip from a real gap depending on the
channel's ``delivery``, answer server pings and notice a silent server. This module does
all of that once; users iterate over events::

    async with FanoutClient(["ws://a/ws", "ws://b/ws"]) as client:
        async for event in client.subscribe("quotes.MNQ", snapshot=True):
            ...  # Publication, Resync or Gap, in order

docs/protocol.md is the reference for every rule applied here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import itertools
import json
import logging
import random
import re
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from fanout_client.backoff import Backoff
from fanout_client.errors import (
    ConnectionLost,
    FanoutClosed,
    TokenUnavailable,
    closed_error,
    request_error,
)

__all__ = [
    "ClientState",
    "Counters",
    "Event",
    "FanoutClient",
    "Gap",
    "Position",
    "Publication",
    "Resync",
    "Subscription",
    "advised_delay",
    "retry_after",
    "subscribe_retry_delay",
]

# The WebSocket subprotocols of docs/protocol.md.
SUBPROTOCOL_JSON = "fanout.json"
SUBPROTOCOL_MSGPACK = "fanout.msgpack"

# Codes the client uses for connections it ends itself (as fanout.js: never sent by edges).
CLOSE_CONNECT_FAILED = 4000
CLOSE_NO_PING = 4001
CLOSE_CLIENT = 1000

HEARTBEAT_GRACE = 1.0  # s on top of ping_interval + pong_timeout before a server is dead
CONNECT_TIMEOUT = 10.0  # s for the TCP/WebSocket handshake and for the connected reply
RETRYABLE_CODES = frozenset({"unavailable", "internal"})


_ADVISED = re.compile(r"(?:^|\s)retry_after_ms=(\d{1,7})(?:\s|$)")


def retry_after(value: str | None) -> float:
    """An HTTP Retry-After in seconds (the delay form; a date or garbage counts as none),
    at most an hour."""
    if value is None or not value.strip().isdigit():
        return 0.0
    return min(float(value.strip()), 3600.0)


SUBSCRIBE_RETRY = (1.0, 5.0)  # s: an unavailable subscribe without advice retries in this


def subscribe_retry_delay(reply: dict[str, Any],
                          rand: Callable[[float, float], float] = random.uniform) -> float:
    """When to resend a subscribe that got a retryable error: the server's advice
    (`retry_after_ms`, the edge under load) plus up to half again, so that the clients it
    deferred together come back spread out; without advice 1-5 s. At most a minute."""
    advised = reply.get("retry_after_ms")
    if isinstance(advised, int) and not isinstance(advised, bool) and advised > 0:
        seconds = min(advised / 1000, 60.0)
        return seconds + rand(0.0, seconds / 2)
    return rand(*SUBSCRIBE_RETRY)


def advised_delay(reason: str) -> float:
    """The reconnect delay (s) a server advises in its close reason, or 0."""
    m = _ADVISED.search(reason or "")
    return int(m.group(1)) / 1000 if m else 0.0


class ClientState:
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


# --- events ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    """Where a client is in a channel: the last offset it saw, in which epoch."""

    offset: int
    epoch: str


@dataclass(frozen=True, slots=True)
class Publication:
    """One message of a channel; ``deleted`` means: remove ``key`` from your state."""

    channel: str
    offset: int
    data: Any
    key: str = ""
    deleted: bool = False


@dataclass(frozen=True, slots=True)
class Resync:
    """Replace your state for the channel with ``snapshot`` and go on from epoch/offset.

    Delivered when continuity was lost (recovery failed, or the edge sent ``resync``), and
    for the first snapshot of a subscription asked with ``snapshot=True``."""

    channel: str
    epoch: str
    offset: int
    snapshot: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Publications ``from_``..``to`` were dropped for this slow client (drop delivery);
    ``client.history()`` can backfill them while they are retained."""

    channel: str
    from_: int
    to: int


Event = Publication | Resync | Gap


@dataclass
class Counters:
    """What happened to continuity since the client was made (for metrics and tests)."""

    recovered: int = 0  # recovering subscribes answered recovered: true
    resynced: int = 0  # recovery failed or the edge sent resync: state replaced
    gaps: int = 0  # gap notices applied
    reconnects: int = 0  # connection attempts after the first
    duplicates: int = 0  # pubs at or below the position, dropped
    messages: int = 0  # publications delivered


# --- subscriptions -----------------------------------------------------------------------


class Subscription:
    """One channel's events, as an async iterator over a bounded queue.

    A full queue makes the client stop reading the socket: the edge then applies the
    channel's delivery policy (conflate, drop with gap notices, or close 3001 and
    recover), which is what it is designed for; a consumer stalled for longer than the
    heartbeat window gets its connection recycled and recovered."""

    def __init__(
        self, client: FanoutClient, channel: str, snapshot: bool, max_rate: float | None,
        maxsize: int,
    ) -> None:
        self.client = client
        self.channel = channel
        self.snapshot = snapshot
        self.max_rate = max_rate
        self.delivery: str | None = None  # from the last subscribe reply
        self.position: Position | None = None
        self.phase = "idle"  # idle | pending | live | refilling
        self._maxsize = maxsize
        self._items: deque[Event] = deque()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._end: Callable[[], BaseException] | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        while not self._items:
            if self._end is not None:
                raise self._end()
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._writable.set()
        return item

    def qsize(self) -> int:
        return len(self._items)

    async def unsubscribe(self) -> None:
        await self.client.unsubscribe(self.channel)

    async def _put(self, event: Event) -> None:
        while len(self._items) >= self._maxsize and self._end is None:
            self._writable.clear()
            await self._writable.wait()
        if self._end is not None:
            return
        self._items.append(event)
        self._readable.set()

    def _finish(self, end: Callable[[], BaseException]) -> None:
        """End the iterator once what is queued has been read."""
        if self._end is None:
            self._end = end
        self._readable.set()
        self._writable.set()


@dataclass
class _Pending:
    kind: str  # subscribe | unsubscribe | history | ping | refresh
    channel: str | None
    recover: Position | None
    future: asyncio.Future[dict[str, Any]] | None
    sub: Subscription | None = None


# --- the client ----------------------------------------------------------------------------


class FanoutClient:
    """Keeps one connection to one of ``urls`` open, and every subscription continuous."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        name: str | None = None,
        binary: bool = False,
        backoff: Backoff | None = None,
        logger: logging.Logger | None = None,
        queue_size: int = 10_000,
        rand: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.urls: list[str] = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("FanoutClient: empty URL list")
        self.token = token
        self.name = name
        self.binary = binary
        self.backoff = backoff if backoff is not None else Backoff()
        self.log = logger if logger is not None else logging.getLogger("fanout.client")
        self.queue_size = queue_size
        self.counters = Counters()
        self.url: str | None = None  # of the current (or last) connection
        self.session: dict[str, Any] | None = None  # the connected reply in use
        self._rand = rand
        self._state = ClientState.CLOSED
        self._subs: dict[str, Subscription] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._url_index = 0
        self._ws: ClientConnection | None = None
        self._runner: asyncio.Task[None] | None = None
        self._opened = asyncio.Event()  # set while open, or when stopped
        self._fatal: FanoutClosed | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # connection number: stale retries check it

    # --- lifecycle -----------------------------------------------------------------------

    @property
    def state(self) -> str:
        """connecting | open | reconnecting | closed."""
        return self._state

    async def __aenter__(self) -> FanoutClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        """Start the connection loop and wait until a connection is open.

        Transient failures are retried with backoff for as long as it takes (wrap the call
        in a timeout to bound it); a 3500-3999 close raises FanoutClosed."""
        if self._runner is None or self._runner.done():
            self._fatal = None
            self._opened.clear()
            self._set_state(ClientState.CONNECTING)
            self._runner = asyncio.create_task(self._run(), name="fanout-client")
        await self._opened.wait()
        if self._fatal is not None:
            raise self._fatal
        if self._state != ClientState.OPEN and self._runner.done():
            raise closed_error(CLOSE_CLIENT, "client closed")

    async def close(self) -> None:
        """Close for good; iterators end after what they hold. Positions are kept."""
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        for task in list(self._tasks):
            task.cancel()
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(CLOSE_CLIENT, "client closed"), CONNECT_TIMEOUT)
        self._fail_pending()
        self._set_state(ClientState.CLOSED)
        self._opened.set()
        for sub in self._subs.values():
            sub._finish(StopAsyncIteration)

    # --- API -------------------------------------------------------------------------------

    def subscribe(
        self, channel: str, snapshot: bool = False, max_rate: float | None = None
    ) -> Subscription:
        """Subscribe (now if open, else on the next connection); iterate the result."""
        if not isinstance(channel, str) or not channel:
            raise ValueError("channel must be a non-empty string")
        old = self._subs.get(channel)
        if old is not None and old._end is None:
            raise ValueError(f"already subscribed to {channel}")
        if max_rate is not None and not 0 < max_rate <= 1000:
            raise ValueError("max_rate must be above 0 and at most 1000")
        sub = Subscription(self, channel, snapshot, max_rate, self.queue_size)
        if old is not None:  # ended by close(): recover from where it stopped
            sub.position = old.position
        self._subs[channel] = sub
        if self._state == ClientState.OPEN:
            self._spawn(self._send_subscribe(sub))
        return sub

    async def unsubscribe(self, channel: str) -> None:
        """Stop a subscription; its iterator ends after what it holds."""
        sub = self._subs.pop(channel, None)
        if sub is None:
            return
        sub._finish(StopAsyncIteration)
        if self._state == ClientState.OPEN and sub.phase != "idle":
            with contextlib.suppress(Exception):
                await self._send({"type": "unsubscribe", "id": self._register(
                    _Pending("unsubscribe", channel, None, None))[0], "channel": channel})

    def positions(self) -> dict[str, Position]:
        """Each subscribed channel's position (the last offset handed out, in which epoch)."""
        return {ch: s.position for ch, s in self._subs.items() if s.position is not None}

    async def history(
        self, channel: str, from_: int, to: int, *, epoch: str | None = None,
        timeout: float = 10.0,
    ) -> list[Publication]:
        """Backfill ``from_``..``to`` (a gap's range) in the subscription's epoch.

        Raises the RequestFailed subclass of the server's code (HistoryUnavailable: gone,
        do not retry); ConnectionLost if the connection is lost meanwhile."""
        if epoch is None:
            sub = self._subs.get(channel)
            if sub is None or sub.position is None:
                raise ValueError(f"no epoch known for {channel}: pass epoch=")
            epoch = sub.position.epoch
        async with asyncio.timeout(timeout):
            await self._wait_open()
            rid, fut = self._register(_Pending("history", channel, None, self._future()))
            await self._send({"type": "history", "id": rid, "channel": channel,
                              "epoch": epoch, "from": from_, "to": to})
            reply = await fut
        if reply.get("type") == "error":
            raise request_error(str(reply.get("code")), str(reply.get("message")),
                                request="history", channel=channel)
        return [_publication(p) for p in reply.get("publications") or []]

    # --- the connection loop -------------------------------------------------------------

    async def _run(self) -> None:
        first = True
        advised = 0.0
        try:
            while True:
                if not first:
                    self.counters.reconnects += 1
                    self._set_state(ClientState.RECONNECTING)
                    delay = self.backoff.next_delay()
                    if advised:  # at least what the server advised, plus up to half again
                        delay = max(delay, advised + self._rand(0.0, advised / 2))
                    self.log.info("reconnect_wait delay=%.3f attempt=%d", delay,
                                  self.backoff.attempt)
                    await asyncio.sleep(delay)
                first = False
                url = self.urls[self._url_index % len(self.urls)]
                self._url_index += 1
                code, reason = await self._session(url)
                advised = advised_delay(reason)
                if code is not None and 3500 <= code <= 3999:
                    self._stop_fatal(code, reason)
                    return
        finally:
            self._fail_pending()

    async def _session(self, url: str) -> tuple[int | None, str]:
        """One connection, from the handshake to its end: returns its close code/reason."""
        self.url = url
        self._generation += 1
        ws: ClientConnection | None = None
        refresher: asyncio.Task[None] | None = None
        try:
            ws = await ws_connect(
                url,
                subprotocols=[SUBPROTOCOL_MSGPACK if self.binary else SUBPROTOCOL_JSON],  # type: ignore[list-item]
                ping_interval=None,  # heartbeats are application messages
                max_size=None,
                open_timeout=CONNECT_TIMEOUT,
            )
            self._ws = ws
            deadline = await self._handshake(ws)
            self._set_state(ClientState.OPEN)
            self.backoff.reset()
            self._opened.set()
            for sub in list(self._subs.values()):
                sub.phase = "idle"
                await self._send_subscribe(sub)
            expires_in = (self.session or {}).get("expires_in")
            if callable(self.token) and isinstance(expires_in, int | float):
                refresher = asyncio.create_task(self._refresh_loop(float(expires_in)))
            await self._read(ws, deadline)
            return None, ""  # not reached: _read returns by raising
        except ConnectionClosed as exc:
            code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
            if exc.rcvd is None and exc.sent is not None:
                code, reason = exc.sent.code, exc.sent.reason
            self.log.warning("connection_closed url=%s code=%s reason=%r", url, code, reason)
            return code, reason
        except TimeoutError:
            self.log.warning("connection_dead url=%s", url)
            return CLOSE_NO_PING, "no ping"
        except InvalidStatus as exc:  # refused before the upgrade (docs/protocol.md)
            response = exc.response
            reason = f"HTTP {response.status_code}"
            after = retry_after(response.headers.get("Retry-After"))
            if after:  # waited for as a close reason's advice is
                reason += f" retry_after_ms={round(after * 1000)}"
            self.log.warning("connect_refused url=%s status=%d retry_after=%s", url,
                             response.status_code, after)
            return CLOSE_CONNECT_FAILED, reason
        except (OSError, InvalidHandshake, InvalidURI, ValueError, TokenUnavailable) as exc:
            self.log.warning("connect_failed url=%s error=%r", url, exc)
            return CLOSE_CONNECT_FAILED, str(exc)
        finally:
            if refresher is not None:
                refresher.cancel()
            self._ws = None
            self.session = None
            self._fail_pending()
            for sub in self._subs.values():
                sub.phase = "idle"
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(CLOSE_NO_PING, "client reconnecting"), 1.0)

    async def _refresh_loop(self, expires_in: float) -> None:
        """Send a fresh token before the connection's runs out (a minute before, or half
        way for short ones), so that it is not closed with 3006 and reconnected. A failed
        refresh is retried; if none succeeds in time, the 3006 reconnect is the fallback."""
        loop = asyncio.get_running_loop()

        def due(expires_in: float) -> tuple[float, float]:
            """(when the token ends, how long until refreshing it), loop time."""
            return loop.time() + expires_in, max(expires_in - 60.0, expires_in / 2)

        end, delay = due(expires_in)
        while True:
            await asyncio.sleep(delay)
            try:
                token = await self._token()
                rid, fut = self._register(_Pending("refresh", None, None, self._future()))
                await self._send({"type": "refresh", "id": rid, "token": token})
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    reply = await fut
            except Exception as exc:  # any failure (the token function too): retry
                reply = {"type": "error", "code": "client", "message": repr(exc)}
            if reply.get("type") == "refreshed" and isinstance(
                reply.get("expires_in"), int | float
            ):
                end, delay = due(float(reply["expires_in"]))
                self.log.info("token_refreshed expires_in=%.1f", float(reply["expires_in"]))
                continue
            self.log.warning("token_refresh_failed code=%s message=%r", reply.get("code"),
                             reply.get("message"))
            delay = min(5.0, max((end - loop.time()) / 2, 0.1))

    async def _token(self) -> str | None:
        """The token for this connection: a function is called at every connect, so a
        reconnect (after a 3006 "token expired" close, say) carries a fresh one."""
        token = self.token
        if not callable(token):
            return token  # as given: the edge judges it
        value = token()
        return await value if inspect.isawaitable(value) else value

    async def _handshake(self, ws: ClientConnection) -> float:
        """Send connect, wait for connected; return the heartbeat deadline (loop time)."""
        try:
            token = await self._token()
        except Exception as exc:  # the application's function: any failure is a failed connect
            raise TokenUnavailable(f"token function failed: {exc!r}") from exc
        rid = next(self._ids)
        await self._send({"type": "connect", "id": rid, "token": token, "name": self.name})
        async with asyncio.timeout(CONNECT_TIMEOUT):
            while True:
                for msg in self._decode(await ws.recv()):
                    if msg.get("type") == "connected":
                        self.session = msg
                        self.log.info("connected url=%s client=%s", self.url, msg.get("client"))
                        return self._deadline()
                    if msg.get("type") == "ping":
                        await self._send({"type": "pong"})

    def _deadline(self) -> float:
        s = self.session or {}
        window = float(s.get("ping_interval", 25.0)) + float(s.get("pong_timeout", 10.0))
        return asyncio.get_running_loop().time() + window + HEARTBEAT_GRACE

    async def _read(self, ws: ClientConnection, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    raw = await ws.recv()
            except TimeoutError:
                self.log.warning("heartbeat_missed url=%s", self.url)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(CLOSE_NO_PING, "no ping"), 1.0)
                raise
            for msg in self._decode(raw):
                if msg.get("type") == "ping":
                    deadline = self._deadline()
                await self._on_message(msg)
            # A consumer that held the reader past the deadline is not the server's fault:
            # give frames already buffered (a ping among them) a moment to be read.
            deadline = max(deadline, loop.time() + 0.05)

    # --- incoming messages -----------------------------------------------------------------

    def _decode(self, raw: str | bytes) -> list[dict[str, Any]]:
        obj = msgpack.unpackb(raw, raw=False) if isinstance(raw, bytes) and self.binary \
            else json.loads(raw)
        items = obj if isinstance(obj, list) else [obj]
        return [m for m in items if isinstance(m, dict)]

    async def _on_message(self, msg: dict[str, Any]) -> None:
        kind = msg.get("type")
        if kind == "pub":
            await self._on_pub(msg)
        elif kind == "ping":
            await self._send({"type": "pong"})
        elif kind == "gap":
            await self._on_gap(msg)
        elif kind == "resync":
            sub = self._subs.get(str(msg.get("channel")))
            if sub is not None and sub.phase == "live":
                await self._resync(sub, msg)
        elif kind in ("subscribed", "unsubscribed", "history", "error", "pong", "refreshed"):
            rid = msg.get("id")
            pending = self._pending.pop(rid, None) if isinstance(rid, int) else None
            if pending is None:
                if kind == "error":
                    self.log.warning("server_error code=%s message=%r",
                                     msg.get("code"), msg.get("message"))
                return
            if pending.kind == "subscribe" and pending.sub is not None:
                await self._on_subscribe_reply(pending, msg)
            elif pending.future is not None and not pending.future.done():
                pending.future.set_result(msg)

    async def _on_subscribe_reply(self, pending: _Pending, msg: dict[str, Any]) -> None:
        sub = pending.sub
        assert sub is not None
        if self._subs.get(sub.channel) is not sub:
            return  # unsubscribed meanwhile
        if msg.get("type") == "error":
            code, text = str(msg.get("code")), str(msg.get("message"))
            if code in RETRYABLE_CODES:
                sub.phase = "idle"
                delay = subscribe_retry_delay(msg, self._rand)
                self.log.warning("subscribe_retry channel=%s code=%s delay=%.2f",
                                 sub.channel, code, delay)
                self._spawn(self._retry_subscribe(sub, self._generation, delay))
            elif code == "already_subscribed":
                sub.phase = "live"
            else:
                self.log.error("subscribe_failed channel=%s code=%s", sub.channel, code)
                self._subs.pop(sub.channel, None)
                sub._finish(lambda: request_error(code, text, request="subscribe",
                                                  channel=sub.channel))
            return
        sub.phase = "live"
        sub.delivery = str(msg.get("delivery", "all"))
        epoch, offset = str(msg["epoch"]), int(msg["offset"])
        recover = pending.recover
        if msg.get("recovered") and recover is not None:
            self.counters.recovered += 1
            self.log.info("recovered channel=%s offset=%d replay_to=%d",
                          sub.channel, recover.offset, offset)
            return  # keep the position: the replay follows
        sub.position = Position(offset, epoch)
        if recover is not None:
            self.counters.resynced += 1
            self.log.warning("not_recovered channel=%s from=%d epoch=%s now=%d epoch=%s",
                             sub.channel, recover.offset, recover.epoch, offset, epoch)
            await sub._put(Resync(sub.channel, epoch, offset, msg.get("snapshot")))
        elif "snapshot" in msg:
            await sub._put(Resync(sub.channel, epoch, offset, msg.get("snapshot")))

    async def _on_pub(self, msg: dict[str, Any]) -> None:
        sub = self._subs.get(str(msg.get("channel")))
        if sub is None or sub.phase != "live" or sub.position is None:
            return  # unsubscribed, or a recovery in flight covers it
        offset = int(msg["offset"])
        pos = sub.position.offset
        if offset <= pos:
            self.counters.duplicates += 1
            return
        skips_allowed = sub.delivery == "conflate" or sub.max_rate is not None
        if offset > pos + 1 and not skips_allowed:
            # On "all" (and "drop" without a gap notice) a skip is a real gap.
            self.log.warning("real_gap channel=%s position=%d offset=%d delivery=%s",
                             sub.channel, pos, offset, sub.delivery)
            await self._refill(sub)
            return
        sub.position = Position(offset, sub.position.epoch)
        self.counters.messages += 1
        await sub._put(_publication(msg))

    async def _on_gap(self, msg: dict[str, Any]) -> None:
        sub = self._subs.get(str(msg.get("channel")))
        if sub is None or sub.phase != "live" or sub.position is None:
            return
        first, last = int(msg["from"]), int(msg["to"])
        if last <= sub.position.offset:
            return
        self.counters.gaps += 1
        self.log.info("gap channel=%s from=%d to=%d", sub.channel, first, last)
        sub.position = Position(last, sub.position.epoch)
        await sub._put(Gap(sub.channel, first, last))

    async def _resync(self, sub: Subscription, msg: dict[str, Any]) -> None:
        self.counters.resynced += 1
        epoch, offset = str(msg["epoch"]), int(msg["offset"])
        self.log.warning("resync channel=%s epoch=%s offset=%d", sub.channel, epoch, offset)
        sub.position = Position(offset, epoch)
        await sub._put(Resync(sub.channel, epoch, offset, msg.get("snapshot")))

    # --- outgoing --------------------------------------------------------------------------

    async def _send(self, obj: dict[str, Any]) -> None:
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        if self.binary:
            await ws.send(msgpack.packb(obj, use_bin_type=True))
        else:
            await ws.send(json.dumps(obj, separators=(",", ":")))

    async def _send_subscribe(self, sub: Subscription) -> None:
        if (self._subs.get(sub.channel) is not sub or sub._end is not None
                or sub.phase not in ("idle", "refilling")):
            return  # replaced, ended by close() (until subscribed again), or already sent
        req: dict[str, Any] = {"type": "subscribe", "channel": sub.channel}
        if sub.position is not None:
            req["recover"] = {"offset": sub.position.offset, "epoch": sub.position.epoch}
        else:
            req["snapshot"] = sub.snapshot
        if sub.max_rate is not None:
            req["max_rate"] = sub.max_rate
        rid, _ = self._register(_Pending("subscribe", sub.channel, sub.position, None, sub))
        req["id"] = rid
        sub.phase = "pending"
        await self._send(req)

    async def _refill(self, sub: Subscription) -> None:
        """Unsubscribe, then subscribe with recover from the position: the replay fills
        the gap. Publications in between are ignored (phase refilling)."""
        sub.phase = "refilling"
        rid, fut = self._register(_Pending("unsubscribe", sub.channel, None, self._future()))
        await self._send({"type": "unsubscribe", "id": rid, "channel": sub.channel})

        async def resubscribe() -> None:
            with contextlib.suppress(ConnectionError):
                await fut
                if sub.phase == "refilling":
                    await self._send_subscribe(sub)

        self._spawn(resubscribe())

    async def _retry_subscribe(self, sub: Subscription, generation: int,
                               delay: float) -> None:
        await asyncio.sleep(delay)
        if generation == self._generation and self._state == ClientState.OPEN:
            await self._send_subscribe(sub)

    # --- helpers -----------------------------------------------------------------------------

    def _register(self, pending: _Pending) -> tuple[int, asyncio.Future[dict[str, Any]]]:
        rid = next(self._ids)
        self._pending[rid] = pending
        fut = pending.future if pending.future is not None else self._future()
        return rid, fut

    def _future(self) -> asyncio.Future[dict[str, Any]]:
        return asyncio.get_running_loop().create_future()

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.future is not None and not p.future.done():
                p.future.set_exception(ConnectionLost("connection lost"))

    async def _wait_open(self) -> None:
        while self._state != ClientState.OPEN:
            if self._fatal is not None:
                raise self._fatal
            if self._runner is None:
                raise ConnectionLost("client is closed")
            self._opened.clear()
            await self._opened.wait()

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, coro: Any) -> None:
        try:
            await coro
        except (ConnectionError, ConnectionClosed):
            pass  # the connection loop handles the loss
        except Exception:
            self.log.exception("client_task_failed")

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self.log.debug("state from=%s to=%s", self._state, state)
            self._state = state
            if state != ClientState.OPEN:
                self._opened.clear()

    def _stop_fatal(self, code: int, reason: str) -> None:
        self.log.error("closed_for_good code=%d reason=%r", code, reason)
        self._fatal = closed_error(code, reason)
        self._set_state(ClientState.CLOSED)
        self._opened.set()
        for sub in self._subs.values():
            sub._finish(functools.partial(closed_error, code, reason))


def _publication(msg: dict[str, Any]) -> Publication:
    return Publication(
        channel=str(msg["channel"]),
        offset=int(msg["offset"]),
        data=msg.get("data"),
        key=str(msg.get("key") or ""),
        deleted=bool(msg.get("deleted", False)),
    )
