"""POST /v1/chat/completions and /v1/completions: thin handlers over admission and the wire schemas.

A completions request with a list of prompts runs one job per prompt, one after the other
(``_generate_batch``), and answers them as one: OpenAI's choice order and summed usage."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

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
from lllmsd.api.schemas.tokens import load_decoder
from lllmsd.api.sse import stream_sse
from lllmsd.core.admission import Admission
from lllmsd.core.jobs import ChatJob, CompletionJob, GenerationEvent, JobKind, Usage, collect_generation


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = ChatCompletionRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    return await _generate(request, body, JobKind.CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    body = CompletionRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    if body.has_token_ids():
        await load_decoder()
    if len(body.prompts()) > 1:
        return await _generate_batch(request, body)
    return await _generate(request, body, JobKind.COMPLETION)


async def _generate_batch(request: web.Request, body: CompletionRequest) -> web.StreamResponse:
    """A list of prompts: every prompt admitted first (a 400 for any of them before anything queues), then
    each prompt's job runs in turn, and the answer holds ``n`` choices per prompt, as OpenAI's does."""
    built: list[CompletionJob] = []

    def build(config: Any, index: int) -> CompletionJob:
        if not built:  # the prompts are decoded and checked together, once
            built.extend(body.to_jobs(config))
        return built[index]

    runtime = request.app[RUNTIME]
    admissions = [
        await runtime.admit(body.model, JobKind.COMPLETION, functools.partial(build, index=index))
        for index in range(len(body.prompts()))
    ]
    first = admissions[0].job
    identity = ResponseIdentity("cmpl", body.model, admissions[0].config.engine, None)
    choices = len(admissions) * body.n
    events = observe_generation(request, body.model, each_prompt(admissions, body.n))
    async with contextlib.aclosing(events):
        if body.stream:
            chunks = completion_chunks(identity, events, first.logprobs is not None, body.include_usage)
            return await stream_sse(request, chunks)
        result = collect_generation([event async for event in events], choices)
    return web.json_response(completion_response(identity, result, first.logprobs is not None))


async def each_prompt(admissions: list[Admission[CompletionJob]], n: int) -> AsyncIterator[GenerationEvent]:
    """The events of each admitted job, one job after the other, each on an instance acquired for it (and
    given back before the next queues); choice ``c`` of prompt ``p`` becomes choice ``p * n + c``, and the
    usage of all of them is one Usage event at the end."""
    total = Usage(0, 0)
    for number, admission in enumerate(admissions):
        job = admission.job
        async with (
            admission.pool.acquire(job.context()) as instance,
            contextlib.aclosing(instance.generate(job)) as events,
        ):
            async for event in events:
                if isinstance(event, Usage):
                    total = Usage(
                        total.prompt_tokens + event.prompt_tokens,
                        total.completion_tokens + event.completion_tokens,
                        total.cached_tokens + event.cached_tokens,
                    )
                else:
                    yield replace(event, choice=number * n + event.choice)
    yield total


async def _generate(
    request: web.Request, body: ChatCompletionRequest | CompletionRequest, kind: JobKind
) -> web.StreamResponse:
    # refused parameters answer 400 here, before the request queues
    admission = await request.app[RUNTIME].admit(body.model, kind, body.to_job)
    job = admission.job
    is_chat = isinstance(job, ChatJob)
    session = request.get(SESSION)
    async with admission.pool.acquire(job.context(), session=session) as instance:
        identity = ResponseIdentity("chatcmpl" if is_chat else "cmpl", body.model, admission.config.engine, instance.id)
        # Closing the events when this block ends, whatever ends it, stops the engine (within one
        # token) before the instance goes back to the pool.
        async with contextlib.aclosing(
            observe_generation(request, body.model, instance.generate(job, session))
        ) as events:
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
