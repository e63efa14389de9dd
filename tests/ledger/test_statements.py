"""Statement links: the page and CSV work until the link expires, then 403; forged or altered links 403."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import time
from urllib.parse import urlsplit

from proxy.appstate import CONFIG, WALLETS
from proxy.ledger import statements
from tests.conftest import ADMIN
from tests.ledger.test_reports import admin, mixed_load

THIS_MONTH = dt.datetime.now(dt.UTC).strftime("%Y-%m")


async def link(gateway, user: str = "u_1", month: str = THIS_MONTH, **extra) -> dict:
    return await admin(gateway, "POST", f"/end-users/{user}/statement-links", {"month": month, **extra})


def local(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + "?" + parts.query


async def test_a_statement_link_shows_the_months_figures_and_its_csv(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    wallet = await ledger_gateway.server.app[WALLETS].get("u_1")
    made = await link(ledger_gateway)

    page = await ledger_gateway.get(local(made["url"]))

    assert page.status == 200 and page.content_type == "text/html"
    assert page.headers["Cache-Control"] == "private, no-store" and page.headers["Referrer-Policy"] == "no-referrer"
    text = await page.text()
    assert f'id="carried-out" data-micros="{wallet.balance_micros}"' in text
    assert 'id="carried-in" data-micros="0"' in text and "gpt-4o-mini" in text and "inv_2" in text
    sheet = await ledger_gateway.get(local(made["csv_url"]))
    assert sheet.status == 200
    rows = list(csv.DictReader(io.StringIO(await sheet.text())))
    body = [r for r in rows if r["kind"] not in ("carried_in", "carried_out")]
    assert sum(int(r["amount_micros"]) for r in body) == wallet.balance_micros  # from 0, everything this month
    assert rows[-1]["kind"] == "carried_out" and int(rows[-1]["amount_micros"]) == wallet.balance_micros


async def test_an_expired_link_is_a_403(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    made = await link(ledger_gateway, ttl_seconds=1)
    assert (await ledger_gateway.get(local(made["url"]))).status == 200

    await asyncio.sleep(max(0.0, made["expires_at"] - time.time()) + 0.05)

    for url in (made["url"], made["csv_url"]):
        response = await ledger_gateway.get(local(url))
        assert response.status == 403 and (await response.json())["error"]["code"] == "invalid_statement_link"


async def test_a_forged_or_altered_link_is_a_403(ledger_gateway, mock_upstream):
    await mixed_load(ledger_gateway, mock_upstream)
    made = local((await link(ledger_gateway))["url"])
    path, query = made.split("?")
    expires = int(query.split("expires=")[1].split("&")[0])
    key = statements.signing_key(ledger_gateway.server.app[CONFIG])
    forged = [
        made.replace("sig=", "sig=0"),  # a wrong signature
        made.replace("sig=", "x="),  # none
        made.replace("/u_1/", "/u_2/"),  # another end user, this one's signature
        made.replace(THIS_MONTH, "2020-01"),  # another month
        made.replace(f"expires={expires}", f"expires={expires + 86_400}"),  # a longer life
        statements.link_path(b"not-the-key", "u_1", THIS_MONTH, expires),  # signed with another key
        statements.link_path(key, "u_1", THIS_MONTH, int(time.time()) - 1),  # well signed, but expired
    ]
    for url in forged:
        response = await ledger_gateway.get(url)
        assert response.status == 403, url


async def test_links_are_only_for_existing_end_users_and_real_months(ledger_gateway):
    missing = await ledger_gateway.post("/admin/end-users/nobody/statement-links", json={"month": THIS_MONTH},
                                        headers=ADMIN)
    assert missing.status == 404
    await admin(ledger_gateway, "POST", "/end-users", {"id": "u_1"})
    for month in ("2026-13", "2026-1", "november"):
        bad = await ledger_gateway.post("/admin/end-users/u_1/statement-links", json={"month": month}, headers=ADMIN)
        assert bad.status == 400, month
