"""A bare aiohttp pass-through reverse proxy: the baseline metergate is compared against.

No auth, no billing, no body parsing: every ``/v1/...`` request is forwarded to the
upstream over one shared keep-alive ``ClientSession`` and the response body is
streamed back chunk by chunk as it arrives (``iter_any``).  Bodies are passed as
raw bytes (``auto_decompress=False``), so Content-Encoding and Content-Length are
forwarded unchanged; responses without a length go out chunked.

    python -m bench.passthrough --port 8200 --upstream http://127.0.0.1:8100/v1

``upstream_base_url`` may end in ``/v1`` or not: ``/v1/chat/completions`` goes to
``{origin}{prefix}/chat/completions`` if the prefix ends in ``/v1``, else to
``{origin}{prefix}/v1/chat/completions``.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

# RFC 9110 hop-by-hop headers, plus those aiohttp recomputes itself.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)

BUFFER_LIMIT = 256 * 1024  # bodies of known length up to this are relayed in one write

SESSION_KEY = web.AppKey("passthrough_session", aiohttp.ClientSession)


def _upstream_prefix(upstream_base_url: str) -> str:
    base = upstream_base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


async def _truncated(request: web.Request, upstream: aiohttp.ClientResponse, headers: CIMultiDict) -> web.StreamResponse:
    """The upstream broke inside a body of known length: send the headers, then drop
    the connection, so the client too sees an incomplete response."""
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    resp.content_length = upstream.content_length
    await resp.prepare(request)
    request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()
    return resp


def create_passthrough_app(upstream_base_url: str, connector_limit: int = 1024) -> web.Application:
    prefix = _upstream_prefix(upstream_base_url)
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def session_ctx(app: web.Application):
        connector = aiohttp.TCPConnector(
            limit=connector_limit,
            limit_per_host=connector_limit,
            keepalive_timeout=60,
            ttl_dns_cache=None,
        )
        session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        app[SESSION_KEY] = session
        yield
        await session.close()

    app.cleanup_ctx.append(session_ctx)

    async def forward(request: web.Request) -> web.StreamResponse:
        session = app[SESSION_KEY]
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        body = await request.read() if request.body_exists else None
        url = URL(prefix + request.raw_path, encoded=True)
        try:
            upstream = await session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientError as exc:
            return web.json_response(
                {"error": {"message": f"upstream unreachable: {exc}", "type": "upstream_error", "param": None, "code": None}},
                status=502,
            )
        async with upstream:
            out_headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP)
            length = upstream.content_length
            if length is not None and length <= BUFFER_LIMIT:
                # Small body of known length (non-streamed JSON): one read, one write of
                # headers+body, as any production proxy does with small responses.
                try:
                    data = await upstream.read()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                    return await _truncated(request, upstream, out_headers)
                return web.Response(status=upstream.status, reason=upstream.reason, headers=out_headers, body=data)
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=out_headers)
            if length is not None:
                resp.content_length = length
            await resp.prepare(request)
            content = upstream.content
            while True:
                try:
                    data = await content.readany()  # what iter_any() does, minus the wrapper
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError):
                    # The upstream broke mid-body: pass the truncation on by closing the
                    # client connection without the terminating chunk.
                    request.protocol.force_close()
                    if request.transport is not None:
                        request.transport.close()
                    return resp
                if not data:
                    break
                try:
                    await resp.write(data)
                except ConnectionResetError:
                    # Our client went away; leaving `async with upstream` unread closes
                    # the upstream connection, so the provider stops generating.
                    return resp
            await resp.write_eof()
            return resp

    app.router.add_route("*", "/v1/{tail:.*}", forward)
    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.passthrough", description="bare aiohttp pass-through proxy")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8100/v1")
    args = p.parse_args(argv)

    async def serve() -> None:
        # handler_cancellation: a client that goes away cancels the handler, which
        # releases (closes) the upstream connection instead of draining it.
        runner = web.AppRunner(create_passthrough_app(args.upstream), access_log=None, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=1024)
        await site.start()
        print(f"listening on http://{args.host}:{args.port}/v1 -> {args.upstream}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
