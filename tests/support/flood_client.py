"""The client side of tests/integration/test_flood.py's floods, in a process of its own (so that it
does not take the GIL from the test's bystander and publisher):
``python -m tests.support.flood_client <mode> <port> <count> <source address>``. It prints
``ready``, and starts when a line arrives on stdin.

- ``handshakes``: `count` WebSocket handshakes at once; prints one JSON line
  ``{"took": s, "answers": [[status, retry-after], ...]}``, holds the admitted connections
  until a line arrives on stdin, then closes everything and exits.
- ``half-open``: `count` TCP connections at once, odd ones sending half a request, even ones
  nothing; waits until the server closes each; prints ``{"lived": [s, ...], "answered":
  n}``: how long each lived from the start of its connect, and how many got any bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time

from tests.support.wsclient import http_upgrade

PARTIAL = b"GET /ws HTTP/1.1\r\nHost: edge\r\nUpgrade: websocket\r\nConn"


async def handshakes(port: int, count: int, source: str) -> None:
    started = time.monotonic()
    answers = await asyncio.gather(*(
        http_upgrade("127.0.0.1", port, local_addr=(source, 0), timeout=60)
        for _ in range(count)))
    took = time.monotonic() - started
    print(json.dumps({"took": took, "answers": [[a.status, a.headers.get("retry-after", "")]
                                                for a in answers]}), flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    for a in answers:
        await a.close()


async def half_open(port: int, count: int, source: str) -> None:
    async def one(i: int) -> tuple[float, bytes]:
        opened = time.monotonic()  # the edge's clock starts after this
        reader, writer = await asyncio.open_connection("127.0.0.1", port,
                                                       local_addr=(source, 0))
        if i % 2:
            writer.write(PARTIAL)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(4096):
                data += chunk
        lived = time.monotonic() - opened
        writer.close()
        return lived, data

    results = await asyncio.gather(*(one(i) for i in range(count)))
    print(json.dumps({"lived": [lived for lived, _ in results],
                      "answered": sum(bool(data) for _, data in results)}), flush=True)


def main() -> None:
    mode, port, count, source = sys.argv[1:5]
    run = {"handshakes": handshakes, "half-open": half_open}[mode]
    print("ready", flush=True)
    sys.stdin.readline()  # "go": the flood starts when the test says, not at our start-up
    asyncio.run(run(int(port), int(count), source))


if __name__ == "__main__":
    main()
