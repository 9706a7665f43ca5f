"""A minimal relay: the floor the edge's per-frame cost is compared against.

A plain `websockets` server that subscribes to Redis pub/sub and forwards each live message
to the WebSocket clients of its channel, one frame per message. Nothing else: no ordering
checks, no repair, no recovery, no send queue, no slow-consumer policy, no pings, no
metrics, no authentication. It speaks just enough of docs/protocol.md for the benchmark's
clients (bench/wsload.c, the `fanout.json` subprotocol): `connect` gets `connected`,
`subscribe` gets `subscribed` with the channel's current offset (read from its meta hash),
and each publication goes out as the edge writes it (`common.protocol.pub_json` over the
live message decoded by `common.broker.live.decode_live`), so the clients see the same bytes
from both servers.

    .venv/bin/python bench/relay.py --port P --redis-url URL --key-prefix PREFIX

bench/perframe.py runs it beside an edge; it is not meant for anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Any

from redis.asyncio import Redis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from common.broker.keys import Keys
from common.broker.live import decode_live
from common.loop import LOOPS, loop_factory
from common.protocol import pub_json


class Relay:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self.pubsub = redis.pubsub()
        self.clients: dict[str, set[ServerConnection]] = {}
        # One SUBSCRIBE at a time: redis-py's PubSub loses some when many tasks send at once.
        self.lock = asyncio.Lock()

    async def handler(self, ws: ServerConnection) -> None:
        mine: list[str] = []
        try:
            async for raw in ws:
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "connect":
                    await ws.send(json.dumps({"type": "connected", "id": msg.get("id"),
                                              "client": "relay"}))
                elif kind == "subscribe":
                    channel = str(msg["channel"])
                    subs = self.clients.get(channel)
                    if subs is None:
                        subs = self.clients[channel] = set()
                        async with self.lock:
                            await self.pubsub.subscribe(self.keys.live(channel))
                    subs.add(ws)
                    mine.append(channel)
                    top = await self.redis.hget(self.keys.meta(channel), "top")
                    await ws.send(json.dumps({
                        "type": "subscribed", "id": msg.get("id"), "channel": channel,
                        "offset": int(top or 0), "recovered": False,
                    }))
        except ConnectionClosed:
            pass
        finally:
            for channel in mine:
                self.clients.get(channel, set()).discard(ws)

    async def forward(self) -> None:
        """Every live message to its channel's clients, one frame each."""
        prefix = self.keys.live_prefix()
        channel_of = self.keys.channel_of_live
        clients = self.clients
        while not self.pubsub.subscribed:
            await asyncio.sleep(0.01)
        async for msg in self.pubsub.listen():
            if msg["type"] != "message" or not msg["channel"].startswith(prefix):
                continue
            channel = channel_of(msg["channel"])
            subs = clients.get(channel)
            if subs:
                for pub in decode_live(channel, msg["data"]):
                    broadcast(subs, pub_json(channel, pub.offset, pub.key, pub.data,
                                             pub.deleted))


async def main(args: argparse.Namespace) -> None:
    redis = Redis.from_url(args.redis_url, decode_responses=True)
    relay = Relay(redis, Keys(args.key_prefix))
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    forwarder: asyncio.Task[Any] | None = None
    async with serve(relay.handler, args.host, args.port, compression=None,
                     subprotocols=[Subprotocol("fanout.json")], ping_interval=None,
                     max_queue=None):
        forwarder = asyncio.create_task(relay.forward())
        await stop
    forwarder.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await forwarder
    await redis.aclose()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--redis-url", required=True)
    p.add_argument("--key-prefix", required=True)
    p.add_argument("--loop", default="asyncio", choices=LOOPS,
                   help="event loop (as the edge's FANOUT_LOOP, common/loop.py)")
    return p.parse_args()


if __name__ == "__main__":
    if len(sys.argv) == 1:  # `make bench` runs every bench/*.py: this is not a benchmark
        print("bench/relay.py: the relay bench/perframe.py compares the edge with "
              "(--port, --redis-url, --key-prefix to run it)")
        sys.exit(0)
    args = parse_args()
    with asyncio.Runner(loop_factory=loop_factory(args.loop)) as runner:
        runner.run(main(args))
