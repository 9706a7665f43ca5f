"""One client connection: reads requests, answers them, and writes from a bounded queue.

The hub never awaits a client: it calls `enqueue`, which appends to this session's queue
(or ends the session if the queue is over its bounds) and wakes the session's own writer
task. So a client that stops reading delays nobody but itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from common import protocol
from common.aio import raise_if_cancelling
from common.auth import LEEWAY, Claims, TokenError, permits
from common.broker import Publication
from common.channels import Channel, parse_channel
from common.config import EdgeConfig
from common.errors import (
    AlreadySubscribed,
    BadRequest,
    CloseCode,
    Disconnect,
    HistoryUnavailable,
    InternalError,
    NotSubscribed,
    PermissionDenied,
    RequestError,
    TooManySubscriptions,
    Unauthorized,
    Unavailable,
)
from common.protocol import Codec, Frame
from edge.hub import Batch, Hub, Subscription, Wire
from edge.limits import TokenBucket
from edge.sendqueue import Outcome, Policy, SendQueue, coalesce, merge_json
from edge.stats import EdgeStats
from edge.tokens import KeysUnavailable, TokenVerifier
from edge.wire import RawWebSocket, encode_frame
from edge.wsprotocol import FAILED

_CLOSE_REASONS = {
    CloseCode.SHUTDOWN: "shutdown",
    CloseCode.SLOW_CONSUMER: "slow_consumer",
    CloseCode.INSUFFICIENT_STATE: "insufficient_state",
    CloseCode.NO_PONG: "no_pong",
    CloseCode.SERVER_ERROR: "server_error",
    CloseCode.CONNECT_TIMEOUT: "connect_timeout",
    CloseCode.TOKEN_EXPIRED: "token_expired",
    CloseCode.TOO_MANY_REQUESTS: "too_many_requests",
    CloseCode.BAD_REQUEST: "bad_request",
    CloseCode.UNAUTHORIZED: "unauthorized",
    CloseCode.FORBIDDEN: "forbidden",
    CloseCode.CONNECTION_LIMIT: "connection_limit",
}


CLOSE_TIMEOUT = 10.0  # s a close frame may wait for a full socket to drain
# A slow consumer is told to wait this long before reconnecting: coming back at once into
# the same burst would only overflow again.
SLOW_RETRY_AFTER = 1.0

# A client closed for too many requests is told to wait this long before reconnecting.
TOO_MANY_RETRY_AFTER = 5.0

# Closes fanout does not choose itself: uvicorn's shutdown (1012), and the WebSocket layer
# failing a connection for what a client sent (edge/wsprotocol.py): a frame over the size
# limit (1009), broken framing (1002, or 1007 for a close reason that is not UTF-8), a text
# frame that is not UTF-8 (3500).
_PEER_CLOSE_REASONS = {1012: "shutdown"}
_FAILED_REASONS = {1002: "protocol_error", 1007: "protocol_error", 1009: "message_too_big",
                   3500: "bad_request"}


class Session:
    def __init__(
        self,
        ws: WebSocket,
        hub: Hub,
        config: EdgeConfig,
        stats: EdgeStats,
        logger: logging.Logger,
        codec: Codec,
        client_id: str,
        verifier: TokenVerifier | None = None,
    ) -> None:
        self.ws = ws
        self.verifier = verifier  # None: authentication is off
        self.hub = hub
        self.config = config
        self.stats = stats
        self.log = logger
        self.codec = codec
        self.client_id = client_id
        self.subscriptions: set[str] = set()
        self._subscribing: dict[str, asyncio.Task[None]] = {}
        self.queue = SendQueue(
            # The stats' method, not one of ours: a callback to the session from its own
            # queue would make each session a reference cycle, freed only by the garbage
            # collector's rare full collections (edge/server.py tunes them), not at once.
            codec, config.queue_max_messages, config.queue_max_bytes, stats.count_queue
        )
        # FANOUT_OVERFLOW, or the namespaces file's (config.overflow has both, resolved);
        # a namespace missing there (a config built by hand) has its file's.
        self._policies = {ns: Policy(p) for ns, p in config.overflow.items()}
        self._wakeup = asyncio.Event()
        # Set by `fail`: a plain future, not a task waiting on an event (one task less per
        # connection; `asyncio.wait` takes futures).
        self._done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._close: Disconnect | None = None
        # The session's cleanup has begun: whatever finishes after it (a request or a
        # subscribe whose cancel a library swallowed) must leave nothing behind.
        self._ending = False
        self._ping_sent: float | None = None  # monotonic time of the unanswered ping
        self._peer_close_code = 1005
        self._failed = False  # the WebSocket layer failed the connection (edge/wsprotocol.py)
        self._loop = asyncio.get_running_loop()
        self.claims: Claims | None = None  # None: authentication is off
        self._expiry: asyncio.TimerHandle | None = None
        # Direct writes to the transport (edge/wire.py), when the server allows them...
        self._raw = RawWebSocket.attach(ws.scope) if config.direct_write else None
        # ... and past the queue when it is empty, unless the writer is to wait and gather.
        self._direct = self._raw if not config.write_delay else None
        # This turn's batches (and replies) for a client writing directly, held back during
        # the hub's flush and written together when it ends (`flush_out`).
        self._out: list[Batch | Frame] | None = None

    # --- called by the hub (synchronous, never blocks) -----------------------------------

    def enqueue(self, frame: Frame) -> None:
        """Queue a control frame: a reply, a ping, a resync, a recovered message. Each is
        bounded by something else (a request, the ping interval, the recovery limit)."""
        if self._close is not None or self._ending:
            return
        raw = self._direct
        if raw is not None and not self.queue.busy:
            out = self._out
            if out is not None:  # during the hub's flush, after this turn's batches
                out.append(frame)
                return
            if raw.ready:
                self._write_now(raw, encode_frame(frame), 1, 1, len(frame))
                return
        self.queue.push_control(frame)
        self._wakeup.set()

    def enqueue_all(self, frames: list[Frame]) -> None:
        """Queue control messages that belong together, in order: a subscribe's reply and
        the publications it replays. They are packed into as few frames as the frame bounds
        allow, as live traffic is: a client that keeps up gets them in one socket write (a
        replay of 10,000 messages in about 20 frames, not 10,000); otherwise the writer
        coalesces them from the queue. Nothing sent after this (a live message) can pass
        them."""
        if self._close is not None or self._ending or not frames:
            return
        raw = self._direct
        if raw is not None and not self.queue.busy:
            out = self._out
            if out is not None:  # during the hub's flush, after this turn's batches
                out.extend(frames)
                return
            if raw.ready:
                self._write_now(raw, *self._pack(frames, [1] * len(frames)))
                return
        push = self.queue.push_control
        for frame in frames:
            push(frame)
        self._wakeup.set()

    def _write_now(self, raw: RawWebSocket, data: bytes, frames: int, messages: int,
                   payload: int) -> None:
        """Straight to the socket: nothing is queued before it and the transport takes it
        without blocking, so no writer task needs to wake up."""
        raw.write(data)
        stats = self.stats
        stats.writes += 1
        stats.frames_sent += frames
        stats.frames_direct += frames
        stats.messages_sent += messages
        stats.bytes_sent += payload

    def resynced(self, sub: Subscription, frame: Frame) -> None:
        self.queue.forget(sub.channel)
        sub.cancel()
        sub.held = None
        self.enqueue(frame)

    def deliver(self, sub: Subscription, batch: Batch, start: int) -> None:
        """Queue live publications under the subscription's policy and rate limit. A client
        that keeps up gets the batch's shared chunks (one queue entry per batch); only a
        rate-limited client, or a conflating one that is behind, is served message by
        message."""
        if self._close is not None:
            return
        out = self._out
        if out is not None and start == 0 and sub.max_rate is None and not self.queue.busy:
            # Another channel of this turn for a client already taking it directly (the
            # hot path of a watchlist): the transport's state cannot have changed since.
            out.append(batch)
            return
        raw = self._direct
        if (start == 0 and raw is not None and sub.max_rate is None and not self.queue.busy
                and raw.ready):
            deferred = self.hub.deferred
            if deferred is not None:  # the hub's flush: written when every channel is done
                self._out = [batch]
                deferred.append(self)
            else:  # keeping up: the batch's finished frames, shared with every such client
                self._write_now(raw, *batch.wire(self.codec))
            return
        if sub.max_rate is not None:
            for pub in batch.pubs[start:]:
                self._throttle(sub, pub)
            return
        if sub.policy is Policy.CONFLATE and len(self.queue):
            for pub in batch.pubs[start:]:
                self._push(sub, pub)
                if self._close is not None:
                    return
            return
        for part, count, first, last in batch.chunks(self.codec, start):
            outcome = self.queue.push_chunk(sub.channel, first, last, part, count, sub.policy)
            if outcome is Outcome.DROPPED:
                self.stats.count_dropped(sub.namespace, count)
            elif outcome is Outcome.OVERFLOW:
                self.fail(Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer", SLOW_RETRY_AFTER))
                return
        self._wakeup.set()

    def flush_out(self) -> None:
        """The end of the hub's flush: what this client got this turn, in one write. One
        batch (one channel) goes as the batch's shared frames; several channels' batches
        (and replies queued meanwhile) are coalesced into as few frames as the frame bounds
        allow, so a watchlist client gets one frame per turn, not one per channel."""
        out, self._out = self._out, None
        raw = self._direct
        if not out or raw is None or raw.closed:
            return
        if len(out) == 1 and isinstance(out[0], Batch):
            self._write_now(raw, *out[0].wire(self.codec))
        else:
            self._write_now(raw, *self._combine(out))

    def _combine(self, items: list[Batch | Frame]) -> Wire:
        """Batches and control frames, in order, as finished frames within the bounds."""
        codec = self.codec
        parts: list[Frame] = []
        counts: list[int] = []
        for item in items:
            if isinstance(item, Batch):
                for part, n, _, _ in item.chunks(codec):
                    parts.append(part)
                    counts.append(n)
            else:
                parts.append(item)
                counts.append(1)
        return self._pack(parts, counts)

    def _pack(self, parts: list[Frame], counts: list[int]) -> Wire:
        """Parts (messages, or chunks of `counts` messages), in order, as finished frames of
        at most `max_frame_messages` messages and `max_frame_bytes` each (a part larger than
        that goes alone)."""
        codec = self.codec
        messages = sum(counts)
        max_messages = self.config.max_frame_messages
        max_bytes = self.config.max_frame_bytes
        if messages <= max_messages and sum(map(len, parts)) + len(parts) <= max_bytes:
            frame = coalesce(parts, codec, messages)  # the usual case: one frame
            return Wire(encode_frame(frame), 1, messages, len(frame))
        frames: list[bytes] = []
        payload = 0
        group: list[Frame] = []
        count = size = 0
        for part, n in zip(parts, counts, strict=True):
            if group and (size + len(part) > max_bytes or count + n > max_messages):
                frame = coalesce(group, codec, count)
                frames.append(encode_frame(frame))
                payload += len(frame)
                group, count, size = [], 0, 0
            group.append(part)
            count += n
            size += len(part) + 1
        frame = coalesce(group, codec, count)
        frames.append(encode_frame(frame))
        payload += len(frame)
        return Wire(b"".join(frames), len(frames), messages, payload)

    def _push(self, sub: Subscription, pub: Publication) -> None:
        outcome = self.queue.push(
            pub.channel, pub.offset, pub.key, pub.data, pub.frame(self.codec), sub.policy,
            sub.merge, pub.deleted,
        )
        if outcome is Outcome.QUEUED:
            pass
        elif outcome is Outcome.CONFLATED:
            self.stats.count_conflated(sub.namespace)
        elif outcome is Outcome.DROPPED:
            self.stats.count_dropped(sub.namespace)
        else:
            self.fail(Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer", SLOW_RETRY_AFTER))
            return
        self._wakeup.set()

    def _throttle(self, sub: Subscription, pub: Publication) -> None:
        """At most `max_rate` frames per second for the channel; in between, the latest value
        per key is held (partial updates merged), and all held keys go out together in
        offset order, so offsets stay increasing."""
        now = self._loop.time()
        if sub.held is None and now >= sub.next_at:
            sub.next_at = now + 1.0 / (sub.max_rate or 1.0)
            self._push(sub, pub)
            return
        held = sub.held if sub.held is not None else {}
        sub.held = held
        old = held.pop(pub.key, None)
        if old is not None:
            self.stats.count_conflated(sub.namespace)
            if sub.merge and not pub.deleted:  # this client's own merged value
                pub = Publication(
                    pub.channel, pub.epoch, pub.offset, pub.key, merge_json(old.data, pub.data)
                )
        held[pub.key] = pub
        if sub.timer is None:
            sub.timer = self._loop.call_at(sub.next_at, self._release, sub)

    def _release(self, sub: Subscription) -> None:
        sub.timer = None
        held, sub.held = sub.held or {}, None
        sub.next_at = self._loop.time() + 1.0 / (sub.max_rate or 1.0)
        for pub in sorted(held.values(), key=lambda p: p.offset):
            self._push(sub, pub)
            if self._close is not None:
                return

    def fail(self, exc: Disconnect) -> None:
        """End the session with `exc`'s close code (from any task)."""
        if self._close is None:
            self._close = exc
            if not self._done.done():
                self._done.set_result(None)

    # --- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        self.stats.connections += 1
        self.stats.connections_total += 1
        tasks: list[asyncio.Future[Any]] = [
            asyncio.create_task(self._read_loop()),
            asyncio.create_task(self._write_loop()),
            self._done,
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, Disconnect):
                    self.fail(exc)
                elif exc is not None and not isinstance(exc, WebSocketDisconnect | OSError):
                    self.log.error("session error client=%s error=%r", self.client_id, exc,
                                   exc_info=exc)
                    self.fail(Disconnect(CloseCode.SERVER_ERROR, "internal error"))
        finally:
            self._ending = True
            if self._expiry is not None:
                self._expiry.cancel()
            tasks += self._subscribing.values()
            for task in tasks:
                task.cancel()
            # Waited for, not awaited one by one: re-raised here, each task's exception would
            # take this frame into its traceback, a reference cycle (frame, tasks, exception)
            # holding the whole session until a full garbage collection (rare: edge/server.py).
            with contextlib.suppress(asyncio.CancelledError):  # this task's own: clean up
                await asyncio.wait(tasks)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: run() has dealt with the first ones above
            for name in self.subscriptions:
                self.hub.unsubscribe(self, name)
            self.subscriptions.clear()
            self.queue.clear()
            self.stats.connections -= 1
            close = self._close
            if close is not None:
                reason = _CLOSE_REASONS.get(close.code, "other")
            else:
                reasons = _FAILED_REASONS if self._failed else _PEER_CLOSE_REASONS
                reason = reasons.get(self._peer_close_code, "client_closed")
            self.stats.count_disconnect(reason)
            if close is not None:
                self.log.info("disconnect client=%s code=%d reason=%s",
                              self.client_id, close.code, close.reason)
                # The close frame waits behind whatever the socket still holds: a slow client
                # that drains in time gets it (and knows to reconnect and recover); a frozen
                # one is cut off when the wait ends.
                # (Not `wait_for`: in Python 3.11 it runs the close as a task of its own whose
                # exception, a WebSocketDisconnect, makes a reference cycle with it.)
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT):
                        await self.ws.close(int(close.code), close.reason)
            if close is not None:
                # Its traceback, and what it was raised from (a decoder's error), hold the
                # tasks' frames and so the session: dropped for the same reason.
                close.__traceback__ = close.__context__ = close.__cause__ = None

    async def _receive(self) -> Frame | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            self._peer_close_code = int(message.get("code") or 1005)
            self._failed = bool(message.get(FAILED))
            return None
        self.stats.frames_received += 1
        text = message.get("text")
        if text is not None:
            return str(text)
        data: bytes = message.get("bytes") or b""
        return data

    async def _read_loop(self) -> None:
        try:
            first = await asyncio.wait_for(self._receive(), self.config.connect_timeout)
        except TimeoutError:
            raise Disconnect(CloseCode.CONNECT_TIMEOUT, "no connect in time") from None
        if first is None:
            return
        obj = protocol.decode_frame(first, self.codec)
        try:
            command = protocol.parse_command(obj)
        except RequestError as exc:
            raise Disconnect(CloseCode.BAD_REQUEST, f"bad connect: {exc.message}") from None
        if not isinstance(command, protocol.Connect):
            raise Disconnect(CloseCode.BAD_REQUEST, "first message must be connect")
        await self._authenticate(command.token)
        self.enqueue(protocol.encode(protocol.connected(
            command.id, self.client_id, self.config.ping_interval, self.config.pong_timeout,
            self._expires_in(),
        ), self.codec))
        pinger = asyncio.create_task(self._ping_loop())
        bucket = TokenBucket(self.config.request_rate, self.config.request_burst,
                             self._loop.time())
        try:
            while True:
                frame = await self._receive()
                if frame is None:
                    return
                if not bucket.take(self._loop.time()):
                    raise Disconnect(CloseCode.TOO_MANY_REQUESTS, "too many requests",
                                     TOO_MANY_RETRY_AFTER)
                await self._handle(protocol.decode_frame(frame, self.codec))
                raise_if_cancelling()  # a history read's Redis call may swallow a cancel
        finally:
            pinger.cancel()

    async def _authenticate(self, token: str | None) -> None:
        """Without keys configured every client may read every channel (development); with
        them, the token's claims decide, and the connection ends when it expires. An edge
        that has no keys yet (JWKS not loaded) asks the client to come back: 3004."""
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
        self._set_claims(claims)

    def _set_claims(self, claims: Claims) -> None:
        self.claims = claims
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = self._loop.call_later(
            max(self._expires_in() or 0.0, 0.0), self.fail,
            Disconnect(CloseCode.TOKEN_EXPIRED, "token expired"),
        )

    def _expires_in(self) -> float | None:
        """Seconds this connection may live on its token (as long as verify_token accepts
        it); None without authentication."""
        if self.claims is None:
            return None
        return max(self.claims.expires + LEEWAY - time.time(), 0.0)

    async def _refresh(self, command: protocol.Refresh) -> dict[str, Any]:
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
        for name in sorted(self.subscriptions | set(self._subscribing)):
            if not permits(claims, parse_channel(name)):
                raise PermissionDenied(f"the new token does not allow {name}: unsubscribe first")
        self._set_claims(claims)
        return protocol.refreshed(command.id, self._expires_in() or 0.0)

    def _check_allowed(self, channel: Channel) -> None:
        if self.claims is not None and not permits(self.claims, channel):
            raise PermissionDenied(f"not allowed to read {channel.name}")

    def _policy(self, channel: Channel) -> Policy:
        policy = self._policies.get(channel.namespace)
        if policy is None:
            policy = self._policies[channel.namespace] = Policy(channel.spec.overflow)
        return policy

    async def _handle(self, obj: dict[str, Any]) -> None:
        try:
            command = protocol.parse_command(obj)
            if isinstance(command, protocol.Subscribe):
                # Subscribes wait on Redis: run them beside the reader, so that a pong or
                # another request is not stuck behind them.
                self._start_subscribe(command)
                return
            reply = await self._execute(command)
        except RequestError as exc:
            self._reply_error(obj, exc)
            return
        if reply is not None:
            self.enqueue(protocol.encode(reply, self.codec))

    def _reply_error(self, obj: dict[str, Any], exc: RequestError) -> None:
        self.stats.count_error(exc.code)
        self.enqueue(protocol.encode(protocol.error(protocol.request_id_of(obj), exc), self.codec))

    def _start_subscribe(self, command: protocol.Subscribe) -> None:
        name = command.channel.name
        self._check_allowed(command.channel)
        if name in self.subscriptions or name in self._subscribing:
            raise AlreadySubscribed(f"already subscribed to {name}")
        if len(self.subscriptions) + len(self._subscribing) >= self.config.max_subscriptions:
            raise TooManySubscriptions(
                f"at most {self.config.max_subscriptions} subscriptions per connection"
            )
        task = asyncio.create_task(self._subscribe(command))
        self._subscribing[name] = task
        task.add_done_callback(self._subscribed)

    def _subscribed(self, task: asyncio.Task[None]) -> None:
        """A subscribe task ended: forget it (not another one for the same channel that
        may have started since)."""
        for name, running in self._subscribing.items():
            if running is task:
                del self._subscribing[name]
                return

    async def _execute(self, command: protocol.Command) -> dict[str, Any] | None:
        if isinstance(command, protocol.Unsubscribe):
            name = command.channel.name
            pending = self._subscribing.get(name)
            if pending is not None:
                await asyncio.wait([pending])  # unsubscribe what that subscribe gives
            if name not in self.subscriptions:
                raise NotSubscribed(f"not subscribed to {name}")
            self.subscriptions.discard(name)
            self.hub.unsubscribe(self, name)
            self.queue.forget(name)
            return protocol.unsubscribed(command.id, name)
        if isinstance(command, protocol.History):
            await self._history(command)
            return None
        if isinstance(command, protocol.Pong):
            if self._ping_sent is not None:
                self.stats.client_lag.observe(time.monotonic() - self._ping_sent)
                self._ping_sent = None
            return None
        if isinstance(command, protocol.Ping):
            return protocol.pong(command.id)
        if isinstance(command, protocol.Refresh):
            return await self._refresh(command)
        if isinstance(command, protocol.Connect):
            raise BadRequest("already connected")
        raise InternalError("unhandled command")

    async def _subscribe(self, command: protocol.Subscribe) -> None:
        name = command.channel.name
        spec = command.channel.spec
        recover, snapshot = command.recover, command.snapshot
        if recover is not None and not spec.recovery:
            # The namespace does not recover: the client starts over from the snapshot
            # (recovered: false), as after a position that is no longer retained.
            recover, snapshot = None, True
        try:
            _, joined = await self.hub.subscribe(
                self, command.channel, recover, snapshot, command.id,
                policy=self._policy(command.channel), max_rate=spec.rate(command.max_rate),
            )
        except RequestError as exc:
            self.stats.count_error(exc.code)
            self.enqueue(protocol.encode(protocol.error(command.id, exc), self.codec))
            return
        if self._ending:  # the session ended meanwhile (and its cleanup ran without this)
            self.hub.unsubscribe(self, name)
            return
        # No await between the hub's merge and these enqueues: the reply and the replay go
        # out before any live message that follows them.
        self.subscriptions.add(name)
        codec = self.codec
        self.enqueue_all([protocol.encode(joined.reply, codec),
                          *(pub.frame(codec) for pub in joined.replay)])

    async def _history(self, command: protocol.History) -> None:
        """Backfill after a gap notice: the publications first..last, if still retained."""
        if command.last - command.first + 1 > self.config.recovery_limit:
            raise BadRequest(f"at most {self.config.recovery_limit} publications per request")
        name = command.channel.name
        self._check_allowed(command.channel)
        try:
            result = await self.hub.read_history(
                name, command.first - 1, "0", command.epoch, command.last
            )
        except Exception as exc:
            self.log.warning("history failed channel=%s error=%r", name, exc)
            raise Unavailable("history temporarily unavailable, retry") from None
        if not result.recoverable or result.epoch != command.epoch or result.top < command.last:
            raise HistoryUnavailable(f"{name} {command.first}..{command.last} is not retained")
        frames = [p.frame(self.codec) for p in result.entries]
        self.enqueue(protocol.history_reply(command.id, name, result.epoch, frames, self.codec))

    async def _write_loop(self) -> None:
        """Drain the queue, everything pending coalesced into one frame (up to the frame
        bounds): a frame costs about the same CPU whatever it holds, so a client that
        falls behind costs less per message, not more. Writes wait while the socket's
        write buffer is over its high-water mark; meanwhile the queue's policy applies.

        With direct writes, parts are popped only when the transport takes them at once,
        so an empty queue means nothing is in flight and the hub may write past the queue
        (`deliver`) without reordering anything."""
        queue = self.queue
        stats = self.stats
        codec = self.codec
        max_messages = self.config.max_frame_messages
        max_bytes = self.config.max_frame_bytes
        delay = self.config.write_delay
        raw = self._raw
        send = self.ws.send
        kind = "text" if codec is Codec.JSON else "bytes"
        while True:
            await self._wakeup.wait()
            if delay:
                await asyncio.sleep(delay)
            self._wakeup.clear()
            while queue.busy:
                if raw is not None:
                    if not raw.ready:
                        if raw.closed:
                            raise WebSocketDisconnect(1006)
                        await raw.wait_writable()
                        continue
                    parts, count = queue.pop_parts(max_messages, max_bytes)
                    if not parts:
                        break
                    frame = coalesce(parts, codec, count)
                    raw.write(encode_frame(frame))
                else:
                    parts, count = queue.pop_parts(max_messages, max_bytes)
                    if not parts:
                        break
                    frame = coalesce(parts, codec, count)
                    await send({"type": "websocket.send", kind: frame})
                stats.writes += 1
                stats.frames_sent += 1
                stats.messages_sent += count
                stats.bytes_sent += len(frame)

    async def _ping_loop(self) -> None:
        """Application pings (browsers cannot see protocol pings). The first one comes at a
        random point of the interval so that clients that reconnected together do not
        ping in lockstep."""
        interval = self.config.ping_interval
        timeout = self.config.pong_timeout
        await asyncio.sleep(random.uniform(interval / 2, interval))
        ping = protocol.encode(protocol.ping(), self.codec)
        while True:
            self._ping_sent = time.monotonic()
            self.enqueue(ping)
            await asyncio.sleep(timeout)
            if self._ping_sent is not None:
                self.fail(Disconnect(CloseCode.NO_PONG, "no pong"))
                return
            await asyncio.sleep(max(interval - timeout, 0.0))
