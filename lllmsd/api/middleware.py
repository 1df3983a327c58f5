"""Middlewares: request ids and access log, and the one place errors become OpenAI error envelopes.

Order (outermost first): request id + access log, then errors. Every non-2xx response the daemon sends,
whatever raised it (our errors, aiohttp's HTTP exceptions, validation, a bug), has the envelope
``{"error": {"message", "type", "param", "code"}}``; a bug answers 500 with the request id and logs the
traceback, never a bare 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from lllmsd.api.keys import MODEL, REQUEST_ID, RUNTIME
from lllmsd.api.schemas.common import error_body
from lllmsd.errors import LllmsdError

log = logging.getLogger("lllmsd.access")
errors_log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-Id"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

# aiohttp's HTTP errors -> (OpenAI type, code)
_HTTP_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    408: ("invalid_request_error", "request_timeout"),
    415: ("invalid_request_error", "unsupported_media_type"),
}


def error_response(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    return web.json_response(error_body(message, type_, param, code), status=status, headers=headers)


def validation_param(loc: tuple[Any, ...]) -> str:
    """pydantic's location as OpenAI writes a param: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        # pydantic's type tags, not field names (a field may well be called stream or stream_format)
        elif part in ("function-after", "function-before", "str") or str(part).startswith(("list[", "union[")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_error_response(exc: ValidationError) -> web.Response:
    errors = exc.errors(include_url=False)
    first = errors[0]
    param = validation_param(tuple(first["loc"])) or None
    messages = []
    for error in errors[:5]:
        where = validation_param(tuple(error["loc"]))
        text = "unrecognized request argument" if error["type"] == "extra_forbidden" else error["msg"]
        text = text.removeprefix("Value error, ")
        messages.append(f"{where}: {text}" if where else text)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return error_response(400, "; ".join(messages) + more, "invalid_request_error", param, "invalid_value")


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else uuid.uuid4().hex
    request[REQUEST_ID] = request_id
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except asyncio.CancelledError:
        status = 499  # client closed the connection
        raise
    finally:
        log.info(
            "%s %s model=%s status=%d duration=%.3fs request_id=%s",
            request.method,
            _loggable(request.path),
            _loggable(request.get(MODEL, "-")),
            status,
            time.perf_counter() - started,
            request_id,
        )


def _loggable(value: str, limit: int = 200) -> str:
    """A client-chosen string (a model id, a path) fit for one log line: control characters escaped, so
    it cannot forge log lines, and clipped, so a megabyte-long model id is not a megabyte of log."""
    escaped = value.encode("unicode_escape").decode("ascii") if not value.isprintable() else value
    return escaped if len(escaped) <= limit else f"{escaped[:limit]}...({len(escaped)} chars)"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except LllmsdError as exc:
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers())
    except ValidationError as exc:
        return validation_error_response(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        type_, code = _HTTP_ERRORS.get(exc.status, ("invalid_request_error", "http_error"))
        own_text = exc.text and not exc.text.startswith(f"{exc.status}:") and exc.status != 413
        message = exc.text if own_text else _http_message(request, exc)  # a 413 names the setting to raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after", "www-authenticate")}
        return error_response(exc.status, message, type_, None, code, headers)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        request_id = request.get(REQUEST_ID, "-")
        errors_log.exception("unexpected error serving %s %s (request id %s)", request.method, request.path, request_id)
        return error_response(
            500,
            f"internal server error (request id {request_id}); the daemon logged the details",
            "server_error",
            None,
            "internal_error",
        )


def _http_message(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        return f"request body too large (limit {request.app[RUNTIME].config.max_body_size} bytes, max_body_size)"
    return exc.reason


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or the 4xx that says what is wrong with it."""
    content_type = request.content_type
    if content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text=f"Content-Type must be application/json, got '{content_type or 'none'}'"
        )
    timeout = request.app[RUNTIME].config.client_timeout
    try:
        # bounded in size by client_max_size (aiohttp raises 413 beyond it) and in time: a body that stalls
        # must not hold its connection and handler forever
        body = await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        message = f"the request body did not arrive within {timeout:g}s (client_timeout)"
        raise web.HTTPRequestTimeout(text=message) from None
    if len(body) > PARSE_IN_THREAD:
        # A 26 MB body takes about a second to parse and walk. json.loads holds the GIL while it runs (so
        # it still pauses the event loop, about 0.05 s a MB); the walk over what it built does not.
        data = await asyncio.to_thread(parse_json_object, body)
    else:
        data = parse_json_object(body)
    model = data.get("model")
    if isinstance(model, str):
        request[MODEL] = model  # the access log names it even when validation refuses the body
    return data


PARSE_IN_THREAD = 1 << 20  # bytes


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"malformed JSON body: {exc}") from None
    except RecursionError:  # the parser's own limit, about 1,000 levels on CPython
        raise web.HTTPBadRequest(text=_too_deep()) from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the JSON body must be an object")
    if nesting_exceeds(data, MAX_JSON_DEPTH):
        raise web.HTTPBadRequest(text=_too_deep())
    return data


# Deeper bodies are refused before validation: pydantic, JSON Schema handling and grammar building all
# recurse, and a body nested a few hundred levels deep would exhaust the stack there. Real requests nest
# about 10 levels (a tool's JSON Schema a few more).
MAX_JSON_DEPTH = 128


def _too_deep() -> str:
    return f"the JSON body is nested too deeply (at most {MAX_JSON_DEPTH} levels of objects and arrays)"


_CONTAINERS = frozenset({dict, list})  # what json.loads builds objects and arrays as


def nesting_exceeds(data: Any, limit: int) -> bool:
    """Whether ``data`` holds objects or arrays nested more than ``limit`` deep (iterative: no recursion).
    An array of scalars (4,000,000 token ids) is passed over at C speed, not item by item in Python."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        if _CONTAINERS.isdisjoint(map(type, children)):
            continue
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False
