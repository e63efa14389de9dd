"""Test mode, call by call: every surface the built-in sandbox answers (completions, the Responses API
and its retrieval), the upstream a config names for test mode instead, end-user tokens of a test end
user, and what the sandbox does not answer (refused before any output, so nothing is charged)."""

from __future__ import annotations

import time

import jwt
import openai
import pytest

from pricing import Usage
from pricing.yaml_source import SourceError
from proxy.app import create_app
from proxy.appstate import HTTP, SANDBOX
from proxy.config import load_config
from tests.conftest import ADMIN_KEY, OPERATOR_KEY, UPSTREAM_KEY_ENV
from tests.mock_upstream import running_mock_upstream
from tests.proxy.test_gateway_failures import sdk
from tests.proxy.test_sandbox import ASK, end_user, price

JWT_SECRET = "a-shared-secret-for-sandbox-tests-" + "x" * 40
JWT_SECRET_ENV = "METERGATE_TEST_SANDBOX_JWT_SECRET"


async def charges(wallets, user_id: str) -> list[int]:
    """What each call cost the wallet (micros), oldest first."""
    return [-e.amount_micros for e in reversed(await wallets.ledger(user_id)) if e.type == "charge"]


async def test_a_test_keys_completion_is_answered_by_the_sandbox_and_charged_its_usage(gateway, base_url, wallets,
                                                                                         mock_upstream):
    client = sdk(base_url, await end_user(gateway, "u_test", livemode=False))
    answer = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=5)
    assert mock_upstream.requests == []
    assert answer.choices[0].text and answer.usage.completion_tokens == 5
    model = "gpt-3.5-turbo-instruct"
    expected = price(gateway, Usage(prompt_tokens=answer.usage.prompt_tokens, completion_tokens=5), model)
    assert await charges(wallets, "u_test") == [expected]
    assert (await wallets.get("u_test")).balance_micros == 1_000_000 - expected


async def test_a_test_keys_response_is_answered_stored_and_retrieved_in_the_sandbox(gateway, base_url, wallets,
                                                                                      mock_upstream):
    client = sdk(base_url, await end_user(gateway, "u_test", livemode=False))
    created = await client.responses.create(model="gpt-4o-mini", input="Say hello", max_output_tokens=6)
    again = await client.responses.retrieve(created.id)
    assert mock_upstream.requests == []
    assert created.output_text and again.output_text == created.output_text
    expected = price(gateway, Usage(prompt_tokens=created.usage.input_tokens, completion_tokens=created.usage.output_tokens))
    assert created.usage.output_tokens == 6
    assert await charges(wallets, "u_test") == [expected]


async def test_a_test_keys_streamed_response_is_charged_the_usage_of_its_last_event(gateway, base_url, wallets,
                                                                                     mock_upstream):
    client = sdk(base_url, await end_user(gateway, "u_test", livemode=False))
    async with client.responses.stream(model="gpt-4o-mini", input="Say hello", max_output_tokens=4) as stream:
        text = "".join([e.delta async for e in stream if e.type == "response.output_text.delta"])
        final = await stream.get_final_response()
    assert mock_upstream.requests == []
    assert text == final.output_text and final.usage.output_tokens == 4
    expected = price(gateway, Usage(prompt_tokens=final.usage.input_tokens, completion_tokens=4))
    assert await charges(wallets, "u_test") == [expected]


async def test_the_sandbox_refuses_what_it_cannot_answer_and_charges_nothing(gateway, base_url, wallets, mock_upstream):
    client = sdk(base_url, await end_user(gateway, "u_test", livemode=False))
    with pytest.raises(openai.BadRequestError) as refused:
        await client.images.generate(model="dall-e-3", prompt="a cat")
    assert refused.value.code == "sandbox_unsupported"
    assert mock_upstream.requests == []
    state = await wallets.get("u_test")
    assert (state.balance_micros, state.held_micros) == (1_000_000, 0)
    assert await charges(wallets, "u_test") == []


@pytest.fixture
async def two_upstreams(aiohttp_client, redis_server, redis, mock_upstream, monkeypatch):
    """metergate with a real upstream (`mock_upstream`) and one named as `sandbox_upstream` (yielded second)."""
    monkeypatch.setenv(UPSTREAM_KEY_ENV, "sk-upstream")
    async with running_mock_upstream() as test_upstream:
        config = load_config(
            redis_url=redis_server.url, admin_keys=[ADMIN_KEY], operator_keys=[OPERATOR_KEY],
            upstreams={"openai": {"base_url": mock_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV},
                       "openai-test": {"base_url": test_upstream.base_url, "api_key_env": UPSTREAM_KEY_ENV}},
            sandbox_upstream="openai-test",
        )
        client = await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})
        yield client, test_upstream


async def test_a_configured_sandbox_upstream_takes_test_calls_and_only_them(two_upstreams, mock_upstream, wallets):
    gateway, test_upstream = two_upstreams
    base_url = str(gateway.make_url("/v1"))
    await sdk(base_url, await end_user(gateway, "u_test", livemode=False)).chat.completions.create(**ASK)
    assert [r.path for r in test_upstream.requests] == ["/v1/chat/completions"] and mock_upstream.requests == []
    await sdk(base_url, await end_user(gateway, "u_live", livemode=True)).chat.completions.create(**ASK)
    assert [r.path for r in mock_upstream.requests] == ["/v1/chat/completions"] and len(test_upstream.requests) == 1
    assert all(e.details.get("is_simulated") is True for e in await wallets.ledger("u_test"))


async def test_a_real_upstream_named_sandbox_is_not_replaced_by_the_built_in_responder(aiohttp_client, gateway_config,
                                                                                      mock_upstream):
    upstreams = {**gateway_config.model_dump()["upstreams"], "sandbox": {"base_url": mock_upstream.base_url}}
    config = type(gateway_config).model_validate({**gateway_config.model_dump(), "upstreams": upstreams})
    app = (await aiohttp_client(create_app(config))).server.app
    assert app[SANDBOX].name == "_sandbox"
    assert app[HTTP]["sandbox"] is not app[HTTP]["_sandbox"]


def test_a_key_cannot_be_both_a_live_and_a_test_operator_key(redis_server):
    with pytest.raises(SourceError, match="both operator_keys and operator_test_keys"):
        load_config(redis_url=redis_server.url, operator_keys=["k1", "k2"], operator_test_keys=["k2"])


@pytest.fixture
async def jwt_gateway(aiohttp_client, gateway_config, monkeypatch):
    monkeypatch.setenv(JWT_SECRET_ENV, JWT_SECRET)
    config = type(gateway_config).model_validate({**gateway_config.model_dump(), "jwt": {
        "audience": "metergate", "hs256_secret_env": JWT_SECRET_ENV, "algorithms": ["HS256"]}})
    return await aiohttp_client(create_app(config), server_kwargs={"handler_cancellation": True})


async def test_a_test_end_users_token_acts_in_test_mode(jwt_gateway, wallets, mock_upstream):
    await end_user(jwt_gateway, "u_test", livemode=False)
    now = int(time.time())
    token = jwt.encode({"sub": "u_test", "aud": "metergate", "iat": now, "exp": now + 300}, JWT_SECRET, algorithm="HS256")
    answer = await sdk(str(jwt_gateway.make_url("/v1")), token).chat.completions.create(**ASK)
    assert mock_upstream.requests == []
    expected = price(jwt_gateway, Usage(prompt_tokens=answer.usage.prompt_tokens,
                                        completion_tokens=answer.usage.completion_tokens))
    assert await charges(wallets, "u_test") == [expected]
