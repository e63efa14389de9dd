"""The service configuration: `metergate.yaml`, validated, with environment overrides.

Precedence is file < environment < command line. A config that fails
validation raises `SourceError` naming the file, line and field at fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from pricing.yaml_source import SourceError, SourceIssue, issues_from_validation, read_yaml, to_plain
from proxy.budgets import BudgetTerms

# `proxy/defaults` is a link to the repository's `config/`, so a checkout serves
# (and edits) config/ while a wheel carries the same files as package data.
DEFAULT_CONFIG_PATH = Path(__file__).parent / "defaults" / "metergate.yaml"

# The keys the bundled config ships with: anyone who has read the README knows them.
DEV_ADMIN_KEY = "mg-admin-dev-only-change-me"
DEV_OPERATOR_KEY = "mg-operator-dev-only-change-me"

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise PydanticCustomError("http_url", "must be an http:// or https:// URL with a host, got '{value}'", {"value": value})
    return value


def _web_origin(value: str) -> str:
    # Browsers send `Origin: scheme://host[:port]`, never a path or a trailing
    # slash; an entry with either would match nothing and fail silently.
    if value == "*":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query or parts.fragment:
        raise PydanticCustomError(
            "web_origin", "must be an origin like https://app.example.com (scheme://host[:port], no path or trailing slash) "
            "or \"*\", got '{value}'", {"value": value})
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
WebOrigin = Annotated[str, AfterValidator(_web_origin)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamConfig(_Strict):
    """One model provider speaking the OpenAI HTTP API."""

    base_url: HttpUrl
    api_key_env: str | None = None
    connect_timeout_seconds: PositiveFloat = 5.0
    read_timeout_seconds: PositiveFloat = 300.0
    # Open connections to this upstream at most (calls beyond wait for one). Each call in
    # flight holds one, a stream for its whole length; the process needs two file
    # descriptors per call (client and upstream), so raise `ulimit -n` to match.
    max_connections: PositiveInt = 4096

    @property
    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


JWT_ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class JWTConfig(_Strict):
    """End-user tokens: minted by the operator's backend (or by metergate), verified here.

    HS* tokens verify against the secret in `hs256_secret_env`; the others
    against `public_key_file` (PEM) or `jwks_file` (by `kid`). Only the listed
    `algorithms` are accepted; `none` can never be listed. To let metergate
    mint tokens (POST /admin/end-users/{id}/tokens) it needs the secret, or
    `private_key_file` (PEM) with `key_id` as the tokens' `kid`.
    """

    hs256_secret_env: str | None = None
    public_key_file: str | None = None
    jwks_file: str | None = None
    private_key_file: str | None = None
    key_id: str | None = None
    algorithms: list[Literal[JWT_ALGORITHMS]] = ["HS256"]  # type: ignore[valid-type]
    audience: str | None = None
    issuer: str | None = None
    leeway_seconds: Annotated[int, Field(ge=0)] = 0
    max_ttl_seconds: PositiveInt = 3600


# Currencies whose smallest unit is not a hundredth (Stripe's list): an amount
# in micros becomes Stripe's integer amount by this exponent.
_ZERO_DECIMAL = {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"}
_THREE_DECIMAL = {"bhd", "jod", "kwd", "omr", "tnd"}

Money = Annotated[Decimal, Field(gt=0, le=1_000_000_000)]


class AutoTopUpDefaults(_Strict):
    """A wallet's auto top-up rule when its card is saved: below `threshold`, charge `amount` (currency units)."""

    enabled: bool = False
    threshold: Money = Decimal(5)
    amount: Money = Decimal(20)


