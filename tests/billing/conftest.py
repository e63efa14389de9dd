"""Billing fixtures: the fake Stripe (tests/fake_stripe.py, a localstripe server in a subprocess), a `stripe`
client pointed at it, and `sign_stripe_event` for webhook events built by hand.

`fake_stripe` is started once per session and flushed before every test that uses it; when such a test fails,
the fake's log for that test is added to the report.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import stripe

from tests.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_STRIPE_API_KEY = "sk_test_metergate_fake"
WEBHOOK_ID = "metergate"  # one registration, replaced by each register_webhook
LOG_OFFSET = pytest.StashKey[int]()
FAKE_KEY = pytest.StashKey["FakeStripe"]()


def sign_stripe_event(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header value for `payload`, as Stripe (and localstripe) sign: v1 = HMAC-SHA256 of "t.payload"."""
    t = int(time.time()) if timestamp is None else timestamp
    signature = hmac.new(secret.encode(), b"%d.%s" % (t, payload), hashlib.sha256).hexdigest()
    return f"t={t},v1={signature}"


class FakeStripeError(Exception):
    """A non-2xx answer from one of the fake's test routes."""

    def __init__(self, status: int, body: Any):
        super().__init__(f"fake stripe answered {status}: {body}")
        self.status = status
        self.body = body


@dataclass
class FakeStripe:
    url: str
    api_key: str
    log_path: Path

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def _call(self, method: str, path: str, form: dict[str, Any] | None = None) -> None:
        data = json.dumps(form).encode() if form is not None else None
        headers = {**self._auth, "Content-Type": "application/json"}
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10):
                pass
        except urllib.error.HTTPError as error:
            raise FakeStripeError(error.code, error.read().decode(errors="replace")) from None

    def register_webhook(self, url: str, secret: str, events: list[str] | None = None) -> None:
        """Deliver every event (or only `events`) to `url`, signed with `secret`; replaces any earlier registration."""
        form: dict[str, Any] = {"url": url, "secret": secret}
        if events is not None:
            form["events"] = events
        self._call("POST", f"/_config/webhooks/{WEBHOOK_ID}", form)

    def flush(self) -> None:
        """Forget every object, saved idempotency key, registered webhook, pending delivery and refund refusal."""
        self._call("DELETE", "/_config/data")

    def fail_next_refund(self, status: int = 400, code: str = "charge_disputed", message: str | None = None) -> None:
        """The next refund creation answers `status` (400 → InvalidRequestError, 402 → CardError) with `code`."""
        form: dict[str, Any] = {"status": status, "code": code}
        if message is not None:
            form["message"] = message
        self._call("POST", "/_test/refunds/fail_next", form)

    async def pay_checkout(self, session_id: str, card_number: str = "4242424242424242") -> dict[str, Any]:
        """Pay the Checkout Session as its customer would on Stripe's page; the completed session, or FakeStripeError."""
        async with aiohttp.ClientSession() as http, http.post(
                f"{self.url}/_test/checkout/sessions/{session_id}/pay", json={"card_number": card_number}) as response:
            body = await response.json()
            if response.status != 200:
                raise FakeStripeError(response.status, body)
            return body

    async def payment_intents(self, customer: str | None = None) -> list[dict[str, Any]]:
        """Every PaymentIntent (of `customer`), newest first, as the API returns them."""
        found: list[dict[str, Any]] = []
        params: dict[str, str] = {"limit": "100"}
        async with aiohttp.ClientSession(headers=self._auth) as http:
            while True:
                async with http.get(f"{self.url}/v1/payment_intents", params=params) as response:
                    page = await response.json()
                    if response.status != 200:
                        raise FakeStripeError(response.status, page)
                found.extend(page["data"])
                if not page["has_more"]:
                    break
                params["starting_after"] = page["data"][-1]["id"]
        # Filtered here as well as by the fake, so a fake that ignored `customer` could not pass for one that filters.
        return [intent for intent in found if customer is None or intent["customer"] == customer]

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


