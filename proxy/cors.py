"""CORS for the OpenAI-compatible surface (/v1/*), so end-user browsers can call metergate directly.

Origins come from `cors_origins` in the config (exact `scheme://host[:port]`
strings, or `*`). A preflight from a listed origin is answered with the
methods and headers it may use; a listed origin's responses, streamed ones
included, carry `Access-Control-Allow-Origin` and expose metergate's headers
(cost, balance, request id, rate limits). A request from any other origin is
refused with a 403 before anything runs, without CORS headers, so nothing is
charged and the browser lets the page read nothing. Requests without an
`Origin` (servers, SDKs) are not affected; /admin is never CORS-enabled.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from aiohttp import web

from proxy.appstate import CONFIG, app_state
from proxy.errors import error_response

EXPOSED = ", ".join((
    "X-Request-Id", "X-Model", "X-Usage-Cost", "X-Total-Tokens", "X-Wallet-Balance", "X-Settlement", "X-Max-Tokens-Clamped",
    "Retry-After",
    "X-RateLimit-Limit-Requests", "X-RateLimit-Remaining-Requests", "X-RateLimit-Limit-Tokens", "X-RateLimit-Remaining-Tokens",
))
METHODS = "GET, POST, OPTIONS"
DEFAULT_HEADERS = "Authorization, Content-Type"
MAX_AGE = "600"
_HEADER_LIST = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+(\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*$")
_ALLOWED_ORIGIN = web.RequestKey("cors_origin", str)


def _applies(request: web.Request) -> bool:
    return request.path.startswith("/v1/")


def origin_allowed(request: web.Request, origin: str) -> bool:
    origins = app_state(request)[CONFIG].cors_origins
    return "*" in origins or origin.rstrip("/") in origins


def _refused(origin: str) -> web.Response:
    return error_response(403, f"the origin {origin!r} is not allowed to call this API", code="origin_not_allowed")


@web.middleware
async def cors_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    origin = request.headers.get("Origin")
    if origin is None or not _applies(request):
        return await handler(request)
    allowed = origin_allowed(request, origin)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
        if not allowed:
            return _refused(origin)
        requested = request.headers.get("Access-Control-Request-Headers", "").strip()
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": METHODS,
            "Access-Control-Allow-Headers": requested if requested and _HEADER_LIST.match(requested) else DEFAULT_HEADERS,
            "Access-Control-Max-Age": MAX_AGE,
            "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
        })
    if not allowed:
        return _refused(origin)
    request[_ALLOWED_ORIGIN] = origin
    return await handler(request)


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs for every response, streamed ones included,
    # just before its headers are sent.
    origin = request.get(_ALLOWED_ORIGIN)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED
        response.headers["Vary"] = "Origin"


def setup(app: web.Application) -> None:
    app.middlewares.append(cors_middleware)
    app.on_response_prepare.append(_add_headers)
