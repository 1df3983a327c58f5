"""GET /openapi.json: an OpenAPI 3.1 document of every route, generated from the models that serve them.

Request bodies are described by the very pydantic models the handlers validate with (api/schemas/text.py
and messages.py, embeddings.py, audio.py), response bodies by the strict models in api/schemas/bodies.py,
which the tests validate real responses against; the paths come from the app's router. So the document
cannot drift: a new request field appears in it by itself, a changed response shape fails the tests,
and a route nobody described is listed with ``x-undocumented: true`` (a test asserts there is none).

Every error response is the OpenAI envelope (``ErrorResponse``). HEAD routes, which aiohttp adds next to
every GET, are left out as OpenAPI tools expect.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from lllmsd import __version__
from lllmsd.api.keys import RUNTIME
from lllmsd.api.schemas import bodies as r
from lllmsd.api.schemas.audio import TranscriptionRequest, TranslationRequest
from lllmsd.api.schemas.embeddings import EmbeddingRequest
from lllmsd.api.schemas.rerank import RerankRequest
from lllmsd.api.schemas.responses import ResponseCreateRequest
from lllmsd.api.schemas.speech import CONTENT_TYPES as SPEECH_CONTENT_TYPES
from lllmsd.api.schemas.speech import SpeechRequest
from lllmsd.api.schemas.text import ChatCompletionRequest, CompletionRequest
from lllmsd.api.session import MAX_SESSION_LENGTH

log = logging.getLogger(__name__)

OPENAPI_VERSION = "3.1.0"
REF = "#/components/schemas/{model}"
API_PREFIXES = ("/v1", "/openai/v1")  # the same prefixes app.py mounts the OpenAI routes under
OPEN_PATHS = frozenset({"/health", "/ready"})  # served without an API key (see api/auth.py)
JSON = "application/json"
MULTIPART = "multipart/form-data"

ERROR_DESCRIPTIONS: Mapping[int, str] = MappingProxyType(
    {
        400: "Invalid request: a field is missing, malformed or out of range, or the model cannot do this "
        "(code names it: invalid_value, context_length_exceeded, unsupported_parameter, ...).",
        401: "Missing or wrong API key (only when api_keys are configured).",
        404: "No model with this id (code model_not_found), or no stored response with this id (code "
        "response_not_found).",
        408: "The request body did not arrive within client_timeout seconds.",
        413: "Request body or uploaded file larger than the configured limit (max_body_size, max_audio_size).",
        415: "Wrong Content-Type.",
        429: "Too many requests waiting for this model (code queue_full); see Retry-After.",
        500: "The engine failed (code engine_error) or a bug (code internal_error, with a request id).",
        503: "The model could not be loaded or downloaded, no instance came free within queue_timeout, "
        "the daemon is shutting down, or the response store cannot be used (code response_store_unavailable).",
    }
)
_GENERATION_ERRORS = (400, 404, 408, 413, 415, 429, 500, 503)
_AUDIO_ERRORS = (400, 404, 413, 415, 429, 500, 503)


@dataclass(frozen=True)
class Body:
    """One response body: a model serialised as JSON, or text of a media type."""

    media_type: str
    model: type[BaseModel] | None = None
    description: str = ""
    events: tuple[type[BaseModel], ...] = ()  # a stream's event payload models (text/event-stream)
    schema: Mapping[str, Any] | None = None  # a body described by hand (no model): its JSON Schema


@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    ok: tuple[Body, ...]
    request: type[BaseModel] | None = None
    request_media: str = JSON
    errors: tuple[int, ...] = (500,)
    path_parameters: tuple[tuple[str, str], ...] = ()  # (name, description)
    session: bool = False  # takes the session header (api/session.py): a conversation's affinity key
    extra: Mapping[str, Any] = field(default_factory=dict)


_TEXT = "Plain text"
_SSE = "text/event-stream"
_STREAM = "With `stream: true`: server-sent events, each `data: {json}` one chunk, ending with `data: [DONE]`."
_RERANK = Operation(
    "Rank documents by relevance to a query (Cohere/Jina shape; not OpenAI)",
    "rerank",
    (Body(JSON, r.RerankResponse),),
    RerankRequest,
    errors=_GENERATION_ERRORS,
)
_AUDIO_BODIES = (
    Body(JSON, r.Transcription, "response_format json (the default)"),
    Body(JSON, r.VerboseTranscription, "response_format verbose_json"),
    Body("text/plain", description=f"{_TEXT}: response_format text"),
    Body("application/x-subrip", description="SubRip subtitles: response_format srt"),
    Body("text/vtt", description="WebVTT subtitles: response_format vtt"),
)
_BINARY = {"type": "string", "format": "binary"}
_SPEECH_BODIES = (
    *(
        Body(media, description=f"response_format {name}", schema=_BINARY)
        for name, media in SPEECH_CONTENT_TYPES.items()
    ),
    Body(
        _SSE,
        description="With `stream_format: sse`: speech.audio.delta events, then speech.audio.done",
        events=(r.SpeechAudioDelta, r.SpeechAudioDone),
    ),
)

# (method, path below the API prefix, or the whole path for the daemon's own routes) -> what it does
OPERATIONS: Mapping[tuple[str, str], Operation] = MappingProxyType(
    {
        ("POST", "/chat/completions"): Operation(
            "Create a chat completion",
            "chat",
            (Body(JSON, r.ChatCompletion), Body(_SSE, description=_STREAM, events=(r.ChatCompletionChunk,))),
            ChatCompletionRequest,
            errors=_GENERATION_ERRORS,
            session=True,
        ),
        ("POST", "/completions"): Operation(
            "Create a (legacy) completion",
            "completions",
            (Body(JSON, r.Completion), Body(_SSE, description=_STREAM, events=(r.Completion,))),
            CompletionRequest,
            errors=_GENERATION_ERRORS,
            session=True,
        ),
        ("POST", "/embeddings"): Operation(
            "Create embeddings",
            "embeddings",
            (Body(JSON, r.EmbeddingList),),
            EmbeddingRequest,
            errors=_GENERATION_ERRORS,
        ),
        ("POST", "/audio/transcriptions"): Operation(
            "Transcribe audio",
            "audio",
            (
                *_AUDIO_BODIES,
                Body(
                    _SSE,
                    description="With `stream=true`: transcript.text.delta events, then transcript.text.done",
                    events=(r.TranscriptTextDelta, r.TranscriptTextDone),
                ),
            ),
            TranscriptionRequest,
            MULTIPART,
            errors=_AUDIO_ERRORS,
        ),
        ("POST", "/audio/translations"): Operation(
            "Translate audio into English text",
            "audio",
            _AUDIO_BODIES,
            TranslationRequest,
            MULTIPART,
            errors=_AUDIO_ERRORS,
        ),
        ("POST", "/responses"): Operation(
            "Create a response (the Responses API; stored and chained with previous_response_id)",
            "responses",
            (
                Body(JSON, r.ResponseObject),
                Body(
                    _SSE,
                    description="With `stream: true`: typed events (`event:` and `data:` lines, sequence_number "
                    "from 0), ending with response.completed, response.incomplete or response.failed; no [DONE]",
                    events=(r.ResponseStreamEvent,),
                ),
            ),
            ResponseCreateRequest,
            errors=_GENERATION_ERRORS,
            session=True,
        ),
        ("GET", "/responses/{response_id}"): Operation(
            "Retrieve a stored response",
            "responses",
            (Body(JSON, r.ResponseObject),),
            errors=(404, 500, 503),
            path_parameters=(("response_id", "A resp_... id."),),
        ),
        ("DELETE", "/responses/{response_id}"): Operation(
            "Delete a stored response",
            "responses",
            (Body(JSON, r.ResponseDeleted),),
            errors=(404, 500, 503),
            path_parameters=(("response_id", "A resp_... id."),),
        ),
        ("GET", "/responses/{response_id}/input_items"): Operation(
            "List a stored response's input items (paginated: after, limit, order)",
            "responses",
            (Body(JSON, r.ResponseInputItemList),),
            errors=(400, 404, 500, 503),
            path_parameters=(("response_id", "A resp_... id."),),
        ),
        ("POST", "/audio/speech"): Operation(
            "Speak text: the audio file, streamed sentence by sentence",
            "audio",
            _SPEECH_BODIES,
            SpeechRequest,
            errors=_GENERATION_ERRORS,
        ),
        # below the API prefixes, and also at /rerank and /v2/rerank, where other servers answer it
        ("POST", "/rerank"): _RERANK,
        ("POST", "/v2/rerank"): _RERANK,
        ("GET", "/models"): Operation("List the configured models", "models", (Body(JSON, r.ModelList),)),
        ("GET", "/models/{model}"): Operation(
            "Describe one model",
            "models",
            (Body(JSON, r.ModelObject),),
            errors=(404, 500),
            path_parameters=(("model", "A model id from the config."),),
        ),
        ("GET", "/"): Operation(
            "What the daemon is doing: models, instances, queues, downloads", "daemon", (Body(JSON, r.Status),)
        ),
        ("GET", "/health"): Operation("Liveness: answers while the daemon runs", "daemon", (Body(JSON, r.Health),)),
        ("GET", "/ready"): Operation(
            "Readiness: 200 once every model with min_instances is loaded, 503 (code not_ready) before that "
            "and while the daemon drains",
            "daemon",
            (Body(JSON, r.Ready),),
            errors=(503,),
        ),
        ("GET", "/metrics"): Operation(
            "Prometheus metrics",
            "daemon",
            (Body("text/plain", description="Prometheus text exposition format 0.0.4"),),
        ),
        ("GET", "/openapi.json"): Operation(
            "This document", "daemon", (Body(JSON, description="An OpenAPI 3.1 document", schema={"type": "object"}),)
        ),
    }
)


# ------------------------------------------------------------------------------------------ building


def build_document(app: web.Application) -> dict[str, Any]:
    """The OpenAPI document of ``app``'s routes (call it after every route is added)."""
    refs, schemas = _components()
    session_header = app[RUNTIME].config.session_header  # the running config: a reload may rename it
    paths: dict[str, dict[str, Any]] = {}
    for method, path in _routes(app):
        operation = _lookup(method, path)
        entry = _undocumented(method, path) if operation is None else _operation(operation, path, refs, session_header)
        paths.setdefault(path, {})[method.lower()] = entry
    keys_required = bool(app[RUNTIME].config.api_keys)  # the running config: a reload may change the keys
    for path, methods in paths.items():
        for entry in methods.values():
            if path in OPEN_PATHS:
                entry["security"] = []
            if path in OPEN_PATHS or not keys_required:
                entry["responses"].pop("401", None)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "lllmsd",
            "version": __version__,
            "description": "OpenAI-compatible API of a local-model daemon. Every error is "
            '`{"error": {"message", "type", "param", "code"}}`.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "One of api_keys."}},
        },
    }
    if keys_required:
        document["security"] = [{"bearer": []}]
    return document


