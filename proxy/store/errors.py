"""The store's refusals: each Lua script error code maps to one exception class."""

from __future__ import annotations

from redis.exceptions import ResponseError


class WalletError(Exception):
    """A refusal from a wallet script; `code` is stable and machine-readable."""

    code = "WALLET_ERROR"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class WalletNotFound(WalletError):
    code = "WALLET_NOT_FOUND"


class WalletExists(WalletError):
    code = "WALLET_EXISTS"


class InsufficientFunds(WalletError):
    code = "INSUFFICIENT_FUNDS"


class IdempotencyConflict(WalletError):
    code = "IDEMPOTENCY_CONFLICT"


class SpendLimitReached(WalletError):
    """A hold's growth would take its credential past a spend cap."""

    code = "SPEND_LIMIT"


class StaleCredential(WalletError):
    """The key a call was admitted with changed (revoked, its scopes or expiry patched)
    since this process cached it: look it up afresh and admit the call again."""

    code = "STALE_CREDENTIAL"


class HoldNotFound(WalletError):
    code = "HOLD_NOT_FOUND"


class HoldClosed(WalletError):
    code = "HOLD_CLOSED"


class ChargeNotFound(WalletError):
    code = "CHARGE_NOT_FOUND"


class RefundExceedsCharge(WalletError):
    code = "REFUND_EXCEEDS_CHARGE"


class InvalidAmount(WalletError):
    code = "INVALID_AMOUNT"


class BalanceLimit(WalletError):
    code = "BALANCE_LIMIT"


class InvalidWalletRequest(WalletError):
    code = "INVALID_REQUEST"


class PaymentNotFound(WalletError):
    """No card payment with that id credited this wallet."""

    code = "PAYMENT_NOT_FOUND"


class RefundExceedsPayment(WalletError):
    code = "REFUND_EXCEEDS_PAYMENT"


class NoPaymentMethod(WalletError):
    """Auto top-up cannot be enabled before a card is saved."""

    code = "NO_PAYMENT_METHOD"


class CreditLimitInUse(WalletError):
    """The credit limit cannot go below what the wallet already uses of it."""

    code = "CREDIT_LIMIT_IN_USE"


class BudgetExceeded(WalletError):
    """The call (or its growth) does not fit what the end user's budget leaves this period."""

    code = "BUDGET_EXCEEDED"


_ERRORS: dict[str, type[WalletError]] = {
    cls.code: cls
    for cls in (
        WalletNotFound, WalletExists, InsufficientFunds, SpendLimitReached, IdempotencyConflict, HoldNotFound, HoldClosed,
        ChargeNotFound, RefundExceedsCharge, InvalidAmount, BalanceLimit, InvalidWalletRequest,
        PaymentNotFound, RefundExceedsPayment, NoPaymentMethod, CreditLimitInUse, BudgetExceeded, StaleCredential,
    )
}


def _raise_script_error(exc: ResponseError) -> None:
    code, _, message = str(exc).partition(" ")
    cls = _ERRORS.get(code)
    if cls is None:
        raise exc
    raise cls(message) from None
