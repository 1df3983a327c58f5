"""GET /v1/models and /v1/models/{id}, in OpenAI's shapes."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from lllmsd.api.keys import MODEL, RUNTIME
from lllmsd.core.runtime import Runtime
from lllmsd.errors import ModelNotFound


def _model_object(runtime: Runtime, model_id: str) -> dict[str, Any]:
    if model_id not in runtime.pools:
        raise ModelNotFound(model_id)
    return {"id": model_id, "object": "model", "created": int(runtime.started_at), "owned_by": "lllmsd"}


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response({"object": "list", "data": [_model_object(runtime, m) for m in runtime.pools]})


async def get_model(request: web.Request) -> web.Response:
    model_id = request.match_info["model"]
    request[MODEL] = model_id
    return web.json_response(_model_object(request.app[RUNTIME], model_id))
