"""The OpenAI Agents SDK (openai-agents) as the client: an agent with one function tool runs against
lllmsd's Responses API, calls the tool, gets its result back and completes, stateless (the SDK re-sends
the history) and chained (``auto_previous_response_id``: the stored conversation is prepended)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from agents import Agent, OpenAIResponsesModel, RunConfig, Runner, function_tool
from agents.items import ToolCallItem, ToolCallOutputItem

from lllmsd.engines.fake import FakeEngine
from tests.api.test_responses import responses_config, stored_ids
from tests.conftest import AppFactory, sdk


class AgentFakeEngine(FakeEngine):
    """The FakeEngine, except that it answers in text once a tool's result is the last message, as a
    model does after its tool ran (the plain FakeEngine would call the tool again for as long as the last
    user message names it)."""

    def _tool_to_call(self, job, last_user):  # type: ignore[no-untyped-def]
        if job.messages and job.messages[-1].role == "tool":
            return None
        return super()._tool_to_call(job, last_user)


calls: list[str] = []


@function_tool
def get_weather(text: str) -> str:
    """The weather the user asks about.

    Args:
        text: what the user asked.
    """
    calls.append(text)
    return "sunny and warm"


@pytest.mark.parametrize("chained", [False, True])
async def test_an_agent_with_a_function_tool_completes(start_app: AppFactory, tmp_path: Path, chained: bool) -> None:
    calls.clear()
    client = await start_app(responses_config(tmp_path), engines={"fake": AgentFakeEngine})
    async with sdk(client) as api:
        agent = Agent(
            name="weather",
            instructions="Answer with the weather.",
            tools=[get_weather],
            model=OpenAIResponsesModel(model="chat", openai_client=api),
        )
        options: dict[str, Any] = {"auto_previous_response_id": True} if chained else {}
        result = await Runner.run(
            agent, "use get_weather for Paris", run_config=RunConfig(tracing_disabled=True), max_turns=4, **options
        )
        first, second = [await api.responses.retrieve(r.response_id or "") for r in result.raw_responses]
    assert calls == ["use get_weather for Paris"]
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds
    outputs = [item for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert [o.output for o in outputs] == ["sunny and warm"]
    assert result.final_output == "use get_weather for Paris"  # the FakeEngine's answer: the user's words
    assert len(result.raw_responses) == 2
    assert sorted(stored_ids(tmp_path)) == sorted([first.id, second.id])
    # chained, the second turn named the first and sent only the tool's output; stateless, the SDK sent the
    # whole history back, the function call item as it came. Either way the prompt is the same and the
    # instance already held all of the first turn's prompt.
    assert second.previous_response_id == (first.id if chained else None)
    assert first.usage is not None
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens
