"""Each model family's tool calls and reasoning end to end: the daemon (its worker processes) with a
family template on SmolLM2's weights (tests/family_templates.py), outputs forced by the family's call
grammar (tool_choice required) or by a request grammar (reasoning), read over HTTP and through the SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from lllmsd.config import parse_config
from tests.conftest import AppFactory, make_config, sdk, sse_data
from tests.engines.test_llama_families import WEATHER, families_model
from tests.shared_daemon import RemoteClient, ThreadedDaemon, shared_daemon

pytestmark = pytest.mark.engines

WIRE_TOOL = {"type": "function", "function": {"name": WEATHER.name, "parameters": WEATHER.parameters}}


@pytest.fixture(scope="module")
def daemon() -> Iterator[ThreadedDaemon]:
    """One daemon for the module: each family is a model of its own, loaded by its first test."""
    models = {name: families_model(name) for name in ("hermes", "qwen3", "think", "llama3", "mistral")}
    models["qwen3-inline"] = families_model("qwen3", reasoning="inline")
    with shared_daemon(make_config(models, concurrency=1)) as shared:
        yield shared


@pytest.fixture
async def client(daemon: ThreadedDaemon) -> AsyncIterator[RemoteClient]:
    async with RemoteClient(daemon.url) as remote:
        yield remote


def call_request(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris? Call get_weather."}],
        "tools": [WIRE_TOOL],
        "tool_choice": "required",
        "temperature": 0,
        "max_tokens": 60,
        **extra,
    }


@pytest.mark.parametrize("model", ["hermes", "llama3", "mistral"])
async def test_a_forced_call_in_each_family_syntax_comes_back_as_a_call(client: RemoteClient, model: str) -> None:
    async with sdk(client) as api:
        answer = await api.chat.completions.create(**call_request(model))
        stream = await api.chat.completions.create(**call_request(model, stream=True))
        chunks = [chunk async for chunk in stream]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls][:1] == ["get_weather"]
    assert all(isinstance(json.loads(c.function.arguments)["city"], str) for c in calls)
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    streamed = ["".join(d.function.arguments or "" for d in deltas if d.index == i) for i in range(len(calls))]
    assert streamed == [c.function.arguments for c in calls]  # temperature 0: the same answer
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert not any(c.choices[0].delta.content for c in chunks)


THOUGHT = "Paris is in France; it is summer."
ANSWER = "It is sunny in Paris."


def reasoning_request(model: str, grammar: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "grammar": grammar,
        "temperature": 0,
        **extra,
    }


@pytest.mark.parametrize(
    ("model", "grammar"),
    [
        ("qwen3", json.dumps(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}")),
        ("think", json.dumps(f"{THOUGHT}\n</think>\n\n{ANSWER}")),  # the prompt opened <think>
    ],
)
async def test_reasoning_is_split_out_streamed_and_not(client: RemoteClient, model: str, grammar: str) -> None:
    body = reasoning_request(model, f"root ::= {grammar}")
    async with sdk(client) as api:  # grammar is not OpenAI's: the SDK sends it as an extra field
        answer = await api.chat.completions.create(
            **{k: v for k, v in body.items() if k != "grammar"}, extra_body={"grammar": body["grammar"]}
        )
    message = answer.choices[0].message
    assert message.content == ANSWER
    assert (message.model_extra or {}).get("reasoning_content", "").strip() == THOUGHT
    assert answer.choices[0].finish_reason == "stop"

    response = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.status == 200
    chunks = await sse_data(response)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    reasoning = "".join(d.get("reasoning_content") or "" for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    assert (reasoning.strip(), content) == (THOUGHT, ANSWER)
    assert sum(1 for d in deltas if d.get("reasoning_content")) > 1  # it streams as it is generated
    assert "think>" not in content + reasoning


async def test_reasoning_inline_keeps_the_tags_in_the_content(client: RemoteClient) -> None:
    grammar = "root ::= " + json.dumps(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}")
    response = await client.post("/v1/chat/completions", json=reasoning_request("qwen3-inline", grammar))
    assert response.status == 200
    message = (await response.json())["choices"][0]["message"]
    assert message["content"] == f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}"
    assert "reasoning_content" not in message


async def test_enable_thinking_false_reaches_the_template_over_http(client: RemoteClient) -> None:
    # the prompt then closes an empty reasoning: a grammar-forced plain answer stays content
    body = reasoning_request("qwen3", "root ::= " + json.dumps(ANSWER), chat_template_kwargs={"enable_thinking": False})
    response = await client.post("/v1/chat/completions", json=body)
    assert response.status == 200, await response.text()
    answer = await response.json()
    assert answer["choices"][0]["message"]["content"] == ANSWER
    assert answer["usage"]["prompt_tokens"] > 0
    bad = await client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": {"tools": []}})
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "chat_template_kwargs"


async def test_reasoning_is_a_reasoning_item_in_the_responses_api(start_app: AppFactory, tmp_path: Path) -> None:
    config = parse_config(
        {
            "models": {"qwen3": families_model("qwen3")},
            "cache_dir": str(tmp_path / "cache"),
            "responses": {"path": str(tmp_path / "responses.sqlite3")},
        }
    )
    client = await start_app(config)
    grammar = "root ::= " + json.dumps(f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}")
    body = {"model": "qwen3", "input": "What is the weather in Paris?", "temperature": 0}
    async with sdk(client) as api:
        response = await api.responses.create(**body, extra_body={"grammar": grammar})
        stream = await api.responses.create(**body, stream=True, extra_body={"grammar": grammar})
        events = [event async for event in stream]
    reasoning, message = response.output
    assert reasoning.type == "reasoning"
    assert [c.text.strip() for c in reasoning.content or []] == [THOUGHT]
    assert message.type == "message"
    assert response.output_text == ANSWER

    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert len(deltas) > 1
    assert "".join(deltas).strip() == THOUGHT
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    (done,) = [e for e in events if e.type == "response.completed"]
    assert [item.type for item in done.response.output] == ["reasoning", "message"]
    assert done.response.output_text == ANSWER
