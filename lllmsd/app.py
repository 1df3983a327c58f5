"""create_app(config): the whole daemon as one aiohttp Application, with no module-level state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from aiohttp import web

from lllmsd.api import audio, embeddings, models, probes, rerank, responses, speech, status, text
from lllmsd.api.auth import auth_middleware
from lllmsd.api.keys import RESPONSE_STORE, RUNTIME
from lllmsd.api.metrics import metrics_middleware, setup_metrics
from lllmsd.api.middleware import error_middleware, request_context_middleware
from lllmsd.api.openapi import setup_openapi
from lllmsd.api.probes import DRAIN, Drain, drain_middleware
from lllmsd.api.session import echo_session, session_middleware
from lllmsd.config import DaemonConfig
from lllmsd.core.clock import Clock
from lllmsd.core.response_store import ResponseStore
from lllmsd.core.runtime import Runtime
from lllmsd.core.store import ModelStore
from lllmsd.engines.base import Engine
from lllmsd.engines.registry import EngineRegistry, builtin_engines

log = logging.getLogger(__name__)

API_PREFIXES = ("/v1", "/openai/v1")
RERANK_PATHS = ("/rerank", "/v2/rerank")  # where llama-server, infinity and Cohere's v2 clients also look


def create_app(
    config: DaemonConfig,
    *,
    engines: EngineRegistry | Mapping[str, type[Engine]] | None = None,
    clock: Clock | None = None,
    store: ModelStore | None = None,
    base_dir: Path | None = None,
    reap_interval: float | None = 1.0,
) -> web.Application:
    """Build the app. ``engines`` is the engine registry ``config`` was parsed with (default: the built-in
    engines), or a mapping of engine names to classes that replace the built-in ones (tests inject
    instrumented fakes); ``base_dir`` is what relative model locations are relative to (the config
    file's folder)."""
    if not isinstance(engines, EngineRegistry):
        engines = builtin_engines().with_classes(engines or {})
    app = web.Application(
        client_max_size=config.max_body_size,
        # outermost first: the metrics see the final status (a draining daemon's 503 too), errors (a 401, a bad
        # session id) become envelopes
        middlewares=[
            request_context_middleware,
            metrics_middleware,
            drain_middleware,
            error_middleware,
            auth_middleware,
            session_middleware,
        ],
    )
    runtime = Runtime(config, engines=engines, clock=clock, store=store, base_dir=base_dir, reap_interval=reap_interval)
    app[RUNTIME] = runtime
    # opened on first use: a store that cannot be opened fails the Responses requests only
    app[RESPONSE_STORE] = ResponseStore(config.responses_path(), runtime.clock)
    app[DRAIN] = Drain()
    app.on_response_prepare.append(echo_session)
    setup_metrics(app, runtime)

    async def runtime_lifecycle(app: web.Application) -> AsyncIterator[None]:
        await runtime.start()
        yield
        await runtime.stop()
        await app[RESPONSE_STORE].close()

    app.cleanup_ctx.append(runtime_lifecycle)
    _add_routes(app)
    setup_openapi(app)  # last: it documents the routes it finds
    return app


def _add_routes(app: web.Application) -> None:
    app.router.add_get("/", status.status)
    app.router.add_get("/health", status.health)
    app.router.add_get("/ready", probes.ready)
    for prefix in API_PREFIXES:
        app.router.add_get(f"{prefix}/models", models.list_models)
        app.router.add_get(f"{prefix}/models/{{model}}", models.get_model)
        app.router.add_post(f"{prefix}/chat/completions", text.chat_completions)
        app.router.add_post(f"{prefix}/completions", text.completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings.embeddings)
        app.router.add_post(f"{prefix}/audio/transcriptions", audio.transcriptions)
        app.router.add_post(f"{prefix}/audio/translations", audio.translations)
        app.router.add_post(f"{prefix}/responses", responses.create_response)
        app.router.add_get(f"{prefix}/responses/{{response_id}}", responses.get_response)
        app.router.add_delete(f"{prefix}/responses/{{response_id}}", responses.delete_response)
        app.router.add_get(f"{prefix}/responses/{{response_id}}/input_items", responses.list_input_items)
        app.router.add_post(f"{prefix}/audio/speech", speech.speech)
        app.router.add_post(f"{prefix}/rerank", rerank.rerank)
    for path in RERANK_PATHS:
        app.router.add_post(path, rerank.rerank)
