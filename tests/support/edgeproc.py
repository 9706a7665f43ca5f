"""A real edge process for tests that need one (not a test module): its own event loop and
socket buffers, as in production (an in-process edge shares the test's loop, which hides
races between a client's writes and the edge's reads), its log captured, its RSS readable."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator

import httpx

from fanout.embedded import free_port, stop_process
from tests.support.httpwait import wait_http_ok


class EdgeProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log_path: str) -> None:
        self.proc = proc
        self.port = port
        self.log_path = log_path

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss_kib(self) -> int:
        """Resident set size now (VmRSS, KiB)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    async def metrics(self) -> str:
        async with httpx.AsyncClient(timeout=5) as http:
            return (await http.get(f"{self.http}/metrics")).text


@contextlib.asynccontextmanager
async def edge_process(redis_url: str, key_prefix: str, *args: str, pin: bool = False,
                       **env: str) -> AsyncIterator[EdgeProcess]:
    """`python -m fanout edge` on a free loopback port (FANOUT_* settings in `env`,
    flags in `args`), ready (/readyz answered 200) when the block starts, stopped after.
    With `pin` (and two CPUs or more), the edge gets a CPU of its own and this process the
    others meanwhile: measure the edge, not the test process competing with it."""
    port = free_port()
    fd, log_path = tempfile.mkstemp(prefix="fanout-edge-", suffix=".log")
    full_env = {**os.environ, "FANOUT_REDIS_URL": redis_url, "FANOUT_KEY_PREFIX": key_prefix,
                "FANOUT_LOG_LEVEL": "info", **env}
    cpus = sorted(os.sched_getaffinity(0))
    pin = pin and len(cpus) > 1
    proc = subprocess.Popen(
        [sys.executable, "-m", "fanout", "edge", "--port", str(port), *args],
        env=full_env, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, {cpus[0]})) if pin else None,
    )
    os.close(fd)
    if pin:
        os.sched_setaffinity(0, set(cpus[1:]))
    edge = EdgeProcess(proc, port, log_path)
    try:
        async with httpx.AsyncClient(base_url=edge.http, timeout=2) as http:
            await wait_http_ok(http, "/readyz", proc=proc)
        yield edge
    finally:
        if pin:
            os.sched_setaffinity(0, set(cpus))
        stop_process(proc)
        os.unlink(log_path)


class IngestProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int) -> None:
        self.proc = proc
        self.port = port  # of /metrics, /healthz, /readyz

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def ingest_process(redis_url: str, key_prefix: str = "fanout",
                         **env: str) -> AsyncIterator[IngestProcess]:
    """`python -m fanout ingest` (the simulated feed unless `env` says otherwise) with its
    ops port on loopback, answering /healthz when the block starts, stopped after."""
    port = free_port()
    full_env = {**os.environ, "FANOUT_REDIS_URL": redis_url, "FANOUT_KEY_PREFIX": key_prefix,
                "FANOUT_LOG_LEVEL": "warning", "FANOUT_INGEST_METRICS_PORT": str(port), **env}
    proc = subprocess.Popen([sys.executable, "-m", "fanout", "ingest"], env=full_env,
                            stdin=subprocess.DEVNULL)
    ingest = IngestProcess(proc, port)
    try:
        async with httpx.AsyncClient(base_url=ingest.http, timeout=2) as http:
            await wait_http_ok(http, "/healthz", proc=proc)
        yield ingest
    finally:
        stop_process(proc)
