"""Fixtures for the ledger of record: a fresh database per test on SQLite and on a real PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from proxy.ledger.db import LedgerDatabase
from tests.postgres_server import PostgresServer


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database's URL, once on SQLite (a file) and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    async with server.database() as url:
        yield url


@pytest.fixture
async def ledger_db(database_url: str) -> AsyncIterator[LedgerDatabase]:
    database = await LedgerDatabase.open(database_url)
    yield database
    await database.close()


@pytest.fixture
async def ledger_gateway(aiohttp_client, database_url: str, redis_server, redis, mock_upstream, monkeypatch):
    """The whole app (real Redis, the mock upstream) archiving to this test's own database."""
    from proxy.app import create_app
    from proxy.config import load_config
    from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV

    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    config = load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY], database_url=database_url,
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
    )
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


async def archive_now(gateway) -> None:
    """Archive every wallet's entries now (the app's own archiver would within a second)."""
    from proxy.appstate import LEDGER_DB, REDIS, WALLETS
    from proxy.config import ArchiveConfig
    from proxy.ledger.archiver import Archiver
    from proxy.store.archive import ArchiveStore

    app = gateway.server.app
    await Archiver(ArchiveStore(app[REDIS], app[WALLETS].commands), app[WALLETS], app[LEDGER_DB], ArchiveConfig()).drain()
