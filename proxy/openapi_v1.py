"""The OpenAPI paths of the OpenAI-compatible surface (`/v1/...`) and the public statement pages.

Request bodies are OpenAI's own (see its API reference); these schemas name the
fields metergate reads to price and route a call, and leave the rest open
(`additionalProperties`), since every other field is passed to the upstream as sent.
"""

from __future__ import annotations

from typing import Any

_ERROR = {"$ref": "#/components/responses/Error"}
_END_USER: list[dict[str, list[str]]] = [{"endUserKey": []}]


def _body(required: list[str], properties: dict[str, Any], content_type: str = "application/json") -> dict[str, Any]:
    schema = {"type": "object", "required": required, "properties": properties, "additionalProperties": True}
    return {"required": True, "content": {content_type: {"schema": schema}}}


def _call(summary: str, body: dict[str, Any] | None, ok: str, errors: tuple[int, ...] = (400, 401, 402, 403, 404, 429, 502, 503),
          ok_type: str = "application/json") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "security": _END_USER,
                          "responses": {"200": {"description": ok, "content": {ok_type: {}}}}}
    if body is not None:
        op["requestBody"] = body
    for status in errors:
        op["responses"][str(status)] = _ERROR
    return op


def _param(name: str, where: str = "path") -> dict[str, Any]:
    return {"name": name, "in": where, "required": where == "path", "schema": {"type": "string"}}


_MODEL = {"type": "string", "description": "a model of the caller's rate card"}
_USER = {"type": "string", "description": "with an operator key: the end user who pays"}
_STREAM = {"type": "boolean", "description": "relay server-sent events as they come; usage and cost in the last"}
_METERED = ("Metered: held against the caller's wallet before it is forwarded, settled to the exact cost after; "
            "non-streamed answers carry X-Usage-Cost, X-Total-Tokens, X-Model and X-Wallet-Balance. "
            "A test-mode caller (sk-eu_test_ key, operator test key, a test end user's token) is answered by the "
            "sandbox and charged on its test wallet; an operator key of one mode naming an end user of the other is "
            "a 403 livemode_mismatch.")


def v1_paths() -> dict[str, Any]:
    return {
        "/v1/chat/completions": {"post": {**_call("Chat completion, streamed or not. " + _METERED, _body(
            ["model", "messages"], {"model": _MODEL, "messages": {"type": "array"}, "stream": _STREAM,
                                    "max_completion_tokens": {"type": "integer"}, "max_tokens": {"type": "integer"},
                                    "n": {"type": "integer"}, "user": _USER}), "the completion (or an SSE stream)")}},
        "/v1/completions": {"post": _call("Legacy completion. " + _METERED, _body(
            ["model", "prompt"], {"model": _MODEL, "prompt": {}, "max_tokens": {"type": "integer"}, "stream": _STREAM,
                                  "user": _USER}), "the completion (or an SSE stream)")},
        "/v1/embeddings": {"post": _call("Embeddings. " + _METERED, _body(
            ["model", "input"], {"model": _MODEL, "input": {}, "user": _USER}), "the embeddings")},
        "/v1/responses": {"post": _call("The Responses API, streamed or not. " + _METERED, _body(
            ["model", "input"], {"model": _MODEL, "input": {}, "instructions": {"type": "string"},
                                 "max_output_tokens": {"type": "integer"}, "stream": _STREAM, "tools": {"type": "array"},
                                 "store": {"type": "boolean"}, "user": _USER}),
            "the response (or its typed SSE events, usage and cost in response.completed)")},
        "/v1/responses/{response_id}": {"get": {**_call(
            "A stored response, for the end user who created it only (free)", None, "the response", (401, 404, 502)),
            "parameters": [_param("response_id")]}},
        "/v1/images/generations": {"post": _call(
            "Image generation: held for n images at the card's price for the size and quality; charged per image returned",
            _body(["model", "prompt"], {"model": _MODEL, "prompt": {"type": "string"}, "n": {"type": "integer", "maximum": 10},
                                        "size": {"type": "string"}, "quality": {"type": "string"}, "user": _USER}),
            "the images")},
        "/v1/audio/speech": {"post": _call(
            "Speech: billed per character of input (the charge is in X-Usage-Cost); the audio relayed as it comes",
            _body(["model", "input"], {"model": _MODEL, "input": {"type": "string", "maxLength": 4096},
                                       "voice": {"type": "string"}, "user": _USER}),
            "the audio", ok_type="audio/*")},
        "/v1/audio/transcriptions": {"post": _call(
            "Transcription of an upload: held at its longest possible duration, charged the reported duration by the second",
            _body(["model", "file"], {"model": _MODEL, "file": {"type": "string", "format": "binary"},
                                      "response_format": {"enum": ["json", "verbose_json", "text", "srt", "vtt"]},
                                      "user": _USER}, "multipart/form-data"),
            "the transcript")},
        "/v1/models": {"get": _call("The models the caller may call", None, "a list of models", (401,))},
        "/v1/models/{model}": {"get": {**_call("One model the caller may call", None, "the model", (401, 404)),
                                       "parameters": [_param("model")]}},
        "/v1/estimate": {"post": _call(
            "A pre-flight quote for a request body: what would be held, and whether the wallet affords it (nothing moves)",
            _body(["model"], {"model": _MODEL}), "the quote", (400, 401, 404))},
        "/v1/wallet": {"get": _call("The caller's wallet: balance, held, available and recent history", None, "the wallet",
                                    (401,))},
        "/statements/{end_user}/{month}": {"get": {
            "summary": "A monthly statement page (HTML), through a signed link that expires", "security": [],
            "parameters": [_param("end_user"), _param("month"), _param("expires", "query"), _param("sig", "query")],
            "responses": {"200": {"description": "the statement", "content": {"text/html": {}}}, "403": _ERROR}}},
        "/statements/{end_user}/{month}.csv": {"get": {
            "summary": "The same statement as CSV", "security": [],
            "parameters": [_param("end_user"), _param("month"), _param("expires", "query"), _param("sig", "query")],
            "responses": {"200": {"description": "the statement's lines", "content": {"text/csv": {}}}, "403": _ERROR}}},
        "/openapi.json": {"get": {"summary": "This document", "security": [], "responses": {"200": {"description": "OpenAPI 3.1"}}}},
    }