def undocumented_routes(document: Mapping[str, Any]) -> list[str]:
    return [
        f"{method.upper()} {path}"
        for path, methods in document["paths"].items()
        for method, entry in methods.items()
        if entry.get("x-undocumented")
    ]


def _routes(app: web.Application) -> list[tuple[str, str]]:
    found = []
    for route in app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        found.append((route.method, route.resource.canonical))
    return found


def _lookup(method: str, path: str) -> Operation | None:
    for prefix in API_PREFIXES:
        if path.startswith(f"{prefix}/"):
            return OPERATIONS.get((method, path.removeprefix(prefix)))
    return OPERATIONS.get((method, path))


def _undocumented(method: str, path: str) -> dict[str, Any]:
    log.warning("route %s %s has no OpenAPI description (add it to lllmsd/api/openapi.py)", method, path)
    return {"summary": f"{method} {path}", "x-undocumented": True, "responses": {"default": {"description": "?"}}}


def _operation(
    operation: Operation, path: str, refs: Mapping[tuple[type, str], Any], session_header: str
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "summary": operation.summary,
        "tags": [operation.tag],
        "operationId": _operation_id(path),
        "responses": {"200": _ok(operation.ok, refs), **_errors(operation.errors)},
    }
    if operation.path_parameters:
        entry["parameters"] = [
            {"name": name, "in": "path", "required": True, "description": text, "schema": {"type": "string"}}
            for name, text in operation.path_parameters
        ]
    if operation.session:
        entry.setdefault("parameters", []).append(
            {
                "name": session_header,
                "in": "header",
                "required": False,
                "description": "Names the conversation: echoed on the response, and the turn goes to the instance "
                "that holds the session's context (a balancer hashes on it too). Empty: no session.",
                "schema": {"type": "string", "pattern": f"^[\\x21-\\x7e]{{0,{MAX_SESSION_LENGTH}}}$"},
            }
        )
    if operation.request is not None:
        schema_ref = refs[(operation.request, "validation")]
        if operation.request_media == MULTIPART:
            schema_ref = {"$ref": REF.format(model=_form_name(operation.request))}
        entry["requestBody"] = {"required": True, "content": {operation.request_media: {"schema": schema_ref}}}
    return entry


