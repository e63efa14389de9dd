"""The mock upstream's media endpoints. `POST /v1/images/generations`: `n` images (or
`MockUpstream.images_returned`), as URLs or base64 as asked, with OpenAI's `created`/`data` shape; `image_usage`
adds gpt-image-1's token usage object. `POST /v1/audio/speech`: audio bytes in chunks."""

from __future__ import annotations

import base64
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from tests.mock_responses import Failer, Reader, accept, missing_parameter

if TYPE_CHECKING:
    from tests.mock_upstream import MockUpstream

_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 32).decode()


def make_images_handler(
    state: MockUpstream, read: Reader, maybe_fail: Failer,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    from tests.mock_upstream import _json_response, _sleep_watching

    async def generate(request: web.Request) -> web.StreamResponse:
        data, answer = await accept(request, read, maybe_fail, "prompt", text=True)
        if data is None:
            return answer
        if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
            return web.Response(status=499)
        count = state.images_returned if state.images_returned is not None else int(data.get("n") or 1)
        as_b64 = data.get("response_format") == "b64_json"
        images = [{"b64_json": _PNG} if as_b64 else {"url": f"https://images.example/{i}.png",
                                                     "revised_prompt": data["prompt"]} for i in range(count)]
        body: dict[str, Any] = {"created": int(time.time()), "data": images}
        if state.image_usage is not None:
            body["usage"] = state.image_usage
        state.replies_completed += 1
        return _json_response(200, body)

    return generate


def make_speech_handler(
    state: MockUpstream, read: Reader, maybe_fail: Failer,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /v1/audio/speech: `speech_chunks` chunks of audio bytes, `chunk_delay` apart; `cut_after_chunks` cuts it."""
    from tests.mock_upstream import _abort, _sleep_watching

    async def speech(request: web.Request) -> web.StreamResponse:
        data, answer = await accept(request, read, maybe_fail, "input", text=True)
        if data is None:
            return answer
        state.streams_started += 1
        resp = web.StreamResponse(status=200, headers={"Content-Type": "audio/mpeg"})
        await resp.prepare(request)
        for i in range(state.speech_chunks):
            if state.cut_after_chunks is not None and i >= state.cut_after_chunks:
                _abort(request)
                return resp
            if i and state.chunk_delay and not await _sleep_watching(request, state.chunk_delay):
                state._note_disconnect()
                return resp
            await resp.write(bytes([i % 256]) * 1024)
        await resp.write_eof()
        state.streams_completed += 1
        return resp

    return speech


def make_transcription_handler(
    state: MockUpstream, maybe_fail: Failer,
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """POST /v1/audio/transcriptions (multipart): a transcript of `transcription_seconds` of audio, in the
    format asked: `json` with `usage: {type: duration, seconds}`, `verbose_json` with `duration`, or plain text;
    after `first_byte_delay`."""
    from multidict import CIMultiDict

    from tests.mock_upstream import RecordedRequest, _json_response, _sleep_watching

    async def transcribe(request: web.Request) -> web.StreamResponse:
        state.request_count += 1
        form = await request.post()
        upload = form.get("file")
        if state.record_requests:
            fields = {k: v for k, v in form.items() if isinstance(v, str)}
            size = len(upload.file.read()) if isinstance(upload, web.FileField) else None
            state.requests.append(RecordedRequest(method="POST", path=request.path, query=dict(request.query),
                                                  headers=CIMultiDict(request.headers), body=b"",
                                                  json={**fields, "file_size": size,
                                                        "filename": getattr(upload, "filename", None)}))
        failed = await maybe_fail(request)
        if failed is not None:
            return failed
        if not isinstance(upload, web.FileField):
            return _json_response(400, missing_parameter("file"))
        if state.first_byte_delay and not await _sleep_watching(request, state.first_byte_delay):
            return web.Response(status=499)
        text, seconds = "hello from the mock", state.transcription_seconds
        response_format = form.get("response_format") or "json"
        if response_format == "verbose_json":
            return _json_response(200, {"task": "transcribe", "language": "english", "duration": seconds, "text": text,
                                        "segments": []})
        if response_format in ("text", "srt", "vtt"):
            return web.Response(text=text, content_type="text/plain")
        return _json_response(200, {"text": text, "usage": {"type": "duration", "seconds": seconds}})

    return transcribe
