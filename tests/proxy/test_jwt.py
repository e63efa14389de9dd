"""End-user tokens: every way a JWT can be wrong is a 401 that charges nothing; good ones act like keys.

Prices as in test_scopes: CHAT holds 77 micros and, with the mock reporting
200 + 40 tokens, costs 68.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.app import create_app
from proxy.config import load_config
from tests.conftest import ADMIN, ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY, UPSTREAM_KEY_ENV, money_ledger
from tests.mock_upstream import make_usage

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 100}
COST = 68
SECRET = "a-shared-secret-for-tests-" + "x" * 40  # 66 bytes: long enough for HS512 too
SECRET_ENV = "METERGATE_TEST_JWT_SECRET"
AUDIENCE, ISSUER = "metergate", "https://app.example.com"


def pem_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def pem_public(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def key_files(tmp_path, rsa_key, ec_key):
    (tmp_path / "rsa.pub.pem").write_bytes(pem_public(rsa_key))
    (tmp_path / "rsa.pem").write_bytes(pem_private(rsa_key))
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "ec-2026", "use": "sig", "alg": "ES256"}]}))
    return tmp_path


@pytest.fixture
def make_gateway(aiohttp_client, redis_server, redis, mock_upstream, monkeypatch):
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    mock_upstream.usage_override = make_usage(200, 40)

    async def make(**jwt_config):
        jwt_config = {"audience": AUDIENCE, "issuer": ISSUER, "max_ttl_seconds": 3600, **jwt_config}
        config = load_config(
            redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY],
            upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
            jwt=jwt_config,
        )
        return await aiohttp_client(create_app(config))

    return make


@pytest.fixture
async def hs_gateway(make_gateway):
    return await make_gateway(hs256_secret_env=SECRET_ENV, algorithms=["HS256"])


@pytest.fixture
async def rs_gateway(make_gateway, key_files):
    return await make_gateway(public_key_file=str(key_files / "rsa.pub.pem"), algorithms=["RS256"])


def claims(**overrides) -> dict:
    now = int(time.time())
    base = {"sub": "u_1", "iat": now, "exp": now + 300, "aud": AUDIENCE, "iss": ISSUER, "jti": "t1"}
    return {k: v for k, v in {**base, **overrides}.items() if v is not None}


def hs256(**overrides) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


async def chat(client, token: str, body: dict = CHAT):
    return await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})


async def snapshot(wallets, user_id: str = "u_1"):
    state = await wallets.get(user_id)
    return state.balance_micros, state.held_micros, [e.id for e in await money_ledger(wallets, user_id)]


async def assert_401_and_free(client, token: str, wallets, mock_upstream, fragment: str) -> None:
    before = await snapshot(wallets)
    resp = await chat(client, token)
    body = await resp.json()
    assert resp.status == 401, body
    assert body["error"]["code"] == "invalid_token" and fragment in body["error"]["message"], body
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


# ------------------------------------------------------------ good tokens


async def test_hs256_token_pays_from_its_end_users_wallet(hs_gateway, make_end_user, wallets):
    await make_end_user()
    resp = await chat(hs_gateway, hs256())
    assert resp.status == 200, await resp.text()
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    assert charge.details["key_id"] == "jwt:t1"


async def test_rs256_token_verifies_against_the_pem_public_key(rs_gateway, make_end_user, wallets, rsa_key):
    await make_end_user()
    token = jwt.encode(claims(), pem_private(rsa_key), algorithm="RS256")
    assert (await chat(rs_gateway, token)).status == 200
    assert (await wallets.get("u_1")).balance_micros == 10_000_000 - COST


async def test_es256_token_verifies_against_the_jwks_key_named_by_kid(make_gateway, key_files, make_end_user, ec_key):
    gateway = await make_gateway(jwks_file=str(key_files / "jwks.json"), algorithms=["ES256"])
    await make_end_user()
    token = jwt.encode(claims(), pem_private(ec_key), algorithm="ES256", headers={"kid": "ec-2026"})
    assert (await chat(gateway, token)).status == 200


async def test_token_reads_its_wallet(hs_gateway, make_end_user):
    await make_end_user()
    resp = await hs_gateway.get("/v1/wallet", headers={"Authorization": f"Bearer {hs256()}"})
    assert (await resp.json())["balance_micros"] == 10_000_000


# ------------------------------------------------------------- bad tokens


async def test_bad_signature_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    token = jwt.encode(claims(), "another-secret-of-at-least-32-bytes!!", algorithm="HS256")
    await assert_401_and_free(hs_gateway, token, wallets, mock_upstream, "signature")


async def test_tampered_payload_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await make_end_user("u_2")
    header, _, signature = hs256().split(".")
    forged = base64.urlsafe_b64encode(json.dumps(claims(sub="u_2")).encode()).rstrip(b"=").decode()
    await assert_401_and_free(hs_gateway, f"{header}.{forged}.{signature}", wallets, mock_upstream, "signature")


async def test_alg_none_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    token = jwt.encode(claims(), None, algorithm="none")
    await assert_401_and_free(hs_gateway, token, wallets, mock_upstream, "algorithm 'none' is not allowed")


async def test_algorithm_outside_the_allow_list_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    token = jwt.encode(claims(), SECRET, algorithm="HS512")
    await assert_401_and_free(hs_gateway, token, wallets, mock_upstream, "algorithm 'HS512' is not allowed")


def forge_hs256(secret: bytes, payload: dict) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(b'{"alg":"HS256","typ":"JWT"}') + "." + b64(json.dumps(payload).encode())
    return signing_input + "." + b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())


async def test_hs256_token_signed_with_the_rsa_public_key_is_401(rs_gateway, make_end_user, wallets, mock_upstream, rsa_key):
    """Algorithm confusion: the public key is public, so it must never work as an HMAC secret."""
    await make_end_user()
    token = forge_hs256(pem_public(rsa_key), claims())
    await assert_401_and_free(rs_gateway, token, wallets, mock_upstream, "algorithm 'HS256' is not allowed")


async def test_hs256_with_the_public_key_fails_even_where_hs256_is_allowed(make_gateway, key_files, make_end_user, wallets, mock_upstream, rsa_key):
    gateway = await make_gateway(hs256_secret_env=SECRET_ENV, public_key_file=str(key_files / "rsa.pub.pem"), algorithms=["HS256", "RS256"])
    await make_end_user()
    token = forge_hs256(pem_public(rsa_key), claims())
    await assert_401_and_free(gateway, token, wallets, mock_upstream, "signature")


async def test_expired_token_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    now = int(time.time())
    await assert_401_and_free(hs_gateway, hs256(iat=now - 600, exp=now - 1), wallets, mock_upstream, "expired")


async def test_token_before_its_nbf_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, hs256(nbf=int(time.time()) + 120), wallets, mock_upstream, "not valid yet")


async def test_wrong_audience_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, hs256(aud="someone-else"), wallets, mock_upstream, "audience")


async def test_wrong_issuer_is_401_and_free(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, hs256(iss="https://evil.example"), wallets, mock_upstream, "issuer")


async def test_token_without_exp_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    token = jwt.encode({k: v for k, v in claims().items() if k != "exp"}, SECRET, algorithm="HS256")
    await assert_401_and_free(hs_gateway, token, wallets, mock_upstream, "`exp`")


async def test_token_living_longer_than_the_max_ttl_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    now = int(time.time())
    await assert_401_and_free(hs_gateway, hs256(iat=now, exp=now + 7200), wallets, mock_upstream, "longer than")


async def test_token_for_an_unknown_end_user_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, hs256(sub="nobody"), wallets, mock_upstream, "end user does not exist")


async def test_token_signed_by_a_retired_key_is_401(make_gateway, key_files, make_end_user, wallets, mock_upstream, ec_key):
    gateway = await make_gateway(jwks_file=str(key_files / "jwks.json"), algorithms=["ES256"])
    await make_end_user()
    token = jwt.encode(claims(), pem_private(ec_key), algorithm="ES256", headers={"kid": "ec-2025-revoked"})
    await assert_401_and_free(gateway, token, wallets, mock_upstream, "retired")


async def test_garbage_that_looks_like_a_jwt_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, "eyJhbGciOi.not-base64.x", wallets, mock_upstream, "malformed")


async def test_tokens_are_refused_where_none_are_configured(gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(gateway, hs256(), wallets, mock_upstream, "not enabled")


# ---------------------------------------------------------------- scopes


async def test_token_models_claim_limits_models(hs_gateway, make_end_user, wallets):
    await make_end_user()
    before = await snapshot(wallets)
    resp = await chat(hs_gateway, hs256(models=["gpt-4o"]))
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "model_not_found"
    assert await snapshot(wallets) == before


async def test_token_spend_claim_caps_spend(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    before = await snapshot(wallets)
    resp = await chat(hs_gateway, hs256(max_spend_micros=50))
    assert resp.status == 402 and (await resp.json())["error"]["code"] == "spend_limit_exceeded"
    assert await snapshot(wallets) == before and mock_upstream.request_count == 0


async def test_token_rate_claim_limits_requests_per_jti(hs_gateway, make_end_user):
    await make_end_user()
    token = hs256(requests_per_minute=1)
    assert (await chat(hs_gateway, token)).status == 200
    assert (await chat(hs_gateway, token)).status == 429
    assert (await chat(hs_gateway, hs256(jti="t2", requests_per_minute=1))).status == 200


async def test_bad_limit_claim_is_401(hs_gateway, make_end_user, wallets, mock_upstream):
    await make_end_user()
    await assert_401_and_free(hs_gateway, hs256(max_spend_micros=-5), wallets, mock_upstream, "max_spend_micros")


# ----------------------------------------------------------------- minting


async def test_minted_hs256_token_works_and_carries_its_limits(hs_gateway, make_end_user, wallets):
    await make_end_user()
    resp = await hs_gateway.post("/admin/end-users/u_1/tokens", json={"ttl_seconds": 120, "models": ["gpt-4o-mini"], "max_spend_micros": 1000}, headers=ADMIN)
    minted = await resp.json()
    assert resp.status == 201, minted
    assert minted["token_type"] == "Bearer" and minted["algorithm"] == "HS256" and minted["expires_in"] == 120
    decoded = jwt.decode(minted["token"], SECRET, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    assert (decoded["sub"], decoded["models"], decoded["max_spend_micros"], decoded["jti"]) == ("u_1", ["gpt-4o-mini"], 1000, minted["jti"])
    assert (await chat(hs_gateway, minted["token"])).status == 200
    charge = next(e for e in await wallets.ledger("u_1") if e.type == "charge")
    assert charge.details["key_id"] == f"jwt:{minted['jti']}" and charge.amount_micros == -COST


async def test_minted_rs256_token_names_its_kid(make_gateway, key_files, make_end_user):
    gateway = await make_gateway(
        public_key_file=str(key_files / "rsa.pub.pem"), private_key_file=str(key_files / "rsa.pem"), key_id="rsa-1", algorithms=["RS256"],
    )
    await make_end_user()
    minted = await (await gateway.post("/admin/end-users/u_1/tokens", json={}, headers=ADMIN)).json()
    assert jwt.get_unverified_header(minted["token"])["kid"] == "rsa-1" and minted["algorithm"] == "RS256"
    assert (await chat(gateway, minted["token"])).status == 200


async def test_mint_over_the_max_ttl_is_400(hs_gateway, make_end_user):
    await make_end_user()
    resp = await hs_gateway.post("/admin/end-users/u_1/tokens", json={"ttl_seconds": 7200}, headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "ttl_seconds"


async def test_mint_for_an_unknown_end_user_is_404(hs_gateway):
    resp = await hs_gateway.post("/admin/end-users/nobody/tokens", json={}, headers=ADMIN)
    assert resp.status == 404


async def test_mint_without_a_signing_key_is_409(rs_gateway, make_end_user):
    await make_end_user()
    resp = await rs_gateway.post("/admin/end-users/u_1/tokens", json={}, headers=ADMIN)
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "token_signing_unavailable"


async def test_mint_needs_the_admin_key(hs_gateway, make_end_user):
    await make_end_user()
    resp = await hs_gateway.post("/admin/end-users/u_1/tokens", json={}, headers={"Authorization": f"Bearer {OPERATOR_KEY}"})
    assert resp.status == 401


def test_none_can_never_be_an_allowed_algorithm():
    from pydantic import ValidationError

    from proxy.config import JWTConfig

    with pytest.raises(ValidationError):
        JWTConfig(algorithms=["none"])