class StripeConfig(_Strict):
    """Money in through Stripe: Checkout top-ups, saved cards, auto top-up, refunds to the card.

    The wallets' balances are in this `currency` (1 unit = 1,000,000 micros);
    amounts here are in currency units, the API's in micros.
    """

    secret_key_env: str = "STRIPE_SECRET_KEY"
    webhook_secret_env: str = "STRIPE_WEBHOOK_SECRET"
    # Where the stripe library sends its requests: Stripe itself, or a test double.
    api_base: HttpUrl = "https://api.stripe.com"
    currency: Annotated[str, Field(pattern=r"^[a-z]{3}$")] = "usd"
    top_up_presets: list[Money] = [Decimal(20), Decimal(50), Decimal(200), Decimal(500)]
    minimum_top_up: Money = Decimal(5)
    maximum_top_up: Money = Decimal(10_000)
    # Where Checkout sends the buyer back (Stripe fills {CHECKOUT_SESSION_ID}).
    success_url: HttpUrl = "http://127.0.0.1:8080/topped-up?session_id={CHECKOUT_SESSION_ID}"
    cancel_url: HttpUrl = "http://127.0.0.1:8080/top-up-cancelled"
    product_name: str = "Credit"
    # The auto top-up rule a wallet gets when its card is saved: `default`, or its tier's.
    auto_top_up: dict[str, AutoTopUpDefaults] = {"default": AutoTopUpDefaults()}
    # After a declined auto top-up, the next try waits this long; this many
    # consecutive failures turn the rule off until the operator re-enables it.
    auto_top_up_retry_after_seconds: Annotated[float, Field(ge=0)] = 3600.0
    auto_top_up_max_failures: PositiveInt = 3
    # How many times the library retries a request Stripe did not answer (with
    # the same idempotency key, so a retry never charges twice).
    max_network_retries: Annotated[int, Field(ge=0, le=10)] = 2

    @property
    def secret_key(self) -> str | None:
        return os.environ.get(self.secret_key_env) or None

    @property
    def webhook_secret(self) -> str | None:
        return os.environ.get(self.webhook_secret_env) or None

    @property
    def micros_per_unit(self) -> int:
        """Micros in one of Stripe's integer amount units (a cent for USD)."""
        if self.currency in _ZERO_DECIMAL:
            return 1_000_000
        if self.currency in _THREE_DECIMAL:
            return 1_000
        return 10_000

    @model_validator(mode="after")
    def _whole_minor_units(self) -> StripeConfig:
        # Stripe charges integers of the currency's smallest unit: an amount
        # finer than that could be credited but never charged.
        amounts = [("top_up_presets", p) for p in self.top_up_presets]
        amounts += [("minimum_top_up", self.minimum_top_up), ("maximum_top_up", self.maximum_top_up)]
        amounts += [(f"auto_top_up.{tier}.amount", rule.amount) for tier, rule in self.auto_top_up.items()]
        for name, amount in amounts:
            if (amount * 1_000_000) % self.micros_per_unit:
                raise ValueError(f"{name}: {amount} is finer than one {self.currency.upper()} minor unit")
        if self.minimum_top_up > self.maximum_top_up:
            raise ValueError("minimum_top_up is above maximum_top_up")
        return self

    def auto_top_up_for(self, tier: str) -> AutoTopUpDefaults:
        return self.auto_top_up.get(tier) or self.auto_top_up.get("default") or AutoTopUpDefaults()

    @staticmethod
    def to_micros(amount: Decimal) -> int:
        return int(amount * 1_000_000)


class LowBalanceAlerts(_Strict):
    """When `wallet.balance_low` fires: available crossing below an absolute amount,
    or below a percentage of the wallet's last top-up. Each fires once when
    crossed downward and is re-armed by a top-up."""

    absolute_micros: list[Annotated[int, Field(ge=0)]] = []
    percent_of_last_top_up: list[Annotated[int, Field(gt=0, lt=100)]] = [50, 20, 10]


class EventsConfig(_Strict):
    """Events out: derived from the wallets' ledgers, delivered to signed webhook endpoints."""

    # Per tier ("default" for the others); a wallet's own alerts (admin API) win.
    low_balance: dict[str, LowBalanceAlerts] = {"default": LowBalanceAlerts()}
    # How often each replica looks for wallets with new ledger entries, and for events to deliver.
    poll_interval_seconds: PositiveFloat = 0.5
    # Events are kept (and can be redelivered) this long.
    retention_days: PositiveInt = 30
    webhook_timeout_seconds: PositiveFloat = 10.0
    # A failed delivery is retried after retry_base, doubling up to retry_max;
    # an endpoint failing for disable_after is turned off (and said so).
    retry_base_seconds: PositiveFloat = 10.0
    retry_max_seconds: PositiveFloat = 3600.0
    disable_after_seconds: PositiveFloat = 3 * 24 * 3600.0

    def low_balance_for(self, tier: str) -> LowBalanceAlerts:
        return self.low_balance.get(tier) or self.low_balance.get("default") or LowBalanceAlerts()


