"""What `metergate serve` says at start about how its Redis keeps money through a crash (the test's own private server)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy import startup


@pytest.fixture
async def persistence(redis) -> AsyncIterator[None]:
    """Put the private server's persistence back as it was after the test changes it."""
    saved = {name: (await redis.config_get(name))[name] for name in ("appendonly", "appendfsync", "save")}
    yield
    for name, value in saved.items():
        await redis.config_set(name, value)


async def test_a_redis_that_keeps_nothing_on_disk_is_warned_about(redis, redis_server, persistence):
    await redis.config_set("save", "")
    await redis.config_set("appendonly", "no")
    warning = startup.redis_durability(redis_server.url)
    assert warning is not None and "keeps nothing on disk" in warning and "appendfsync everysec" in warning


async def test_rdb_snapshots_alone_are_warned_about(redis, redis_server, persistence):
    await redis.config_set("appendonly", "no")
    await redis.config_set("save", "3600 1")
    warning = startup.redis_durability(redis_server.url)
    assert warning is not None and "keeps only RDB snapshots" in warning


async def test_an_aof_fsynced_every_second_is_enough(redis, redis_server, persistence):
    await redis.config_set("appendonly", "yes")
    await redis.config_set("appendfsync", "everysec")
    assert startup.redis_durability(redis_server.url) is None


async def test_an_aof_left_to_the_os_is_warned_about(redis, redis_server, persistence):
    await redis.config_set("appendonly", "yes")
    await redis.config_set("appendfsync", "no")
    warning = startup.redis_durability(redis_server.url)
    assert warning is not None and "appendfsync 'no'" in warning


def test_an_unreachable_ledger_database_stops_the_start_with_one_line():
    error = startup.check_database("postgresql+asyncpg://nobody:secret@127.0.0.1:9/ledger")
    assert error is not None and error.startswith("cannot use the ledger database at postgresql+asyncpg://nobody:***@")
    assert "secret" not in error
