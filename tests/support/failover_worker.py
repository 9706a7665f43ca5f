"""One ingest worker process for the failover tests: `python -m tests.support.failover_worker`.

It runs what `fanout ingest` runs (`ingest.worker.run_worker`: the leader election, the
worker, signal handling), configured by the same ``FANOUT_*`` environment, but on the
deterministic `SequenceFeed` instead of the simulated market. Test knobs:

- ``FAILOVER_NAME``: this worker's name, recorded in every message it publishes first;
- ``FAILOVER_RATE``: messages per second (default 500);
- ``FAILOVER_STOP_AT``: the process stops itself (SIGSTOP) just as it writes the publish
  batch holding message ``m<i>`` to Redis: after the worker checked its term and took its
  fence, before the script calls reach the server. That is the pause fencing exists for
  (a GC pause or a stalled VM between the check and the write); SIGCONT resumes the write.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from common.broker.keys import Keys
from common.broker.redisbroker import RedisBroker
from common.config import build
from ingest.config import INGEST_SETTINGS, IngestConfig
from ingest.worker import run_worker
from tests.support.seqfeed import SequenceFeed


def stop_before_writing(message_id: str, log: logging.Logger) -> None:
    """SIGSTOP this process once, as the publish carrying `message_id` is written (publish.lua
    gets each message's id as an argument of its own): RedisBroker's packed write, or a
    redis-py pipeline (the cluster broker's)."""
    fired = False
    needle = f"\r\n{message_id}\r\n".encode()  # the id as a RESP bulk string

    def pause() -> None:
        nonlocal fired
        fired = True
        log.warning("pausing before the write of %s pid=%d", message_id, os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)
        log.warning("resumed, writing the batch of %s", message_id)

    original = Pipeline._execute_pipeline

    async def execute(self: Pipeline, connection: Any, commands: Any, *args: Any) -> Any:
        if not fired and any(_text(arg) == message_id for cmd in commands for arg in cmd[0]):
            pause()
        return await original(self, connection, commands, *args)

    Pipeline._execute_pipeline = execute  # type: ignore[method-assign,assignment]

    pipelined = RedisBroker._pipelined

    async def packed_write(self: RedisBroker, packed: bytes, count: int) -> list[Any]:
        if not fired and needle in packed:
            pause()
        return await pipelined(self, packed, count)

    RedisBroker._pipelined = packed_write  # type: ignore[method-assign]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main() -> int:
    config = build(IngestConfig, INGEST_SETTINGS)
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    log = logging.getLogger("fanout.ingest")
    name = os.environ.get("FAILOVER_NAME", "w")
    stop_at = os.environ.get("FAILOVER_STOP_AT")
    if stop_at:
        stop_before_writing(f"m{int(stop_at)}", log)
    redis = Redis.from_url(config.redis.url, decode_responses=True)
    feed = SequenceFeed(redis, Keys(config.redis.key_prefix), worker=name,
                        rate=float(os.environ.get("FAILOVER_RATE", "500")))
    return run_worker(config, feed)


if __name__ == "__main__":
    sys.exit(main())