class AdminKeyConfig(_Strict):
    """A named admin key with a role: `admin` (everything), `developer` (end users and
    keys, no money movements), `viewer` (read only). The key itself comes from an
    env var, so it never sits in the file; the audit log records the name."""

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")]
    key_env: str
    role: Literal["admin", "developer", "viewer"] = "viewer"

    @property
    def key(self) -> str | None:
        return os.environ.get(self.key_env) or None


class ArchiveConfig(_Strict):
    """The ledger of record: every wallet's ledger entries copied to the SQL database,
    and the Redis streams trimmed behind what was copied."""

    enabled: bool = True
    # Ledger entries stay in Redis at least this long (and always until archived).
    redis_retention_days: Annotated[float, Field(gt=0)] = 7.0
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 500
    poll_interval_seconds: PositiveFloat = 1.0
    # A replica's claim on a wallet it archives, renewed every batch: how late a killed
    # replica's wallets are taken up by the others.
    lease_seconds: PositiveFloat = 10.0


class StatementsConfig(_Strict):
    """End users' monthly statements: hosted HTML pages behind signed, expiring links."""

    operator_name: str = "metergate"
    logo_url: str | None = None
    link_ttl_seconds: PositiveInt = 7 * 24 * 3600
    # The HMAC key of statement links; unset, one derived from the first admin key (links then
    # die when that key is rotated).
    secret_env: str = "METERGATE_STATEMENT_SECRET"
    public_base_url: str | None = None  # how links are written (e.g. https://billing.example.com); unset: the request's host

    @property
    def secret(self) -> str | None:
        return os.environ.get(self.secret_env) or None


class AssetConfig(_Strict):
    """A unit wallets can hold instead of USD (e.g. `credits`): cards that price in it
    and wallets that hold it use its micros; `usd_per_unit` is its value, for margin reports."""

    usd_per_unit: Annotated[Decimal, Field(gt=0)]


