"""Every Redis key name the store uses, in one place.

All keys of one wallet share the hash tag `{w:<wallet_id>}`, so every script
touches a single Redis Cluster slot. Outside a wallet's slot: the hold index
and the grant-expiry index
(read by the reaper), API keys by hash, and the Stripe lookups (which wallet a
payment paid, which events were applied), none of them written by a script.
"""

from __future__ import annotations

import hashlib
import re

from proxy.store.errors import InvalidWalletRequest

PREFIX = "mg"
HOLD_INDEX_KEY = f"{PREFIX}:hold-index"
# Wallets with a grant due to expire, scored by when (the reaper's; written beside
# grant.lua, never inside a script, like the hold index).
GRANT_DUE_KEY = f"{PREFIX}:grant-due"
# Wallets with ledger entries not yet archived (scored by when), and wallets whose
# archived entries come due for trimming (scored by when): see proxy/ledger/archiver.py.
ARCHIVE_DIRTY_KEY = f"{PREFIX}:archive:dirty"
ARCHIVE_TRIM_KEY = f"{PREFIX}:archive:trim"
WALLET_ID_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,128}$")
MAX_AMOUNT_MICROS = 10**15


def _tag(wallet_id: str) -> str:
    return f"{PREFIX}:{{w:{wallet_id}}}"


def _wallet_key(w: str) -> str:
    return f"{_tag(w)}:wallet"


def _ledger_key(w: str) -> str:
    return f"{_tag(w)}:ledger"


def _holds_key(w: str) -> str:
    return f"{_tag(w)}:holds"


def _hold_key(w: str, hold_id: str) -> str:
    return f"{_tag(w)}:hold:{hold_id}"


def _idempotency_key(w: str, key: str) -> str:
    return f"{_tag(w)}:idem:{hashlib.sha256(key.encode()).hexdigest()}"


def _profile_key(w: str) -> str:
    return f"{_tag(w)}:profile"


def _refunded_key(w: str) -> str:
    return f"{_tag(w)}:refunded"


def _user_keys_key(w: str) -> str:
    return f"{_tag(w)}:api-keys"


def _limits_key(w: str, key_id: str) -> str:
    return f"{_tag(w)}:limits:{key_id}"


def _meter_usage_key(w: str, meter: str, period: str) -> str:
    """Units (micro-units) of one of the operator's meters this end user used in a period ("2026-12")."""
    return f"{_tag(w)}:meter:{meter}:{period}"


def _response_key(w: str, response_id: str) -> str:
    """Which upstream holds a Responses API response this end user created (GET /v1/responses/{id})."""
    return f"{_tag(w)}:response:{response_id}"


def _archive_key(w: str) -> str:
    """The wallet's archive state: `cursor` (the last entry archived), `trimmed_to` and
    `trimmed_sum` (the last entry trimmed from the stream, and the sum of all trimmed amounts)."""
    return f"{_tag(w)}:archive"


def _wallet_events_key(w: str) -> str:
    """The wallet's event-derivation state (see proxy/store/events.py); its `cursor` bounds trimming too."""
    return f"{_tag(w)}:events"


def _billing_key(w: str) -> str:
    """The wallet's saved card (Stripe customer, payment method) and auto top-up rule."""
    return f"{_tag(w)}:billing"


def _card_payments_key(w: str) -> str:
    """Per card payment (PaymentIntent id): what it credited, what was refunded, disputes."""
    return f"{_tag(w)}:card-payments"


def _stripe_payment_key(payment_intent_id: str) -> str:
    """Which wallet a PaymentIntent paid (for events that name only the payment)."""
    return f"{PREFIX}:stripe:payment:{payment_intent_id}"


def _stripe_event_key(event_id: str) -> str:
    return f"{PREFIX}:stripe:event:{event_id}"


def _api_key_key(key_hash: str) -> str:
    return f"{PREFIX}:api-key:{key_hash}"


def _index_member(wallet_id: str, hold_id: str) -> str:
    return f"{wallet_id}|{hold_id}"


def _check_wallet_id(wallet_id: str) -> None:
    if not WALLET_ID_RE.match(wallet_id):
        raise InvalidWalletRequest("ids are 1-128 characters of A-Z a-z 0-9 _ . @ -")
