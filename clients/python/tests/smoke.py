"""A live check of an installed fanout-client against a real edge, run by
tests/integration/test_python_client_venv.py in a venv holding only this package,
websockets and msgpack.

    python -I smoke.py WS_URL CHANNEL COUNT

Subscribes with a snapshot over msgpack, prints "ready <offset>" once the snapshot is in,
then expects COUNT publications right after it, backfills the first three with history(),
checks that a bad channel raises BadChannel (in the FanoutClientError tree), and prints
one JSON line with what it saw. Any failed check exits non-zero.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys

import fanout_client
from fanout_client import BadChannel, FanoutClient, FanoutClientError, Publication, Resync


async def main(url: str, channel: str, count: int) -> dict[str, object]:
    server_modules = [m for m in ("common", "edge", "ingest", "redis", "starlette")
                      if importlib.util.find_spec(m) is not None]
    assert not server_modules, f"server modules importable: {server_modules}"
    async with asyncio.timeout(60):
        async with FanoutClient(url, binary=True, name="smoke") as client:
            events = client.subscribe(channel, snapshot=True)
            first = await anext(events)
            assert isinstance(first, Resync), first
            print("ready", first.offset, flush=True)
            pubs: list[Publication] = []
            while len(pubs) < count:
                event = await anext(events)
                assert isinstance(event, Publication), event
                pubs.append(event)
            offsets = [p.offset for p in pubs]
            assert offsets == list(range(first.offset + 1, first.offset + 1 + count)), offsets
            backfill = await client.history(channel, offsets[0], offsets[2])
            assert [p.offset for p in backfill] == offsets[:3]
            assert [p.data for p in backfill] == [p.data for p in pubs[:3]]
            bad = client.subscribe("nosuchnamespace.X")
            try:
                await anext(bad)
                raise AssertionError("a bad channel was accepted")
            except BadChannel as exc:
                assert isinstance(exc, FanoutClientError) and exc.request == "subscribe"
                bad_code = exc.code
    return {
        "version": fanout_client.__version__,
        "module": fanout_client.__file__,
        "snapshot_offset": first.offset,
        "offsets": offsets,
        "data": [p.data for p in pubs],
        "bad_channel": bad_code,
        "delivered": client.counters.messages,
    }


if __name__ == "__main__":
    result = asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    print(json.dumps(result), flush=True)
