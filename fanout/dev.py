"""`fanout dev`: the whole system on one machine, stopped by one Ctrl-C.

Starts an embedded Valkey (unless a Redis URL is configured: REDIS_URL, FANOUT_REDIS_URL,
FANOUT_REDIS_URL_FILE or [redis] url in the config file), one ingest worker on the simulated
feed and N edges on consecutive ports, as child processes, and prints the URLs. The config
file (--config or FANOUT_CONFIG) is checked here and passed on to every child.

Signals, thought through:

* The children stay in our process group (so Ctrl-Z, Ctrl-\\ and terminal output treat
  the cluster as one job), but they are started with SIGINT *blocked*: a blocked mask
  survives fork and exec, and neither uvicorn, asyncio nor valkey-server unblocks it. A
  terminal Ctrl-C therefore reaches only this process, which stops the children with
  SIGTERM in dependency order (edges, then ingest, then Valkey): nobody loses Redis while
  still shutting down, and no child turns SIGINT into a KeyboardInterrupt traceback.
* A second Ctrl-C (or SIGTERM) while stopping kills what is left at once.
* If this process is killed hard, Linux's parent-death signal (prctl PR_SET_PDEATHSIG)
  kills ingest and the edges. Valkey is started by `EmbeddedValkey`, which takes no
  preexec hook, so a tiny watchdog process holds a pipe from us and kills Valkey when the
  pipe closes without being disarmed first.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from common.config import CONFIG_ENV, DEFAULT, config_path, redact_url
from common.errors import ConfigError
from fanout.config import load
from fanout.embedded import EmbeddedValkey

log = logging.getLogger("fanout.dev")

REDIS_ENV = ("FANOUT_REDIS_URL", "REDIS_URL", "FANOUT_REDIS_URL_FILE")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>

# Runs in its own process with SIGINT blocked. Our end of its stdin closes when we die,
# however we die; a clean shutdown writes a byte first, which disarms it.
_WATCHDOG = """\
import os, signal, sys
pid = int(sys.argv[1])
if not sys.stdin.buffer.read(1):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


# --- arguments -----------------------------------------------------------------------------


def _bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


