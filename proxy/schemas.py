"""The admin API's request bodies and response shapes, as typed models.

The OpenAPI document is generated from these same models, so it cannot drift
from what the handlers accept.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from proxy.budgets import BudgetTerms, BudgetView
from proxy.store import MAX_AMOUNT_MICROS, WalletState

Micros = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT_MICROS, description="integer micros (1 USD = 1,000,000)")]
SignedMicros = Annotated[StrictInt, Field(ge=-MAX_AMOUNT_MICROS, le=MAX_AMOUNT_MICROS, description="signed integer micros, non-zero")]
EndUserId = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.@-]{1,128}$", description="your id for the end user; also the wallet id")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateEndUser(_Body):
    id: EndUserId
    tier: StrictStr = "default"
    metadata: dict[str, Any] = {}
    credit_limit_micros: Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS)] = 0
    ratecard: StrictStr | None = Field(None, description="pin to a card: 'card_id' or 'card_id@version'")
    budget: BudgetTerms | None = Field(None, description="spend cap per calendar period; default: the tier's (config `budgets`)")
    asset: StrictStr | None = Field(None, description=(
        "what the wallet holds (USD, or an asset the config defines); must be what the end user's card prices in. "
        "Default: that card's asset. It never changes"))
    livemode: StrictBool = Field(True, description=(
        "false: a test end user (keys sk-eu_test_…, calls answered by the sandbox, every ledger entry is_simulated); "
        "it never changes"))


class UpdateEndUser(_Body):
    """Only the fields sent change; `"ratecard": null` unpins the end user (back to their tier's card)."""

    tier: StrictStr | None = None
    metadata: dict[str, Any] | None = None
    ratecard: StrictStr | None = Field(None, description="'card_id' or 'card_id@version' (grandfathered); null unpins")
    budget: BudgetTerms | None = Field(None, description="spend cap per calendar period; null: back to the tier's")


Count = Annotated[StrictInt, Field(ge=1, le=MAX_AMOUNT_MICROS)]
Cap = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS, description="integer micros (1 USD = 1,000,000)")]
ModelNames = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=200)]], Field(min_length=1, max_length=200)]


class TokenScopes(_Body):
    """What an end-user token (or key) may do. Left out or null: no limit of that kind."""

    models: ModelNames | None = Field(None, description="model names it may call; others are a 404")
    max_spend_micros: Cap | None = Field(None, description="lifetime spend cap; over it, 402")
    max_daily_spend_micros: Cap | None = Field(None, description="spend cap per UTC day; over it, 402")
    requests_per_minute: Count | None = Field(None, description="sliding one-minute window; over it, 429")
    tokens_per_minute: Count | None = Field(None, description="prompt + output bound at admission, corrected to the real usage at settlement; over it, 429")

    def scopes(self) -> dict[str, Any]:
        """The limits that are set, as stored on the key or carried in the token."""
        return {name: getattr(self, name) for name in SCOPE_FIELDS if getattr(self, name, None) is not None}


class KeyScopes(TokenScopes):
    """What a key may do. Left out or null: no limit of that kind."""

    expires_ms: Annotated[StrictInt, Field(ge=0)] | None = Field(None, description="unix time in ms after which it no longer authenticates")


SCOPE_FIELDS = ("models", "max_spend_micros", "max_daily_spend_micros", "requests_per_minute", "tokens_per_minute", "expires_ms")


class CreateKey(KeyScopes):
    name: Annotated[StrictStr, Field(max_length=200)] = ""


class UpdateKey(KeyScopes):
    """PATCH: only the fields sent change; a limit sent as null is removed."""

    name: Annotated[StrictStr, Field(max_length=200)] | None = None

    def apply(self, scopes: dict[str, Any]) -> dict[str, Any]:
        out = dict(scopes)
        for name in SCOPE_FIELDS:
            if name in self.model_fields_set:
                if getattr(self, name) is None:
                    out.pop(name, None)
                else:
                    out[name] = getattr(self, name)
        return out


class TopUp(_Body):
    amount_micros: Micros
    reference: Annotated[StrictStr, Field(max_length=500)] = ""
    metadata: dict[str, Any] = {}


class Refund(_Body):
    amount_micros: Micros
    charge_id: StrictStr = Field(description="ledger id of the charge being refunded")
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    metadata: dict[str, Any] = {}


class Adjustment(_Body):
    amount_micros: SignedMicros
    reason: Annotated[StrictStr, Field(min_length=1, max_length=500)]
    metadata: dict[str, Any] = {}


