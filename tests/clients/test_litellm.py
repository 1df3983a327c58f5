"""LiteLLM against the daemon, through its OpenAI provider (``openai/<model>`` with ``api_base``) and its
text-completion provider, as LiteLLM documents OpenAI-compatible servers."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import litellm
import numpy as np
import pytest
from aiohttp.test_utils import TestClient

from tests.clients.conftest import KEY, base_url
from tests.clients.models import PERSON_PROMPT, Person, check_person
from tests.conftest import sdk

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def server(client: TestClient) -> dict[str, Any]:
    return {"api_base": base_url(client), "api_key": KEY, "num_retries": 0}


async def test_completion_sync_async_and_streamed(fake_daemon: TestClient) -> None:
    messages = [{"role": "user", "content": "hello litellm"}]
    answer = await asyncio.to_thread(litellm.completion, model="openai/chat", messages=messages, **server(fake_daemon))
    assert answer.choices[0].message.content == "hello litellm"
    assert answer.usage.completion_tokens == 2
    again = await litellm.acompletion(model="openai/chat", messages=messages, **server(fake_daemon))
    assert again.choices[0].message.content == "hello litellm"
    stream = await litellm.acompletion(model="openai/chat", messages=messages, stream=True, **server(fake_daemon))
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    assert text == "hello litellm"


async def test_tools(fake_daemon: TestClient) -> None:
    messages: list[Any] = [{"role": "user", "content": "call get_weather for Paris"}]
    answer = await litellm.acompletion(
        model="openai/chat", messages=messages, tools=[WEATHER_TOOL], **server(fake_daemon)
    )
    call = answer.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"text": messages[0]["content"]}
    messages += [answer.choices[0].message.model_dump(), {"role": "tool", "tool_call_id": call.id, "content": "sun"}]
    messages.append({"role": "user", "content": "thank you"})
    follow_up = await litellm.acompletion(model="openai/chat", messages=messages, **server(fake_daemon))
    assert follow_up.choices[0].message.content == "thank you"


@pytest.mark.engines
async def test_response_format_with_a_nested_model(smol_daemon: TestClient) -> None:
    answer = await litellm.acompletion(
        model="openai/smol",
        messages=[{"role": "user", "content": PERSON_PROMPT}],
        response_format=Person,
        temperature=0,
        max_tokens=160,
        **server(smol_daemon),
    )
    check_person(Person.model_validate_json(answer.choices[0].message.content))


async def test_embedding(fake_daemon: TestClient) -> None:
    texts = ["litellm embeds this", "and this"]
    answer = await litellm.aembedding(model="openai/emb", input=texts, **server(fake_daemon))
    async with sdk(fake_daemon) as api:
        direct = await api.embeddings.create(model="emb", input=texts, encoding_format="float")
    np.testing.assert_allclose([d["embedding"] for d in answer.data], [d.embedding for d in direct.data], rtol=1e-5)


async def test_transcription(fake_daemon: TestClient) -> None:
    audio = ("speech.wav", b"\x00" * 3200)
    answer = await litellm.atranscription(model="openai/stt", file=audio, **server(fake_daemon))
    assert answer.text == "fake transcript of 3200 bytes"


async def test_text_completion_with_a_list_of_prompts(
    fake_daemon: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lllmsd.access"):
        answer = await litellm.atext_completion(
            model="text-completion-openai/chat", prompt=["one two", "three"], max_tokens=5, **server(fake_daemon)
        )
    assert caplog.text.count("POST /v1/completions model=chat status=200") == 1  # one request with the list
    assert [(c.index, c.text) for c in answer.choices] == [(0, "one two"), (1, "three")]
    single = await asyncio.to_thread(
        litellm.text_completion, model="text-completion-openai/chat", prompt="four five", **server(fake_daemon)
    )
    assert single.choices[0].text == "four five"
