"""`POST /v1/audio/transcriptions` (the SDK's `audio.transcriptions.create`): a multipart upload, metered.

The hold is the upload's longest possible duration (its size over the least bytes per
second of its format, as the model's card says), at the model's audio price; the
charge is the duration the transcript reports, by the second (`json` and
`verbose_json` answers report it; for `text`, `srt` and `vtt` the bound is charged).
The call runs through the same lease as every other, in a task the client's leaving
does not cancel: the provider bills a transcription it has started either way.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from proxy import metering, observability
from proxy.appstate import METERING, app_state
from proxy.auth import Caller, identify, operator_caller
from proxy.calls.audio import forward_transcription
from proxy.calls.lease import Lease
from proxy.calls.upstream import UpstreamCall
from proxy.errors import ApiError
from proxy.gateway import answer_whole, caller_card, caller_model, refuse_when_draining, upstream_of
from proxy.ids import new_id

routes = web.RouteTableDef()


async def _transcribed(call: UpstreamCall, lease: Lease) -> web.StreamResponse:
    async with lease:
        if lease.client_left:
            raise asyncio.CancelledError  # gone before forwarding: the lease releases the hold
        return await forward_transcription(call, lease)


@routes.post("/v1/audio/transcriptions")
async def transcriptions(request: web.Request) -> web.StreamResponse:
    app = app_state(request)
    refuse_when_draining(request)
    credential = await identify(request)  # before the upload is read
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(400, "send the audio as multipart/form-data with a `file` part", code="invalid_request", param="file")
    try:
        form = await request.post()
    except ValueError:
        raise ApiError(400, "the multipart body could not be read", code="invalid_request", param="file") from None
    upload, model_name = form.get("file"), form.get("model")
    if not isinstance(upload, web.FileField):
        raise ApiError(400, "`file` is required (an audio file part)", code="invalid_request", param="file")
    if not isinstance(model_name, str) or not model_name:
        raise ApiError(400, "you must provide a model parameter", code="missing_model", param="model")
    user = form.get("user")
    caller = credential if isinstance(credential, Caller) else await operator_caller(request, user if isinstance(user, str) else None, credential)
    card = caller_card(request, caller)
    model = caller_model(card, caller, model_name, "transcription")
    content = upload.file.read()
    quote = metering.transcription_quote(card, model, len(content), upload.filename)
    fields = [(k, v) for k, v in form.items() if isinstance(v, str) and k not in ("file", "model", "user")]

    def make_form() -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("model", model.upstream_model)
        for name, value in fields:
            data.add_field(name, value)
        data.add_field("file", content, filename=upload.filename, content_type=upload.content_type)
        return data

    call = UpstreamCall(*upstream_of(request, model, caller), "/audio/transcriptions", {}, False, form=make_form)
    service = app[METERING]
    lease = service.lease(caller, quote, new_id("req_"))
    observability.call_started(request, lease)
    return await answer_whole(service, lease, _transcribed(call, lease))
