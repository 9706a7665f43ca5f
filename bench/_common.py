"""Helpers shared by the benchmarks (not a benchmark itself: `make bench` runs it as a no-op).

Linux only: CPU times come from /proc, pinning from sched_setaffinity, and child cleanup
from prctl(PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar

from redis.asyncio import Redis

from fanout.embedded import EmbeddedValkey, free_port

T = TypeVar("T")

CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
HOST = "127.0.0.1"  # benchmarks are loopback only


# --- processes -----------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds `pid` has used so far (from /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may contain spaces and ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


class CpuMeter:
    """CPU % of a process over an interval (100 % = one core busy)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._cpu = 0.0
        self._wall = 0.0
        self.start()

    def start(self) -> None:
        self._cpu = cpu_seconds(self.pid)
        self._wall = time.monotonic()

    def percent(self) -> float:
        wall = time.monotonic() - self._wall
        return 100.0 * (cpu_seconds(self.pid) - self._cpu) / wall if wall > 0 else 0.0


def cpu_times(cpu: int | None = None) -> tuple[float, float, float]:
    """(busy, steal, total) seconds of one CPU, or of all of them, from /proc/stat. Busy is
    everything but idle, iowait and steal: processes, and interrupts (loopback networking
    is mostly softirq time, charged to no process)."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    with open("/proc/stat", encoding="ascii") as f:
        for line in f:
            fields = line.split()
            if fields[0] == name:
                user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
                busy = user + nice + system + irq + softirq
                total = busy + idle + iowait + steal
                return busy / CLK_TCK, steal / CLK_TCK, total / CLK_TCK
    raise ValueError(f"no {name} in /proc/stat")


class CpuBusy:
    """How busy one CPU (or the machine, 100 % per CPU) was over an interval, and the steal
    (time the hypervisor gave to other VMs)."""

    def __init__(self, cpu: int | None = None) -> None:
        self.cpu = cpu
        self.scale = 1 if cpu is not None else os.cpu_count() or 1
        self._start = (0.0, 0.0, 0.0)
        self.start()

    def start(self) -> None:
        self._start = cpu_times(self.cpu)

    def percent(self) -> tuple[float, float]:
        """(busy %, steal %), 100 % = one CPU."""
        busy, steal, total = (b - a for a, b in zip(self._start, cpu_times(self.cpu),
                                                    strict=True))
        if total <= 0:
            return 0.0, 0.0
        return 100.0 * self.scale * busy / total, 100.0 * self.scale * steal / total


def parent_death_hook() -> Callable[[], None]:
    """A preexec_fn: the child gets SIGKILL if we die, however we die."""
    libc = ctypes.CDLL(None, use_errno=True)

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL.value))

    return hook


def child_preexec(cpu: int | None) -> Callable[[], None]:
    """A preexec_fn for a child of a benchmark: dies with us, pinned to `cpu` if given."""
    death = parent_death_hook()

    def preexec() -> None:
        death()
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})

    return preexec


def pin(pid: int, cpu: int) -> bool:
    """Pin `pid` (0 = this process) to one CPU; False if that CPU is not ours to use."""
    if cpu not in os.sched_getaffinity(0):
        return False
    os.sched_setaffinity(pid, {cpu})
    return True


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def sigterm_as_interrupt() -> None:
    """SIGTERM (and SIGHUP) unwind like Ctrl-C, so that every `finally` cleans up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, where SIGTERM and SIGHUP cancel the main task as Ctrl-C does (so that
    its `finally` blocks run in the loop); either ends in KeyboardInterrupt."""

    async def main() -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, task.cancel)
        return await coro

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    finally:
        sigterm_as_interrupt()  # the loop put the default handlers back


# --- Redis ---------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    embedded: EmbeddedValkey | None

    @property
    def pid(self) -> int | None:
        return self.embedded.pid if self.embedded is not None else None


# Kills a pid when its stdin closes without a byte first: we died without cleaning up.
_WATCHDOG = """\
import os, signal, sys
if not sys.stdin.buffer.read(1):
    try:
        os.kill(int(sys.argv[1]), signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


@contextlib.contextmanager
def watchdog(pid: int) -> Iterator[None]:
    """SIGKILL `pid` if this process dies (even by SIGKILL) before leaving the block: for a
    child started without a preexec hook, such as EmbeddedValkey's valkey-server."""
    dog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pid)], stdin=subprocess.PIPE,
                           start_new_session=True)
    assert dog.stdin is not None
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            dog.stdin.write(b"x")  # disarm
            dog.stdin.close()
        dog.wait()


@contextlib.contextmanager
def redis_server(url: str | None) -> Iterator[Server]:
    """`url` if given, else an embedded Valkey on a free loopback port, stopped at exit."""
    if url:
        yield Server(url, None)
        return
    valkey = EmbeddedValkey()
    valkey.start()
    try:
        assert valkey.pid is not None
        with watchdog(valkey.pid):
            yield Server(valkey.url, valkey)
    finally:
        valkey.stop()


