"""`fanout dev` as a user runs it: a subprocess, its own Valkey, URLs that answer, and a
signal that stops everything and leaves no process behind."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import pytest

from common.admission import check_origin_patterns
from common.errors import ConfigError
from fanout import dev as dev_module
from tests.support.wsclient import upgrade_request
from tests.unit.test_dev import dev_args

# Subprocess tests: each starts `fanout dev` (Valkey, ingest, edges) and watches /proc.
integration = pytest.mark.integration
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 60.0  # a cold start imports starlette, redis, ... in four processes
STOP_TIMEOUT = 30.0
EDGE_LINE = re.compile(r"^edge (\d+): (http://\S+)$")
T = TypeVar("T")

# Proxies from the environment must not see requests to our loopback servers.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- helpers ---------------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> int:
    """The first of `n` consecutive ports that were all free a moment ago."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((host, 0))
            first: int = s.getsockname()[1]
        if first + n - 1 > 65535:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    s.bind((host, port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {n} consecutive free ports")


def clean_env(**extra: str) -> dict[str, str]:
    """Our environment without a Redis URL, so that `fanout dev` starts its own Valkey."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "FANOUT_REDIS_URL")}
    env.update(extra)
    return env


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with _OPENER.open(url, timeout=2.0) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, "", b""
    except (urllib.error.URLError, OSError):
        return 0, "", b""


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of `pid` from /proc, or None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return int(fields[1]), fields[0], int(fields[19])


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, int]:
    """Every live process below `root`: pid -> start time (to tell a reused pid)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = proc_stat(int(entry.name))
        if stat is not None and stat[1] not in "ZX":
            children.setdefault(stat[0], []).append(int(entry.name))
            starts[int(entry.name)] = stat[2]
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if pid in starts:
                found[pid] = starts[pid]
                todo.append(pid)
    return found


def running(processes: dict[int, int]) -> list[int]:
    """Those of `processes` still running. A zombie has ended: it only waits for a parent
    (here maybe an init that does not reap) to collect its exit code."""
    alive = []
    for pid, start in processes.items():
        stat = proc_stat(pid)
        if stat is not None and stat[2] == start and stat[1] not in "ZX":
            alive.append(pid)
    return alive


class DevProcess:
    """`fanout dev` in a subprocess, its stdout read line by line in a thread."""

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_ports(2)
        self.stderr_path = tmp_path / "dev.stderr"
        self._stderr = self.stderr_path.open("wb")
        cmd = [sys.executable, "-m", "fanout", "dev", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env or clean_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=self._stderr, text=True,
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        self.children: dict[int, int] = {}

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, what: str, check: Callable[[], T | None],
                 timeout: float = START_TIMEOUT) -> T:
        """Poll `check` until it returns something; fail early if dev exits."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value is not None:
                return value
            if self.proc.poll() is not None:
                pytest.fail(f"fanout dev exited with {self.proc.returncode} while waiting for "
                            f"{what}\nstdout:\n" + "\n".join(self.lines)
                            + f"\nstderr:\n{self.stderr()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {what}\nstderr:\n{self.stderr()[-4000:]}")
            time.sleep(0.05)

    def urls(self, edges: int) -> list[str]:
        def ready() -> list[str] | None:
            found = [m.group(2) for m in map(EDGE_LINE.match, list(self.lines)) if m]
            stops = any("Ctrl-C" in line for line in list(self.lines))
            return found if len(found) == edges and stops else None

        return self.wait_for("the edge URLs", ready)

    def collect_children(self) -> dict[int, int]:
        self.children = descendants(self.proc.pid)
        return self.children

    def close(self) -> None:
        """Whatever happened, leave nothing running."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for pid in running(self.children):
            os.kill(pid, signal.SIGKILL)
        self._stderr.close()


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[Callable[..., DevProcess]]:
    started: list[DevProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> DevProcess:
        dev = DevProcess(tmp_path, *args, env=env)
        started.append(dev)
        return dev

    yield start
    for dev in started:
        dev.close()


def _healthy(url: str) -> bool | None:
    return True if get(url + "healthz")[0] == 200 else None


def _html(url: str) -> bool | None:
    status, content_type, body = get(url)
    head = body[:2048].lower()
    return True if status == 200 and content_type.startswith("text/html") and (
        b"<html" in head or b"<!doctype html" in head) else None


def _ws_status(url: str, origin: str) -> int:
    """The HTTP status an edge at `url` answers a browser's WebSocket handshake from a page
    of `origin` with (101: upgraded)."""
    parts = urllib.parse.urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=5) as sock:
        sock.sendall(upgrade_request(parts.netloc, headers=[("Origin", origin)]))
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, "closed without an answer"
            head += chunk
    return int(head.split()[1])


def _assert_all_gone(dev: DevProcess) -> None:
    deadline = time.monotonic() + 5.0
    while (left := running(dev.children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, "left running: " + "; ".join(f"{pid} {cmdline(pid)}" for pid in left)


def _started_cluster(dev: DevProcess, edges: int) -> list[str]:
    urls = dev.urls(edges)
    assert urls == [f"http://127.0.0.1:{dev.port + i}/" for i in range(edges)]
    for url in urls:
        dev.wait_for(f"{url}healthz", functools.partial(_healthy, url))
        dev.wait_for(f"HTML at {url}", functools.partial(_html, url))
    children = dev.collect_children()
    commands = [cmdline(pid) for pid in children]
    assert sum(" edge " in c for c in commands) == edges, commands
    assert sum(" ingest" in c for c in commands) == 1, commands
    assert any("valkey-server" in c for c in commands), commands
    return urls


# --- tests -----------------------------------------------------------------------------------


@integration
@needs_proc
def test_dev_serves_and_sigint_stops_everything(
    dev_process: Callable[..., DevProcess],
) -> None:
    dev = dev_process("--edges", "2")
    urls = _started_cluster(dev, 2)
    for url in urls:  # the demo page's own origin may connect; other sites' pages may not
        assert _ws_status(url, url.rstrip("/")) == 101
        assert _ws_status(url, url.replace("127.0.0.1", "localhost").rstrip("/")) == 101
        assert _ws_status(url, "http://evil.example") == 403

    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(STOP_TIMEOUT) == 0, dev.stderr()[-4000:]
    _assert_all_gone(dev)
    assert "Traceback" not in dev.stderr(), dev.stderr()[-4000:]


@integration
@needs_proc
def test_dev_stops_everything_when_a_child_dies(dev_process: Callable[..., DevProcess]) -> None:
    dev = dev_process("--edges", "2")
    _started_cluster(dev, 2)
    edge = next(pid for pid in dev.children if " edge " in cmdline(pid))

    os.kill(edge, signal.SIGKILL)
    assert dev.proc.wait(STOP_TIMEOUT) == 1
    _assert_all_gone(dev)
    assert "child exited" in dev.stderr()


@integration
@needs_proc
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_children_die_with_a_hard_killed_dev(dev_process: Callable[..., DevProcess]) -> None:
    dev = dev_process("--edges", "1")
    _started_cluster(dev, 1)

    dev.proc.kill()
    dev.proc.wait(STOP_TIMEOUT)
    _assert_all_gone(dev)


@integration
@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("--rate", "-1"), {}, "--rate"),
        (("--symbols", ","), {}, "--symbols"),
        ((), {"FANOUT_LOG_LEVEL": "loud"}, "FANOUT_LOG_LEVEL"),
        ((), {"FANOUT_REDIS_URL": "http://127.0.0.1:1"}, "FANOUT_REDIS_URL"),
    ],
)
def test_bad_setting_exits_nonzero_naming_it(
    dev_process: Callable[..., DevProcess], args: tuple[str, ...], env: dict[str, str],
    named: str,
) -> None:
    dev = dev_process(*args, env=clean_env(**env))
    assert dev.proc.wait(STOP_TIMEOUT) != 0
    assert named in dev.stderr()
    assert not any(EDGE_LINE.match(line) for line in dev.lines)


@integration
def test_busy_port_exits_nonzero_naming_it(dev_process: Callable[..., DevProcess]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        dev = dev_process("--edges", "1", "--port", str(port))  # the last --port wins
        assert dev.proc.wait(STOP_TIMEOUT) != 0
    assert "--port" in dev.stderr()


def test_plan_without_redis_url_embeds_valkey() -> None:
    port = free_ports(2)
    plan = dev_module.plan(dev_args("--port", str(port)), environ={"PATH": "/bin"})
    assert plan.redis_url is None
    assert list(plan.ports) == [port, port + 1]
    assert plan.env == {"PATH": "/bin"}


def test_plan_takes_the_redis_url_from_the_environment() -> None:
    port = free_ports(2)
    environ = {"REDIS_URL": "redis://:old@h:1/0", "FANOUT_REDIS_URL": "redis://:pw@h:2/0"}
    plan = dev_module.plan(dev_args("--port", str(port)), environ=environ)
    assert plan.redis_url == "redis://:pw@h:2/0"  # as for ingest and edge: FANOUT_ first
    assert not set(plan.env) & {"REDIS_URL", "FANOUT_REDIS_URL"}  # passed on explicitly
    assert "pw" not in repr(plan)


def test_plan_allows_the_edges_own_origins() -> None:
    port = free_ports(2)
    plan = dev_module.plan(dev_args("--port", str(port)), environ={"PATH": "/bin"})
    origins = plan.allowed_origins
    assert origins is not None
    assert f"http://127.0.0.1:{port + 1}" in origins.split(",")
    assert plan.edge_env == {"PATH": "/bin", "FANOUT_ALLOWED_ORIGINS": origins}
    assert check_origin_patterns(origins.split(",")) == tuple(origins.split(","))


def test_plan_keeps_the_origins_the_environment_sets() -> None:
    port = free_ports(2)
    environ = {"FANOUT_ALLOWED_ORIGINS": "https://app.example.com"}
    plan = dev_module.plan(dev_args("--port", str(port)), environ=environ)
    assert plan.allowed_origins is None
    assert plan.edge_env["FANOUT_ALLOWED_ORIGINS"] == "https://app.example.com"
    with pytest.raises(ConfigError, match="FANOUT_ALLOWED_ORIGINS"):
        dev_module.plan(dev_args("--port", str(port)),
                        environ={"FANOUT_ALLOWED_ORIGINS": "app.example.com"})


def test_plan_takes_the_redis_url_from_a_file_variable(tmp_path: Path) -> None:
    port = free_ports(2)
    secret = tmp_path / "url"
    secret.write_text("redis://:pw@h:3/0\n")
    environ = {"FANOUT_REDIS_URL_FILE": str(secret), "PATH": "/bin"}
    plan = dev_module.plan(dev_args("--port", str(port)), environ=environ)
    assert plan.redis_url == "redis://:pw@h:3/0"
    assert plan.env == {"PATH": "/bin"}  # the children get FANOUT_REDIS_URL instead


def test_plan_reads_the_config_file_and_passes_it_on(tmp_path: Path) -> None:
    port = free_ports(2)
    config = tmp_path / "fanout.toml"
    config.write_text("[redis]\nurl = 'redis://cache:6379/2'\n[ingest]\nrate = 5\n")
    plan = dev_module.plan(dev_args("--port", str(port), "--config", str(config)),
                           environ={})
    assert plan.redis_url == "redis://cache:6379/2"  # a server is configured: no embedding
    assert plan.env == {"FANOUT_CONFIG": str(config)}  # the children read it too
    config.write_text("[ingest]\nrate = 0\n")
    with pytest.raises(ConfigError, match=r"\[ingest\] rate"):
        dev_module.plan(dev_args("--port", str(port)), environ={"FANOUT_CONFIG": str(config)})
