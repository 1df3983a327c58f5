"""POST /v1/chat/completions and /v1/completions: thin handlers over the pool and the wire schemas."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.api.metrics import observe_generation
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.text import (
    ChatCompletionRequest,
    CompletionRequest,
    ResponseHeader,
    chat_chunks,
    chat_response,
    completion_chunks,
    completion_response,
    reject_unsupported_task,
)
from lllmsd.api.sse import stream_sse
from lllmsd.core.runtime import Runtime
from lllmsd.core.tasks import ChatTask, CompletionTask, ModelTask, collect_generation


def _text_model(runtime: Runtime, model_id: str, wanted: str) -> tuple[Any, type]:
    config = runtime.model_config(model_id)
    if config.task is not ModelTask.TEXT_COMPLETION:
        raise reject_unsupported_task(model_id, wanted, config.task.value)
    return config, runtime.engine_class(model_id)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, ChatCompletionRequest, "chat completions")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, CompletionRequest, "completions")


async def _serve(
    request: web.Request, wire: type[ChatCompletionRequest | CompletionRequest], route: str
) -> web.StreamResponse:
    body = wire.model_validate(await read_json(request))
    request[MODEL] = body.model
    runtime = request.app[RUNTIME]
    config, engine_class = _text_model(runtime, body.model, route)
    task = body.to_task(config)
    engine_class.check_task(config, task)  # refused parameters answer 400 before the request queues
    return await _generate(request, runtime, body, task, config.engine)


async def _generate(
    request: web.Request,
    runtime: Runtime,
    body: ChatCompletionRequest | CompletionRequest,
    task: ChatTask | CompletionTask,
    engine: str,
) -> web.StreamResponse:
    is_chat = isinstance(task, ChatTask)
    async with runtime.pool(body.model).acquire(task.context()) as instance:
        header = ResponseHeader("chatcmpl" if is_chat else "cmpl", body.model, engine, instance.id)
        # Closing the events when this block ends, whatever ends it, stops the engine (within one
        # token) before the instance goes back to the pool.
        async with contextlib.aclosing(observe_generation(request, body.model, instance.generate(task))) as events:
            if body.stream:
                if is_chat:
                    chunks = chat_chunks(header, events, task.n, task.logprobs, body.include_usage)
                else:
                    chunks = completion_chunks(header, events, task.logprobs is not None, body.include_usage)
                return await stream_sse(request, chunks)
            result = collect_generation([event async for event in events], task.n)
    if is_chat:
        return web.json_response(chat_response(header, result, task.logprobs))
    return web.json_response(completion_response(header, result, task.logprobs is not None))
