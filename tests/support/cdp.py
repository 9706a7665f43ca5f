"""A minimal Chrome DevTools Protocol driver for browser tests: headless Chromium from
Debian's package, driven over its DevTools WebSocket (no browser download, no extra
dependency). Only what the tests need: navigate, evaluate, screenshot."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

import websockets

from fanout.embedded import free_port

# Without the networking flags Chromium floods the closed network (field notes).
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900",
)


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, executable: str) -> None:
        self.executable = executable
        self.port = free_port()
        # Chromium may still write into its profile as it is killed.
        self.profile = tempfile.TemporaryDirectory(
            prefix="fanout-chromium-", ignore_cleanup_errors=True
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: Any = None
        self.ids = itertools.count(1)

    async def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.executable, *FLAGS, f"--user-data-dir={self.profile.name}",
             f"--remote-debugging-port={self.port}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        async with asyncio.timeout(30):
            while True:
                try:
                    tabs = await asyncio.to_thread(self._tabs)
                    page = next(t for t in tabs if t["type"] == "page")
                    break
                except (OSError, StopIteration):
                    assert self.proc.poll() is None, "chromium exited"
                    await asyncio.sleep(0.1)
        self.ws = await websockets.connect(page["webSocketDebuggerUrl"], max_size=None)
        await self.call("Page.enable")
        await self.call("Runtime.enable")

    def _tabs(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json", timeout=2) as r:
            tabs: list[dict[str, Any]] = json.load(r)
            return tabs

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self.ids)
        await self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        async with asyncio.timeout(30):
            while True:
                msg = json.loads(await self.ws.recv())
                if msg.get("id") == n:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    result: dict[str, Any] = msg["result"]
                    return result

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def reload(self) -> None:
        await self.call("Page.reload")

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 20.0) -> Any:
        """Poll a JS expression until it is truthy (the page has no event to await)."""
        async with asyncio.timeout(timeout):
            while True:
                try:
                    value = await self.js(expression)
                except RuntimeError:
                    value = None
                if value:
                    return value
                await asyncio.sleep(0.1)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png")
        data = base64.b64decode(shot["data"])

        def save() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

        await asyncio.to_thread(save)

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.profile.cleanup()
