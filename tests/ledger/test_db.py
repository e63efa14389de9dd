"""`LedgerDatabase`: migrations, exactly-once inserts and the append-only audit log, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from proxy.ledger.db import AuditRecord, LedgerDatabase, database_url, entry_row
from proxy.ledger.schema import audit_log, ledger_entries, metadata
from proxy.store.wallets import LedgerEntry


def charge(entry_id: str, amount: int, **details) -> LedgerEntry:
    return LedgerEntry(id=entry_id, type="charge", amount_micros=-amount, balance_micros=1_000 - amount, held_micros=0,
                       details={"model": "gpt-4o", "key_id": "key_1", "tier": "pro", "prompt_tokens": 10,
                                "completion_tokens": 5, "price_micros": amount, "cost_micros": amount // 2, **details})


async def test_the_migrated_schema_has_the_tables_and_columns_queries_are_written_against(ledger_db: LedgerDatabase):
    async with ledger_db.engine.connect() as conn:
        found = await conn.run_sync(lambda c: {t: {col["name"] for col in sa.inspect(c).get_columns(t)}
                                                for t in sa.inspect(c).get_table_names()})
    for table in metadata.tables.values():
        assert found[table.name] == {c.name for c in table.columns}


async def test_migrating_again_is_a_no_op(ledger_db: LedgerDatabase):
    await ledger_db.migrate()
    async with ledger_db.engine.connect() as conn:
        revision = (await conn.execute(sa.text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert revision == "0002"


async def test_an_entry_inserted_twice_is_archived_once(ledger_db: LedgerDatabase):
    entries = [charge("1700000000000-0", 300), charge("1700000000001-0", 200)]
    assert await ledger_db.insert_batches({"u_1": entries}) == 2
    assert await ledger_db.insert_batches({"u_1": [*entries, charge("1700000000002-0", 100)]}) == 1
    async with ledger_db.engine.connect() as conn:
        rows = (await conn.execute(sa.select(ledger_entries.c.entry_id, ledger_entries.c.amount_micros)
                                   .order_by(ledger_entries.c.entry_id))).all()
    assert [tuple(r) for r in rows] == [("1700000000000-0", -300), ("1700000000001-0", -200), ("1700000000002-0", -100)]


async def test_the_same_entry_id_in_two_wallets_is_two_rows(ledger_db: LedgerDatabase):
    # In one batch (one transaction), as an archiver pass over both wallets writes them.
    assert await ledger_db.insert_batches({"u_1": [charge("1700000000000-0", 300)],
                                           "u_2": [charge("1700000000000-0", 300)]}) == 2
    async with ledger_db.engine.connect() as conn:
        assert (await conn.execute(sa.select(sa.func.count()).select_from(ledger_entries))).scalar_one() == 2


def test_a_charge_row_carries_what_reports_group_by():
    row = entry_row("u_1", charge("1700000000000-0", 300, request_id="req_1", outcome="completed"))
    assert (row["day"], row["month"], row["model"], row["tier"], row["key_id"], row["price_micros"], row["cost_micros"],
            row["prompt_tokens"], row["completion_tokens"], row["request_id"], row["outcome"]) == (
        "2023-11-14", "2023-11", "gpt-4o", "pro", "key_1", 300, 150, 10, 5, "req_1", "completed")


def test_entries_either_side_of_utc_midnight_get_their_own_day():
    # 2023-11-14T23:59:59.999Z and the next millisecond, then back: the row's day is
    # formatted once per UTC day, so a cached day must never leak to the next entry.
    days = [entry_row("u_1", charge(f"{ms}-0", 1))["day"] for ms in (1700006399999, 1700006400000, 1700006399999)]
    assert days == ["2023-11-14", "2023-11-15", "2023-11-14"]


def test_a_row_takes_numbers_and_names_from_details_only_when_they_are_whole_and_present():
    row = entry_row("u_1", charge("1700000000000-0", 300, prompt_tokens="12", completion_tokens=1.5,
                                  price_micros=True, model="", key_id=None, outcome=7))
    assert (row["prompt_tokens"], row["completion_tokens"], row["price_micros"], row["model"], row["key_id"],
            row["outcome"]) == (12, None, None, None, None, "7")


async def test_the_audit_log_refuses_updates_and_deletes(ledger_db: LedgerDatabase):
    await ledger_db.append_audit(AuditRecord(at_ms=1, actor="ops", role="admin", method="POST", path="/admin/x",
                                             action="POST /x", target="u_1", request_id="req_1", status=201,
                                             request_body={"amount_micros": 5}, before={"b": 1}, after={"b": 2}))
    for statement in (audit_log.update().values(actor="someone else"), audit_log.delete()):
        with pytest.raises(DBAPIError, match="append-only"):
            async with ledger_db.engine.begin() as conn:
                await conn.execute(statement)
    async with ledger_db.engine.connect() as conn:
        assert (await conn.execute(sa.select(audit_log.c.actor, audit_log.c.after))).all() == [("ops", '{"b":2}')]


def test_plain_urls_get_the_async_drivers():
    assert database_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert database_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert database_url(None).startswith("sqlite+aiosqlite:///")
