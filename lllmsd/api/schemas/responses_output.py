"""Rendering Responses API answers: the Response object and its typed stream events.

``ResponseRenderer`` folds the engine's event stream (the chat-completions one: ``TextDelta``,
``ToolCallDelta``, ``ChoiceEnd``, ``Usage``) into output items, and says at each step which stream
events OpenAI sends for it. The non-streamed answer is the same fold with the events dropped, so the two
modes cannot drift. ``response_events`` numbers the events of a stream (``sequence_number`` from 0) and
ends it with exactly one of response.completed, response.incomplete or response.failed.

Reasoning: a thinking model's ``ReasoningDelta`` events become a ``reasoning`` output item before the
message, its text in ``content`` (``reasoning_text``: nothing is encrypted or summarised here), streamed
as response.reasoning_text.delta events. ``output_tokens_details.reasoning_tokens`` stays 0: the engines
count generated tokens, not which of them were reasoning.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from lllmsd.api.schemas.response_items import new_id
from lllmsd.api.schemas.responses import (
    FunctionToolWire,
    ResponseCreateRequest,
    TextFormatJsonSchema,
    ToolChoiceFunction,
)
from lllmsd.core.jobs import (
    ChatJob,
    ChoiceEnd,
    GenerationEvent,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from lllmsd.errors import LllmsdError

log = logging.getLogger(__name__)

StreamEvent = dict[str, Any]


class ResponseRenderer:
    """One Response being built from engine events. Not thread-safe: one request's handler owns it."""

    def __init__(
        self,
        request: ResponseCreateRequest,
        job: ChatJob,
        *,
        stored: bool,
        created_at: float | None = None,
    ) -> None:
        self.request = request
        self.job = job
        self.id = new_id("resp")
        self.created_at = int(created_at if created_at is not None else time.time())
        self.stored = stored
        self.output: list[dict[str, Any]] = []
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.error: dict[str, Any] | None = None
        self._message: dict[str, Any] | None = None  # the open message item, while text streams into it
        self._text: list[str] = []
        self._logprobs: list[dict[str, Any]] = []
        self._calls: dict[int, dict[str, Any]] = {}  # call_index -> its open function_call item
        self._reasoning: dict[str, Any] | None = None  # the open reasoning item, while reasoning streams
        self._reasoning_text: list[str] = []
        self._closed = False

    # ---------------------------------------------------------------------------------- the events

    def start(self) -> list[StreamEvent]:
        snapshot = self.body("in_progress")
        return [
            {"type": "response.created", "response": snapshot},
            {"type": "response.in_progress", "response": snapshot},
        ]

    def apply(self, event: GenerationEvent) -> list[StreamEvent]:
        """The stream events for one engine event (only choice 0 exists: a Response has one answer)."""
        if isinstance(event, ReasoningDelta):
            return self._reasoning_delta(event.text) if event.text else []
        if isinstance(event, TextDelta):
            if not event.text and not event.logprobs:
                return []
            events = self._close_reasoning()
            events += self._open_message()
            logprobs = [_logprob(lp) for lp in event.logprobs] if self.request.wants_logprobs else []
            self._text.append(event.text)
            self._logprobs += logprobs
            assert self._message is not None
            events.append(
                {
                    "type": "response.output_text.delta",
                    **self._where(self._message),
                    "content_index": 0,
                    "delta": event.text,
                    "logprobs": logprobs,
                }
            )
            return events
        if isinstance(event, ToolCallDelta):
            return self._call_delta(event)
        if isinstance(event, ChoiceEnd):
            self.finish_reason = event.finish_reason
        elif isinstance(event, Usage):
            self.usage = event
        return []

    def close(self) -> list[StreamEvent]:
        """The done events of every open item; the output is final after this."""
        if self._closed:
            return []
        self._closed = True
        events = self._close_reasoning()
        events += self._close_message()
        for index in sorted(self._calls):
            item = self._calls[index]
            item["arguments"] = compact_json(item["arguments"])
            item["status"] = "completed"
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    **self._where(item),
                    "arguments": item["arguments"],
                    "name": item["name"],
                }
            )
            events.append({"type": "response.output_item.done", **self._index(item), "item": dict(item)})
        self._calls = {}
        return events

    def final(self) -> StreamEvent:
        """The last event: response.completed, response.incomplete, or response.failed."""
        body = self.body()
        return {"type": f"response.{body['status']}", "response": body}

    def fail(self, exc: BaseException) -> list[StreamEvent]:
        """An ``error`` event then response.failed, for a failure after the stream began."""
        message = exc.message if isinstance(exc, LllmsdError) else "the response failed; the daemon logged the details"
        code = exc.code if isinstance(exc, LllmsdError) else "server_error"
        self.close()
        self.error = {"code": "server_error", "message": message}
        return [
            {"type": "error", "code": code, "message": message, "param": getattr(exc, "param", None)},
            {"type": "response.failed", "response": self.body("failed")},
        ]

    # ------------------------------------------------------------------------------- the object

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        return "incomplete" if self.finish_reason == "length" else "completed"

    def body(self, status: str | None = None) -> dict[str, Any]:
        """The Response object; ``status`` in_progress while it streams, else the outcome."""
        status = status or self.status
        request, sampling = self.request, self.job.sampling
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": self.error,
            "incomplete_details": incomplete,
            "instructions": request.instructions,
            "max_output_tokens": request.max_output_tokens,
            "max_tool_calls": None,
            "model": request.model,
            "output": [dict(item) for item in self.output] if status != "in_progress" else [],
            "parallel_tool_calls": self.job.parallel_tool_calls,
            "previous_response_id": request.previous_response_id,
            "prompt_cache_key": request.prompt_cache_key,
            "reasoning": _reasoning(request),
            "safety_identifier": request.safety_identifier,
            "service_tier": "default",
            "store": self.stored,
            "temperature": sampling.temperature,
            "text": {"format": _text_format(request)},
            "tool_choice": _tool_choice(request),
            "tools": [_tool(t) for t in request.tools or ()],
            "top_logprobs": request.top_logprobs,
            "top_p": sampling.top_p,
            "truncation": request.truncation or "disabled",
            "usage": _usage(self.usage) if self.usage is not None and status != "in_progress" else None,
            "user": request.user,
            "metadata": request.metadata or {},
        }

    # ---------------------------------------------------------------------------------- items

    def _open_message(self) -> list[StreamEvent]:
        if self._message is not None:
            return []
        item = {"id": new_id("msg"), "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
        self._message = item
        self.output.append(item)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        return [
            {"type": "response.output_item.added", **self._index(item), "item": dict(item, content=[])},
            {"type": "response.content_part.added", **self._where(item), "content_index": 0, "part": part},
        ]

    def _close_message(self) -> list[StreamEvent]:
        item = self._message
        if item is None:
            return []
        self._message = None
        text = "".join(self._text)
        part = {"type": "output_text", "annotations": [], "logprobs": self._logprobs, "text": text}
        item["content"] = [part]
        item["status"] = "incomplete" if self.finish_reason == "length" else "completed"
        where = {**self._where(item), "content_index": 0}
        return [
            {"type": "response.output_text.done", **where, "text": text, "logprobs": self._logprobs},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", **self._index(item), "item": dict(item)},
        ]

    def _reasoning_delta(self, text: str) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        item = self._reasoning
        if item is None:
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [], "status": "in_progress"}
            self._reasoning = item
            self.output.append(item)
            events.append({"type": "response.output_item.added", **self._index(item), "item": dict(item)})
        self._reasoning_text.append(text)
        events.append({"type": "response.reasoning_text.delta", **self._where(item), "content_index": 0, "delta": text})
        return events

    def _close_reasoning(self) -> list[StreamEvent]:
        item = self._reasoning
        if item is None:
            return []
        self._reasoning = None
        text = "".join(self._reasoning_text)
        item["content"] = [{"type": "reasoning_text", "text": text}]
        item["status"] = "completed"
        return [
            {"type": "response.reasoning_text.done", **self._where(item), "content_index": 0, "text": text},
            {"type": "response.output_item.done", **self._index(item), "item": dict(item)},
        ]

    def _call_delta(self, event: ToolCallDelta) -> list[StreamEvent]:
        events = self._close_reasoning()
        events += self._close_message()  # text before a call is its own message item
        item = self._calls.get(event.call_index)
        if item is None:
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": event.id or new_id("call"),
                "name": event.name or "",
            }
            self._calls[event.call_index] = item
            self.output.append(item)
            events.append({"type": "response.output_item.added", **self._index(item), "item": dict(item)})
        if event.arguments:
            item["arguments"] += event.arguments
            events.append(
                {"type": "response.function_call_arguments.delta", **self._where(item), "delta": event.arguments}
            )
        return events

    def _index(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"output_index": self.output.index(item)}

    def _where(self, item: dict[str, Any]) -> dict[str, Any]:
        return {"item_id": item["id"], "output_index": self.output.index(item)}


