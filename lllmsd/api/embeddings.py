"""POST /v1/embeddings: a thin handler over the model's batcher and the wire schema."""

from __future__ import annotations

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.embeddings import EmbeddingRequest, embedding_response
from lllmsd.api.schemas.text import reject_unsupported_task
from lllmsd.core.tasks import ModelTask


async def embeddings(request: web.Request) -> web.Response:
    body = EmbeddingRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    runtime = request.app[RUNTIME]
    config = runtime.model_config(body.model)
    if config.task is not ModelTask.EMBEDDING:
        raise reject_unsupported_task(body.model, "embeddings", config.task.value)
    task = body.to_task(config)
    runtime.engine_class(body.model).check_task(config, task)
    # through the batcher, not the pool: concurrent requests share engine calls (see core/batcher.py)
    result = await runtime.batcher(body.model).embed(task)
    return web.json_response(embedding_response(body.model, result, body.encoding_format))
