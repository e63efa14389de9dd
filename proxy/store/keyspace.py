"""Every Redis key name the store uses, in one place.

All keys of one wallet share the hash tag `{w:<wallet_id>}`, so every script
touches a single Redis Cluster slot. The hold index, read by the reaper, is
the only key outside a wallet's slot.
"""

from __future__ import annotations

import hashlib
import re

from proxy.store.errors import InvalidWalletRequest

PREFIX = "mg"
HOLD_INDEX_KEY = f"{PREFIX}:hold-index"
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


def _api_key_key(key_hash: str) -> str:
    return f"{PREFIX}:api-key:{key_hash}"


def _index_member(wallet_id: str, hold_id: str) -> str:
    return f"{wallet_id}|{hold_id}"


def _check_wallet_id(wallet_id: str) -> None:
    if not WALLET_ID_RE.match(wallet_id):
        raise InvalidWalletRequest("ids are 1-128 characters of A-Z a-z 0-9 _ . @ -")
