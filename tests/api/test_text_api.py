"""Chat and completions end to end on the FakeEngine, through the official SDK and raw HTTP."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from lllmsd.engines.fake import FakeEngine
from tests.conftest import AppFactory, fake_model, make_config, sdk

PREFIXES = ["/v1", "/openai/v1"]
USER = [{"role": "user", "content": "the quick brown fox"}]


def assert_envelope(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_chat_through_the_sdk(client: TestClient, prefix: str) -> None:
    async with sdk(client, prefix) as api:
        answer = await api.chat.completions.create(model="chat", messages=USER)
    assert answer.choices[0].message.content == "the quick brown fox"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.model == "chat"
    assert answer.object == "chat.completion"
    assert answer.id.startswith("chatcmpl-chat-1-")
    assert answer.system_fingerprint
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (6, 4)
    assert answer.usage.total_tokens == 10


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_chat_stream_through_the_sdk(client: TestClient, prefix: str) -> None:
    async with sdk(client, prefix) as api:
        stream = await api.chat.completions.create(
            model="chat", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert len({c.id for c in chunks}) == 1
    assert all(c.model == "chat" and c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "the quick brown fox"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1
    assert finish[0].choices[0].finish_reason == "stop"
    assert finish[0].choices[0].delta.content is None
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_completions_through_the_sdk(client: TestClient, prefix: str) -> None:
    async with sdk(client, prefix) as api:
        answer = await api.completions.create(model="chat", prompt="one two three", max_tokens=2)
        stream = await api.completions.create(model="chat", prompt="one two three", stream=True)
        chunks = [chunk async for chunk in stream]
    assert answer.object == "text_completion"
    assert answer.choices[0].text == "one two"
    assert answer.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in chunks) == "one two three"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_completions_default_to_16_tokens_like_openai(openai_client: openai.AsyncOpenAI) -> None:
    prompt = " ".join(f"w{i}" for i in range(40))
    answer = await openai_client.completions.create(model="chat", prompt=prompt)
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 16
    assert answer.choices[0].finish_reason == "length"


async def test_stop_sequences_are_not_echoed(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "alpha beta gamma delta"}], stop=["gamma"]
    )
    assert answer.choices[0].message.content == "alpha beta "
    assert answer.choices[0].finish_reason == "stop"


async def test_n_choices_are_indexed(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(model="chat", messages=USER, n=3)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert all(c.message.content == "the quick brown fox" for c in answer.choices)


async def test_tool_calls_non_stream_and_stream(openai_client: openai.AsyncOpenAI) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    answer = await openai_client.chat.completions.create(
        model="chat", messages=USER, tools=tools, tool_choice="required"
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.content is None
    assert message.tool_calls is not None
    assert message.tool_calls[0].function.name == "lookup"
    assert json.loads(message.tool_calls[0].function.arguments) == {"text": "the quick brown fox"}

    stream = await openai_client.chat.completions.create(
        model="chat",
        messages=USER,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        stream=True,
    )
    deltas = [c.choices[0].delta.tool_calls[0] async for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].id
    assert (deltas[0].function.name, deltas[0].index) == ("lookup", 0)
    assert all(d.id is None and d.function.name is None for d in deltas[1:])
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"text": "the quick brown fox"}


async def test_logprobs_in_the_chat_shape(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.chat.completions.create(model="chat", messages=USER, logprobs=True, top_logprobs=2)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == "the quick brown fox"
    assert all(len(t.top_logprobs) == 2 for t in logprobs.content)


async def test_logprobs_in_the_legacy_completions_shape(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.completions.create(model="chat", prompt="a b c", logprobs=1)
    logprobs = answer.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.tokens == ["a", " b", " c"]
    assert logprobs.text_offset == [0, 1, 3]
    assert len(logprobs.token_logprobs or []) == 3
    assert all(len(top) == 1 for top in logprobs.top_logprobs or [])


async def test_echo_returns_the_prompt_first(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.completions.create(model="chat", prompt="x y", echo=True)
    assert answer.choices[0].text == "x yx y"


async def test_models_list_and_get(start_app: AppFactory) -> None:
    client = await start_app(make_config({"a": fake_model(), "b": fake_model()}))
    async with sdk(client) as api:
        listed = await api.models.list()
        one = await api.models.retrieve("b")
        with pytest.raises(openai.NotFoundError) as missing:
            await api.models.retrieve("zzz")
    assert [m.id for m in listed.data] == ["a", "b"]
    assert one.id == "b"
    assert one.object == "model"
    assert missing.value.code == "model_not_found"


async def test_status_and_health(client: TestClient) -> None:
    await (await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER})).read()
    status = await (await client.get("/")).json()
    health = await client.get("/health")
    assert health.status == 200
    model = status["models"]["chat"]
    assert (model["engine"], model["task"], model["waiting"]) == ("fake", "text-completion", 0)
    [instance] = model["instances"]
    assert instance["state"] == "idle"
    assert instance["requests_served"] == 1
    assert instance["context_tokens"] == 10
    assert status["downloads"] == []


# ------------------------------------------------------------------------------------------- errors


async def post_raw(client: TestClient, path: str, body: str | bytes, content_type: str = "application/json") -> Any:
    return await client.post(path, data=body, headers={"Content-Type": content_type})


async def test_malformed_json_is_400(client: TestClient) -> None:
    response = await post_raw(client, "/v1/chat/completions", "{not json")
    assert response.status == 400
    assert "malformed JSON" in assert_envelope(await response.json())["message"]


async def test_wrong_field_type_names_the_field(client: TestClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER, "max_tokens": "x"})
    assert response.status == 400
    error = assert_envelope(await response.json())
    assert error["param"] == "max_tokens"
    assert error["type"] == "invalid_request_error"


async def test_nested_field_error_names_the_path(client: TestClient) -> None:
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": [{"role": "wizard", "content": "x"}]}
    )
    assert response.status == 400
    assert assert_envelope(await response.json())["param"] == "messages[0].role"


async def test_unknown_argument_is_refused_not_ignored(client: TestClient) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER, "temprature": 1})
    assert response.status == 400
    error = assert_envelope(await response.json())
    assert error["param"] == "temprature"
    assert "unrecognized" in error["message"]


async def test_unknown_model_is_404_model_not_found(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as error:
        await openai_client.chat.completions.create(model="gpt-9", messages=USER)
    assert error.value.code == "model_not_found"
    assert "gpt-9" in error.value.message


async def test_wrong_method_is_405(client: TestClient) -> None:
    response = await client.get("/v1/chat/completions")
    assert response.status == 405
    assert assert_envelope(await response.json())["code"] == "method_not_allowed"


async def test_unknown_route_is_404_in_the_envelope(client: TestClient) -> None:
    response = await client.get("/v1/nothing-here")
    assert response.status == 404
    assert_envelope(await response.json())


async def test_body_over_the_limit_is_413(start_app: AppFactory) -> None:
    client = await start_app(make_config(max_body_size=2048))
    big = json.dumps({"model": "chat", "messages": [{"role": "user", "content": "x" * 5000}]})
    response = await post_raw(client, "/v1/chat/completions", big)
    assert response.status == 413
    assert assert_envelope(await response.json())["code"] == "payload_too_large"


async def test_wrong_content_type_is_415(client: TestClient) -> None:
    response = await post_raw(client, "/v1/completions", "model=chat", "application/x-www-form-urlencoded")
    assert response.status == 415
    assert assert_envelope(await response.json())["code"] == "unsupported_media_type"


async def test_context_overflow_is_400_with_both_numbers(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(context_size=16)}))
    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError) as error:
            await api.chat.completions.create(model="chat", messages=[{"role": "user", "content": "w " * 30}])
        with pytest.raises(openai.BadRequestError) as streamed:
            await api.chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "w " * 30}], stream=True
            )
    for raised in (error, streamed):
        assert raised.value.code == "context_length_exceeded"
        assert "16" in raised.value.message
        assert "33" in raised.value.message


async def test_a_default_max_tokens_is_shortened_but_a_requested_one_must_fit(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(context_size=20)}))
    prompt = " ".join(f"w{i}" for i in range(12))  # 12 tokens of 20: the default 16 does not fit
    async with sdk(client) as api:
        shortened = await api.completions.create(model="chat", prompt=prompt)
        with pytest.raises(openai.BadRequestError) as refused:
            await api.completions.create(model="chat", prompt=prompt, max_tokens=16)
    assert shortened.choices[0].finish_reason == "length"
    assert shortened.usage is not None
    assert shortened.usage.prompt_tokens + shortened.usage.completion_tokens == 20
    assert refused.value.code == "context_length_exceeded"
    assert refused.value.param == "max_tokens"
    assert "28" in refused.value.message


class ExplodingEngine(FakeEngine):
    """An engine whose request check has a bug: the daemon must answer 500 in the envelope."""

    @classmethod
    def check_job(cls, config: Any, job: Any) -> None:
        raise ZeroDivisionError("a bug")


async def test_unexpected_error_is_500_with_request_id(start_app: AppFactory) -> None:
    client = await start_app(engines={"fake": ExplodingEngine})
    response = await client.post(
        "/v1/chat/completions", json={"model": "chat", "messages": USER}, headers={"X-Request-Id": "req-42"}
    )
    assert response.status == 500
    error = assert_envelope(await response.json())
    assert "req-42" in error["message"]
    assert "ZeroDivisionError" not in error["message"]
    assert response.headers["X-Request-Id"] == "req-42"


async def test_mid_stream_failure_is_an_error_event(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": fake_model(fail_after_tokens=2)}))
    async with sdk(client) as api:
        stream = await api.chat.completions.create(model="chat", messages=USER, stream=True)
        received: list[str] = []

        async def consume() -> None:
            async for chunk in stream:
                received.append(chunk.choices[0].delta.content or "")

        with pytest.raises(openai.APIError) as error:
            await consume()
    assert "".join(received) == "the quick"
    assert "engine failed" in error.value.message


async def test_embedding_model_refuses_chat(start_app: AppFactory) -> None:
    client = await start_app(make_config({"emb": {"task": "embedding", "engine": "fake"}}))
    response = await client.post("/v1/chat/completions", json={"model": "emb", "messages": USER})
    assert response.status == 400
    assert "embedding model" in assert_envelope(await response.json())["message"]


@pytest.mark.parametrize(
    ("field", "value"), [("chat_template_kwargs", {"enable_thinking": False}), ("reasoning_effort", "low")]
)
async def test_template_variables_are_refused_by_an_engine_without_templates(
    client: TestClient, field: str, value: Any
) -> None:
    response = await client.post("/v1/chat/completions", json={"model": "chat", "messages": USER, field: value})
    assert response.status == 400
    error = assert_envelope(await response.json())
    assert (error["param"], error["code"]) == (field, "unsupported_parameter")


async def test_reasoning_effort_outside_openais_values_is_a_400(client: TestClient) -> None:
    body = {"model": "chat", "messages": USER, "reasoning_effort": "extreme"}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 400
    assert assert_envelope(await response.json())["param"] == "reasoning_effort"
