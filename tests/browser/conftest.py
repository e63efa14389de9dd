"""What the browser tests share: one headless Chromium for the whole run, and examples/browser/ served from two origins.

Selenium drives Debian's `chromium` through `chromium-driver`; the driver's calls block, so tests run them in a
thread (`asyncio.to_thread`) and the servers on the event loop keep serving. Without chromium the tests that use
`browser` are skipped locally, and fail under CI (CI=true), where `.ci/run` installs it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

PAGE_DIR = Path(__file__).resolve().parents[2] / "examples" / "browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def _unavailable() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    missing = _unavailable()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {missing}")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="metergate-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # --lang: pages format amounts in the browser's locale; the tests read them as en-US does.
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--lang=en-US", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _static_app() -> web.Application:
    app = web.Application()
    app.router.add_static("/", PAGE_DIR)
    return app


@pytest.fixture
async def pages(aiohttp_server):
    """The example pages from two origins: (listed, unlisted)."""
    listed = await aiohttp_server(_static_app(), host="127.0.0.1")
    unlisted = await aiohttp_server(_static_app(), host="127.0.0.1")
    return f"http://127.0.0.1:{listed.port}", f"http://127.0.0.1:{unlisted.port}"