async def response_events(
    renderer: ResponseRenderer,
    events: AsyncIterator[GenerationEvent],
    on_done: Callable[[dict[str, Any]], Awaitable[None]],
) -> AsyncIterator[StreamEvent]:
    """The numbered stream events of one Response. ``on_done`` gets the final Response object before the
    last event is sent (the handler stores it there: what a client sees completed is stored); if it, or
    the engine, fails after the stream began, the stream ends with an ``error`` event and response.failed."""
    numbers = itertools.count()

    def numbered(batch: list[StreamEvent]) -> list[StreamEvent]:
        return [{**event, "sequence_number": next(numbers)} for event in batch]

    # The engine's first event comes before response.created: an error it raises at once (context too
    # long, a refused parameter) must reach the client before any event, so it can still be an HTTP status.
    first = await anext(events, None)
    for event in numbered(renderer.start()):
        yield event
    try:
        if first is not None:
            for event in numbered(renderer.apply(first)):
                yield event
        async for engine_event in events:
            for event in numbered(renderer.apply(engine_event)):
                yield event
        for event in numbered(renderer.close()):
            yield event
        await on_done(renderer.body())
        final = renderer.final()
    except Exception as exc:
        if not isinstance(exc, LllmsdError):
            log.error("response %s failed while streaming", renderer.id, exc_info=exc)
        for event in numbered(renderer.fail(exc)):
            yield event
        return
    yield numbered([final])[0]


