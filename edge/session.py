"""One client connection: its request loop, composed of the roles around it.

* edge/writer.py: writing, straight to the socket or through the bounded send queue;
* edge/throttle.py: a subscription's `max_rate`;
* edge/heartbeat.py: pings, pong timeouts and the client's lag;
* edge/credentials.py: the token, its expiry and `refresh`.

The hub never awaits a client: it calls `deliver`, which writes or queues (or ends the
session if the queue is over its bounds). So a client that stops reading delays nobody
but itself. The session keeps each subscription's delivery rules (overflow policy,
conflation merge, rate limit) itself: the hub only orders and repairs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any

from starlette.types import Message, Receive
from starlette.websockets import WebSocket, WebSocketDisconnect

from common import protocol
from common.aio import raise_if_cancelling
from common.broker import Publication
from common.channels import Channel, SnapshotMode
from common.config import EdgeConfig
from common.errors import (
    AlreadySubscribed,
    BadRequest,
    CloseCode,
    Disconnect,
    HistoryUnavailable,
    InternalError,
    NotSubscribed,
    RequestError,
    TooManySubscriptions,
    Unavailable,
)
from common.protocol import Codec, Frame, Position
from edge.credentials import Credentials
from edge.heartbeat import Heartbeat
from edge.hub import Hub, Joined
from edge.limits import TokenBucket
from edge.pack import Batch
from edge.sendqueue import Outcome, Policy
from edge.stats import EdgeStats
from edge.tcpinfo import acked_bytes, connection_socket, limit_unsent
from edge.throttle import Offer, Throttle
from edge.tokens import TokenVerifier
from edge.writer import Writer
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


class Feed:
    """The session's side of one subscription: how the channel's messages reach this
    client (the hub's side, `edge.hub.Subscription`, is its position)."""

    __slots__ = ("merge", "namespace", "policy", "throttle")

    def __init__(self, namespace: str, policy: Policy, merge: bool,
                 max_rate: float | None) -> None:
        self.namespace = namespace  # for the per-namespace counters
        self.policy = policy  # what the client's queue does when it is full
        self.merge = merge  # messages are partial updates (conflation merges them)
        self.throttle = Throttle(max_rate, merge) if max_rate is not None else None

    @property
    def delivery(self) -> str:
        """The subscribe reply's `delivery`: what the client may miss (docs/protocol.md)."""
        if self.throttle is not None and self.policy is not Policy.DROP:
            return "conflate"
        if self.policy is Policy.DISCONNECT and self.throttle is None:
            return "all"
        return self.policy.value


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
        receive: Receive | None = None,
    ) -> None:
        self.ws = ws
        self.hub = hub
        self.config = config
        self.stats = stats
        self.log = logger
        self.codec = codec
        self.client_id = client_id
        self.subscriptions: dict[str, Feed] = {}
        self._subscribing: dict[str, asyncio.Task[None]] = {}
        # The server's ASGI receive, if given, past Starlette's `WebSocket.receive` (whose
        # checks are of no use past the accept): one coroutine frame less while the
        # connection idles.
        self._asgi_receive: Receive = receive or ws.receive
        self.writer = Writer(ws, codec, config, stats)
        self.queue = self.writer.queue
        self.credentials = Credentials(verifier, logger, client_id)
        self.heartbeat = Heartbeat(config.ping_interval, config.pong_timeout,
                                   max_lag=config.max_lag)
        # FANOUT_OVERFLOW, or the namespaces file's (config.overflow has both, resolved);
        # a namespace missing there (a config built by hand) has its file's.
        self._policies = {ns: Policy(p) for ns, p in config.overflow.items()}
        # A failed write ends the session (cleared by `writer.close` in the cleanup: the
        # writer must not hold the session after it ends).
        self.writer.on_error = self._write_failed
        # The connection's own task, which runs the request loop (`run`): `fail` from any
        # other task or callback cancels it while it reads (`_reading`); `_cancelled` tells
        # that cancel from one of the server's (a shutdown), which must propagate.
        self._task: asyncio.Task[Any] | None = None
        self._reading = False
        self._cancelled = False
        self._stopped = False  # the request loop is to end (`fail`, or a lost connection)
        self._close: Disconnect | None = None
        # The session's cleanup has begun: whatever finishes after it (a request or a
        # subscribe whose cancel a library swallowed) must leave nothing behind.
        self._ending = False
        self._peer_close_code = 1005
        self._failed = False  # the WebSocket layer failed the connection (edge/wsprotocol.py)
        self._loop = asyncio.get_running_loop()

    # --- called by the hub (synchronous, never blocks): edge.hub.Subscriber --------------

    def deliver(self, channel: str, batch: Batch, start: int) -> None:
        """Live publications under the subscription's policy and rate limit. A client that
        keeps up takes the batch's shared frames (directly, or one queue entry per chunk);
        only a rate-limited client, or a conflating one that is behind, is served message
        by message."""
        if self._close is not None:
            return
        feed = self.subscriptions.get(channel)
        if feed is None:  # not (or no longer) subscribed here: nothing to deliver to
            return
        if feed.throttle is not None:
            for pub in batch.pubs[start:]:
                self._throttle(feed, pub)
            return
        writer = self.writer
        if start == 0 and writer.take(batch):
            return
        queue = writer.queue
        if feed.policy is Policy.CONFLATE and (len(queue) or queue.lagging):
            for pub in batch.pubs[start:]:
                self._push(feed, pub)
                if self._close is not None:
                    return
            return
        for part, count, first, last in batch.chunks(
            self.codec, writer.max_bytes, writer.max_messages, start
        ):
            outcome = queue.push_chunk(channel, first, last, part, count, feed.policy)
            if outcome is Outcome.DROPPED:
                self.stats.count_dropped(feed.namespace, count)
            elif outcome is Outcome.OVERFLOW:
                self.fail(Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer", SLOW_RETRY_AFTER))
                return
        writer.wake()

    def end_turn(self) -> None:
        self.writer.end_turn()

    def resynced(self, channel: str, frame: Frame) -> None:
        self.queue.forget(channel)
        feed = self.subscriptions.get(channel)
        if feed is not None and feed.throttle is not None:
            feed.throttle.reset()
        self.enqueue(frame)

    def behind(self) -> None:
        """The client is `max_lag` behind and still reading (edge/heartbeat.py): a slow
        consumer, whose queue's policy applies as if it were full until its pong."""
        if self._close is None and not self.writer.lagging:
            self.writer.lag(True)
            self.stats.clients_behind += 1

    def fail(self, exc: Disconnect) -> None:
        """End the session with `exc`'s close code (from any task or callback)."""
        if self._close is None:
            self._close = exc
            self._stop()

    def _stop(self) -> None:
        """End the request loop: at its next turn if this is its own task, else now (its
        task is cancelled, and `run` tells that cancel from a server's)."""
        if self._stopped:
            return
        self._stopped = True
        task = self._task
        if self._reading and task is not None and task is not asyncio.current_task():
            self._cancelled = True
            task.cancel()

    def _write_failed(self, exc: BaseException) -> None:
        """The writer task ended with `exc` (edge/writer.py)."""
        if isinstance(exc, Disconnect):
            self.fail(exc)
        elif isinstance(exc, WebSocketDisconnect | OSError):
            self._stop()  # the connection is gone: nobody to send a close frame to
        else:
            self.log.error("session error client=%s error=%r", self.client_id, exc, exc_info=exc)
            self.fail(Disconnect(CloseCode.SERVER_ERROR, "internal error"))

    # --- writing -------------------------------------------------------------------------

    def enqueue(self, frame: Frame) -> None:
        """Send a control frame: a reply, a ping, a resync. Each is bounded by something
        else (a request, the ping interval, the recovery limit)."""
        if self._close is not None or self._ending:
            return
        self.writer.send(frame)

    def enqueue_all(self, frames: list[Frame]) -> None:
        """Send control messages that belong together, in order (see `Writer.send_all`)."""
        if self._close is not None or self._ending or not frames:
            return
        self.writer.send_all(frames)

    def _push(self, feed: Feed, pub: Publication) -> None:
        outcome = self.queue.push(
            pub.channel, pub.offset, pub.key, pub.data, pub.frame(self.codec), feed.policy,
            feed.merge, pub.deleted,
        )
        if outcome is Outcome.QUEUED:
            pass
        elif outcome is Outcome.CONFLATED:
            self.stats.count_conflated(feed.namespace)
        elif outcome is Outcome.DROPPED:
            self.stats.count_dropped(feed.namespace)
        else:
            self.fail(Disconnect(CloseCode.SLOW_CONSUMER, "slow consumer", SLOW_RETRY_AFTER))
            return
        self.writer.wake()

    def _throttle(self, feed: Feed, pub: Publication) -> None:
        throttle = feed.throttle
        assert throttle is not None
        offer = throttle.offer(pub, self._loop.time())
        if offer is Offer.SEND:
            self._push(feed, pub)
            return
        if offer is Offer.REPLACED:
            self.stats.count_conflated(feed.namespace)
        if throttle.timer is None:
            throttle.timer = self._loop.call_at(throttle.due, self._release, feed)

    def _release(self, feed: Feed) -> None:
        assert feed.throttle is not None
        for pub in feed.throttle.release(self._loop.time()):
            self._push(feed, pub)
            if self._close is not None:
                return

    # --- the connection's life -----------------------------------------------------------

    async def run(self) -> None:
        """The connection's life, in the connection's own task (uvicorn's, for the ASGI
        call): the request loop, then the cleanup. No other task per idle connection: the
        writer has one only while its queue is busy (edge/writer.py), the heartbeat is a
        loop timer (edge/heartbeat.py), a subscribe one while it waits on Redis."""
        self.stats.connections += 1
        self.stats.connections_total += 1
        self._task = task = asyncio.current_task()
        try:
            try:
                self._reading = True
                await self._read_loop()
            finally:
                self._reading = False
        except Disconnect as exc:
            self.fail(exc)
        except asyncio.CancelledError:
            # Ours (`fail`, `_stop`) is swallowed; a server's (shutdown) goes on after the
            # cleanup.
            if not self._uncancel(task):
                raise
        except (WebSocketDisconnect, OSError):
            pass
        except Exception as exc:
            self.log.error("session error client=%s error=%r", self.client_id, exc,
                           exc_info=exc)
            self.fail(Disconnect(CloseCode.SERVER_ERROR, "internal error"))
        finally:
            # A cancel of ours that a library swallowed (and that nothing raised) is taken
            # back too: the cleanup below must not be cancelled by it.
            self._uncancel(task)
            await self._cleanup()

    def _uncancel(self, task: asyncio.Task[Any] | None) -> bool:
        """Take back the cancel `_stop` sent, if it did: whether no other cancel is left."""
        if not self._cancelled or task is None:
            return False
        self._cancelled = False
        return task.uncancel() == 0

    async def _cleanup(self) -> None:
        self._ending = True
        self._stopped = True
        self.heartbeat.stop()
        self.credentials.close()
        tasks: list[asyncio.Task[Any]] = list(self._subscribing.values())
        writing = self.writer.close()
        if writing is not None:
            tasks.append(writing)
        for task in tasks:
            task.cancel()
        if tasks:
            # Waited for, not awaited one by one: re-raised here, each task's exception
            # would take this frame into its traceback, a reference cycle (frame, tasks,
            # exception) holding the whole session until a full garbage collection (rare:
            # edge/server.py).
            with contextlib.suppress(asyncio.CancelledError):  # this task's own: clean up
                await asyncio.wait(tasks)
            for task in tasks:
                if task.done() and not task.cancelled():
                    task.exception()  # retrieved: a subscribe's end is of no interest now
        for name, feed in self.subscriptions.items():
            if feed.throttle is not None:
                feed.throttle.reset()
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
            # Its traceback, and what it was raised from (a decoder's error), hold the
            # frames and so the session: dropped for the same reason.
            close.__traceback__ = close.__context__ = close.__cause__ = None
        self._task = None

    async def _receive(self) -> Frame | None:
        return self._frame_of(await self._asgi_receive())

    def _frame_of(self, message: Message) -> Frame | None:
        """A received ASGI message's frame, or None for the end of the connection."""
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

    async def _connect(self) -> bool:
        """The first message, `connect`: whether the session goes on. (A method of its
        own: its locals, the request and its token, end with it, not kept while idle.)"""
        # (`asyncio.timeout`, not `wait_for`: in Python 3.11 that runs the receive as a
        # task of its own.)
        try:
            async with asyncio.timeout(self.config.connect_timeout):
                first = await self._receive()
        except TimeoutError:
            raise Disconnect(CloseCode.CONNECT_TIMEOUT, "no connect in time") from None
        if first is None or self._stopped:
            return False
        obj = protocol.decode_frame(first, self.codec)
        try:
            command = protocol.parse_command(obj)
        except RequestError as exc:
            raise Disconnect(CloseCode.BAD_REQUEST, f"bad connect: {exc.message}") from None
        if not isinstance(command, protocol.Connect):
            raise Disconnect(CloseCode.BAD_REQUEST, "first message must be connect")
        await self.credentials.authenticate(command.token, self.fail)
        if self._stopped:
            return False
        self.enqueue(protocol.encode(protocol.connected(
            command.id, self.client_id, self.config.ping_interval, self.config.pong_timeout,
            self.credentials.expires_in(),
        ), self.codec))
        return True

    async def _read_loop(self) -> None:
        if not await self._connect():
            return
        sock = connection_socket(self.ws.scope)
        if sock is not None:
            limit_unsent(sock, self.config.socket_unsent_limit)
        # Stopped by the session's cleanup (`_cleanup`), which also lets its callbacks go.
        self.heartbeat.start(
            protocol.encode(protocol.ping(), self.codec), self.enqueue, self.fail,
            self.behind, None if sock is None else functools.partial(acked_bytes, sock),
        )
        bucket = TokenBucket(self.config.request_rate, self.config.request_burst,
                             self._loop.time())
        receive = self._asgi_receive
        while not self._stopped:  # `fail` from this task itself (a request) ends it here
            # (The server's receive, called here: no coroutine frame in between while the
            # connection idles.)
            frame = self._frame_of(await receive())
            if frame is None:
                return
            if not bucket.take(self._loop.time()):
                raise Disconnect(CloseCode.TOO_MANY_REQUESTS, "too many requests",
                                 TOO_MANY_RETRY_AFTER)
            await self._handle(protocol.decode_frame(frame, self.codec))
            frame = None  # not kept while the connection idles
            raise_if_cancelling()  # a history read's Redis call may swallow a cancel

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
        self.credentials.check_allowed(command.channel)
        if name in self.subscriptions or name in self._subscribing:
            raise AlreadySubscribed(f"already subscribed to {name}")
        if len(self.subscriptions) + len(self._subscribing) >= self.config.max_subscriptions:
            raise TooManySubscriptions(
                f"at most {self.config.max_subscriptions} subscriptions per connection"
            )
        recover, snapshot, feed = self._subscribe_args(command)
        now = self.hub.subscribe_now(self, command.channel, recover, snapshot)
        if now is not None:  # from memory: no task, no await (most of a reconnect storm)
            self._joined(command, feed, now[1])
            return
        task = asyncio.create_task(self._subscribe(command, recover, snapshot, feed))
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
            feed = self.subscriptions.pop(name, None)
            if feed is None:
                raise NotSubscribed(f"not subscribed to {name}")
            if feed.throttle is not None:
                feed.throttle.reset()
            self.hub.unsubscribe(self, name)
            self.queue.forget(name)
            return protocol.unsubscribed(command.id, name)
        if isinstance(command, protocol.History):
            await self._history(command)
            return None
        if isinstance(command, protocol.Pong):
            lag = self.heartbeat.pong()
            if lag is not None:
                self.stats.client_lag.observe(lag)
                if self.writer.lagging:  # it reached the ping: caught up
                    self.writer.lag(False)
            return None
        if isinstance(command, protocol.Ping):
            return protocol.pong(command.id)
        if isinstance(command, protocol.Refresh):
            return await self.credentials.refresh(
                command, [*self.subscriptions, *self._subscribing], self.fail
            )
        if isinstance(command, protocol.Connect):
            raise BadRequest("already connected")
        raise InternalError("unhandled command")

    def _subscribe_args(
        self, command: protocol.Subscribe
    ) -> tuple[Position | None, bool, Feed]:
        """The position to recover, whether to send the snapshot, and the feed."""
        channel = command.channel
        spec = channel.spec
        recover, snapshot = command.recover, command.snapshot
        if recover is not None and not spec.recovery:
            # The namespace does not recover: the client starts over from the snapshot
            # (recovered: false), as after a position that is no longer retained.
            recover, snapshot = None, True
        feed = Feed(channel.namespace, self._policy(channel),
                    channel.snapshot_mode is SnapshotMode.MERGE, spec.rate(command.max_rate))
        return recover, snapshot, feed

    async def _subscribe(self, command: protocol.Subscribe, recover: Position | None,
                         snapshot: bool, feed: Feed) -> None:
        name = command.channel.name
        try:
            _, joined = await self.hub.subscribe(self, command.channel, recover, snapshot)
        except RequestError as exc:
            self.stats.count_error(exc.code)
            self._reply([protocol.encode(protocol.error(command.id, exc), self.codec)])
            return
        if self._ending:  # the session ended meanwhile (and its cleanup ran without this)
            self.hub.unsubscribe(self, name)
            return
        self._joined(command, feed, joined)

    def _joined(self, command: protocol.Subscribe, feed: Feed, joined: Joined) -> None:
        """Send a subscribe's reply and replay. Called with no await since the hub's merge:
        they go out before any live message that follows them."""
        name = command.channel.name
        self.subscriptions[name] = feed
        self.writer.hold()  # the other replies of this turn (a burst) in the same write
        codec = self.codec
        reply = protocol.subscribed_frame(command.id, name, joined.epoch, joined.offset,
                                          joined.recovered, joined.snapshot, feed.delivery,
                                          codec)
        self._reply([reply, *(pub.frame(codec) for pub in joined.replay)])

    def _reply(self, frames: list[Frame]) -> None:
        self.enqueue_all(frames)

    async def _history(self, command: protocol.History) -> None:
        """Backfill after a gap notice: the publications first..last, if still retained."""
        if command.last - command.first + 1 > self.config.recovery_limit:
            raise BadRequest(f"at most {self.config.recovery_limit} publications per request")
        name = command.channel.name
        self.credentials.check_allowed(command.channel)
        try:
            result = await self.hub.client_history(
                name, command.first - 1, command.epoch, command.last
            )
        except Unavailable:
            raise
        except Exception as exc:
            self.log.warning("history failed channel=%s error=%r", name, exc)
            raise Unavailable("history temporarily unavailable, retry") from None
        if not result.recoverable or result.epoch != command.epoch or result.top < command.last:
            raise HistoryUnavailable(f"{name} {command.first}..{command.last} is not retained")
        frames = [p.frame(self.codec) for p in result.entries]
        self.enqueue(protocol.history_reply(command.id, name, result.epoch, frames, self.codec))
