"""The Responses API on SmolLM2 (llama-cpp, in worker processes, as the daemon runs it), through the
official SDK: chained turns routed to the instance that holds the conversation, evaluating only their new
input; the chain after a restart; a function call round trip; structured output that validates."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient
from pydantic import BaseModel, Field

from lllmsd.config import DaemonConfig, parse_config
from tests.api.test_responses import read_sse
from tests.conftest import AppFactory, sdk
from tests.engines.conftest import TEXT_MODELS

pytestmark = pytest.mark.engines

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
SLACK = 3  # tokens a chat template may re-render differently at the turn boundary


def smol_config(tmp_path: Path, **model: Any) -> DaemonConfig:
    return parse_config(
        {
            "models": {"smol": {**TEXT_MODELS["llama-cpp"](), "context_size": 2048, **model}},
            "cache_dir": str(tmp_path / "cache"),
            "responses": {"path": str(tmp_path / "responses.sqlite3")},
        }
    )


HELPER = "You are a helpful assistant. Answer in one short sentence."
# Another conversation's instructions. Not the same as HELPER on purpose: the pool routes by the longest
# shared prefix, so a new conversation with the same instructions would be sent to the instance holding
# the first one (to reuse the instructions' tokens), evicting that conversation.
GEOGRAPHER = "You are a geography teacher. Answer in one short sentence."


async def ask(
    api: openai.AsyncOpenAI, text: str, previous: Any = None, instructions: str = HELPER, **extra: Any
) -> Any:
    return await api.responses.create(
        model="smol",
        instructions=instructions,
        input=text,
        previous_response_id=previous.id if previous is not None else None,
        temperature=0,
        max_output_tokens=16,
        **extra,
    )


def held(response: Any) -> int:
    """What the instance holds after ``response``: its whole prompt and its answer."""
    return response.usage.input_tokens + response.usage.output_tokens


async def test_a_chain_evaluates_only_new_input_on_its_instance_and_survives_a_restart(
    start_app: AppFactory, tmp_path: Path
) -> None:
    config = smol_config(tmp_path, max_instances=2)
    first_app: TestClient = await start_app(config)
    async with sdk(first_app) as api:
        one = await ask(api, "Name a colour.")
        other = await ask(api, "Name a country.", instructions=GEOGRAPHER)  # on a second instance
        two = await ask(api, "Name an animal.", one)
        other_two = await ask(api, "Name a city there.", other, instructions=GEOGRAPHER)
        three = await ask(api, "Name a fruit.", two)
    for response in (one, two, three, other, other_two):
        assert response.status in ("completed", "incomplete")
        assert response.output_text
    # each chained turn was routed to the instance holding its conversation: only its new input was evaluated
    assert two.usage.input_tokens_details.cached_tokens >= held(one) - SLACK
    assert three.usage.input_tokens_details.cached_tokens >= held(two) - SLACK
    assert other_two.usage.input_tokens_details.cached_tokens >= held(other) - SLACK
    assert three.usage.input_tokens > held(two)  # the whole history is in its prompt
    await first_app.close()

    # a new daemon on the same database: the chain goes on, its history evaluated once
    second_app: TestClient = await start_app(config)
    async with sdk(second_app) as api:
        assert (await api.responses.retrieve(three.id)).output_text == three.output_text
        four = await ask(api, "Name a vegetable.", three)
        five = await ask(api, "Name a tree.", four)
    assert four.output_text
    assert four.usage.input_tokens_details.cached_tokens == 0
    assert four.usage.input_tokens >= held(three)
    assert five.usage.input_tokens_details.cached_tokens >= held(four) - SLACK


async def test_a_function_call_round_trip(start_app: AppFactory, tmp_path: Path) -> None:
    client = await start_app(smol_config(tmp_path))
    async with sdk(client) as api:
        call_turn = await api.responses.create(
            model="smol",
            input="What is the weather in Paris?",
            tools=[WEATHER_TOOL],
            tool_choice="required",
            temperature=0,
            max_output_tokens=64,
        )
        calls = [item for item in call_turn.output if item.type == "function_call"]
        assert calls
        call = calls[0]
        assert call.name == "get_weather"
        arguments = json.loads(call.arguments)
        assert isinstance(arguments["city"], str)
        assert call.arguments == json.dumps(arguments, separators=(",", ":"), ensure_ascii=False)

        answer = await api.responses.create(
            model="smol",
            previous_response_id=call_turn.id,
            input=[{"type": "function_call_output", "call_id": c.call_id, "output": "Sunny, 24 C"} for c in calls],
            tools=[WEATHER_TOOL],
            tool_choice="none",
            temperature=0,
            max_output_tokens=32,
        )
    assert answer.output[0].type == "message"
    assert answer.output_text.strip()
    # (no cache check here: with tool_choice "none" the llama-cpp engine leaves the tools out of the
    # prompt, so this prompt differs from the call turn's from the system turn on)


async def test_structured_output_streaming_and_limits(start_app: AppFactory, tmp_path: Path) -> None:
    class Colour(BaseModel):
        name: str
        hex_code: str = Field(max_length=7)  # "#ff0000": unbounded, SmolLM2 may write digits until the limit

    client = await start_app(smol_config(tmp_path))
    async with sdk(client) as api:
        parsed = await api.responses.parse(
            model="smol", input="Give the colour red as JSON.", text_format=Colour, temperature=0, max_output_tokens=64
        )
        assert isinstance(parsed.output_parsed, Colour)

        schema = {
            "type": "object",
            "properties": {"answer": {"type": "integer"}},
            "required": ["answer"],
            "additionalProperties": False,
        }
        structured = await api.responses.create(
            model="smol",
            input="What is 2 + 2?",
            text={"format": {"type": "json_schema", "name": "sum", "schema": schema, "strict": True}},
            temperature=0,
            max_output_tokens=32,
        )
        assert isinstance(json.loads(structured.output_text)["answer"], int)

        short = await api.responses.create(model="smol", input="Tell me a long story.", max_output_tokens=3)
        assert short.status == "incomplete"
        assert short.incomplete_details is not None
        assert short.incomplete_details.reason == "max_output_tokens"
        assert short.usage is not None
        assert short.usage.output_tokens == 3

        async with api.responses.stream(
            model="smol", instructions=HELPER, input="Say hello.", temperature=0, max_output_tokens=200
        ) as stream:
            events = [event async for event in stream]
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            assert events[-1].type == "response.completed", events[-1]
            final = await stream.get_final_response()
        assert "".join(deltas) == final.output_text
        assert (await api.responses.retrieve(final.id)).output_text == final.output_text

        items = [item async for item in api.responses.input_items.list(final.id)]
        assert [(i.type, i.role, i.content[0].text) for i in items] == [("message", "user", "Say hello.")]  # type: ignore[union-attr]
        await api.responses.delete(final.id)
        with pytest.raises(openai.NotFoundError):
            await api.responses.retrieve(final.id)

        with pytest.raises(openai.BadRequestError) as refused:
            await api.responses.create(model="smol", input="hi", tools=[{"type": "web_search"}])
        assert refused.value.body["param"] == "tools[0].type"  # type: ignore[index]

    raw = await client.post(
        "/v1/responses", json={"model": "smol", "input": "Say hi.", "stream": True, "max_output_tokens": 8}
    )
    events = await read_sse(raw)
    names = [name for name, _ in events]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(name == data["type"] for name, data in events)
    deltas = names.count("response.output_text.delta")
    assert deltas >= 1
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        names[-1],
    ]
    assert names[-1] in ("response.completed", "response.incomplete")


async def test_an_openai_agents_agent_with_a_function_tool_completes_on_smollm2(
    start_app: AppFactory, tmp_path: Path
) -> None:
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool
    from agents.items import ToolCallOutputItem

    cities: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        cities.append(city)
        return f"It is sunny and 24 C in {city}."

    client = await start_app(smol_config(tmp_path))
    async with sdk(client) as api:
        agent = Agent(
            name="weather",
            instructions="You answer questions about the weather. Use the tool.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="smol", openai_client=api),
            # required: SmolLM2 is too small to decide on its own; the SDK resets it to auto after a call
            model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=256),
        )
        for chained in (False, True):
            cities.clear()
            result = await Runner.run(
                agent,
                "What is the weather in Paris?",
                run_config=RunConfig(tracing_disabled=True),
                max_turns=4,
                auto_previous_response_id=chained,
            )
            assert cities
            assert all(isinstance(city, str) and city for city in cities)
            outputs = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
            assert outputs
            assert all("sunny" in output for output in outputs)
            assert isinstance(result.final_output, str)
            assert result.final_output.strip()
