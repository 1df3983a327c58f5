"""POST /v1/chat/completions and /v1/completions: thin handlers over admission and the wire schemas."""

from __future__ import annotations

import contextlib

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME, SESSION
from lllmsd.api.metrics import observe_generation
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.text import ChatCompletionRequest, CompletionRequest
from lllmsd.api.schemas.text_output import (
    ResponseIdentity,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
)
from lllmsd.api.sse import stream_sse
from lllmsd.core.jobs import ChatJob, JobKind, collect_generation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = ChatCompletionRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    return await _generate(request, body, JobKind.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    body = CompletionRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    return await _generate(request, body, JobKind.COMPLETION)


async def _generate(
    request: web.Request, body: ChatCompletionRequest | CompletionRequest, kind: JobKind
) -> web.StreamResponse:
    # refused parameters answer 400 here, before the request queues
    admission = await request.app[RUNTIME].admit(body.model, kind, body.to_job)
    job = admission.job
    is_chat = isinstance(job, ChatJob)
    async with admission.pool.acquire(job.context(), session=request.get(SESSION)) as instance:
        identity = ResponseIdentity("chatcmpl" if is_chat else "cmpl", body.model, admission.config.engine, instance.id)
        # Closing the events when this block ends, whatever ends it, stops the engine (within one
        # token) before the instance goes back to the pool.
        async with contextlib.aclosing(observe_generation(request, body.model, instance.generate(job))) as events:
            if body.stream:
                if isinstance(job, ChatJob):
                    chunks = chat_chunks(identity, events, job.n, job.logprobs, body.include_usage)
                else:
                    chunks = completion_chunks(identity, events, job.logprobs is not None, body.include_usage)
                return await stream_sse(request, chunks)
            result = collect_generation([event async for event in events], job.n)
    if isinstance(job, ChatJob):
        return web.json_response(chat_response(identity, result, job.logprobs))
    return web.json_response(completion_response(identity, result, job.logprobs is not None))
