"""The wallet store: the one door to Redis. Every key name and every Lua script live here.

- `wallets`: `WalletStore` moves money, one method per script in `proxy/lua/`.
- `accounts`: `AccountStore` keeps end users' API keys.
- `limits`: `LimitStore` counts per-credential rates and spend.
- `payments`: `PaymentStore` credits card payments, refunds to the card, disputes, and the auto top-up rule.
- `scripts`: the client, the `Commands` protocol and the script runner;
  `redis_mux`: the multiplexed connection the request path uses;
  `cluster`: how the app connects, and the request path's routing on a Redis Cluster.
- `keyspace`: every key name; `errors`: the scripts' refusals.

Handlers never build a key themselves.
"""

from proxy.store.accounts import API_KEY_PREFIX, TEST_KEY_PREFIX, AccountStore, ApiKey, hash_api_key
from proxy.store.errors import (
    BalanceLimit,
    BudgetExceeded,
    ChargeNotFound,
    CreditLimitInUse,
    HoldClosed,
    HoldNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    InvalidWalletRequest,
    NoPaymentMethod,
    PaymentNotFound,
    RefundExceedsCharge,
    RefundExceedsPayment,
    SpendLimitReached,
    StaleCredential,
    WalletError,
    WalletExists,
    WalletNotFound,
)
from proxy.store.keyspace import HOLD_INDEX_KEY, MAX_AMOUNT_MICROS, PREFIX, WALLET_ID_RE
from proxy.store.limits import KeySpend, Limited, LimitStore
from proxy.store.scripts import Commands, RedisPyCommands, connect, fingerprint
from proxy.store.wallets import (
    Audit,
    Checkpoint,
    CredentialSpend,
    Hold,
    HoldExtension,
    KeyStamp,
    LedgerEntry,
    Receipt,
    Settlement,
    WalletState,
    WalletStore,
    now_ms,
)

__all__ = [
    "API_KEY_PREFIX", "AccountStore", "ApiKey", "KeyStamp", "Audit", "BalanceLimit", "BudgetExceeded", "Checkpoint", "ChargeNotFound", "CreditLimitInUse", "Commands", "CredentialSpend",
    "HOLD_INDEX_KEY", "Hold", "HoldClosed", "HoldExtension", "HoldNotFound", "IdempotencyConflict", "InsufficientFunds",
    "InvalidAmount", "InvalidWalletRequest", "NoPaymentMethod", "PaymentNotFound", "RefundExceedsPayment", "KeySpend", "LedgerEntry", "LimitStore", "Limited", "MAX_AMOUNT_MICROS",
    "PREFIX", "Receipt", "RedisPyCommands", "RefundExceedsCharge", "Settlement", "SpendLimitReached", "StaleCredential", "TEST_KEY_PREFIX", "WALLET_ID_RE", "WalletError",
    "WalletExists", "WalletNotFound", "WalletState", "WalletStore", "connect", "fingerprint", "hash_api_key", "now_ms",
]
