"""The SSE writer (api/sse.py) on a bare aiohttp app: chunks in order whether they come one at a time or
several at once, a keep-alive comment while the producer is quiet, and an error after the first chunk as
an error event. The producer waits on events the test sets, so nothing here depends on timing: a ping
interval of a millisecond only makes the quiet part short."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient

from lllmsd.api.sse import stream_sse
from lllmsd.errors import LllmsdError


async def lines_of(response: Any) -> AsyncIterator[str]:
    async for raw in response.content:
        if line := raw.decode().strip():
            yield line


async def serve(aiohttp_client: Any, chunks: AsyncIterator[dict[str, Any]], **options: Any) -> TestClient:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_sse(request, chunks, **options)

    app = web.Application()
    app.router.add_get("/", handler)
    return await aiohttp_client(app)


async def test_chunks_that_arrive_together_are_written_in_order(aiohttp_client: Any) -> None:
    release = asyncio.Event()

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 0}
        await release.wait()
        for n in range(1, 6):  # several at once, as a worker frame of several tokens brings them
            yield {"n": n}

    client = await serve(aiohttp_client, chunks())
    response = await client.get("/")
    lines = lines_of(response)
    assert await anext(lines) == 'data: {"n":0}'
    release.set()
    rest = [line async for line in lines]
    assert rest == [f'data: {{"n":{n}}}' for n in range(1, 6)] + ["data: [DONE]"]


async def test_a_quiet_producer_gets_keep_alive_comments_until_its_next_chunk(aiohttp_client: Any) -> None:
    release = asyncio.Event()

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 0}
        await release.wait()  # quiet until the client has seen a keep-alive
        yield {"n": 1}

    client = await serve(aiohttp_client, chunks(), ping_interval=0.001)
    response = await client.get("/")
    lines = lines_of(response)
    assert await anext(lines) == 'data: {"n":0}'
    assert await anext(lines) == ": ping"
    release.set()
    rest = [line async for line in lines if line != ": ping"]
    assert rest == ['data: {"n":1}', "data: [DONE]"]


async def test_an_error_after_the_first_chunk_ends_the_stream_with_an_error_event(aiohttp_client: Any) -> None:
    async def chunks() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 0}
        raise LllmsdError("the engine stopped", code="engine_failed")

    client = await serve(aiohttp_client, chunks())
    response = await client.get("/")
    assert response.status == 200
    lines = [line async for line in lines_of(response)]
    assert lines[0] == 'data: {"n":0}'
    error = json.loads(lines[1].removeprefix("data: "))["error"]
    assert error["message"] == "the engine stopped"
    assert len(lines) == 2  # no [DONE] after an error
