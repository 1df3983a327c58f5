"""The Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}, GET .../input_items.

Thin handlers: validate (api/schemas/responses.py), read the stored chain of ``previous_response_id``,
admit the ChatJob it becomes as a chat request (so every engine and the pool's context affinity serve
it unchanged), render the events (api/schemas/responses_output.py), and store the answer
(core/response_store.py) before the client sees it completed.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from lllmsd.api.keys import MODEL, RESPONSE_STORE, RUNTIME, SESSION
from lllmsd.api.metrics import observe_generation
from lllmsd.api.middleware import read_json
from lllmsd.api.schemas.response_items import InputItem, items_to_messages
from lllmsd.api.schemas.responses import ResponseCreateRequest, ResponseTurn, in_responses_terms
from lllmsd.api.schemas.responses_output import ResponseRenderer, response_events
from lllmsd.api.sse import stream_sse
from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import ChatJob, ChatMessage, GenerationEvent, JobKind
from lllmsd.core.response_store import Retention, StoredResponse
from lllmsd.errors import ContextLengthExceeded, InvalidRequest, LllmsdError, ResponseNotFound

log = logging.getLogger(__name__)

_ITEMS = TypeAdapter(list[InputItem])
MAX_ITEMS_PAGE = 100


async def create_response(request: web.Request) -> web.StreamResponse:
    body = ResponseCreateRequest.model_validate(await read_json(request))
    request[MODEL] = body.model
    runtime, store = request.app[RUNTIME], request.app[RESPONSE_STORE]
    settings = runtime.config.responses
    history: tuple[ChatMessage, ...] = ()
    if body.previous_response_id is not None:
        previous = await store.get(body.previous_response_id)
        if previous is None:
            raise ResponseNotFound(body.previous_response_id, param="previous_response_id")
        history = previous.history
    stored = body.store if body.store is not None else settings.store
    turn = body.turn(history)
    try:
        admission = await runtime.admit(body.model, JobKind.CHAT, turn.to_job)
    except LllmsdError as exc:
        raise in_responses_terms(exc) from None
    retention = Retention(settings.max_age, settings.max_count)

    session = request.get(SESSION)
    async with admission.pool.acquire(admission.job.context(), session=session) as instance:
        turn, job, events = await _start_fitting(instance, turn, admission.job, admission.config, session)
        renderer = ResponseRenderer(body, job, stored=stored, created_at=runtime.clock.wall())

        async def save(response: dict[str, Any]) -> None:
            if stored:
                await store.save(_stored(response, turn, instance.id), retention)

        async with contextlib.aclosing(observe_generation(request, body.model, events)) as observed:
            if body.stream:
                return await stream_sse(
                    request, response_events(renderer, observed, save), named_events=True, done_marker=False
                )
            async for event in observed:
                renderer.apply(event)
    renderer.close()
    response = renderer.body()
    await save(response)
    return web.json_response(response)


async def get_response(request: web.Request) -> web.Response:
    if request.query.get("stream", "false").lower() not in ("false", "0"):
        raise InvalidRequest(
            "streaming a stored response is for background responses, which lllmsd does not offer",
            param="stream",
            code="unsupported_parameter",
        )
    stored = await _find(request)
    return web.json_response(stored.response)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    if not await request.app[RESPONSE_STORE].delete(response_id):
        raise ResponseNotFound(response_id, param="response_id")
    return web.json_response({"id": response_id, "object": "response.deleted", "deleted": True})


async def list_input_items(request: web.Request) -> web.Response:
    """This response's input items, paginated as OpenAI does (newest first unless ``order=asc``)."""
    stored = await _find(request)
    query = request.query
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be 'asc' or 'desc'", param="order", code="invalid_value")
    limit = _limit(query.get("limit", "20"))
    items = stored.input_items if order == "asc" else list(reversed(stored.input_items))
    after = query.get("after")
    if after is not None:
        ids = [item.get("id") for item in items]
        if after not in ids:
            raise InvalidRequest(f"no input item '{after[:100]}' in this response", param="after", code="invalid_value")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return web.json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


# ------------------------------------------------------------------------------------------- helpers


async def _find(request: web.Request) -> StoredResponse:
    response_id = request.match_info["response_id"]
    stored = await request.app[RESPONSE_STORE].get(response_id)
    if stored is None:
        raise ResponseNotFound(response_id, param="response_id")
    return stored


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_ITEMS_PAGE:
        raise InvalidRequest(
            f"limit must be an integer from 1 to {MAX_ITEMS_PAGE}", param="limit", code="invalid_value"
        )
    return limit


async def _start_fitting(
    instance: ModelInstance, turn: ResponseTurn, job: ChatJob, config: Any, session: str | None
) -> tuple[ResponseTurn, ChatJob, AsyncIterator[GenerationEvent]]:
    """Start generating; with ``truncation: auto``, drop the oldest conversation messages until the
    prompt fits the context. Pulls the engine's first event, so an error it raises at once (context too
    long) is raised here, before any byte of the answer is sent."""
    while True:
        events = instance.generate(job, session)
        try:
            first = await anext(events, None)
        except BaseException as exc:
            await events.aclose()
            if not isinstance(exc, LllmsdError):
                raise
            if not isinstance(exc, ContextLengthExceeded) or turn.request.truncation != "auto":
                raise in_responses_terms(exc) from None
            # drop the share of the history the excess is of the prompt (at least one message): a long
            # chain fits in a few tries, not one engine call per message
            excess = max(exc.prompt_tokens - exc.context_size, 1) / max(exc.prompt_tokens, 1)
            smaller = turn.truncated(math.ceil(turn.kept_history * excess))
            if smaller is None:
                raise in_responses_terms(exc) from None
            log.info(
                "response on %s: the input needs %d tokens, the context holds %d: truncation auto leaves out "
                "the %d oldest messages",
                instance.model_id,
                exc.prompt_tokens,
                exc.context_size,
                smaller.dropped,
            )
            turn, job = smaller, smaller.to_job(config)
            continue
        return turn, job, _prepend(first, events)


async def _prepend(
    first: GenerationEvent | None, rest: AsyncIterator[GenerationEvent]
) -> AsyncIterator[GenerationEvent]:
    async with contextlib.aclosing(rest):  # type: ignore[type-var]
        if first is not None:
            yield first
        async for event in rest:
            yield event


def _stored(response: dict[str, Any], turn: ResponseTurn, instance_id: str) -> StoredResponse:
    output = items_to_messages(_ITEMS.validate_python(response["output"]), turn.conversation)
    return StoredResponse(
        id=response["id"],
        created_at=response["created_at"],
        model=response["model"],
        response=response,
        input_items=turn.input_items,
        history=(*turn.conversation, *output),
        previous_response_id=turn.request.previous_response_id,
        instance_id=instance_id,
    )
