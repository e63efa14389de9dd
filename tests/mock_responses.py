"""The mock upstream's `POST /v1/responses` (OpenAI's Responses API), whole and streamed.

Shaped as OpenAI answers, enough for the official SDK's `responses.create` and
`responses.stream` (which checks the order of the stream's events): a message
item with one `output_text` part of `reply_words` words, optionally preceded by
`web_search_calls` web search items, and usage in the Responses shape
(`input_tokens`/`output_tokens`). The knobs are `MockUpstream`'s: `usage_override`
(given in the chat shape and converted), `omit_usage`, `chunk_delay`, `first_byte_gate`,
`cut_after_chunks`, `first_byte_delay`, `line_ending`, `words_per_chunk`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

if TYPE_CHECKING:
    from tests.mock_upstream import MockUpstream


def responses_usage(chat_usage: dict) -> dict:
    """A chat-shaped usage object (`make_usage`) in the Responses shape."""
    prompt_details = chat_usage.get("prompt_tokens_details") or {}
    completion_details = chat_usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": prompt_details.get("cached_tokens", 0)},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": completion_details.get("reasoning_tokens", 0)},
        "total_tokens": chat_usage["prompt_tokens"] + chat_usage["completion_tokens"],
    }


def _input_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode() if value is not None else ""


Reader = Callable[[web.Request], Awaitable[tuple[Any, web.Response | None]]]
Failer = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


def missing_parameter(name: str) -> dict:
    """OpenAI's error body for a request without `name`."""
    return {"error": {"message": f"Missing required parameter: '{name}'.", "type": "invalid_request_error",
                      "param": name, "code": None}}


async def accept(request: web.Request, read: Reader, maybe_fail: Failer, required: str, *,
                 text: bool = False) -> tuple[dict, None] | tuple[None, web.StreamResponse]:
    """The JSON body of a call to a mock endpoint, or what to answer instead: its parse error, the failure
    the mock was told to give, or a 400 when `required` is missing (or, with `text`, is not a string)."""
    from tests.mock_upstream import _json_response

    data, err = await read(request)
    if err is not None:
        return None, err
    failed = await maybe_fail(request)
    if failed is not None:
        return None, failed
    if not isinstance(data, dict) or required not in data or (text and not isinstance(data[required], str)):
        return None, _json_response(400, missing_parameter(required))
    return data, None


