"""A namespace defined by a file driven end to end through a real edge and Valkey, and a bad
file stopping the command at start."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from common.auth import sign_token
from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.config import (
    EDGE_SETTINGS,
    EdgeConfig,
    build,
)
from common.namespaces import (
    activate,
    load_namespaces,
)
from ingest.publisher import Publisher
from ingest.upstream import UpstreamMessage
from tests.support.wsclient import ProtoClient
from tests.unit.test_namespaces import _restore_namespaces  # noqa: F401  (autouse)

SECRET = b"0123456789abcdef0123456789abcdef"


# --- end to end: a namespace from a file, through a real edge and Valkey --------------------


async def _open(url: str, token: str, *, rcvbuf: int | None = None) -> ProtoClient:
    kwargs: dict[str, Any] = {}
    if rcvbuf is not None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        host, port = url.split("//")[1].split("/")[0].split(":")
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        kwargs["sock"] = sock
    client = await ProtoClient.open(url, connect=False, **kwargs)
    reply = await client.request({"type": "connect", "token": token})
    assert reply["type"] == "connected", reply
    return client


def _token(**claims: Any) -> str:
    return sign_token({"exp": time.time() + 300, **claims}, SECRET)


@pytest.fixture
async def chat_edge(edge_factory: Any, chat_file: str) -> Any:
    config = build(EdgeConfig, EDGE_SETTINGS, env={"FANOUT_NAMESPACES_FILE": chat_file})
    return await edge_factory(
        namespaces_file=chat_file, overflow=config.overflow, auth_secret=SECRET.decode(),
        queue_max_messages=50, queue_max_bytes=64 * 1024,
    )


@pytest.mark.integration
async def test_namespace_from_a_file_end_to_end(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    keys = Keys(key_prefix)
    publisher = Publisher(RedisBroker(redis, keys))  # the file's history: chat 100
    channel = "chat.lobby"
    first = await publisher.publish(UpstreamMessage(channel, {"text": "hi"}))
    assert first.offset == 1

    # public: a token whose channels claim does not name chat reads it
    alice = await _open(chat_edge.url, _token(sub="alice", channels=["quotes.*"]))
    reply = await alice.subscribe(channel, snapshot=True)
    assert reply["type"] == "subscribed" and reply["offset"] == 1
    assert reply["snapshot"] == {}  # snapshot "none": nothing kept ...
    assert not await redis.exists(keys.snapshot(channel))  # ... not even in Redis
    assert reply["delivery"] == "drop"
    second = await publisher.publish(UpstreamMessage(channel, {"text": "there"}))
    await alice.wait_for(lambda: alice.offsets[channel] == [second.offset])
    position = alice.positions[channel]
    await alice.close()

    # recover with an offset: the messages published while away, exactly
    missed = [await publisher.publish(UpstreamMessage(channel, {"n": i})) for i in range(3)]
    back = await _open(chat_edge.url, _token(sub="alice", channels=[]))
    reply = await back.subscribe(channel, recover=position)
    assert reply["recovered"] is True and not reply.get("snapshot")
    await back.wait_for(lambda: back.offsets[channel] == [m.offset for m in missed])

    # history 100: a position older than that is not recovered (and the snapshot is empty)
    await publisher.publish_batch([UpstreamMessage(channel, {"n": i}) for i in range(120)])
    assert await redis.xlen(keys.stream(channel)) == 100
    late = await _open(chat_edge.url, _token(sub="bob"))
    reply = await late.subscribe(channel, recover=position)
    assert reply["recovered"] is False and reply["snapshot"] == {}

    # names of another file are not channels here
    bad = await late.request({"type": "subscribe", "channel": "quotes.MNQ"})
    assert bad["code"] == "bad_channel"
    assert bad["message"] == "unknown namespace 'quotes': expected one of chat, alerts"
    await back.close()
    await late.close()


@pytest.mark.integration
async def test_namespace_from_a_file_slow_consumer_drops(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    publisher = Publisher(RedisBroker(redis, Keys(key_prefix)))
    channel = "chat.busy"
    slow = await _open(chat_edge.url, _token(sub="slow"), rcvbuf=4096)
    reply = await slow.subscribe(channel)
    assert reply["delivery"] == "drop"
    slow.ws.transport.pause_reading()
    pad = "x" * 2000
    total = 0
    for _ in range(60):  # ~12 MB: more than the socket buffers and the queue (64 KiB) hold
        results = await publisher.publish_batch(
            [UpstreamMessage(channel, {"pad": pad}) for _ in range(100)]
        )
        total = results[-1].offset
        await asyncio.sleep(0)
    slow.ws.transport.resume_reading()

    await slow.wait_for(lambda: len(slow.covered(channel)) >= total, 30)
    assert any(m.get("type") == "gap" for m in slow.messages), "the client was never slow"
    # each offset once: received, or dropped and told
    assert sorted(slow.covered(channel)) == list(range(1, total + 1))
    assert not slow.closed.done()  # drop, not disconnect
    assert chat_edge.edge.stats.dropped.get("chat", 0) > 0
    await slow.close()


@pytest.mark.integration
async def test_namespace_without_recovery_account_permission_and_max_rate(
    chat_edge: Any, redis: Any, key_prefix: str
) -> None:
    publisher = Publisher(RedisBroker(redis, Keys(key_prefix)))
    await publisher.publish(UpstreamMessage("alerts.d1", {"level": 1}))
    d1 = await _open(chat_edge.url, _token(sub="d1"))  # account_claims: sub
    reply = await d1.subscribe("alerts.d1")
    assert reply["type"] == "subscribed"
    assert reply["delivery"] == "conflate"  # max_rate 5 by default
    position = (reply["offset"], reply["epoch"])
    denied = await d1.request({"type": "subscribe", "channel": "alerts.d2"})
    assert denied["code"] == "permission_denied"
    await d1.close()

    await publisher.publish(UpstreamMessage("alerts.d1", {"level": 2}))
    trader = await _open(chat_edge.url, _token(sub="t", accounts=["d1"]))  # accounts claim
    reply = await trader.subscribe("alerts.d1", recover=position)
    # recovery = false: a recovering subscribe starts over from the snapshot
    assert reply["recovered"] is False and reply["snapshot"] == {"": {"level": 2}}
    assert reply["offset"] == 2
    await trader.close()


@pytest.mark.integration
async def test_snapshot_none_publishes_every_message_even_if_changed_only(
    chat_file: str, redis: Any, key_prefix: str
) -> None:
    activate(load_namespaces(chat_file))
    keys = Keys(key_prefix)
    publisher = Publisher(RedisBroker(redis, keys))
    msg = UpstreamMessage("chat.x", {"same": 1}, if_changed=True)
    offsets = [(await publisher.publish(msg)).offset for _ in range(3)]
    assert offsets == [1, 2, 3]  # no state kept: nothing is "unchanged"
    assert not await redis.exists(keys.snapshot("chat.x"))
    assert await redis.xlen(keys.stream("chat.x")) == 3


@pytest.mark.parametrize("command", ["edge", "ingest"])
def test_bad_file_stops_the_command_at_start(tmp_path: Path, command: str) -> None:
    import os
    import subprocess
    import sys

    path = tmp_path / "ns.toml"
    path.write_text('[namespaces.chat]\npattern = "chat.{room:id}"\nsnapshot = "full"\n')
    env = {**os.environ, "FANOUT_NAMESPACES_FILE": str(path)}
    done = subprocess.run([sys.executable, "-m", "fanout", command], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert (f"FANOUT_NAMESPACES_FILE: {path}: namespace 'chat': snapshot: must be one of "
            "merge, last, keyed, none, got 'full'") in done.stderr