def _operation_id(path: str) -> str:
    words = [part.strip("{}") for part in path.strip("/").replace(".", "_").split("/") if part]
    return "_".join(words) or "status"


def _ok(bodies: tuple[Body, ...], refs: Mapping[tuple[type, str], Any]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    descriptions = []
    for body in bodies:
        if body.model is not None:
            schema = refs[(body.model, "serialization")]
            if body.media_type in content:  # several JSON shapes (response_format): any of them
                existing = content[body.media_type]["schema"]
                options = existing.get("oneOf", [existing])
                content[body.media_type]["schema"] = {"oneOf": [*options, schema]}
            else:
                content[body.media_type] = {"schema": schema}
        else:
            if body.events:
                schema = _sse_event([refs[(model, "serialization")] for model in body.events])
            else:
                schema = dict(body.schema or {"type": "string"})
            content[body.media_type] = {"schema": schema}
        if body.description:
            descriptions.append(body.description)
    return {"description": "; ".join(descriptions) or "OK", "content": content}


def _sse_event(payloads: list[Any]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1 reads a text/event-stream ``schema`` as each event's): its
    ``data`` is JSON text of one of ``payloads``, or an error envelope when the stream fails, or ``[DONE]``."""
    envelope = {"$ref": REF.format(model="ErrorResponse")}
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "event": {"type": "string"},
            "id": {"type": "string"},
            "retry": {"type": "integer"},
            "data": {
                "anyOf": [
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"oneOf": [*payloads, envelope]},
                        "description": "JSON text of one event.",
                    },
                    {"const": "[DONE]", "description": "The last event of a chat or completion stream."},
                ]
            },
        },
    }


def _errors(codes: tuple[int, ...]) -> dict[str, Any]:
    envelope = {JSON: {"schema": {"$ref": REF.format(model="ErrorResponse")}}}
    return {str(code): {"description": ERROR_DESCRIPTIONS[code], "content": envelope} for code in (401, *codes)}


def _components() -> tuple[Mapping[tuple[type, str], Any], dict[str, Any]]:
    """Every request and response model's JSON Schema, with names made unique by pydantic."""
    wanted: list[tuple[type[BaseModel], JsonSchemaMode]] = [(r.ErrorResponse, "serialization")]
    for operation in OPERATIONS.values():
        if operation.request is not None:
            wanted.append((operation.request, "validation"))
        for body in operation.ok:
            wanted += [(m, "serialization") for m in (body.model, *body.events) if m is not None]
    refs, definitions = models_json_schema(list(dict.fromkeys(wanted)), ref_template=REF)
    schemas = dict(definitions.get("$defs", {}))
    for operation in OPERATIONS.values():
        if operation.request is not None and operation.request_media == MULTIPART:
            schemas[_form_name(operation.request)] = _form_schema(schemas, refs[(operation.request, "validation")])
    return refs, schemas


def _form_name(model: type[BaseModel]) -> str:
    return f"{model.__name__.removesuffix('Request')}Form"


def _form_schema(schemas: Mapping[str, Any], ref: Mapping[str, str]) -> dict[str, Any]:
    """The multipart form: the model's fields, plus the uploaded audio file."""
    name = ref["$ref"].rsplit("/", 1)[-1]
    form = copy.deepcopy(schemas[name])
    form["title"] = form.get("title", name).removesuffix("Request") + "Form"
    form["properties"]["file"] = {
        "type": "string",
        "format": "binary",
        "contentMediaType": "application/octet-stream",
        "description": "The audio (wav, mp3, ogg, flac, ...), decoded by the engine.",
    }
    form["required"] = [*form.get("required", []), "file"]
    return form


# ------------------------------------------------------------------------------------------- serving


async def openapi_document(request: web.Request) -> web.Response:
    return web.json_response(build_document(request.app))


def setup_openapi(app: web.Application) -> None:
    """Add GET /openapi.json (call after the other routes: it describes the router it finds)."""
    app.router.add_get("/openapi.json", openapi_document)
