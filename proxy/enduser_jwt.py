"""End-user tokens: short-lived JWTs that stand for an end user, like a scoped key.

The operator's backend signs `{"sub": <end user id>, "exp": ..., ...}` with a
shared secret (HS256) or a private key whose public half metergate holds (a
PEM file or a JWKS file, by `kid`). Optional claims carry the same limits as a
key: `models`, `max_spend_micros`, `max_daily_spend_micros`,
`requests_per_minute`, `tokens_per_minute`; `jti` names the token in the
ledger (`key_id` = `jwt:<jti>`) and is what its limits are counted under.

Verification never lets the token choose how it is checked: its `alg` must be
in the configured allow-list (`none` cannot be listed), the key is chosen by
that algorithm's family (an HS* token is only ever checked against the
secret, never against a public key), and PyJWT is given that single
algorithm. `exp` and `sub` are required, `nbf`/`aud`/`iss` are checked, and a
token may not live longer than `max_ttl_seconds`.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from pydantic import ValidationError

from proxy.config import Config, JWTConfig
from proxy.errors import ApiError
from proxy.schemas import TokenScopes

CLAIM_SCOPES = ("models", "max_spend_micros", "max_daily_spend_micros", "requests_per_minute", "tokens_per_minute")


def _invalid(message: str) -> ApiError:
    return ApiError(401, f"invalid token: {message}", code="invalid_token")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


@dataclass(frozen=True)
class VerifiedToken:
    end_user_id: str
    key_id: str
    scopes: dict[str, Any]
    claims: dict[str, Any]


@dataclass(frozen=True)
class MintedToken:
    token: str
    jti: str
    expires_at: int
    expires_in: int
    algorithm: str


class TokenAuthority:
    """Verifies end-user tokens (and mints them when metergate holds a signing key)."""

    def __init__(self, config: Config):
        cfg: JWTConfig = config.jwt
        self.cfg = cfg
        self.algorithms = list(dict.fromkeys(cfg.algorithms))
        self.secret: bytes | None = None
        if cfg.hs256_secret_env:
            value = os.environ.get(cfg.hs256_secret_env)
            if value:
                self.secret = value.encode()
        self.public_keys: list[tuple[str | None, Any]] = []
        if cfg.public_key_file:
            pem = config.resolve(cfg.public_key_file).read_bytes()
            self.public_keys.append((cfg.key_id, _load_public_pem(pem)))
        if cfg.jwks_file:
            jwks = json.loads(config.resolve(cfg.jwks_file).read_text())
            for jwk in jwks.get("keys", []):
                self.public_keys.append((jwk.get("kid"), jwt.PyJWK(jwk).key))
        self.private_key: Any = None
        if cfg.private_key_file:
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            self.private_key = load_pem_private_key(config.resolve(cfg.private_key_file).read_bytes(), password=None)

    @property
    def enabled(self) -> bool:
        return self.secret is not None or bool(self.public_keys)

    # -------------------------------------------------------------- verify

    def _key_for(self, alg: str, kid: Any) -> Any:
        if alg.startswith("HS"):
            if self.secret is None:
                raise _invalid(f"{alg} tokens are not accepted here")
            return self.secret
        candidates = [key for key_kid, key in self.public_keys if kid is None or key_kid == kid]
        if not candidates:
            raise _invalid(f"no public key {kid!r} (unknown or retired signing key)" if kid else "no public key to verify it")
        if len(candidates) > 1:
            raise _invalid("the token must name its signing key in `kid`")
        return candidates[0]

    def verify(self, token: str) -> VerifiedToken:
        if not self.enabled:
            raise _invalid("end-user tokens are not enabled on this deployment")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _invalid("malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise _invalid(f"algorithm {alg!r} is not allowed")
        key = self._key_for(alg, header.get("kid"))
        required = ["exp", "sub"] + (["aud"] if self.cfg.audience else []) + (["iss"] if self.cfg.issuer else [])
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], audience=self.cfg.audience, issuer=self.cfg.issuer,
                leeway=self.cfg.leeway_seconds, options={"require": required},
            )
        except jwt.ExpiredSignatureError:
            raise _invalid("it has expired") from None
        except jwt.ImmatureSignatureError:
            raise _invalid("it is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise _invalid("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise _invalid("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise _invalid(f"the `{exc.claim}` claim is required") from None
        except jwt.InvalidSignatureError:
            raise _invalid("signature verification failed") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _invalid("it cannot be verified") from None
        return self._checked(token, claims)

    def _checked(self, token: str, claims: dict[str, Any]) -> VerifiedToken:
        sub, exp = claims.get("sub"), claims["exp"]
        if not isinstance(sub, str) or not sub:
            raise _invalid("`sub` must name the end user")
        issued = claims.get("iat")
        start = issued if isinstance(issued, (int, float)) else time.time() - self.cfg.leeway_seconds
        if exp - start > self.cfg.max_ttl_seconds:
            raise _invalid(f"it lives longer than the allowed {self.cfg.max_ttl_seconds} s")
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not 1 <= len(jti) <= 128):
            raise _invalid("`jti` must be a string of 1-128 characters")
        try:
            scopes = TokenScopes.model_validate({k: claims[k] for k in CLAIM_SCOPES if k in claims}).scopes()
        except ValidationError as exc:
            raise _invalid(f"bad limit claims: {exc.errors()[0]['loc'][0]}") from None
        key_id = "jwt:" + (jti or hashlib.sha256(token.encode()).hexdigest()[:24])
        return VerifiedToken(sub, key_id, scopes, claims)

    # ---------------------------------------------------------------- mint

    def signing_algorithm(self) -> str | None:
        if self.secret is not None and "HS256" in self.algorithms:
            return "HS256"
        if self.private_key is not None:
            return next((a for a in self.algorithms if not a.startswith("HS")), None)
        return None

    def mint(self, end_user_id: str, ttl_seconds: int, scopes: Mapping[str, Any]) -> MintedToken:
        alg = self.signing_algorithm()
        if alg is None:
            raise ApiError(
                409, "metergate holds no signing key: set jwt.hs256_secret_env or jwt.private_key_file",
                code="token_signing_unavailable",
            )
        now = int(time.time())
        jti = "tok_" + secrets.token_hex(12)
        claims: dict[str, Any] = {"sub": end_user_id, "iat": now, "nbf": now, "exp": now + ttl_seconds, "jti": jti, **scopes}
        if self.cfg.audience:
            claims["aud"] = self.cfg.audience
        if self.cfg.issuer:
            claims["iss"] = self.cfg.issuer
        key = self.secret if alg.startswith("HS") else self.private_key
        headers = {"kid": self.cfg.key_id} if self.cfg.key_id and not alg.startswith("HS") else None
        token = jwt.encode(claims, key, algorithm=alg, headers=headers)  # type: ignore[arg-type]  # set when minting is configured
        return MintedToken(token=token, jti=jti, expires_at=now + ttl_seconds, expires_in=ttl_seconds, algorithm=alg)


def _load_public_pem(pem: bytes) -> Any:
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    return load_pem_public_key(pem)


TOKENS = web.AppKey("tokens", TokenAuthority)


def setup(app: web.Application, config: Config) -> None:
    """Load the verification (and signing) keys at start: a missing key file fails here, not per request."""
    app[TOKENS] = TokenAuthority(config)
