"""What OpenAI clients send that a strict reading refused: lists of prompts on /v1/completions, assistant
messages sent back as the SDK returned them, and the access log of a refused request (FakeEngine: it
echoes the prompt's words, so every expected text here follows from the request)."""

from __future__ import annotations

import logging
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory, make_config, sdk, sse_data

# "a cat sat on the mat" and "hello world" in OpenAI's cl100k_base (what tiktoken gives)
CAT_IDS = [64, 8415, 7731, 389, 279, 5634]
HELLO_IDS = [15339, 1917]


async def post(client: TestClient, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    response = await client.post(path, json=body)
    return response.status, await response.json()


# ------------------------------------------------------------------------------- lists of prompts


async def test_a_list_of_prompts_answers_n_choices_per_prompt_in_openais_order(
    openai_client: openai.AsyncOpenAI,
) -> None:
    answer = await openai_client.completions.create(
        model="chat", prompt=["one two", "three four five", "six"], n=2, max_tokens=2
    )
    texts = [(c.index, c.text, c.finish_reason) for c in answer.choices]
    assert texts == [
        (0, "one two", "stop"),
        (1, "one two", "stop"),
        (2, "three four", "length"),
        (3, "three four", "length"),
        (4, "six", "stop"),
        (5, "six", "stop"),
    ]
    # the fake counts words: prompts 2 + 3 + 1, completions 2 per choice but "six" (1)
    assert answer.usage.prompt_tokens == 6
    assert answer.usage.completion_tokens == 2 * 2 + 2 * 2 + 2 * 1
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens


async def test_a_list_of_prompts_streams_with_summed_usage(openai_client: openai.AsyncOpenAI) -> None:
    stream = await openai_client.completions.create(
        model="chat", prompt=["alpha beta", "gamma"], stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == {0: "alpha beta", 1: "gamma"}
    assert finishes == {0: "stop", 1: "stop"}
    usage = chunks[-1].usage
    assert usage is not None
    assert chunks[-1].choices == []
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 3)
    assert [c.usage for c in chunks[:-1]] == [None] * (len(chunks) - 1)


async def test_best_of_applies_to_each_prompt(openai_client: openai.AsyncOpenAI) -> None:
    answer = await openai_client.completions.create(model="chat", prompt=["a b", "c"], n=1, best_of=3)
    assert [(c.index, c.text) for c in answer.choices] == [(0, "a b"), (1, "c")]


async def test_token_id_prompts_are_openai_ids(openai_client: openai.AsyncOpenAI) -> None:
    many = await openai_client.completions.create(model="chat", prompt=[CAT_IDS, HELLO_IDS], max_tokens=10)
    one = await openai_client.completions.create(model="chat", prompt=HELLO_IDS, max_tokens=10)
    assert [c.text for c in many.choices] == ["a cat sat on the mat", "hello world"]
    assert [c.text for c in one.choices] == ["hello world"]


async def test_one_bad_prompt_refuses_the_whole_batch_before_anything_runs(client: TestClient) -> None:
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": [[1, 2], [3, 100_300]]})
    assert status == 400, body
    assert body["error"]["param"] == "prompt[1][1]"
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": ["a", 2]})
    assert status == 400
    assert body["error"]["param"] == "prompt"
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": []})
    assert status == 400
    assert "empty" in body["error"]["message"]
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": ["x"] * 129})
    assert status == 400
    assert "at most 128" in body["error"]["message"]


async def test_token_id_prompts_with_token_ids_model_are_refused(start_app: AppFactory) -> None:
    client = await start_app(make_config({"chat": {"task": "text-completion", "engine": "fake", "token_ids": "model"}}))
    status, body = await post(client, "/v1/completions", {"model": "chat", "prompt": [HELLO_IDS, CAT_IDS]})
    assert status == 400
    assert body["error"]["param"] == "prompt[0]"
    assert "token_ids: model" in body["error"]["message"]


async def test_raw_batch_stream_indexes_every_chunk(client: TestClient) -> None:
    response = await client.post("/v1/completions", json={"model": "chat", "prompt": ["p q", "r"], "stream": True})
    events = await sse_data(response)
    assert {choice["index"] for event in events for choice in event["choices"]} == {0, 1}


# --------------------------------------------------------------------- the SDK's own messages, back


async def test_an_assistant_message_sent_back_from_model_dump_is_accepted(openai_client: openai.AsyncOpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "first question"}]
    first = await openai_client.chat.completions.create(model="chat", messages=messages)
    dumped = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= dumped.keys()  # what made it a 400
    messages += [dumped, {"role": "user", "content": "second question"}]
    second = await openai_client.chat.completions.create(model="chat", messages=messages)
    assert second.choices[0].message.content == "second question"
    # the history reached the engine: the fake's prompt counts every word of it
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 2


