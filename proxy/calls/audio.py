"""Audio: relaying generated speech (`POST /v1/audio/speech`) as it comes, and forwarding uploads to be
transcribed (`POST /v1/audio/transcriptions`), charged by the second of the duration the upstream reports.

Speech is billed by the characters of its input, which are known before the call is
forwarded: the hold is the charge, and once the upstream has accepted the request the
provider bills it whole, so a client that leaves or an upstream that cuts the audio
short still pays the input. An upstream that refuses it (an error status) costs nothing.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from pricing import Usage
from proxy import metering
from proxy.calls.lease import Lease
from proxy.calls.upstream import UpstreamCall, open_upstream, result_headers, settle_and_show
from proxy.errors import ApiError
from proxy.schemas import usd

CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)


async def forward_speech(request: web.Request, call: UpstreamCall, lease: Lease) -> web.StreamResponse:
    upstream = await open_upstream(call, lease)
    usage = Usage(prompt_tokens=lease.quote.prompt_tokens)  # characters (see metering.quote)
    lease.report_usage(usage, "characters")
    response = web.StreamResponse(headers={
        "Content-Type": upstream.headers.get("Content-Type", "audio/mpeg"), "X-Request-Id": lease.request_id,
        "X-Model": lease.model.name, "X-Usage-Cost": usd(metering.price_of(lease.model, usage)),
    })
    try:
        await response.prepare(request)
        async for piece in upstream.content.iter_any():
            await response.write(piece)
        await response.write_eof()
    except CLIENT_GONE:
        lease.outcome = "client_disconnected"
    except (TimeoutError, aiohttp.ClientError):
        lease.outcome = "upstream_cut"
    finally:
        upstream.close()  # the provider stops sending what nobody will hear
    return response


def _reported_seconds(data: Any) -> int | None:
    """The duration a transcription reports: `usage` of type duration (json), or `duration` (verbose_json)."""
    if not isinstance(data, dict):
        return None
    usage = data.get("usage")
    if isinstance(usage, dict) and usage.get("type") == "duration" and _number(usage.get("seconds")):
        return math.ceil(usage["seconds"])
    if _number(data.get("duration")):
        return math.ceil(data["duration"])
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


async def forward_transcription(call: UpstreamCall, lease: Lease) -> web.Response:
    """Forward the upload, read the transcript, charge the duration it reports by the second (the upload's
    bound when it reports none: `text`, `srt` and `vtt` answers carry no duration), answer it as sent."""
    upstream = await open_upstream(call, lease)
    try:
        raw = await upstream.read()
        content_type = upstream.headers.get("Content-Type", "application/json")
    except (TimeoutError, aiohttp.ClientError) as exc:
        lease.upstream_failed(f"unreadable upstream response: {type(exc).__name__}")
        raise ApiError(502, "the upstream provider sent an unreadable response", type="api_error", code="upstream_error") from None
    finally:
        upstream.release()
    data: Any = None
    if "json" in content_type:
        with contextlib.suppress(orjson.JSONDecodeError):
            data = orjson.loads(raw)
    seconds = _reported_seconds(data)
    assert lease.quote.worst_case is not None
    usage = Usage(audio_seconds=seconds if seconds is not None else lease.quote.worst_case.audio_seconds)
    source = "upstream" if seconds is not None else "bound"
    if isinstance(data, dict):
        shown = data.get("usage")
        if not isinstance(shown, dict):
            shown = data["usage"] = {"seconds": usage.audio_seconds}
        settlement, cost = await settle_and_show(lease, usage, source, shown)
        raw = orjson.dumps(data)
    else:
        lease.report_usage(usage, source)
        settlement = await lease.close()
        cost = settlement.captured_micros if settlement is not None else metering.price_of(lease.model, usage)
    return web.Response(body=raw, content_type=content_type.split(";")[0],
                        headers=result_headers(lease, settlement, usage, cost))
