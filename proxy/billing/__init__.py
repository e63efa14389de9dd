"""Money in through Stripe: Checkout top-ups, saved cards, auto top-up, refunds to the card, and the webhook.

- `stripe_api`: the official library's async client, pointed at the configured API base;
- `service`: `Billing`, buying credit and refunding it to the card;
- `auto_top_up`: `AutoTopUps`, the off-session charge a low balance starts;
- `webhook`: `StripeEvents`, Stripe's events verified and applied once;
- `routes`: the HTTP surface (501 without a `stripe:` block).
Money moves only through `proxy.store.payments.PaymentStore`'s Lua scripts.
"""

from proxy.billing.auto_top_up import AutoTopUps
from proxy.billing.service import Billing, BillingError
from proxy.billing.stripe_api import StripeApi, StripeNotConfigured
from proxy.billing.webhook import StripeEvents

__all__ = ["AutoTopUps", "Billing", "BillingError", "StripeApi", "StripeEvents", "StripeNotConfigured"]
