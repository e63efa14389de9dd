"""Relaying a streamed answer: decode the upstream's SSE events, count each
one's output, make sure the hold covers it *before* relaying it, and end every
stream cleanly -- with an in-band error event when it did not complete, never a
second HTTP response inside the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping  # not typing's: isinstance on those is slow, and it runs per chunk
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy import metering, observability
from proxy.calls.chunk_shape import ChunkShape
from proxy.calls.lease import Lease
from proxy.calls.sse import SSEDecoder
from proxy.calls.upstream import UpstreamCall, clamp_header, open_upstream, settle_and_show

log = logging.getLogger(__name__)

CLIENT_GONE = (ConnectionResetError, aiohttp.ClientConnectionResetError)
END_EVENTS = {
    outcome: b"data: " + orjson.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}) + b"\n\n"
    for outcome, message, type_, code in (
        ("upstream_cut", "the upstream provider ended the stream before it was complete; "
         "you were charged only for the tokens received", "api_error", "upstream_stream_cut"),
        ("wallet_exhausted", "the wallet ran out of funds during this stream; it was stopped and "
         "you were charged for the tokens received", "insufficient_quota", "insufficient_quota"),
        ("spend_limit_reached", "this key reached its spend limit during this stream; it was stopped and "
         "you were charged for the tokens received", "insufficient_quota", "spend_limit_exceeded"),
        ("budget_reached", "the spending budget for this period was reached during this stream; it was stopped "
         "and you were charged for the tokens received", "insufficient_quota", "budget_exceeded"),
        ("store_unavailable", "the wallet store became unreachable during this stream; it was stopped, and "
         "the tokens received will be charged when the store is back", "api_error", "store_unavailable"),
        ("internal_error", "this stream failed inside metergate; it was stopped and you were charged "
         "only for the tokens received", "server_error", "internal_error"),
    )
}


def output_text(choice: Mapping[str, Any]) -> str:
    """The output text of one streamed choice delta (content, reasoning, refusal, tool calls)."""
    delta = choice.get("delta")
    if type(delta) is dict and len(delta) == 1:
        # Nearly every chunk of a stream is {"content": "..."}: answered without the general walk.
        content = delta.get("content")
        if type(content) is str:
            return content
    parts: list[str] = []
    if isinstance(delta, Mapping):
        for key in ("content", "reasoning_content", "refusal"):
            if isinstance(delta.get(key), str):
                parts.append(delta[key])
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(fn, Mapping):
                parts.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
    elif isinstance(choice.get("text"), str):
        parts.append(choice["text"])
    return "".join(parts)


def read_event(data: bytes, tools: metering.ToolCallCounter | None = None) -> tuple[str, dict[str, Any] | None]:
    """One event's data: its output text (tokenized by the lease, see Lease.take_output), and
    its JSON when it carries the upstream's usage. `tools` (when the request enables a
    built-in tool) counts the tool calls it shows."""
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(chunk, dict):
        return "", None
    if tools is not None:
        tools.see(chunk)
    choices = chunk.get("choices")
    if not choices or type(choices) is not list:
        text = ""
    elif len(choices) == 1:  # one choice (n=1): no join
        choice = choices[0]
        # orjson makes dicts: `type` answers first (an ABC's isinstance costs ~0.1 µs an event).
        text = output_text(choice) if type(choice) is dict or isinstance(choice, Mapping) else ""
    else:
        text = "".join(output_text(c) for c in choices if isinstance(c, Mapping))
    return text, chunk if isinstance(chunk.get("usage"), dict) else None


# How many times a stream may try to learn its content chunks' shape (the first chunk,
# which names the role, has another than the rest; an upstream whose every chunk differs,
# or whose envelope carries text, stops paying for the probes once these are spent).
SHAPE_LEARNINGS = 4


# Responses API stream events whose `delta` is output text the provider bills as output tokens.
RESPONSE_TEXT_DELTAS = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.function_call_arguments.delta",
    "response.reasoning_text.delta", "response.reasoning_summary_text.delta", "response.custom_tool_call_input.delta",
    "response.mcp_call_arguments.delta", "response.code_interpreter_call_code.delta",
})
# The events that end a Responses stream; each carries the response, with its usage.
RESPONSE_TERMINALS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def read_response_event(data: bytes, tools: metering.ToolCallCounter | None) -> tuple[str, dict[str, Any] | None]:
    """One Responses API event: its output text, and the event itself when it ends the stream."""
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        return "", None
    if not isinstance(event, dict):
        return "", None
    if tools is not None:
        tools.see(event)
    kind = event.get("type")
    if kind in RESPONSE_TEXT_DELTAS:
        delta = event.get("delta")
        return (delta if isinstance(delta, str) else ""), None
    return "", event if kind in RESPONSE_TERMINALS else None


async def _response_with_cost(lease: Lease, terminal: dict[str, Any], usage: dict[str, Any],
                              tools: metering.ToolCallCounter | None) -> bytes:
    """Settle on a Responses stream's final usage and show the charge in it (the event is re-framed as sent)."""
    counted = metering.usage_from_openai(usage)
    if tools is not None:
        counted = metering.with_tool_calls(counted, tools.calls())
    await settle_and_show(lease, counted, "upstream", usage)
    return b"event: " + str(terminal.get("type")).encode() + b"\ndata: " + orjson.dumps(terminal) + b"\n\n"


async def _with_cost(lease: Lease, usage_chunk: dict[str, Any], tools: metering.ToolCallCounter | None) -> bytes:
    """Settle on the upstream's usage (the last chunk before [DONE]) and show the charge in it."""
    usage = metering.usage_from_openai(usage_chunk["usage"])
    if tools is not None:
        usage = metering.with_tool_calls(usage, tools.calls())
    await settle_and_show(lease, usage, "upstream", usage_chunk["usage"])
    return b"data: " + orjson.dumps(usage_chunk) + b"\n\n"


