"""POST /v1/embeddings: a thin handler over admission and the wire schema."""

from __future__ import annotations

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.embeddings import EmbeddingRequest, embedding_response
from lllmsd.api.schemas.tokens import load_decoder
from lllmsd.core.jobs import JobKind


async def embeddings(request: web.Request) -> web.Response:
    body = EmbeddingRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    if body.has_token_ids():
        await load_decoder()
    admission = await request.app[RUNTIME].admit(body.model, JobKind.EMBEDDING, body.to_job)
    # the pool batches concurrent requests into shared engine calls (see core/batcher.py)
    result = await admission.pool.embed(admission.job)
    return web.json_response(embedding_response(body.model, result, body.encoding_format))
