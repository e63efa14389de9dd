"""Test mode: the built-in deterministic responder that test-mode calls go to, and its wiring.

Calls from test credentials (an `sk-eu_test_` key, an operator test key, or a
token of a test end user) are metered and charged on their test wallet like
any call, but forwarded here instead of to a real provider (or to the upstream
the config names as `sandbox_upstream`). The responder speaks the OpenAI
shapes metergate forwards — chat completions (whole and streamed), completions,
embeddings and the Responses API (whole, streamed, and retrieval of a stored
answer) — with text derived from the request and exact `usage`, so an
operator's integration tests see stable answers and stable charges. Other paths
(images, audio) get a 400 naming `sandbox_upstream`: before any output, so the
hold is released and nothing is charged.
"""

from __future__ import annotations

import hashlib
import secrets
import socket
from collections import OrderedDict
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from proxy.config import Config, UpstreamConfig

SANDBOX_UPSTREAM = "sandbox"
# Stored Responses API answers the responder keeps for GET /v1/responses/{id}: in
# memory, per process, newest kept (a sandbox, not a record).
STORED_RESPONSES_LIMIT = 1000
_STORED: web.AppKey[OrderedDict[str, dict[str, Any]]] = web.AppKey("sandbox_stored_responses")
_WORDS = ("test", "mode", "reply", "from", "the", "metergate", "sandbox", "nothing", "real", "was", "called")


@dataclass(frozen=True)
class Sandbox:
    """Where test-mode calls go: an upstream's name and its settings."""

    name: str
    upstream: UpstreamConfig


def _prompt_of(body: dict[str, Any]) -> Any:
    """What a request asks about, whichever API it speaks (chat, completions, embeddings, Responses)."""
    return body.get("messages") or body.get("prompt") or body.get("input") or ""


def _reply_words(body: dict[str, Any], default: int = 12) -> list[str]:
    """A deterministic reply: the same request always gets the same words, as many as it allows."""
    limit = body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens") or default
    count = max(1, min(int(limit) if isinstance(limit, int) else default, default))
    seed = hashlib.sha256(orjson.dumps(_prompt_of(body), default=str)).digest()
    return [_WORDS[(seed[i % len(seed)] + i) % len(_WORDS)] for i in range(count)]


def _prompt_tokens(body: dict[str, Any]) -> int:
    return max(1, len(orjson.dumps(_prompt_of(body), default=str)) // 4)


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


def _response_object(body: dict[str, Any], rid: str, status: str, words: list[str] | None) -> dict[str, Any]:
    """A Responses API `response`: in progress (no output yet), or completed with its message and usage."""
    output: list[dict[str, Any]] = []
    usage = None
    if words is not None:
        output = [{"type": "message", "id": "msg_" + rid.removeprefix("resp_"), "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": " ".join(words), "annotations": []}]}]
        prompt = _prompt_tokens(body)
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": len(words),
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + len(words)}
    return {"id": rid, "object": "response", "created_at": 0, "status": status, "model": body.get("model", "sandbox"),
            "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": [], "error": None,
            "incomplete_details": None, "instructions": body.get("instructions"), "metadata": {},
            "max_output_tokens": body.get("max_output_tokens"), "text": {"format": {"type": "text"}}, "usage": usage}


def _store(request: web.Request, body: dict[str, Any], response: dict[str, Any]) -> None:
    if body.get("store") is False:
        return
    stored = request.app[_STORED]
    stored[response["id"]] = response
    while len(stored) > STORED_RESPONSES_LIMIT:
        stored.popitem(last=False)


async def _responses(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    words = _reply_words(body)
    # The id is random (two identical requests are two responses); the text and usage are not.
    rid = "resp_sandbox_" + secrets.token_hex(12)
    final = _response_object(body, rid, "completed", words)
    _store(request, body, final)
    if not body.get("stream"):
        return web.json_response(final)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    message = final["output"][0]
    part = {"type": "output_text", "text": "", "annotations": []}
    at = {"item_id": message["id"], "output_index": 0, "content_index": 0}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": _response_object(body, rid, "in_progress", None)}),
        ("response.output_item.added", {"output_index": 0, "item": {**message, "status": "in_progress", "content": []}}),
        ("response.content_part.added", {**at, "part": part}),
        *(("response.output_text.delta", {**at, "delta": (" " if i else "") + w}) for i, w in enumerate(words)),
        ("response.output_text.done", {**at, "text": " ".join(words)}),
        ("response.content_part.done", {**at, "part": message["content"][0]}),
        ("response.output_item.done", {"output_index": 0, "item": message}),
        ("response.completed", {"response": final}),
    ]
    for sequence, (kind, payload) in enumerate(events):
        data = orjson.dumps({"type": kind, "sequence_number": sequence, **payload})
        await response.write(b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n")
    return response


async def _retrieve(request: web.Request) -> web.Response:
    rid = request.match_info["response_id"]
    found = request.app[_STORED].get(rid)
    if found is None:
        return web.json_response({"error": {"message": f"No response found with id '{rid}'.", "type": "invalid_request_error",
                                            "param": None, "code": None}}, status=404)
    return web.json_response(found)


async def _unsupported(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": f"the sandbox does not answer {request.path}; name a "
                                        "`sandbox_upstream` in the config to test it", "type": "invalid_request_error",
                                        "param": None, "code": "sandbox_unsupported"}}, status=400)


def responder() -> web.Application:
    app = web.Application()
    app[_STORED] = OrderedDict()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_get("/v1/responses/{response_id}", _retrieve)
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


def builtin_name(config: Config) -> str:
    """The built-in responder's upstream name: `sandbox`, unless the config already names a real
    upstream so (registering the responder under it would send that upstream's live calls here)."""
    name = SANDBOX_UPSTREAM
    while name in config.upstreams:
        name = "_" + name
    return name


def configured_sandbox(config: Config) -> Sandbox | None:
    """The operator's own upstream for test mode, when the config names one."""
    if config.sandbox_upstream is None:
        return None
    return Sandbox(config.sandbox_upstream, config.upstreams[config.sandbox_upstream])
