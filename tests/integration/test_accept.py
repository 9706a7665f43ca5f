"""edge/accept.py: connections accepted many per readiness (libuv accepts one per loop
iteration), handed to the loop with the protocol, a pause when descriptors run out, and the
edge process listening through it (and refusing a port in use with a clear error)."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
from typing import cast

import httpx
import pytest

from edge import accept
from edge.accept import ACCEPT_BATCH, Acceptor, bind_listeners
from fanout.embedded import stop_process
from tests.integration.conftest import EdgeFactory, RedisServer
from tests.support.httpwait import wait_http_ok
from tests.support.wsclient import ProtoClient

pytestmark = pytest.mark.integration

LOG = logging.getLogger("test.accept")


class Recorder(asyncio.Protocol):
    made: list[Recorder] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        Recorder.made.append(self)

    def data_received(self, data: bytes) -> None:
        self.transport.write(data.upper())


def queued_clients(port: int, n: int) -> list[socket.socket]:
    """`n` connections the kernel completed and queued for accept (a blocking connect
    returns once the handshake is done)."""
    out = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        out.append(s)
    return out


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.005)


async def test_a_readiness_accepts_a_whole_batch_and_each_gets_the_protocol() -> None:
    Recorder.made = []
    loop = asyncio.get_running_loop()
    listener, = bind_listeners("127.0.0.1", 0)
    acceptor = Acceptor(loop, Recorder, [listener], LOG)
    acceptor.listen(1024)
    loop.remove_reader(listener.fileno())  # readiness driven by hand below
    port = listener.getsockname()[1]
    n = ACCEPT_BATCH * 2 + 10
    clients = await asyncio.to_thread(queued_clients, port, n)
    try:
        acceptor._ready(listener)
        assert acceptor.accepted == ACCEPT_BATCH  # one readiness: a batch, not one
        acceptor._ready(listener)
        acceptor._ready(listener)
        assert acceptor.accepted == n  # the last one stopped at an empty queue
        acceptor._ready(listener)  # nothing queued: returns without blocking
        assert acceptor.accepted == n
        await wait_for(lambda: len(Recorder.made) == n)
        sock = Recorder.made[0].transport.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        # Served: what the client sends comes back through the protocol.
        clients[-1].sendall(b"ping")
        clients[-1].settimeout(5)
        assert await asyncio.to_thread(clients[-1].recv, 4) == b"PING"
    finally:
        acceptor.close()
        for p in Recorder.made:
            p.transport.close()
        for c in clients:
            c.close()
    assert listener.fileno() == -1  # close() closed the listening socket


class Exhausted(socket.socket):
    """A listening socket whose accept fails as a process out of descriptors does."""

    failures = 1

    def accept(self) -> tuple[socket.socket, object]:
        if Exhausted.failures:
            Exhausted.failures -= 1
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return super().accept()


async def test_out_of_descriptors_pauses_accepting_then_resumes(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    Recorder.made = []
    monkeypatch.setattr(accept, "ACCEPT_PAUSE", 0.05)
    loop = asyncio.get_running_loop()
    listener = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    acceptor = Acceptor(loop, Recorder, [listener], LOG)
    acceptor.listen(16)
    port = listener.getsockname()[1]
    with caplog.at_level(logging.ERROR, LOG.name):
        client = await asyncio.to_thread(socket.create_connection, ("127.0.0.1", port), 5)
        try:
            # The failure pauses accepting (no busy loop on a level-triggered socket), and
            # the queued connection is taken once the pause is over.
            await wait_for(lambda: len(Recorder.made) == 1)
            assert acceptor.paused == 1
            assert "event=accept_paused" in caplog.text
        finally:
            acceptor.close()
            client.close()
            for p in Recorder.made:
                p.transport.close()


async def test_close_during_a_pause_stays_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accept, "ACCEPT_PAUSE", 60.0)  # the pause outlives the test
    Exhausted.failures = 1
    loop = asyncio.get_running_loop()
    listener = Exhausted(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    acceptor = Acceptor(loop, Recorder, [listener], LOG)
    acceptor.listen(16)
    client = await asyncio.to_thread(socket.create_connection,
                                     ("127.0.0.1", listener.getsockname()[1]), 5)
    try:
        await wait_for(lambda: acceptor.paused == 1)
        resume = acceptor._resume
        assert resume is not None
        acceptor.close()
        assert resume.cancelled() and acceptor._resume is None
        acceptor._resumed()  # as if the timer had fired anyway: nothing is watched again
        assert listener.fileno() == -1 and acceptor.accepted == 0
    finally:
        client.close()


async def test_the_edge_serves_through_the_acceptor(edge_factory: EdgeFactory) -> None:
    edge = await edge_factory()
    acceptor = edge.server.acceptor
    assert acceptor is not None
    before = acceptor.accepted
    clients = await asyncio.gather(*(ProtoClient.open(edge.url) for _ in range(20)))
    try:
        assert acceptor.accepted - before >= 20
        reply = await clients[0].request({"type": "subscribe", "channel": "quotes.AAPL"})
        assert reply["type"] == "subscribed"
    finally:
        for c in clients:
            await c.close()
    await edge.stop()
    with pytest.raises(OSError):  # the listening socket is closed on shutdown
        await asyncio.to_thread(socket.create_connection, ("127.0.0.1", edge.port), 2)


async def test_a_port_in_use_fails_the_edge_with_the_error(
    redis_server: RedisServer, key_prefix: str
) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix}
    try:
        proc = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "fanout", "edge", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=60)
    finally:
        taken.close()
    assert proc.returncode == 3, proc.stderr
    assert "event=bind_failed" in proc.stderr
    assert "Traceback" not in proc.stderr


async def test_the_edge_process_listens_and_answers(
    redis_server: RedisServer, key_prefix: str
) -> None:
    listener, = bind_listeners("127.0.0.1", 0)
    port = listener.getsockname()[1]
    listener.close()
    env = {**os.environ, "FANOUT_REDIS_URL": redis_server.url, "FANOUT_KEY_PREFIX": key_prefix,
           "FANOUT_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "edge", "--port", str(port)],
                            env=env, stderr=subprocess.PIPE)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as http:
            await wait_http_ok(http, "/readyz", proc=proc)
        client = await ProtoClient.open(f"ws://127.0.0.1:{port}/ws")
        await client.close()
    finally:
        stop_process(proc)
    assert proc.stderr is not None
    assert f"event=listening host=127.0.0.1 port={port}" in proc.stderr.read().decode()
