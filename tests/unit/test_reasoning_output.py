"""Reasoning events rendered in the chat completions shapes: ``message.reasoning_content`` and
``delta.reasoning_content``, never in ``content`` (pure rendering, no engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from lllmsd.api.schemas.bodies import ChatCompletion, ChatCompletionChunk
from lllmsd.api.schemas.text_output import ResponseIdentity, chat_chunks, chat_response
from lllmsd.core.jobs import (
    ChoiceEnd,
    GenerationEvent,
    ReasoningDelta,
    TextDelta,
    ToolCallDelta,
    Usage,
    collect_generation,
)

EVENTS: list[GenerationEvent] = [
    ReasoningDelta("The user wants "),
    ReasoningDelta("the weather."),
    TextDelta("Let me look."),
    ToolCallDelta(0, '{"city":"Paris"}', id="call_1", name="get_weather"),
    ChoiceEnd("tool_calls"),
    Usage(10, 5),
]


async def events() -> AsyncIterator[GenerationEvent]:
    for event in EVENTS:
        yield event


def identity() -> ResponseIdentity:
    return ResponseIdentity("chatcmpl", "m", "llama-cpp", None)


def test_a_collected_answer_has_reasoning_content_apart() -> None:
    body = chat_response(identity(), collect_generation(EVENTS), logprobs=False)
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["content"] == "Let me look."
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    ChatCompletion.model_validate(body)  # the documented shape (/openapi.json)


def test_an_answer_without_reasoning_has_no_reasoning_content() -> None:
    body = chat_response(identity(), collect_generation([TextDelta("hi"), ChoiceEnd("stop")]), logprobs=False)
    assert "reasoning_content" not in body["choices"][0]["message"]


def test_streamed_reasoning_comes_as_delta_reasoning_content() -> None:
    async def collect() -> list[dict]:
        return [chunk async for chunk in chat_chunks(identity(), events(), 1, False, False)]

    chunks = asyncio.run(collect())
    deltas = [c["choices"][0]["delta"] for c in chunks]
    reasoning = [d["reasoning_content"] for d in deltas if "reasoning_content" in d]
    assert reasoning == ["The user wants ", "the weather."]
    assert all("reasoning_content" not in d or "content" not in d for d in deltas)
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look."
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
