"""A real `metergate serve` killed with SIGKILL while it archives, then restarted: every entry archived exactly once."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from proxy.ledger.schema import ledger_entries
from tests.conftest import ADMIN_KEY, OPERATOR_KEY
from tests.proxy.test_crash_recovery import start_serve, stop

ENTRIES = 1_500


def write_config(tmp_path: Path, repo_root: Path, redis_url: str, database_url: str) -> Path:
    path = tmp_path / "metergate.yaml"
    path.write_text(json.dumps({  # JSON is YAML
        "host": "127.0.0.1", "redis_url": redis_url, "database_url": database_url,
        "admin_keys": [ADMIN_KEY], "operator_keys": [OPERATOR_KEY],
        "ratecards_dir": str(repo_root / "config" / "ratecards"),
        "upstreams": {"openai": {"base_url": "http://127.0.0.1:9"}},  # never called here
        # Small batches: many insert-then-cursor steps for the kill to land between. The killed
        # process's claim on the wallet lapses after lease_seconds.
        "archive": {"batch_size": 3, "poll_interval_seconds": 0.01, "lease_seconds": 1},
    }))
    return path


async def archived_ids(database_url: str) -> list[str]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sa.select(ledger_entries.c.entry_id).where(ledger_entries.c.wallet_id == "u_1"))
            return [r.entry_id for r in rows]
    finally:
        await engine.dispose()


async def test_an_archiver_killed_mid_batch_archives_every_entry_once_after_restart(
    tmp_path, repo_root, redis_server, wallets, database_url
):
    await wallets.open("u_1", profile={"tier": "default", "metadata": {}})
    for n in range(ENTRIES - 2):
        await wallets.top_up("u_1", 1_000 + n, idempotency_key=f"t{n}")
    await wallets.adjust("u_1", -5, reason="correction", idempotency_key="a1")
    expected = [e.id for e in await wallets.ledger_after("u_1", "0", limit=10 * ENTRIES)]
    assert len(expected) == ENTRIES
    config = write_config(tmp_path, repo_root, redis_server.url, database_url)

    first = await start_serve(config, repo_root, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 60
        while len(await archived_ids(database_url)) < 30:
            assert time.monotonic() < deadline, first.log_tail()
            await asyncio.sleep(0.02)
    finally:
        await stop(first)  # SIGKILL, in the middle of the work
    at_kill = len(await archived_ids(database_url))
    assert 0 < at_kill < ENTRIES, "the kill must land while entries are still being archived"

    second = await start_serve(config, repo_root, tmp_path / "second.log")
    try:
        deadline = time.monotonic() + 90
        while len(ids := await archived_ids(database_url)) < ENTRIES:
            assert time.monotonic() < deadline, second.log_tail()
            await asyncio.sleep(0.1)
    finally:
        await stop(second)

    assert sorted(ids) == sorted(expected)  # each once: the primary key, and nothing missing
    assert len(ids) == len(set(ids)) == ENTRIES
