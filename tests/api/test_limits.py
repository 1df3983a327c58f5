"""Request limits: each one holds at its boundary and, exceeded, answers 400/413 naming the limit."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient

from lllmsd.api.keys import RUNTIME
from lllmsd.config import ConfigError
from tests.conftest import AppFactory, fake_model, make_config, sdk


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


async def post(client: TestClient, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.post(path, json=body)
    if response.content_type == "text/event-stream":
        return response.status, {"stream": await response.text()}
    return response.status, await response.json()


def error_of(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


async def test_body_larger_than_max_body_size_is_413_naming_it(start_app: AppFactory) -> None:
    client = await start_app(make_config(max_body_size=4096))
    status, body = await post(client, "/v1/chat/completions", {"model": "chat", "messages": user("x" * 5000)})
    assert status == 413
    error = error_of(body)
    assert error["code"] == "payload_too_large"
    assert "max_body_size" in error["message"]
    assert "4096" in error["message"]
    status, _ = await post(client, "/v1/chat/completions", {"model": "chat", "messages": user("x" * 3000)})
    assert status == 200


async def test_too_many_messages_is_400_naming_max_messages(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(max_messages=3)}))
    three = [*user("a"), {"role": "assistant", "content": "b"}, *user("c")]
    status, _ = await post(client, "/v1/chat/completions", {"model": "chat", "messages": three})
    assert status == 200
    status, body = await post(client, "/v1/chat/completions", {"model": "chat", "messages": [*three, *user("d")]})
    assert status == 400
    error = error_of(body)
    assert error["param"] == "messages"
    assert "max_messages" in error["message"]
    assert "4" in error["message"]
    assert "3" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_longer_than_max_prompt_chars_is_400_naming_it(start_app: AppFactory, stream: bool) -> None:
    client = await start_app(make_config({"chat": fake_model(max_prompt_chars=100)}))
    at_limit = [{"role": "system", "content": "s" * 50}, *user("u" * 50)]
    status, _ = await post(client, "/v1/chat/completions", {"model": "chat", "messages": at_limit, "stream": stream})
    assert status == 200
    over = [{"role": "system", "content": "s" * 50}, {"role": "user", "content": [{"type": "text", "text": "u" * 51}]}]
    status, body = await post(client, "/v1/chat/completions", {"model": "chat", "messages": over, "stream": stream})
    assert status == 400
    assert "max_prompt_chars" in error_of(body)["message"]
    assert "101" in error_of(body)["message"]
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": "p" * 90, "suffix": "s" * 11})
    assert status == 400
    assert error_of(body)["param"] == "prompt"
    status, _ = await post(client, "/v1/completions", {"model": "chat", "prompt": "p" * 90, "suffix": "s" * 10})
    assert status == 200


async def test_tool_call_arguments_count_towards_the_prompt(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(max_prompt_chars=100)}))
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{" + "1" * 200 + "}"}}
    messages = [*user("hi"), {"role": "assistant", "content": None, "tool_calls": [call]}]
    status, body = await post(client, "/v1/chat/completions", {"model": "chat", "messages": messages})
    assert status == 400
    assert "max_prompt_chars" in error_of(body)["message"]


@pytest.mark.parametrize(("field", "value"), [("n", 17), ("best_of", 17), ("n", 0)])
async def test_n_and_best_of_are_bounded(client: TestClient, field: str, value: int) -> None:
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": "a", field: value})
    assert status == 400
    assert error_of(body)["param"] == field
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": "a b", "n": 16, "best_of": 16})
    assert status == 200
    assert len(body["choices"]) == 16


async def test_max_tokens_that_cannot_fit_the_configured_context_is_400_before_queueing(
    start_app: AppFactory,
) -> None:
    client = await start_app(make_config({"chat": fake_model(context_size=64)}))
    for field in ("max_tokens", "max_completion_tokens"):
        status, body = await post(client, "/v1/chat/completions", {"model": "chat", "messages": user("a"), field: 64})
        assert status == 400
        error = error_of(body)
        assert (error["param"], error["code"]) == (field, "context_length_exceeded")
        assert "64" in error["message"]
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": "a", "max_tokens": 100})
    assert status == 400
    assert "100" in error_of(body)["message"]
    assert "64" in error_of(body)["message"]
    assert client.server.app[RUNTIME].pools["chat"].instances == []  # refused without loading anything


@pytest.mark.parametrize("stream", [False, True])
async def test_prompt_plus_max_tokens_over_the_context_is_400_naming_both(start_app: AppFactory, stream: bool) -> None:
    client = await start_app(make_config({"chat": fake_model(context_size=64)}))
    async with sdk(client) as api:
        ten_words = " ".join(["w"] * 10)
        with pytest.raises(openai.BadRequestError) as error:
            await api.chat.completions.create(model="chat", messages=user(ten_words), max_tokens=60, stream=stream)
        assert error.value.code == "context_length_exceeded"
        assert error.value.param == "max_tokens"
        # the prompt is 12 fake tokens (<user>, ten words, <assistant>): 12 + 60 = 72 > 64
        assert "64" in error.value.message
        assert "72" in error.value.message
        fits = await api.chat.completions.create(model="chat", messages=user(ten_words), max_tokens=52)
        assert fits.choices[0].message.content == ten_words
        answer = await api.chat.completions.create(model="chat", messages=user(ten_words))  # no max_tokens: fits
        assert answer.choices[0].finish_reason == "stop"


async def test_embedding_batch_larger_than_max_inputs_is_400_naming_it(start_app: AppFactory) -> None:
    client = await start_app(make_config({"emb": {"task": "embedding", "engine": "fake", "max_inputs": 4}}))
    status, _ = await post(client, "/v1/embeddings", {"model": "emb", "input": ["a"] * 4})
    assert status == 200
    status, body = await post(client, "/v1/embeddings", {"model": "emb", "input": ["a"] * 5})
    assert status == 400
    assert error_of(body)["param"] == "input"
    assert "at most 4" in error_of(body)["message"]


async def test_audio_larger_than_max_audio_size_is_413_naming_it(start_app: AppFactory) -> None:
    config = make_config({"stt": {"task": "speech-to-text", "engine": "fake"}}, max_audio_size=10_000)

    def form(size: int) -> FormData:
        data = FormData()
        data.add_field("model", "stt")
        data.add_field("file", b"\0" * size, filename="a.wav", content_type="audio/wav")
        return data

    client = await start_app(config)
    assert (await client.post("/v1/audio/transcriptions", data=form(10_000))).status == 200
    response = await client.post("/v1/audio/transcriptions", data=form(10_001))
    assert response.status == 413
    assert "max_audio_size" in error_of(await response.json())["message"]


@pytest.mark.parametrize("opener", ["[", '{"a":'])
@pytest.mark.parametrize("depth", [129, 100_000])
async def test_a_deeply_nested_body_is_a_400_not_a_500(client: TestClient, opener: str, depth: int) -> None:
    closer = "]" if opener == "[" else "}"
    inner = opener * depth + "1" + closer * depth
    body = f'{{"model": "chat", "messages": {inner}}}'
    response = await client.post("/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    assert response.status == 400
    error = error_of(await response.json())
    assert "nested too deeply" in error["message"]
    assert "128" in error["message"]
    shallow = (
        '{"model": "chat", "messages": [{"role": "user", "content": "fine"}], "metadata": ' + "[" * 100 + "]" * 100
    )
    response = await client.post(
        "/v1/chat/completions", data=shallow + "}", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400  # metadata is not a chat field: validation answers, not the depth check
    assert "nested" not in error_of(await response.json())["message"]


def test_text_limits_on_a_model_that_takes_no_prompts_are_config_errors() -> None:
    with pytest.raises(ConfigError) as error:
        make_config({"emb": {"task": "embedding", "engine": "fake", "max_messages": 3}})
    assert "models.emb.max_messages" in str(error.value)
