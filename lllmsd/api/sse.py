"""Server-sent events for streaming responses.

``stream_sse`` waits for the first chunk before it sends headers: an error the engine raises before
producing anything (context too long, an unsupported parameter) still becomes a proper HTTP status.
After that, chunks are written as ``data: {json}``; a keep-alive comment goes out when the producer is
quiet; an error becomes a ``data: {"error": ...}`` event; the stream ends with ``data: [DONE]``.

Concurrency rule: the chunks are produced by a separate task feeding a queue, so waiting with a
keep-alive timeout never cancels the producer halfway through a step. When the writer stops (client
gone, cancellation, error), the producer is cancelled and its generator closed, which stops the
engine within one token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from lllmsd.api.keys import REQUEST_ID
from lllmsd.api.schemas.common import error_body
from lllmsd.errors import LllmsdError

log = logging.getLogger(__name__)

PING_INTERVAL = 15.0
_END = object()


def encode_event(data: dict[str, Any] | str, *, named: bool = False) -> bytes:
    """One SSE event; ``named``: with an ``event:`` line giving the payload's ``type`` (the Responses API's
    typed events)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if named and isinstance(data, dict):
        return f"event: {data['type']}\ndata: {payload}\n\n".encode()
    return f"data: {payload}\n\n".encode()


def error_event(exc: BaseException, request_id: str) -> dict[str, Any]:
    if isinstance(exc, LllmsdError):
        return error_body(exc.message, exc.type, exc.param, exc.code)
    return error_body(
        f"internal server error (request id {request_id}); the daemon logged the details",
        "server_error",
        None,
        "internal_error",
    )


async def _pump(chunks: AsyncIterator[Any], queue: asyncio.Queue[Any]) -> None:
    try:
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                await queue.put(chunk)
    except Exception as exc:
        await queue.put(exc)
    else:
        await queue.put(_END)


async def stream_sse(
    request: web.Request,
    chunks: AsyncIterator[dict[str, Any]],
    *,
    ping_interval: float = PING_INTERVAL,
    done_marker: bool = True,
    named_events: bool = False,
) -> web.StreamResponse:
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    producer = asyncio.create_task(_pump(chunks, queue))
    try:
        first = await queue.get()
        if isinstance(first, BaseException):
            raise first  # before any byte was sent: the error middleware answers with a status
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
                "X-Request-Id": request.get(REQUEST_ID, ""),
            }
        )
        await response.prepare(request)
        item = first
        while item is not _END:
            if isinstance(item, BaseException):
                if not isinstance(item, LllmsdError):
                    log.error("stream failed (request id %s)", request.get(REQUEST_ID), exc_info=item)
                await response.write(encode_event(error_event(item, request.get(REQUEST_ID, "-"))))
                return response
            await response.write(encode_event(item, named=named_events))
            item = await _next_or_ping(queue, response, ping_interval)
        if done_marker:
            await response.write(encode_event("[DONE]"))
        await response.write_eof()
        return response
    finally:
        if not producer.done():
            producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def _next_or_ping(queue: asyncio.Queue[Any], response: web.StreamResponse, interval: float) -> Any:
    if not queue.empty():  # a worker frame brings several tokens: those after the first need no timer
        return queue.get_nowait()
    while True:
        try:
            return await asyncio.wait_for(queue.get(), interval)
        except asyncio.TimeoutError:
            await response.write(b": ping\n\n")