_count = _bounded_int(1, 64)
_port = _bounded_int(1, 65535)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `fanout dev`; --rate and --symbols stay strings for ingest to parse."""
    parser.add_argument("--edges", type=_count, default=2, metavar="N",
                        help="number of edge processes (default 2)")
    parser.add_argument("--port", type=_port, default=8000, metavar="P",
                        help="port of the first edge; edge i listens on P+i-1 (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", metavar="HOST",
                        help="address the edges listen on (default 127.0.0.1)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="TOML config file for ingest and the edges (passed to them) "
                        f"[env {CONFIG_ENV}]")
    parser.add_argument("--rate", default=None, metavar="PER_SECOND",
                        help="simulated events per second per symbol (passed to ingest)")
    parser.add_argument("--symbols", default=None, metavar="SYMBOLS",
                        help="comma-separated symbols of the simulated feed (passed to ingest)")
    parser.add_argument("--start-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                        help="how long the edges get to answer /healthz (default 30)")
    parser.add_argument("--stop-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="how long each group of children gets to exit on SIGTERM "
                        "before SIGKILL (default 10)")


# --- the plan: everything validated before anything starts -----------------------------------


@dataclass(frozen=True, slots=True)
class Plan:
    """What `fanout dev` will start; built (and so validated) before anything starts."""

    edges: int
    port: int
    host: str
    rate: str | None
    symbols: str | None
    redis_url: str | None = field(repr=False)  # None: start an embedded Valkey
    env: Mapping[str, str] = field(repr=False)  # the children's, less the Redis URL
    log_level: str = "info"
    start_timeout: float = 30.0
    stop_timeout: float = 10.0
    # The edges' FANOUT_ALLOWED_ORIGINS: their own pages (`dev_origins`), unless the
    # environment sets it (then None: the environment's value goes through as it is).
    allowed_origins: str | None = None

    @property
    def ports(self) -> range:
        return range(self.port, self.port + self.edges)

    @property
    def edge_env(self) -> dict[str, str]:
        env = dict(self.env)
        if self.allowed_origins is not None:
            env["FANOUT_ALLOWED_ORIGINS"] = self.allowed_origins
        return env


def plan(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Plan:
    """Validate every setting the children will see (environment, config file, flags), so
    that a bad one fails here, at once, named (`ConfigError`), instead of as a child dying
    during start."""
    environ = dict(os.environ if environ is None else environ)
    edges: int = args.edges
    port: int = args.port
    if port + edges - 1 > 65535:
        raise ConfigError("--port", f"{edges} edges from port {port} go past 65535")
    path = config_path(environ, args)
    edge = load("edge", env=environ, path=path, args=argparse.Namespace(
        host=args.host, port=str(port + edges - 1)))
    load("ingest", env=environ, path=path,
         args=argparse.Namespace(rate=args.rate, symbols=args.symbols))
    # A Redis URL from the environment or the config file: use that server; none: embed one.
    # The children get it as FANOUT_REDIS_URL, whichever way it came.
    external = edge.sources["redis.url"] != DEFAULT
    redis_url = edge.config.redis.url if external else None
    env = {k: v for k, v in environ.items() if k not in REDIS_ENV}
    if path:
        env[CONFIG_ENV] = path
    for p in range(port, port + edges):
        _check_port_free(edge.config.host, p)
    # The edges' own origins unless the environment or the config file names some.
    origins = None if edge.sources["allowed_origins"] != DEFAULT else ",".join(
        dev_origins(edge.config.host, range(port, port + edges)))
    return Plan(
        edges=edges, port=port, host=edge.config.host, rate=args.rate, symbols=args.symbols,
        redis_url=redis_url, env=env, log_level=edge.config.log_level,
        start_timeout=args.start_timeout, stop_timeout=args.stop_timeout,
        allowed_origins=origins,
    )


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def dev_origins(host: str, ports: Sequence[int]) -> list[str]:
    """The origins of the edges' own pages (the demo), for their FANOUT_ALLOWED_ORIGINS:
    on loopback, each port under every loopback name; on a wildcard address (0.0.0.0, ::)
    any host name on those ports (the page may be opened by any of the machine's names);
    else the host's own name."""
    if host in ("0.0.0.0", "::", ""):
        names: tuple[str, ...] = ("*",)
    elif host in ("127.0.0.1", "localhost", "::1"):
        names = LOOPBACK_NAMES
    else:
        names = (browser_host(host),)
    return [f"http://{name}:{port}" for port in ports for name in names]


def _check_port_free(host: str, port: int) -> None:
    """Fail now, naming --port, rather than health-checking whatever else holds the port."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise ConfigError("--host", f"cannot resolve {host!r}: {exc}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as exc:
            raise ConfigError(
                "--port", f"port {port} on {host} is not free ({exc.strerror}); "
                "pick another first port"
            ) from None


def browser_host(host: str) -> str:
    """The host part of a URL that reaches an edge listening on `host`."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


# --- child processes -------------------------------------------------------------------------


def _parent_death_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when we die; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL.value))
        if os.getppid() != parent:  # we died before prctl took effect
            os._exit(1)

    return hook


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """Children started inside inherit a blocked SIGINT: terminal Ctrl-C is ours alone."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_status(pid: int) -> int | None:
    """The exit code of our child `pid` if it has ended, without reaping it (its owner
    still waits for it), else None. Always None where waitid is missing (macOS < 3.13)."""
    if not hasattr(os, "waitid"):
        return None
    try:
        result = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return -1
    if result is None:
        return None
    code: int = result.si_status
    return -code if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED) else code


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{code} ({signal.Signals(-code).name})"
    return str(code)


@dataclass(slots=True)
class Child:
    name: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """Valkey, ingest and the edges: started in order, watched, stopped in reverse."""

    def __init__(self, plan: Plan, logger: logging.Logger | None = None,
                 out: Callable[[str], None] | None = None) -> None:
        self.plan = plan
        self.log = logger or log
        self.out = out or _print
        self.valkey: EmbeddedValkey | None = None
        self.watchdog: subprocess.Popen[bytes] | None = None
        self.ingest: Child | None = None
        self.edges: list[Child] = []
        self.signals = 0  # stop requests received
        self.last_signal = ""
        self._preexec = _parent_death_hook()

    # signal handler: only counts; the main loop acts, so no exception lands mid-operation
    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.signals += 1
        self.last_signal = signal.Signals(signum).name

    def run(self) -> int:
        """Start, print the URLs, wait for a signal or a death; always stop everything."""
        try:
            code = self._start()
            if code is None:
                code = self._watch()
        except Exception:
            self.log.exception("fanout dev failed")
            code = 1
        finally:
            self.stop()
        return code

    # --- start ---------------------------------------------------------------------------

    def _start(self) -> int | None:
        """None once everything is up; else the exit code (0 if a signal came first)."""
        p = self.plan
        url = p.redis_url
        if url is None:
            self.valkey = EmbeddedValkey(logger=self.log)
            try:
                with _sigint_blocked():
                    self.valkey.start()
                    self.watchdog = subprocess.Popen(
                        [sys.executable, "-c", _WATCHDOG, str(self.valkey.pid)],
                        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                    )
            except RuntimeError as exc:
                self.log.error("valkey did not start error=%s", exc)
                return 1
            url = self.valkey.url
        self.out(f"redis: {redact_url(url)}" + (" (embedded valkey)" if p.redis_url is None
                                                else ""))
        env = dict(p.env, FANOUT_REDIS_URL=url)
        ingest_args = ["ingest"]
        if p.rate is not None:
            ingest_args += ["--rate", p.rate]
        if p.symbols is not None:
            ingest_args += ["--symbols", p.symbols]
        self.ingest = self._spawn("ingest", ingest_args, env)
        edge_env = dict(p.edge_env, FANOUT_REDIS_URL=url)
        for i, port in enumerate(p.ports, 1):
            edge = ["edge", "--host", p.host, "--port", str(port)]
            self.edges.append(self._spawn(f"edge-{i}", edge, edge_env))
        if not self._wait_healthy():
            return 0 if self.signals else 1
        for i, port in enumerate(p.ports, 1):
            self.out(f"edge {i}: {self._base_url(port)}")
        self.out("Ctrl-C stops everything.")
        return None

    def _spawn(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> Child:
        cmd = [sys.executable, "-m", "fanout", *args]
        with _sigint_blocked():
            proc = subprocess.Popen(
                cmd, env=dict(env), stdin=subprocess.DEVNULL, preexec_fn=self._preexec,
            )
        self.log.info("started name=%s pid=%d", name, proc.pid)
        return Child(name, proc)

    def _base_url(self, port: int) -> str:
        return f"http://{browser_host(self.plan.host)}:{port}/"

    def _wait_healthy(self) -> bool:
        """Poll each edge's /healthz until all answer; False on timeout, death or signal."""
        deadline = time.monotonic() + self.plan.start_timeout
        pending = {edge.name: self._base_url(port) + "healthz"
                   for edge, port in zip(self.edges, self.plan.ports, strict=True)}
        while pending:
            if self.signals:
                self.log.info("stop requested during start signal=%s", self.last_signal)
                return False
            dead = self._dead_child()
            if dead is not None:
                name, code = dead
                self.log.error("child exited during start name=%s code=%s", name,
                               _describe(code))
                return False
            for name, url in list(pending.items()):
                if _answers(url):
                    self.log.info("healthy name=%s url=%s", name, url)
                    del pending[name]
            if pending and time.monotonic() > deadline:
                self.log.error("edges not healthy in time timeout=%.0fs pending=%s",
                               self.plan.start_timeout, ",".join(sorted(pending)))
                return False
            if pending:
                time.sleep(0.1)
        return True

    # --- running -------------------------------------------------------------------------

    def _watch(self) -> int:
        """Wait for a stop signal (exit 0) or any child's death (exit 1)."""
        while not self.signals:
            dead = self._dead_child()
            if dead is not None:
                name, code = dead
                self.log.error("child exited name=%s code=%s: stopping everything", name,
                               _describe(code))
                return 1
            time.sleep(0.1)
        self.log.info("stopping signal=%s", self.last_signal)
        return 0

    def _dead_child(self) -> tuple[str, int] | None:
        for child in (self.ingest, *self.edges):
            if child is not None and child.proc.poll() is not None:
                return child.name, child.proc.returncode
        if self.valkey is not None and self.valkey.pid is not None:
            code = _exit_status(self.valkey.pid)
            if code is not None:
                return "valkey", code
        return None

    # --- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Edges, then ingest, then Valkey: each group SIGTERMed, waited for, then
        SIGKILLed if it outstays the stop timeout or a second signal arrives."""
        hurry_after = self.signals
        self._terminate(self.edges, hurry_after)
        self._terminate([self.ingest] if self.ingest else [], hurry_after)
        if self.valkey is not None:
            self.valkey.stop(timeout=self.plan.stop_timeout)
            self.log.info("stopped name=valkey")
        if self.watchdog is not None:
            with contextlib.suppress(OSError):
                assert self.watchdog.stdin is not None
                self.watchdog.stdin.write(b"x")  # disarm: Valkey is already gone
                self.watchdog.stdin.close()
            try:
                self.watchdog.wait(self.plan.stop_timeout)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
                self.watchdog.wait()
        self.edges, self.ingest, self.valkey, self.watchdog = [], None, None, None

    def _terminate(self, children: list[Child], hurry_after: int) -> None:
        for child in children:
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + self.plan.stop_timeout
        for child in children:
            while child.proc.poll() is None:
                if time.monotonic() > deadline or self.signals > hurry_after:
                    self.log.warning("killing name=%s pid=%d", child.name, child.pid)
                    child.proc.kill()
                    child.proc.wait()
                    break
                time.sleep(0.05)
            code = child.proc.returncode
            if code in (0, -signal.SIGTERM):
                self.log.info("stopped name=%s", child.name)
            else:
                self.log.warning("stopped name=%s code=%s", child.name, _describe(code))


def _answers(url: str) -> bool:
    """True if GET `url` is answered 200; proxies from the environment are ignored."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1.0) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _print(line: str) -> None:
    with contextlib.suppress(OSError):  # a closed stdout must not stop the shutdown
        print(line, flush=True)


# --- entry point ---------------------------------------------------------------------------


def run(args: argparse.Namespace, logger: logging.Logger | None = None) -> int:
    """`fanout dev`: 0 after a requested stop, 1 if anything failed; a bad setting raises
    `ConfigError` before anything starts."""
    the_plan = plan(args)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=the_plan.log_level.upper(),
            format="%(asctime)s %(levelname)s %(name)s %(message)s",
        )
    cluster = Cluster(the_plan, logger)
    previous: dict[signal.Signals, Any] = {}
    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, cluster.on_signal)
    try:
        return cluster.run()
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)