def _wait_until_up(fake: FakeStripe, process: subprocess.Popen[bytes], deadline_seconds: float = 30) -> None:
    deadline = time.monotonic() + deadline_seconds
    request = urllib.request.Request(fake.url + "/v1/customers", headers={"Authorization": f"Bearer {fake.api_key}"})
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the fake Stripe exited with {process.returncode}:\n{fake.log_since(0)}")
        try:
            with urllib.request.urlopen(request, timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the fake Stripe did not answer within {deadline_seconds} s:\n{fake.log_since(0)}") from None
            time.sleep(0.05)


@pytest.fixture(scope="session")
def fake_stripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeStripe]:
    port = free_port()
    fake = FakeStripe(f"http://127.0.0.1:{port}", FAKE_STRIPE_API_KEY, tmp_path_factory.mktemp("fake_stripe") / "log")
    with fake.log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-u", "-m", "tests.fake_stripe", "--port", str(port)],
                                   cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_until_up(fake, process)
        yield fake
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(autouse=True)
def _flush_fake_stripe(request: pytest.FixtureRequest) -> None:
    """A clean fake Stripe for each test that uses it (tests that do not use it do not start it)."""
    if "fake_stripe" not in request.fixturenames:
        return
    fake: FakeStripe = request.getfixturevalue("fake_stripe")
    fake.flush()
    request.node.stash[LOG_OFFSET] = fake.log_size()
    request.node.stash[FAKE_KEY] = fake


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed and FAKE_KEY in item.stash:
        report.sections.append(("fake stripe log", item.stash[FAKE_KEY].log_since(item.stash[LOG_OFFSET])))
    return report


@pytest.fixture
async def stripe_client(fake_stripe: FakeStripe) -> AsyncIterator[stripe.StripeClient]:
    """The official client as metergate builds it, pointed at the fake; no retries, so a test sees the first answer."""
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(fake_stripe.api_key, base_addresses={"api": fake_stripe.url}, http_client=http,
                                 max_network_retries=0)
    yield client
    await http.close_async()


# ------------------------------------------------------------ metergate with Stripe

WEBHOOK_SECRET = "whsec_metergate_test_secret"
STRIPE_KEY_ENV = "METERGATE_TEST_STRIPE_KEY"
WEBHOOK_SECRET_ENV = "METERGATE_TEST_STRIPE_WEBHOOK_SECRET"


@dataclass
class BillingGateway:
    """metergate with a `stripe:` block pointed at the fake, its webhook registered there."""

    client: Any  # aiohttp TestClient
    app: Any  # the aiohttp Application
    fake: FakeStripe
    webhook_url: str

    @property
    def wallets(self) -> Any:
        from proxy.appstate import WALLETS

        return self.app[WALLETS]

    @property
    def payments(self) -> Any:
        from proxy.appstate import BILLING

        return self.app[BILLING].payments

    async def drain(self) -> None:
        """Wait for background work (auto top-ups, closes) to finish."""
        from proxy.appstate import BACKGROUND

        await self.app[BACKGROUND].drain(timeout=30)


def stripe_block(fake: FakeStripe, **overrides: Any) -> dict[str, Any]:
    return {"secret_key_env": STRIPE_KEY_ENV, "webhook_secret_env": WEBHOOK_SECRET_ENV, "api_base": fake.url,
            "max_network_retries": 0, **overrides}


@pytest.fixture
def stripe_overrides() -> dict[str, Any]:
    """Override in a test module to change the `stripe:` block (e.g. auto top-up defaults)."""
    return {}


@pytest.fixture
async def billing_gateway(
    aiohttp_client: Any, redis_server: Any, redis: Any, mock_upstream: Any, fake_stripe: FakeStripe,
    stripe_overrides: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> BillingGateway:
    from proxy.app import create_app
    from proxy.config import load_config
    from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV

    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv(STRIPE_KEY_ENV, fake_stripe.api_key)
    monkeypatch.setenv(WEBHOOK_SECRET_ENV, WEBHOOK_SECRET)
    config = load_config(
        redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY],
        upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
        stripe=stripe_block(fake_stripe, **stripe_overrides),
    )
    app = create_app(config)
    client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    webhook_url = str(client.make_url("/stripe/webhook"))
    fake_stripe.register_webhook(webhook_url, WEBHOOK_SECRET)
    return BillingGateway(client=client, app=app, fake=fake_stripe, webhook_url=webhook_url)