def usd(micros: int) -> str:
    """Micros as a decimal string for people: 1234567 -> '1.234567'."""
    if type(micros) is not int:
        return f"{Decimal(micros).scaleb(-6):.6f}"
    # Placing the point in the digits: a third of the Decimal's cost, and a call shows two of these.
    digits = str(abs(micros)).rjust(7, "0")
    return f"{'-' if micros < 0 else ''}{digits[:-6]}.{digits[-6:]}"


class WalletView(BaseModel):
    id: str
    currency: str = Field("USD", description="the wallet's asset: what its micros are of")
    balance_micros: int
    held_micros: int
    available_micros: int
    credit_limit_micros: int
    balance: str
    available: str

    @classmethod
    def of(cls, state: WalletState, asset: str = "USD") -> WalletView:
        return cls(
            id=state.wallet_id, currency=asset, balance_micros=state.balance_micros, held_micros=state.held_micros,
            available_micros=state.available_micros, credit_limit_micros=state.credit_limit_micros,
            balance=usd(state.balance_micros), available=usd(state.available_micros),
        )


class ReceiptView(BaseModel):
    ledger_id: str
    wallet: WalletView


class LedgerEntryView(BaseModel):
    id: str
    type: str
    amount_micros: int
    amount: str
    balance_micros: int
    held_micros: int
    created_ms: int
    details: dict[str, Any]


class LedgerPage(BaseModel):
    object: str = "list"
    data: list[LedgerEntryView]
    has_more: bool
    next_cursor: str | None


class EndUserView(BaseModel):
    id: str
    tier: str
    ratecard: str | None
    metadata: dict[str, Any]
    created_ms: int
    wallet: WalletView
    budget: BudgetView | None = None
    asset: str = "USD"
    livemode: bool = True


class KeyView(BaseModel):
    id: str
    end_user_id: str
    name: str
    masked: str
    created_ms: int
    revoked: bool
    revoked_ms: int | None
    expired: bool = False
    models: list[str] | None = None
    max_spend_micros: int | None = None
    max_daily_spend_micros: int | None = None
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    expires_ms: int | None = None
    spent_micros: int = Field(0, description="lifetime spend through this key (calls in flight count their hold)")
    spent_today_micros: int = Field(0, description="spend through this key in the current UTC day")


class CreatedKeyView(KeyView):
    key: str = Field(description="the key itself, shown this once; only its hash is stored")


class MintToken(TokenScopes):
    ttl_seconds: Annotated[StrictInt, Field(ge=1)] = Field(900, description="at most jwt.max_ttl_seconds")


class TokenView(BaseModel):
    object: str = "end_user.token"
    token: str = Field(description="send as Authorization: Bearer <token>")
    token_type: str = "Bearer"
    end_user_id: str
    jti: str = Field(description="the token's id; its calls are recorded with key_id jwt:<jti>")
    algorithm: str
    expires_at: int = Field(description="unix time in seconds")
    expires_in: int


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyView]


class RateCardSummary(BaseModel):
    id: str
    version: int
    ref: str = Field(description="id@version, what an end user can be pinned to")
    effective_from: str
    models: list[str]


class RateCardsView(BaseModel):
    cards: list[RateCardSummary]
    tiers: dict[str, str]


# ------------------------------------------------------------ money in (Stripe)

Threshold = Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS, description="integer micros")]


class StartCheckout(_Body):
    """An end user's top-up: POST /v1/wallet/checkout-sessions."""

    amount_micros: Micros = Field(description="what the wallet is credited once paid; between the configured minimum and maximum")
    save_card: StrictBool = Field(False, description="keep the card for auto top-up (setup_future_usage=off_session)")
    user: StrictStr | None = Field(None, description="with an operator key: the end user who buys")


class AdminStartCheckout(_Body):
    amount_micros: Micros = Field(description="what the wallet is credited once paid")
    save_card: StrictBool = False
    success_url: StrictStr | None = Field(None, pattern=r"^https?://", description="default: stripe.success_url")
    cancel_url: StrictStr | None = Field(None, pattern=r"^https?://", description="default: stripe.cancel_url")


class CheckoutSessionView(BaseModel):
    object: str = "checkout.session"
    id: str
    url: str = Field(description="send the buyer here (Stripe's hosted page)")
    amount_micros: int
    currency: str


