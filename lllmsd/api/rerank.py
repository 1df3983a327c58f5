"""POST /v1/rerank (and /rerank, /v2/rerank): a thin handler over admission and the wire schema.

A rerank model's engine scores the documents; an embedding model answers by cosine similarity through its
batcher (core/rerank.py). Which one is the pool's business: the handler does the same either way.
"""

from __future__ import annotations

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.rerank import RerankRequest, rerank_response
from lllmsd.core.jobs import JobKind


async def rerank(request: web.Request) -> web.Response:
    body = RerankRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    admission = await request.app[RUNTIME].admit(body.model, JobKind.RERANK, body.to_job)
    result = await admission.pool.rerank(admission.job)
    return web.json_response(rerank_response(body, result))
