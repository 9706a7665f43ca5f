"""What the kernel knows about a client's TCP connection, for telling a slow client from
a dead one (edge/heartbeat.py) and for keeping a slow client's backlog out of the kernel.

* `limit_unsent`: ``TCP_NOTSENT_LOWAT``. Without it Linux lets a socket take megabytes that
  the peer has not asked for yet (the send buffer grows with the connection: 2.8 MB were
  accepted for a client with a 4 KiB receive buffer on this machine), so a client many
  seconds behind can have its whole backlog in the kernel, where no overflow policy can
  reach it. With it the socket takes what is in flight (the peer's window) plus at most the
  limit of unsent bytes; the rest stays in the transport's buffer, whose high-water mark
  pauses the writer, and then in the client's send queue, where conflation and drops apply.
  What is in flight is not limited: a fast client on a long path is not slowed down.
* `acked_bytes`: ``tcpi_bytes_acked`` of ``TCP_INFO`` (Linux ≥ 4.1), the bytes the peer's
  TCP has acknowledged. It grows while the client's application reads (a full receive
  window opens only when it does), and stops when the client reads nothing, is frozen, or
  its host or network is gone.

Elsewhere (another OS, a connection that is not TCP, Starlette's test client) both are
no-ops and the heartbeat falls back to the ping alone.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Mapping
from typing import Any

from edge.wire import RAW_SEND

TCP_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)
TCP_INFO: int | None = getattr(socket, "TCP_INFO", None)
# struct tcp_info (linux/tcp.h): 8 one-byte fields, 24 u32, two u64 pacing rates, then
# the u64 tcpi_bytes_acked.
_BYTES_ACKED = struct.Struct("=Q")
_BYTES_ACKED_AT = 8 + 24 * 4 + 2 * 8
_INFO_LEN = _BYTES_ACKED_AT + _BYTES_ACKED.size


def connection_socket(scope: Mapping[str, Any]) -> Any | None:
    """The TCP socket of a WebSocket connection served by uvicorn (asyncio's
    TransportSocket, which allows get/setsockopt), or None."""
    proto = getattr(scope.get(RAW_SEND), "__self__", None)
    transport = getattr(proto, "transport", None)
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None or getattr(sock, "type", None) != socket.SOCK_STREAM:
        return None
    if getattr(sock, "family", None) not in (socket.AF_INET, socket.AF_INET6):
        return None
    return sock


def limit_unsent(sock: Any, limit: int) -> bool:
    """At most `limit` bytes not yet sent in the socket (TCP_NOTSENT_LOWAT). False if the
    platform has no such option or the socket refused it."""
    if TCP_NOTSENT_LOWAT is None or limit <= 0:
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)
    except OSError:
        return False
    return True


def acked_bytes(sock: Any) -> int | None:
    """Bytes the peer has acknowledged so far, or None where the kernel does not say."""
    if TCP_INFO is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, _INFO_LEN)
    except (OSError, ValueError):
        # ValueError: uvloop's socket of a connection already closed (its descriptor -1),
        # which a heartbeat may still ask before the session's cleanup has run (a storm:
        # thousands at once, each logged with a traceback).
        return None
    if len(info) < _INFO_LEN:
        return None  # a kernel older than 4.1
    value: int = _BYTES_ACKED.unpack_from(info, _BYTES_ACKED_AT)[0]
    return value