class UpdateAutoTopUp(_Body):
    """Only the fields sent change. Enabling needs a saved card, and resets the failure count."""

    enabled: StrictBool | None = None
    threshold_micros: Threshold | None = Field(None, description="a settle leaving available below this starts a top-up")
    amount_micros: Micros | None = Field(None, description="what one auto top-up charges and credits")


class AutoTopUpView(BaseModel):
    object: str = "auto_top_up"
    end_user: str
    enabled: bool
    threshold_micros: int
    amount_micros: int
    card: str | None = Field(description="the saved card, e.g. 'visa •••• 4242'")
    payment_method: str | None
    customer: str | None
    consecutive_failures: int
    last_error: str | None
    disabled_reason: str | None = Field(description="set when failures turned the rule off")
    attempts: int
    blocked_until_ms: int | None = Field(description="no attempt starts before this (one in flight, or backing off)")


class StartCardRefund(_Body):
    payment_intent: StrictStr = Field(pattern=r"^pi_[A-Za-z0-9_]+$", description="the card payment (see card-payments)")
    amount_micros: Micros | None = Field(None, description="left out: all of the payment's credit the wallet still has")


class CardRefundView(BaseModel):
    object: str = "card_refund"
    refund: str = Field(description="Stripe's refund id")
    status: str
    payment_intent: str
    amount_micros: int
    ledger_id: str
    wallet: WalletView


class CardPaymentView(BaseModel):
    payment_intent: str
    credited_micros: int
    refunded_micros: int
    refundable_micros: int


class CardPaymentList(BaseModel):
    object: str = "list"
    data: list[CardPaymentView]


# ------------------------------------------------------------ events out (webhooks)

EventTypes = Annotated[list[Annotated[StrictStr, Field(min_length=1, max_length=100)]], Field(min_length=1, max_length=50)]


class CreateWebhookEndpoint(_Body):
    url: StrictStr = Field(pattern=r"^https?://[^\s]+$", max_length=2000, description="where events are POSTed")
    events: EventTypes = Field(["*"], description="event types to send, or [\"*\"] for all")
    description: StrictStr = Field("", max_length=500)
    enabled: StrictBool = True


class UpdateWebhookEndpoint(_Body):
    """Only the fields sent change. Enabling a disabled endpoint resumes where it stopped (nothing is skipped)."""

    url: StrictStr | None = Field(None, pattern=r"^https?://[^\s]+$", max_length=2000)
    events: EventTypes | None = None
    description: StrictStr | None = Field(None, max_length=500)
    enabled: StrictBool | None = None


class RotateWebhookSecret(_Body):
    grace_seconds: Annotated[StrictInt, Field(ge=0, le=7 * 86_400)] = Field(
        86_400, description="how long deliveries are also signed with the old secret")


class WebhookEndpointView(BaseModel):
    object: str = "webhook_endpoint"
    id: str
    url: str
    events: list[str]
    description: str
    enabled: bool
    disabled_reason: str | None
    created: int
    secret: str | None = Field(None, description="the signing secret: shown only when created or rotated")
    secret_hint: str = Field(description="the secret's last four characters")
    failing_since: int | None = Field(None, description="unix seconds; set while deliveries fail")
    pending_attempts: int = Field(0, description="failed attempts of the event it is retrying")
    next_attempt_at: int | None = None


class WebhookEndpointList(BaseModel):
    object: str = "list"
    data: list[WebhookEndpointView]


class EventView(BaseModel):
    object: str = "event"
    id: str
    type: str
    created: int
    end_user: str | None = None
    ledger_id: str | None = None
    data: dict[str, Any]


class EventPage(BaseModel):
    object: str = "list"
    data: list[EventView]
    next_cursor: str | None = Field(None, description="pass as starting_after for the next (older) page")


class DeliveryAttemptView(BaseModel):
    endpoint: str
    attempts: list[dict[str, Any]]


class EventDetailView(EventView):
    deliveries: list[DeliveryAttemptView]


class Redeliver(_Body):
    endpoint: StrictStr | None = Field(None, description="one endpoint; left out: every enabled endpoint that wants this type")


class BalanceAlerts(_Body):
    absolute_micros: list[Annotated[StrictInt, Field(ge=0, le=MAX_AMOUNT_MICROS)]] = Field([], max_length=20)
    percent_of_last_top_up: list[Annotated[StrictInt, Field(gt=0, lt=100)]] = Field([], max_length=20)


class BalanceAlertsView(BalanceAlerts):
    object: str = "balance_alerts"
    end_user: str
    source: str = Field(description="'wallet' (set for this end user) or 'tier' (its tier's default)")
