"""Rendering chat completions and (legacy) completions answers in the exact OpenAI shapes.

The handlers in api/text.py turn the core's results and streamed events into response bodies and SSE
chunks with these functions (shared/OPENAI-WIRE.md): ``chat_response`` / ``completion_response`` for a
whole answer, ``chat_chunks`` / ``completion_chunks`` for a stream, ``ResponseIdentity`` for the fields
every body or chunk of one answer repeats. Kept apart from the requests (text.py): rendering needs only
the core's result and event types, never the request models.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from lllmsd.api.schemas.common import response_id, system_fingerprint
from lllmsd.core.jobs import (
    ChoiceEnd,
    GenerationEvent,
    GenerationResult,
    ReasoningDelta,
    TextDelta,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def _chat_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.bytes) if lp.bytes is not None else None,
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.bytes) if t.bytes is not None else None}
                    for t in lp.top
                ],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def _completion_logprobs(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{t.token: t.logprob for t in lp.top} for lp in logprobs],
        "text_offset": [lp.text_offset for lp in logprobs],
    }


class ResponseIdentity:
    """The identity of one answer (id, created, model, fingerprint): body fields that its response, or
    each of its chunks, repeats."""

    def __init__(self, prefix: str, model: str, engine: str, instance_id: str | None) -> None:
        self.id = response_id(prefix, instance_id)
        self.created = int(time.time())
        self.model = model
        self.system_fingerprint = system_fingerprint(engine)

    def fields(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.system_fingerprint,
        }


def chat_response(identity: ResponseIdentity, result: GenerationResult, logprobs: bool) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        message: dict[str, Any] = {"role": "assistant", "content": choice.text, "refusal": None}
        if choice.tool_calls:
            message["content"] = choice.text or None
            message["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in choice.tool_calls
            ]
        if choice.reasoning:
            message["reasoning_content"] = choice.reasoning
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": _chat_logprobs(choice.logprobs) if logprobs else None,
                "finish_reason": choice.finish_reason or "stop",
            }
        )
    return {**identity.fields("chat.completion"), "choices": choices, "usage": usage_body(result.usage)}


def completion_response(identity: ResponseIdentity, result: GenerationResult, logprobs: bool) -> dict[str, Any]:
    choices = [
        {
            "text": choice.text,
            "index": choice.index,
            "logprobs": _completion_logprobs(choice.logprobs) if logprobs else None,
            "finish_reason": choice.finish_reason or "stop",
        }
        for choice in result.choices
    ]
    return {**identity.fields("text_completion"), "choices": choices, "usage": usage_body(result.usage)}


async def chat_chunks(
    identity: ResponseIdentity, events: AsyncIterator[GenerationEvent], n: int, logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """Chat completion chunks in the order OpenAI sends them (role first, empty delta with the finish)."""
    base = identity.fields("chat.completion.chunk")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, Any], finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        choice = {"index": index, "delta": delta, "logprobs": lps, "finish_reason": finish}
        return {**base, "choices": [choice], **extra}

    # The engine's first event comes before the role chunks: an error it raises at once (context too
    # long) must reach the client before any chunk does, so it can still be an HTTP status.
    first = await anext(events, None)
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": "", "refusal": None})
    async for event in _prepend(first, events):
        if isinstance(event, TextDelta):
            if event.text or event.logprobs:
                lps = _chat_logprobs(event.logprobs) if logprobs else None
                yield chunk(event.choice, {"content": event.text}, lps=lps)
        elif isinstance(event, ReasoningDelta):
            if event.text:
                yield chunk(event.choice, {"reasoning_content": event.text})
        elif isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.call_index}
            if event.id is not None:
                call.update(id=event.id, type="function")
            function: dict[str, Any] = {"arguments": event.arguments}
            if event.name is not None:
                function["name"] = event.name
            call["function"] = function
            yield chunk(event.choice, {"tool_calls": [call]})
        elif isinstance(event, ChoiceEnd):
            yield chunk(event.choice, {}, event.finish_reason)
        elif isinstance(event, Usage) and include_usage:
            yield {**base, "choices": [], "usage": usage_body(event)}


async def _prepend(
    first: GenerationEvent | None, rest: AsyncIterator[GenerationEvent]
) -> AsyncIterator[GenerationEvent]:
    if first is not None:
        yield first
    async for event in rest:
        yield event


async def completion_chunks(
    identity: ResponseIdentity, events: AsyncIterator[GenerationEvent], logprobs: bool, include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    base = identity.fields("text_completion")
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str, finish: str | None = None, lps: Any = None) -> dict[str, Any]:
        return {**base, "choices": [{"text": text, "index": index, "logprobs": lps, "finish_reason": finish}], **extra}

    async for event in events:
        if isinstance(event, TextDelta):
            yield chunk(event.choice, event.text, lps=_completion_logprobs(event.logprobs) if logprobs else None)
        elif isinstance(event, ChoiceEnd):
            yield chunk(event.choice, "", event.finish_reason)
        elif isinstance(event, Usage) and include_usage:
            yield {**base, "choices": [], "usage": usage_body(event)}