async def test_a_tool_call_message_round_trips(openai_client: openai.AsyncOpenAI) -> None:
    tools: list[Any] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    messages: list[Any] = [{"role": "user", "content": "please lookup cats"}]
    first = await openai_client.chat.completions.create(model="chat", messages=messages, tools=tools)
    message = first.choices[0].message
    assert message.tool_calls
    messages += [
        message.model_dump(),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "cats are mammals"},
    ]
    second = await openai_client.chat.completions.create(model="chat", messages=messages, tools=tools)
    assert second.choices[0].finish_reason == "tool_calls"  # the fake calls again: "lookup" is in the text


async def test_assistant_only_fields_stay_refused_elsewhere(client: TestClient) -> None:
    status, body = await post(
        client, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x", "audio": {}}]}
    )
    assert status == 400
    assert "only accepted on assistant messages" in body["error"]["message"]
    status, body = await post(
        client, "/v1/chat/completions", {"model": "chat", "messages": [{"role": "user", "content": "x", "mood": 1}]}
    )
    assert status == 400
    assert "unrecognized request argument" in body["error"]["message"]


# ------------------------------------------------------------------------------------ the access log


async def test_a_request_refused_in_validation_is_logged_with_its_model(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lllmsd.access"):
        status, _ = await post(client, "/v1/chat/completions", {"model": "chat", "messages": []})
        bad_model, _ = await post(client, "/v1/embeddings", {"model": 42, "input": "x"})
    assert status == 400
    assert bad_model == 400
    assert "POST /v1/chat/completions model=chat status=400" in caplog.text
    assert "POST /v1/embeddings model=- status=400" in caplog.text  # not a string: not named


# ----------------------------------------------------- schemas a grammar cannot express, at admission


async def test_a_pattern_no_grammar_can_express_is_a_400_naming_its_path_before_any_load(
    start_app: AppFactory,
) -> None:
    # the llama-cpp engine's check_job runs at admission, before the request queues: its weights are never
    # loaded here (the location does not even exist), yet the answer names the pattern's schema path
    model = {"task": "text-completion", "engine": "llama-cpp", "location": "/nonexistent/model.gguf"}
    client = await start_app(make_config({"llama": model}))
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": r"(?=\d)\w+"}}}
    async with sdk(client) as api:
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(
                model="llama",
                messages=[{"role": "user", "content": "x"}],
                response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
            )
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["param"] == "response_format.json_schema.schema.properties.code.pattern"
        assert error["code"] == "invalid_value"
        assert "lookahead" in error["message"]
        # the same schema as a tool's parameters, offered with tool_choice auto
        tools: Any = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        with pytest.raises(openai.BadRequestError) as caught:
            await api.chat.completions.create(model="llama", messages=[{"role": "user", "content": "x"}], tools=tools)
        assert caught.value.body["param"] == "tools[0].function.parameters.properties.code.pattern"  # type: ignore[index]
    status = (await (await client.get("/")).json())["models"]["llama"]
    assert status["state"] == "unloaded"  # nothing queued, nothing tried to load the missing file
    assert status["last_error"] is None
