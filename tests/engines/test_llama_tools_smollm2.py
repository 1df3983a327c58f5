"""Tool calls on the real SmolLM2 through the whole daemon (HTTP, its worker process) and the official
SDK: calls that end where the model ends them, streamed with one index per call.

SmolLM2's template knows nothing of tools, so this is the generic path (instructions in the system
prompt, the Hermes syntax under the grammar). Before the fix, at max_tokens 48 the model went on to
repeat its call and the answer ended with ``length``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests.conftest import make_config, sdk
from tests.setup_models import model_path
from tests.shared_daemon import RemoteClient, ThreadedDaemon, shared_daemon

pytestmark = pytest.mark.engines

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
# prompts on which SmolLM2, at temperature 0, repeated its call until max_tokens 48 ran out
REPEATING = "What is the weather like in Paris today?"
TWO_CALLS = "Call get_weather for Paris, then call get_time for Tokyo."
CHOICES: list[Any] = ["required", {"type": "function", "function": {"name": "get_weather"}}]


@pytest.fixture(scope="module")
def daemon() -> Iterator[ThreadedDaemon]:
    """One daemon for the module: each test sends its own conversation at temperature 0."""
    smol = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2")),
        "context_size": 2048,
        "device": {"threads": 1, "batch_threads": 1},
    }
    with shared_daemon(make_config({"smol": smol})) as shared:
        yield shared


@pytest.fixture
async def client(daemon: ThreadedDaemon) -> AsyncIterator[RemoteClient]:
    async with RemoteClient(daemon.url) as remote:
        yield remote


def request(text: str, tool_choice: Any, **extra: Any) -> dict[str, Any]:
    return {
        "model": "smol",
        "messages": [{"role": "user", "content": text}],
        "tools": [WEATHER, TIME],
        "tool_choice": tool_choice,
        "temperature": 0,
        **extra,
    }


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["required", "named"])
async def test_one_complete_call_at_max_tokens_48(client: RemoteClient, tool_choice: Any) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request(REPEATING, tool_choice, max_tokens=48))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert call.function.arguments == '{"city":"Paris","unit":"celsius"}'  # compact, as OpenAI's
    assert call.id.startswith("call_")


@pytest.mark.parametrize("tool_choice", CHOICES, ids=["required", "named"])
async def test_one_complete_call_at_max_tokens_48_streamed(client: RemoteClient, tool_choice: Any) -> None:
    async with sdk(client) as api:
        stream = await api.chat.completions.create(**request(REPEATING, tool_choice, max_tokens=48, stream=True))
        chunks = [chunk async for chunk in stream]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0}
    first, *rest = deltas
    assert first.id is not None
    assert first.id.startswith("call_")
    assert (first.type, first.function.name) == ("function", "get_weather")
    assert all(d.id is None and d.function.name is None for d in rest)
    assert len(rest) > 2  # the arguments come in fragments
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == '{"city":"Paris","unit":"celsius"}'
    assert not any(c.choices[0].delta.content for c in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_the_default_max_tokens_never_repeats_a_call(client: RemoteClient) -> None:
    # before: two identical calls; now the repeat is dropped and ends the answer (the model may still
    # make a different second call: it is offered one)
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request(REPEATING, "required"))
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls[0] == ("get_weather", '{"city":"Paris","unit":"celsius"}')
    assert len(set(calls)) == len(calls)
    assert answer.usage is not None
    assert answer.usage.completion_tokens < 40 * (len(calls) + 1)  # it stopped at the first repeat


async def test_two_different_calls_get_indexes_0_and_1(client: RemoteClient) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request(TWO_CALLS, "required", parallel_tool_calls=True))
        stream = await api.chat.completions.create(**request(TWO_CALLS, "required", stream=True))
        chunks = [chunk async for chunk in stream]
    calls = answer.choices[0].message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2
    assert answer.choices[0].finish_reason == "tool_calls"

    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert sorted({d.index for d in deltas}) == [0, 1]
    firsts = {}
    for delta in deltas:
        if delta.index not in firsts:
            firsts[delta.index] = delta
            assert delta.id is not None
            assert delta.type == "function"
            assert delta.function.name is not None
        else:
            assert delta.id is None
            assert delta.function.name is None
    assert firsts[0].id != firsts[1].id
    assert [firsts[0].function.name, firsts[1].function.name] == ["get_weather", "get_time"]
    streamed = ["".join(d.function.arguments or "" for d in deltas if d.index == i) for i in (0, 1)]
    assert streamed == [c.function.arguments for c in calls]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


async def test_parallel_tool_calls_false_allows_exactly_one(client: RemoteClient) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request(TWO_CALLS, "required", parallel_tool_calls=False))
    assert [c.function.name for c in answer.choices[0].message.tool_calls or []] == ["get_weather"]
    assert answer.choices[0].finish_reason == "tool_calls"


async def test_a_call_cut_off_by_max_tokens_is_content_with_length(client: RemoteClient) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request(REPEATING, "required", max_tokens=12))
    choice = answer.choices[0]
    assert choice.finish_reason == "length"
    assert not choice.message.tool_calls
    assert choice.message.content is not None
    assert choice.message.content.startswith("<tool_call>")


def few_shot(question: str) -> list[dict[str, Any]]:
    """Earlier turns in which the assistant called get_weather: SmolLM2 follows them in tool_choice auto
    (without them it always answers in text)."""
    messages: list[dict[str, Any]] = []
    for i, (city, weather) in enumerate([("London", "Rainy"), ("Berlin", "Cloudy"), ("Rome", "Hot")]):
        call = {
            "id": f"c{i}",
            "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
        }
        messages += [
            {"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": weather},
            {"role": "assistant", "content": f"It is {weather.lower()} in {city}."},
        ]
    return [*messages, {"role": "user", "content": question}]


async def test_auto_lets_the_model_call_and_the_call_goes_on_under_the_grammar(client: RemoteClient) -> None:
    # the few-shot calls give only a city: so does this tool
    city_only = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": city_only}}
    body = {"model": "smol", "messages": few_shot("What is the weather in Paris?"), "tools": [tool], "temperature": 0}
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**body, tool_choice="auto", max_tokens=60)
        stream = await api.chat.completions.create(**body, tool_choice="auto", max_tokens=60, stream=True)
        chunks = [chunk async for chunk in stream]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == [
        ("get_weather", '{"city":"Paris"}')
    ]
    assert not any(c.choices[0].delta.content for c in chunks)  # the call's opening never leaks as text
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather"
    assert "".join(d.function.arguments or "" for d in deltas) == '{"city":"Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


async def test_auto_answers_in_text_when_the_model_does(client: RemoteClient) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**request("Say hello.", "auto", max_tokens=20))
    choice = answer.choices[0]
    assert not choice.message.tool_calls
    assert choice.message.content
    assert "<tool_call>" not in choice.message.content
    assert choice.finish_reason in ("stop", "length")
