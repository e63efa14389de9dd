"""Relaying generated speech (`POST /v1/audio/speech`): the upstream's audio bytes passed on as they come.

Speech is billed by the characters of its input, which are known before the call is
forwarded: the hold is the charge, and once the upstream has accepted the request the
provider bills it whole, so a client that leaves or an upstream that cuts the audio
short still pays the input. An upstream that refuses it (an error status) costs nothing.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from pricing import Usage
from proxy import metering
from proxy.calls.lease import Lease
from proxy.calls.upstream import UpstreamCall, open_upstream
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