AssetName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class Config(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    redis_url: str | None = None
    admin_keys: list[str] = []  # each has the `admin` role
    admins: list[AdminKeyConfig] = []  # named keys with roles (see AdminKeyConfig)
    operator_keys: list[str] = []
    # Operator keys that act in test mode: only on test end users, on the sandbox.
    operator_test_keys: list[str] = []
    # Where test-mode calls go: an upstream named here, else metergate's built-in
    # deterministic responder (proxy/sandbox.py).
    sandbox_upstream: str | None = None
    hold_ttl_seconds: PositiveInt = 600
    # How often a call in flight writes its counted usage onto its hold, so
    # that a proxy killed mid-call is billed by the reaper for what it relayed.
    checkpoint_interval_seconds: PositiveFloat = 2.0
    # How long one wallet-store command may take before the call treats the
    # store as unavailable (and, after forwarding, keeps retrying its close).
    redis_timeout_seconds: PositiveFloat = 10.0
    # On SIGTERM: how long calls in flight (streams above all) may run on while
    # no new call is admitted; what is still running then is cut and settled.
    shutdown_grace_seconds: PositiveFloat = 60.0
    # How `metergate serve` writes its logs: text lines, or one JSON object per
    # line (time, level, logger, message and the call's fields) for collectors.
    log_format: Literal["text", "json"] = "text"
    # How old an end user's tier/card pin may be when a call reads it (0: always fresh).
    profile_cache_seconds: Annotated[float, Field(ge=0)] = 5.0
    reaper_interval_seconds: PositiveFloat = 5.0
    idempotency_ttl_seconds: PositiveInt = 7 * 24 * 3600
    # How long a closed hold's record stays, so that a close retried after a lost
    # reply replays its first result. Only the call's own lease retries a close, for
    # at most an hour, so the record must outlive that and nothing more: every call
    # leaves one (~420 bytes), kept this long.
    closed_hold_ttl_seconds: Annotated[int, Field(ge=7200)] = 24 * 3600
    max_body_bytes: PositiveInt = 4 * 1024 * 1024
    # How long a request body may take to arrive in full; a slower one is a 408,
    # so a client cannot hold a handler open by trickling (or withholding) it.
    body_timeout_seconds: PositiveFloat = 30.0
    cors_origins: list[WebOrigin] = []
    ratecards_dir: str = "ratecards"
    ratecards_watch_interval_seconds: PositiveFloat = 2.0
    upstreams: dict[str, UpstreamConfig] = {}
    jwt: JWTConfig = JWTConfig()
    # Unset: no Stripe; its endpoints answer 501.
    stripe: StripeConfig | None = None
    events: EventsConfig = EventsConfig()
    # Spend budgets per calendar period, by tier (an end user's own budget, set
    # through the admin API, wins): {tier: {limit_micros, period: day|month, timezone}}.
    budgets: dict[str, BudgetTerms] = {}
    # Assets besides USD that wallets may hold and rate cards price in ({name: {usd_per_unit}}).
    assets: dict[AssetName, AssetConfig] = {}
    # The ledger of record (SQLAlchemy URL: postgresql+asyncpg://… or sqlite+aiosqlite:///…).
    # Unset: a SQLite file, metergate-ledger.sqlite3, in the working directory.
    database_url: str | None = None
    archive: ArchiveConfig = ArchiveConfig()
    statements: StatementsConfig = StatementsConfig()
    # Where relative paths in this file are resolved from; set by the loader.
    base_dir: str = "."

    @model_validator(mode="after")
    def _sandbox_is_an_upstream(self) -> Config:
        if self.sandbox_upstream is not None and self.sandbox_upstream not in self.upstreams:
            raise ValueError(f"sandbox_upstream {self.sandbox_upstream!r} is not one of the upstreams")
        if set(self.operator_keys) & set(self.operator_test_keys):
            # A key in both would be taken as live (checked first) though its owner meant it for tests.
            raise ValueError("a key cannot be in both operator_keys and operator_test_keys")
        return self

    def asset_names(self) -> set[str]:
        return {"USD", *self.assets}

    def usd_per_unit(self, asset: str) -> Decimal:
        return Decimal(1) if asset == "USD" else self.assets[asset].usd_per_unit

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else Path(self.base_dir) / path


def _key_list(value: str) -> list[str]:
    # "k1, k2" is how people write lists; the space is not part of the key.
    return [k.strip() for k in value.split(",") if k.strip()]


_ENV_OVERRIDES: dict[str, tuple[str, Any]] = {
    "METERGATE_HOST": ("host", str),
    "METERGATE_PORT": ("port", int),
    "METERGATE_REDIS_URL": ("redis_url", str),
    "METERGATE_DATABASE_URL": ("database_url", str),
    "METERGATE_ADMIN_KEY": ("admin_keys", _key_list),
    "METERGATE_OPERATOR_KEY": ("operator_keys", _key_list),
    "METERGATE_OPERATOR_TEST_KEY": ("operator_test_keys", _key_list),
    "METERGATE_RATECARDS_DIR": ("ratecards_dir", str),
    "METERGATE_HOLD_TTL_SECONDS": ("hold_ttl_seconds", int),
}


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
    """Read, override and validate the config. Raises `SourceError` when it is wrong."""
    path = (path or DEFAULT_CONFIG_PATH).resolve()
    env: Mapping[str, str] = os.environ if environ is None else environ
    document = read_yaml(path) or {}
    if not isinstance(document, dict):
        raise SourceError([SourceIssue(str(path), 1, "-", "the config must be a mapping")])
    data = to_plain(document)
    data.setdefault("base_dir", str(path.parent))
    for var, (field, convert) in _ENV_OVERRIDES.items():
        if env.get(var):
            try:
                data[field] = convert(env[var])
            except ValueError:
                raise SourceError([SourceIssue(var, 0, field, f"cannot parse {env[var]!r}")]) from None
    for name, upstream in (data.get("upstreams") or {}).items():
        # METERGATE_UPSTREAM_OPENAI_BASE_URL points the `openai` upstream elsewhere
        # (a regional endpoint, a test double) without editing the file.
        url = env.get(f"METERGATE_UPSTREAM_{name.upper().replace('-', '_')}_BASE_URL")
        if url and isinstance(upstream, dict):
            upstream["base_url"] = url
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise SourceError(issues_from_validation(path, document, exc)) from None