# ------------------------------------------------------------------------------------------- pieces


def compact_json(text: str) -> str:
    """Function-call arguments as compact JSON (what OpenAI sends); left as they are if not JSON."""
    try:
        return json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    except ValueError:
        return text


def _logprob(lp: TokenLogprob) -> dict[str, Any]:
    return {
        "token": lp.token,
        "logprob": lp.logprob,
        "bytes": list(lp.bytes) if lp.bytes is not None else [],
        "top_logprobs": [
            {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes) if t.bytes is not None else []}
            for t in lp.top
        ],
    }


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        # every input token evaluated now stays in the instance's KV cache for the next turn
        "input_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "cache_write_tokens": max(usage.prompt_tokens - usage.cached_tokens, 0),
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def _text_format(request: ResponseCreateRequest) -> dict[str, Any]:
    fmt = request.text.format if request.text else None
    if fmt is None:
        return {"type": "text"}
    if isinstance(fmt, TextFormatJsonSchema):
        return {
            "type": "json_schema",
            "name": fmt.name,
            "schema": fmt.schema_,
            "description": fmt.description,
            "strict": fmt.strict,
        }
    return {"type": fmt.type}


def _tool_choice(request: ResponseCreateRequest) -> Any:
    choice = request.tool_choice
    if isinstance(choice, ToolChoiceFunction):
        return {"type": "function", "name": choice.name}
    return choice or "auto"


def _tool(tool: FunctionToolWire) -> dict[str, Any]:
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": tool.parameters,
        "strict": tool.strict,
    }


def _reasoning(request: ResponseCreateRequest) -> dict[str, Any]:
    reasoning = request.reasoning
    if reasoning is None:
        return {"effort": None, "summary": None}
    return {"effort": reasoning.effort, "summary": reasoning.summary or reasoning.generate_summary}