async def delete_prefix(redis: Redis, prefix: str) -> int:
    """Delete every key under `prefix:` (a benchmark's own keys)."""
    deleted = 0
    batch: list[str] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=5_000):
        batch.append(key)
        if len(batch) >= 5_000:
            deleted += await redis.unlink(*batch)
            batch.clear()
    if batch:
        deleted += await redis.unlink(*batch)
    return deleted


def bench_prefix(name: str) -> str:
    """A key prefix of this run's own: never collides with a real deployment's keys."""
    return f"bench-{name}-{os.urandom(3).hex()}"


# --- an edge process -----------------------------------------------------------------------


class EdgeProcess:
    """`python -m fanout edge` on a free loopback port, pinned to one CPU, killed with
    us (PR_SET_PDEATHSIG) however we end."""

    def __init__(self, redis_url: str, prefix: str, cpu: int | None,
                 extra: list[str]) -> None:
        self.port = free_port(HOST)
        self.extra = extra
        self.redis_url = redis_url
        self.prefix = prefix
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="bench-edge-")  # noqa: SIM115

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        preexec = child_preexec(self.cpu)
        cmd = [
            sys.executable, "-m", "fanout", "edge",
            "--host", HOST, "--port", str(self.port),
            "--key-prefix", self.prefix, "--log-level", "warning",
            # Every client comes from 127.0.0.1, by the thousand: no admission limits.
            "--max-connections", "0", "--max-connections-per-ip", "0", *self.extra,
        ]
        # The URL through the environment: `fanout edge` refuses one with a password as a
        # flag (ps would show it).
        env = {**os.environ, "FANOUT_REDIS_URL": self.redis_url}
        env.pop("FANOUT_REDIS_URL_FILE", None)
        self.proc = subprocess.Popen(  # from the checkout: the code this process imported
            cmd, cwd=source_root(), env=env, stdin=subprocess.DEVNULL, stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec, start_new_session=True,  # Ctrl-C reaches only us
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.log.close()

    def output(self, limit: int = 4_000) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def url(self, path: str) -> str:
        return f"http://{HOST}:{self.port}{path}"


_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies


async def quit_child(proc: asyncio.subprocess.Process) -> None:
    """A C load client's orderly end: `quit` on its stdin, then the process ends; killed if
    it does not within 5 s (bench/wsload.c and bench/stormload.c speak the same command)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(Exception):
        assert proc.stdin is not None
        proc.stdin.write(b"quit\n")
        await asyncio.wait_for(proc.stdin.drain(), 2.0)
        proc.stdin.close()
    try:
        await asyncio.wait_for(proc.wait(), 5.0)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def http_get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with _HTTP.open(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


async def wait_ready(edge: EdgeProcess, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert edge.proc is not None
        if edge.proc.poll() is not None:
            raise RuntimeError(f"edge exited with code {edge.proc.returncode}:\n"
                               f"{edge.output()}")
        with contextlib.suppress(OSError):
            status, _ = await asyncio.to_thread(http_get, edge.url("/readyz"), 1.0)
            if status == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"edge not ready after {timeout:.0f} s:\n{edge.output()}")
        await asyncio.sleep(0.1)


# --- output --------------------------------------------------------------------------------


def progress(text: str) -> None:
    """Progress goes to stderr: stdout is the tables."""
    print(text, file=sys.stderr, flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, numbers right-aligned, in Markdown pipe syntax."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str], numeric: Sequence[bool]) -> str:
        parts = [v.rjust(w) if n else v.ljust(w)
                 for v, w, n in zip(values, widths, numeric, strict=True)]
        return "| " + " | ".join(parts) + " |"

    left = [False] * len(headers)
    numeric = [all(_is_number(r[i]) for r in rows) if rows else False
               for i in range(len(headers))]
    rule = "|" + "|".join(("-" * (w + 1) + ":") if n else ("-" * (w + 2))
                          for w, n in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(headers, left), rule, *(line(r, numeric) for r in cells)])


def _is_number(value: object) -> bool:
    """Numbers, and the placeholders that stand in for one, align right."""
    if value in ("n/a", "-"):
        return True
    return isinstance(value, int | float) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        return f"{value:.1f}" if value >= 10 else f"{value:.2f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def environment() -> str:
    """One line saying where the numbers come from."""
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs "
        f"(usable {sorted(os.sched_getaffinity(0))}), load average {load}"
    )


def source_root() -> Path:
    """The directory the project's packages are imported from (an editable install: the
    checkout). Subprocesses run from it, so that they run the same code as we do."""
    import common

    return Path(common.__file__).resolve().parent.parent


def source_state() -> str:
    """Which code was measured: the git commit, and whether the tree had local changes."""
    root = source_root()
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "common", "edge", "ingest"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return f"source {root} (not a git checkout)"
    dirty = [line[3:] for line in status.stdout.splitlines()]
    state = f"+ uncommitted changes in {', '.join(dirty)}" if dirty else "clean"
    return f"source {root} at git {head.stdout.strip()} ({state})"


if __name__ == "__main__":
    print("bench/_common.py holds helpers; run bench/publish.py or bench/delivery.py")