def make_responses_handler(
    state: MockUpstream, read: Reader, maybe_fail: Failer,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    from tests.mock_upstream import (
        SSE_HEADERS,
        _abort,
        _json_response,
        _reply,
        _sleep_watching,
        _words_asked,
        count_tokens,
        make_usage,
        obfuscation_padding,
    )

    async def responses(request: web.Request) -> web.StreamResponse:
        data, answer = await accept(request, read, maybe_fail, "input")
        if data is None:
            return answer
        model = state.response_model or data.get("model") or "gpt-4o-mini"
        text, pieces = _reply(_words_asked(data, state.reply_words), state.words_per_chunk)
        rid, mid = "resp_" + uuid.uuid4().hex, "msg_" + uuid.uuid4().hex

        def usage() -> dict | None:
            if state.omit_usage:
                return None
            if state.usage_override is not None:
                return responses_usage(state.usage_override)
            prompt = count_tokens(_input_text(data.get("input"))) + count_tokens(_input_text(data.get("instructions")))
            return responses_usage(make_usage(prompt, count_tokens(text)))

        searches = [{"type": "web_search_call", "id": f"ws_{i}", "status": "completed",
                     "action": {"type": "search", "query": "q"}} for i in range(state.web_search_calls)]
        message = {"type": "message", "id": mid, "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}

        def response(status: str, output: list, with_usage: bool) -> dict:
            return {
                "id": rid, "object": "response", "created_at": int(time.time()), "status": status, "model": model,
                "output": output, "parallel_tool_calls": True, "tool_choice": "auto", "tools": data.get("tools") or [],
                "temperature": 1.0, "top_p": 1.0, "max_output_tokens": data.get("max_output_tokens"),
                "usage": usage() if with_usage else None, "error": None, "incomplete_details": None,
                "instructions": data.get("instructions"), "metadata": {}, "text": {"format": {"type": "text"}},
            }

        if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
            return web.Response(status=499)
        if not data.get("stream"):
            body = response("completed", [*searches, message], True)
            if body["usage"] is None:
                del body["usage"]
            if data.get("store") is not False:
                state.stored_responses[rid] = body
            state.replies_completed += 1
            return _json_response(200, body)

        if state.first_byte_gate is not None:
            await state.first_byte_gate.wait()
        eol = state.line_ending.encode()
        sequence = 0

        def event(kind: str, payload: dict) -> bytes:
            nonlocal sequence
            body = orjson.dumps({"type": kind, "sequence_number": sequence, **payload})
            sequence += 1
            return b"event: " + kind.encode() + eol + b"data: " + body + eol + eol

        state.streams_started += 1
        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        try:
            await resp.prepare(request)
            await resp.write(event("response.created", {"response": response("in_progress", [], False)}))
            for i, item in enumerate(searches):
                await resp.write(event("response.output_item.added", {"output_index": i, "item": {**item, "status": "in_progress"}}))
                await resp.write(event("response.output_item.done", {"output_index": i, "item": item}))
            at = len(searches)
            empty = {**message, "status": "in_progress", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            await resp.write(event("response.output_item.added", {"output_index": at, "item": empty}))
            await resp.write(event("response.content_part.added",
                                   {"item_id": mid, "output_index": at, "content_index": 0, "part": part}))
            for i, piece in enumerate(pieces):
                if state.cut_after_chunks is not None and i >= state.cut_after_chunks:
                    _abort(request)
                    return resp
                if i and state.chunk_delay and not await _sleep_watching(request, state.chunk_delay):
                    state._note_disconnect()
                    return resp
                delta = {"item_id": mid, "output_index": at, "content_index": 0, "delta": piece, "logprobs": []}
                if state.obfuscate:  # OpenAI's stream obfuscation: random padding, a new length each event
                    delta["obfuscation"] = obfuscation_padding()
                await resp.write(event("response.output_text.delta", delta))
            if state.cut_after_chunks is not None:
                _abort(request)
                return resp
            await resp.write(event("response.output_text.done", {"item_id": mid, "output_index": at, "content_index": 0,
                                                                 "text": text, "logprobs": []}))
            await resp.write(event("response.content_part.done", {"item_id": mid, "output_index": at, "content_index": 0,
                                                                  "part": {**part, "text": text}}))
            await resp.write(event("response.output_item.done", {"output_index": at, "item": message}))
            final = response("completed", [*searches, message], True)
            if data.get("store") is not False:
                state.stored_responses[rid] = final
            await resp.write(event("response.completed", {"response": final}))
            await resp.write_eof()
        except ConnectionResetError:
            state._note_disconnect()
            raise
        state.streams_completed += 1
        return resp

    return responses


def make_retrieve_handler(state: MockUpstream) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """GET /v1/responses/{id}: a stored response, or OpenAI's 404."""
    from multidict import CIMultiDict

    from tests.mock_upstream import RecordedRequest, _json_response

    async def retrieve(request: web.Request) -> web.StreamResponse:
        state.request_count += 1
        if state.record_requests:
            state.requests.append(RecordedRequest(method="GET", path=request.path, query=dict(request.query),
                                                  headers=CIMultiDict(request.headers), body=b"", json=None))
        found = state.stored_responses.get(request.match_info["response_id"])
        if found is None:
            return _json_response(404, {"error": {"message": f"No response found with id '{request.match_info['response_id']}'.",
                                                  "type": "invalid_request_error", "param": None, "code": None}})
        return _json_response(200, found)

    return retrieve