async def forward_stream(request: web.Request, call: UpstreamCall, lease: Lease) -> web.StreamResponse:
    client_wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    responses_api = call.responses_api  # typed events ending in response.completed, not chunks and [DONE]
    upstream = await open_upstream(call, lease)
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
        "X-Request-Id": lease.request_id, "X-Model": lease.model.name, **clamp_header(lease),
    })
    decoder = SSEDecoder()
    tools = metering.ToolCallCounter.for_quote(lease.quote)
    # Plain content chunks are read by their shape, without a parse, where nothing else must
    # see each one (the Responses API's typed events, or built-in tool calls to count).
    shape: ChunkShape | None = None
    learnings = 0 if responses_api or tools is not None else SHAPE_LEARNINGS
    saw_done = False
    first_byte = True
    observability.stream_started()
    try:
        await response.prepare(request)
        content = upstream.content
        # readany() is what iter_any() awaits, without its iterator's frame and StopAsyncIteration once a read.
        while piece := await content.readany():
            # Events that arrived together leave together (one write per
            # read), unless the hold must grow first: then what is covered
            # leaves before the store is asked for more.
            relay: list[bytes] = []
            shaped = shape.text_of(piece) if shape is not None and decoder.at_boundary() else None
            if shaped is not None:
                # The read is one event of the learned shape (the common case, one chunk a read):
                # what the decoder and read_event would make of it, for a fraction of their cost.
                if shaped:
                    tokens = lease.take_output(shaped)
                    if tokens is not None and not await _cover(lease, tokens, response, relay):
                        return response
                relay.append(piece)
            for event in () if shaped is not None else decoder.feed(piece):
                data = event.data
                if data is None:
                    relay.append(event.raw)
                    continue
                if responses_api:
                    text, terminal = read_response_event(data, tools)
                    if text:
                        tokens = lease.take_output(text)  # None within the hold: no coroutine for the event
                        if tokens is not None and not await _cover(lease, tokens, response, relay):
                            return response
                    if terminal is not None:
                        saw_done = True
                        final = terminal.get("response")
                        if isinstance(final, dict) and isinstance(final.get("id"), str):
                            lease.response_id = final["id"]
                        usage = final.get("usage") if isinstance(final, dict) else None
                        if isinstance(usage, dict) and lease.usage is None:
                            relay.append(await _response_with_cost(lease, terminal, usage, tools))
                            continue
                    relay.append(event.raw)
                    continue
                shaped = shape.text_of(event.raw) if shape is not None else None
                if shaped is not None:  # an event of the learned shape, among others in the read
                    text, usage_chunk = shaped, None
                elif data == b"[DONE]":
                    saw_done = True
                    relay.append(event.raw)
                    continue
                else:
                    text, usage_chunk = read_event(data, tools)
                    if usage_chunk is None and learnings and ChunkShape.can_learn(text):
                        learnings -= 1  # taught or not: an upstream whose chunks never fit stops paying for probes
                        shape = ChunkShape.learn(data, text, read_event) or shape
                if text:
                    tokens = lease.take_output(text)  # None within the hold (nearly always): no coroutine
                    if tokens is not None and not await _cover(lease, tokens, response, relay):
                        return response
                if usage_chunk is not None and lease.usage is None:
                    shown = await _with_cost(lease, usage_chunk, tools)
                    if usage_chunk.get("choices") or client_wants_usage:
                        relay.append(shown)
                    continue
                relay.append(event.raw)
            if relay:
                await response.write(b"".join(relay))
                if first_byte:  # one observation a stream, not one a chunk
                    first_byte = False
                    observability.stream_first_byte(lease)
            if lease.store_lost and lease.usage is None:
                lease.outcome = "store_unavailable"
                return response
        if not saw_done:
            lease.outcome = "upstream_cut"
            lease.upstream_failed("upstream failed before any output")
    except CLIENT_GONE:
        lease.outcome = "client_disconnected"
    except (TimeoutError, aiohttp.ClientError):
        lease.outcome = "upstream_cut"
        lease.upstream_failed("upstream failed before any output")
    except asyncio.CancelledError:
        lease.outcome = "client_disconnected"
        raise
    except Exception:
        # The response has begun: a second HTTP response cannot follow. End
        # the stream in-band and let the lease charge what was relayed.
        log.exception("request %s: the stream relay failed", lease.request_id)
        lease.outcome = "internal_error"
    finally:
        observability.stream_ended(lease)  # logs a cut stream with its request id
        # Closing (not releasing) drops the upstream connection, so the
        # provider stops generating what nobody will read.
        upstream.close()
        if tools is not None and lease.usage is None and lease.has_output:
            # Ended without the upstream's usage but with output: the tool calls
            # already made are billed by the provider, so they join what is counted.
            calls = tools.calls()
            if calls:
                lease.report_usage(metering.with_tool_calls(lease.counted_usage(), calls), "counted")
        if lease.outcome in END_EVENTS and response.prepared:
            # Say so in-band: the SDKs raise on an error event, where a
            # silently ended stream would look like a complete answer.
            with contextlib.suppress(*CLIENT_GONE, RuntimeError, ConnectionError):
                await response.write(END_EVENTS[lease.outcome])
    return response


async def _cover(lease: Lease, tokens: int, response: web.StreamResponse, relay: list[bytes]) -> bool:
    """Grow the hold for `tokens` of output that `Lease.take_output` could not take, before
    relaying them; first relay what was covered, so a refusal stops the stream right there."""
    if relay:
        await response.write(b"".join(relay))
        relay.clear()
    return await lease.cover_output(tokens)
