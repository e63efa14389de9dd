"""The statement page in real headless Chromium: it shows the month's figures, and a screenshot is kept."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from proxy.appstate import WALLETS
from tests.ledger.conftest import ledger_gateway  # noqa: F401  (a fixture: the app on this test's own database)
from tests.ledger.test_reports import admin, mixed_load

ARTIFACTS = Path(os.environ.get("METERGATE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts")


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """A SQLite file of this test's own: the page must show this test's money only."""
    return f"sqlite+aiosqlite:///{tmp_path / 'ledger.sqlite3'}"


async def run(fn: Any, *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)  # the driver blocks; the app keeps serving on the loop


async def test_the_statement_page_shows_the_months_figures_in_chromium(browser, ledger_gateway, mock_upstream):  # noqa: F811
    gateway = ledger_gateway
    await mixed_load(gateway, mock_upstream)
    wallet = await gateway.server.app[WALLETS].get("u_1")
    month = dt.datetime.now(dt.UTC).strftime("%Y-%m")
    made = await admin(gateway, "POST", "/end-users/u_1/statement-links", {"month": month})

    await run(browser.get, made["url"])

    def figure(element_id: str) -> tuple[int, str]:
        element = browser.find_element(By.ID, element_id)
        return int(element.get_attribute("data-micros")), element.text

    assert await run(lambda: browser.find_element(By.ID, "month").text) == month
    carried_out, shown = await run(figure, "carried-out")
    assert carried_out == wallet.balance_micros and shown.startswith("$")
    top_ups, _ = await run(figure, "top-ups")
    spend, _ = await run(figure, "spend")
    other, _ = await run(figure, "other")
    assert top_ups + spend + other == carried_out  # carried in is 0: the wallet opened this month
    rows = await run(lambda: [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#charges tr.charge")])
    assert any("gpt-4o-mini" in r for r in rows) and any("gpt-4o " in r for r in rows)
    csv_href = await run(lambda: browser.find_element(By.ID, "csv").get_attribute("href"))
    assert csv_href.endswith(made["csv_url"].split("/statements/")[1])

    shot = ARTIFACTS / "statement.png"
    await run(lambda: ARTIFACTS.mkdir(parents=True, exist_ok=True))
    assert await run(browser.save_screenshot, str(shot))
    png = await run(shot.read_bytes)
    assert len(png) > 5_000 and png[:8] == b"\x89PNG\r\n\x1a\n"
