"""Accepting connections many at a time.

Why the edge accepts its connections itself: libuv, uvloop's core, accepts one connection
per event-loop iteration since libuv 1.45 (libuv/libuv#3696: "don't accept() connections
in a loop"). On a busy edge one iteration takes milliseconds, so in a reconnect storm the
edge accepted about 500 connections a second while thousands waited in the kernel's accept
queue (measured, bench/reconnect.py at 10,000 clients: 5,000 queued connections per edge
took 14 s to drain; the median client's upgrade came 5.5-8 s after the abort, and its 20
subscribes 0.1 s after that). asyncio's own selector loop accepts up to its backlog per
readiness event; this does the same on any loop: the listening sockets are watched with
`add_reader`, each readiness accepts up to `batch` connections, and each one is handed to
the loop with `connect_accepted_socket` and served by uvicorn's protocol as before.

The batch bounds one iteration's accepting (and the handshakes that follow it in the next
iteration), so that live delivery and heartbeats keep their turn in a storm; the rest stay
in the accept queue for the next iteration. Out of descriptors (EMFILE and the like, which
a level-triggered listening socket would report again at once, spinning the loop), accepting
pauses for `ACCEPT_PAUSE` seconds, as asyncio's loop does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Sequence

ACCEPT_BATCH = 256  # connections accepted per readiness of a listening socket
ACCEPT_PAUSE = 1.0  # s without accepting after the process ran out of descriptors or memory

# accept() failures of the process, not of the connection: retrying at once would spin.
_RESOURCE_ERRORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def bind_listeners(host: str, port: int) -> list[socket.socket]:
    """Bound TCP sockets for `host`:`port`, one per address `host` resolves to (as
    asyncio's `create_server` binds them: SO_REUSEADDR, IPv6 sockets IPv6-only); not yet
    listening. An empty host means every address."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                               socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                              f"{address!r}: {exc.strerror}") from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class Acceptor:
    """Accepts connections on listening sockets, up to `batch` per readiness, and hands each
    to `loop.connect_accepted_socket` with a protocol from `protocol_factory`."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 protocol_factory: Callable[[], asyncio.BaseProtocol],
                 sockets: Sequence[socket.socket], logger: logging.Logger,
                 batch: int = ACCEPT_BATCH) -> None:
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.sockets = list(sockets)
        self.log = logger
        self.batch = batch
        self.accepted = 0
        self.paused = 0  # times accepting paused for want of descriptors or memory
        self._attaching: set[asyncio.Task[None]] = set()
        self._resume: asyncio.TimerHandle | None = None
        self._closed = False

    def listen(self, backlog: int) -> None:
        """Listen on every socket and start accepting."""
        for sock in self.sockets:
            sock.listen(backlog)
            sock.setblocking(False)
        self._watch()

    def _watch(self) -> None:
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._ready, sock)

    def _unwatch(self) -> None:
        for sock in self.sockets:
            if sock.fileno() != -1:
                self.loop.remove_reader(sock.fileno())

    def _ready(self, sock: socket.socket) -> None:
        for _ in range(self.batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty
            except ConnectionAbortedError:
                continue  # the peer gave up while queued
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRORS:
                    self.paused += 1
                    self.log.error("accepting paused event=accept_paused seconds=%s error=%s",
                                   ACCEPT_PAUSE, exc)
                    self._unwatch()
                    self._resume = self.loop.call_later(ACCEPT_PAUSE, self._resumed)
                    return
                self.log.warning("accept failed event=accept_failed error=%s", exc)
                return
            self.accepted += 1
            conn.setblocking(False)
            task = self.loop.create_task(self._attach(conn))
            self._attaching.add(task)
            task.add_done_callback(self._attaching.discard)

    def _resumed(self) -> None:
        self._resume = None
        if not self._closed:
            self._watch()

    async def _attach(self, conn: socket.socket) -> None:
        """The loop's transport for `conn`, with a protocol; the coroutine waits only for
        `connection_made`, so nothing is awaited here beyond the next turn."""
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, conn)
        except Exception as exc:  # e.g. the peer reset it before the loop took it
            self.log.debug("accepted connection lost event=attach_failed error=%r", exc)
            conn.close()

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        if self._closed:
            return
        self._closed = True
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        self._unwatch()
        for sock in self.sockets:
            sock.close()
