"""Test mode: the built-in deterministic responder that test-mode calls go to, and its wiring.

Calls from test credentials (an `sk-eu_test_` key, an operator test key, or a
token of a test end user) are metered and charged on their test wallet like
any call, but forwarded here instead of to a real provider (or to the upstream
the config names as `sandbox_upstream`). The responder speaks the OpenAI
shapes metergate forwards — chat completions (whole and streamed), completions
and embeddings — with text derived from the request and exact `usage`, so an
operator's integration tests see stable answers and stable charges.
"""

from __future__ import annotations

import hashlib
import socket
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config, UpstreamConfig

SANDBOX_UPSTREAM = "sandbox"
_WORDS = ("test", "mode", "reply", "from", "the", "metergate", "sandbox", "nothing", "real", "was", "called")


@dataclass(frozen=True)
class Sandbox:
    """Where test-mode calls go: an upstream's name and its settings."""

    name: str
    upstream: UpstreamConfig


def _reply_words(body: dict[str, Any], default: int = 12) -> list[str]:
    """A deterministic reply: the same request always gets the same words, as many as it allows."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or default
    count = max(1, min(int(limit) if isinstance(limit, int) else default, default))
    seed = hashlib.sha256(orjson.dumps(body.get("messages") or body.get("prompt") or "", default=str)).digest()
    return [_WORDS[(seed[i % len(seed)] + i) % len(_WORDS)] for i in range(count)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, len(orjson.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")) // 4)


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    words, prompt = _reply_words(body), _prompt_tokens(body)
    base = {"id": "chatcmpl-sandbox", "created": 0, "model": body.get("model", "sandbox")}
    if not body.get("stream"):
        return web.json_response({**base, "object": "chat.completion", "choices": [{
            "index": 0, "message": {"role": "assistant", "content": " ".join(words)}, "finish_reason": "stop"}],
            "usage": _usage(prompt, len(words))})
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i, word in enumerate(words):
        delta = {"role": "assistant", "content": word} if i == 0 else {"content": " " + word}
        chunk = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    end = {**base, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await response.write(b"data: " + orjson.dumps(end) + b"\n\n")
    if (body.get("stream_options") or {}).get("include_usage"):
        usage = {**base, "object": "chat.completion.chunk", "choices": [], "usage": _usage(prompt, len(words))}
        await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
    await response.write(b"data: [DONE]\n\n")
    return response


async def _completions(request: web.Request) -> web.Response:
    body = await request.json()
    words = _reply_words(body)
    return web.json_response({"id": "cmpl-sandbox", "object": "text_completion", "created": 0,
                              "model": body.get("model", "sandbox"),
                              "choices": [{"index": 0, "text": " ".join(words), "finish_reason": "stop"}],
                              "usage": _usage(_prompt_tokens(body), len(words))})


async def _embeddings(request: web.Request) -> web.Response:
    body = await request.json()
    inputs = body.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    dims = body.get("dimensions") if isinstance(body.get("dimensions"), int) else 8
    data = []
    for i, item in enumerate(items):
        digest = hashlib.sha256(orjson.dumps(item, default=str)).digest()
        data.append({"object": "embedding", "index": i, "embedding": [digest[j % 32] / 255 for j in range(dims)]})
    prompt = _prompt_tokens(body)
    return web.json_response({"object": "list", "data": data, "model": body.get("model", "sandbox"),
                              "usage": {"prompt_tokens": prompt, "total_tokens": prompt}})


async def _unsupported(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": f"the sandbox does not answer {request.path}; name a "
                                        "`sandbox_upstream` in the config to test it", "type": "invalid_request_error",
                                        "param": None, "code": "sandbox_unsupported"}}, status=400)


def responder() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_route("*", "/{tail:.*}", _unsupported)
    return app


async def serve_responder() -> AsyncGenerator[UpstreamConfig, None]:
    """Run the responder on a loopback port for as long as the app runs; its upstream settings."""
    runner = web.AppRunner(responder(), access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield UpstreamConfig(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1")
    finally:
        await runner.cleanup()


def configured_sandbox(config: Config) -> Sandbox | None:
    """The operator's own upstream for test mode, when the config names one."""
    if config.sandbox_upstream is None:
        return None
    return Sandbox(config.sandbox_upstream, config.upstreams[config.sandbox_upstream])
