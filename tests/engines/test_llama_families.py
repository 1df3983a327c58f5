"""Each model family's tool format and reasoning on the llama-cpp engine, on SmolLM2's weights with the
family templates the tests write (tests/family_templates.py, built by setup_models.smollm2_families).

No tool-trained model ships on PyPI, so: the rendering tests assert that the prompt carries the tools,
earlier calls and tool results where each family puts them; the end-to-end tests run the daemon with a
family's template and force the output with the family's call grammar (tool_choice required) or a
request grammar (reasoning), then check what comes back over HTTP and through the SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from lllmsd.core.instance import ModelInstance
from lllmsd.core.jobs import ChatMessage, ToolCall, ToolSpec
from lllmsd.errors import InvalidRequest
from tests.engines.conftest import engine_of, load_instance
from tests.setup_models import model_path

pytestmark = [pytest.mark.engines, pytest.mark.asyncio(loop_scope="module")]

WEATHER = ToolSpec(
    "get_weather",
    "The current weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
HISTORY = (
    ChatMessage("system", "Be brief."),
    ChatMessage("user", "What is the weather in Paris?"),
    ChatMessage("assistant", None, tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
    ChatMessage("tool", "Sunny, 24 C", tool_call_id="call_1"),
    ChatMessage("user", "And is that warm?"),
)


def families_model(template: str | None, **extra: Any) -> dict[str, Any]:
    return {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": str(model_path("smollm2-families")),
        "chat_format": f"chat_template.{template}" if template else None,
        "context_size": 2048,
        "device": {"threads": 1, "batch_threads": 1},
        **extra,
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engines() -> AsyncIterator[dict[str, Any]]:
    """One engine per family template (and SmolLM2's own ChatML, which knows nothing of tools)."""
    instances: dict[str, ModelInstance] = {}
    try:
        for name in ("hermes", "qwen3", "think", "llama3", "mistral"):
            instances[name] = await load_instance(families_model(name), isolation="thread")
        smol = {**families_model(None), "location": str(model_path("smollm2"))}
        instances["chatml"] = await load_instance(smol, isolation="thread")
        yield {name: engine_of(instance) for name, instance in instances.items()}
    finally:
        for instance in instances.values():
            await instance.dispose()


def rendered(engine: Any, messages: tuple[ChatMessage, ...] = HISTORY, **options: Any) -> str:
    prompt = engine._prompt.render(messages, options.pop("tools", (WEATHER,)), open_turn=True, **options)
    return engine._llama._model.detokenize(prompt.tokens, special=True).decode()


# ------------------------------------------------------------------------------------------ rendering


async def test_detection_per_template(engines: dict[str, Any]) -> None:
    found = {
        name: (e._prompt.tools.family, e._prompt.tools.native, e._prompt.tools.thinks) for name, e in engines.items()
    }
    assert found == {
        "hermes": ("hermes", True, False),
        "qwen3": ("hermes", True, True),
        "think": ("generic", False, True),
        "llama3": ("llama3", True, False),
        "mistral": ("mistral", True, False),
        "chatml": ("generic", False, False),
    }


@pytest.mark.parametrize("family", ["hermes", "qwen3"])
async def test_hermes_and_qwen_render_tools_calls_and_results_in_their_tags(
    engines: dict[str, Any], family: str
) -> None:
    text = rendered(engines[family])
    tools = text.split("<tools>\n", 1)[1].split("</tools>", 1)[0]
    assert json.loads(tools) == {
        "type": "function",
        "function": {"name": "get_weather", "description": WEATHER.description, "parameters": WEATHER.parameters},
    }
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call><|im_end|>" in text
    )
    assert "<|im_start|>user\n<tool_response>\nSunny, 24 C\n</tool_response><|im_end|>" in text
    assert "You can call these functions" not in text  # the template's own words, not the fallback's
    assert text.endswith("<|im_start|>assistant\n")


async def test_llama3_renders_parameters_and_ipython_results(engines: dict[str, Any]) -> None:
    text = rendered(engines["llama3"])
    assert "Environment: ipython" in text
    assert '"name": "get_weather"' in text.split("<|start_header_id|>user<|end_header_id|>", 1)[1]
    assert (
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>' in text
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\nSunny, 24 C<|eot_id|>" in text


async def test_llama3_template_refusing_two_calls_in_one_message_is_a_400(engines: dict[str, Any]) -> None:
    two = ChatMessage(
        "assistant", None, tool_calls=(ToolCall("a", "get_weather", "{}"), ToolCall("b", "get_weather", "{}"))
    )
    with pytest.raises(InvalidRequest) as error:
        rendered(engines["llama3"], (ChatMessage("user", "hi"), two, ChatMessage("user", "ok")))
    assert error.value.param == "messages"
    assert "single tool-calls" in error.value.message


async def test_mistral_renders_available_tools_tool_calls_and_results(engines: dict[str, Any]) -> None:
    text = rendered(engines["mistral"])
    assert text.index("[AVAILABLE_TOOLS]") < text.index("[INST] And is that warm?[/INST]")
    assert '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]' in text
    assert '[TOOL_RESULTS] {"content": "Sunny, 24 C", "call_id": "call_1"}[/TOOL_RESULTS]' in text


async def test_a_template_without_tools_gets_instructions_and_calls_as_text(engines: dict[str, Any]) -> None:
    text = rendered(engines["chatml"])
    system = text.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
    assert system.startswith("Be brief.\n\nYou can call these functions")
    assert '"name": "get_weather"' in system
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nSunny, 24 C\n</tool_response><|im_end|>" in text


async def test_template_kwargs_and_reasoning_effort_reach_the_template(engines: dict[str, Any]) -> None:
    qwen3 = engines["qwen3"]
    plain = rendered(qwen3)
    assert "<think>" not in plain
    assert "Reasoning:" not in plain
    off = rendered(qwen3, template_kwargs={"enable_thinking": False}, reasoning_effort="high")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert "Reasoning: high" in off
    with pytest.raises(InvalidRequest) as error:
        rendered(qwen3, template_kwargs={"messages": []})
    assert error.value.param == "chat_template_kwargs"


async def test_a_template_that_opens_think_starts_the_answer_in_reasoning(engines: dict[str, Any]) -> None:
    prompt = engines["think"]._prompt.render((ChatMessage("user", "hi"),), (), open_turn=True)
    assert prompt.thinking
    assert not engines["qwen3"]._prompt.render((ChatMessage("user", "hi"),), (), open_turn=True).thinking


async def test_a_family_marker_that_is_a_control_token_is_shown_as_text(engines: dict[str, Any]) -> None:
    # SmolLM2 has none of the families' markers as one token; its own <|im_start|> stands in for one
    from lllmsd.engines.llama_cpp.sampling import Decoder

    llama = engines["chatml"]._llama
    token = llama.tokenize(b"<|im_start|>", add_bos=False, special=True)
    assert len(token) == 1
    assert Decoder(llama)._piece(token[0]) == b""  # control tokens are invisible by default
    assert Decoder(llama, ("<|im_start|>", "<tool_call>"))._piece(token[0]) == b"<|im_start|>"
    assert engines["qwen3"]._prompt.tools.shown_markers == ("<think>", "</think>")
    assert engines["mistral"]._prompt.tools.shown_markers == ("[TOOL_CALLS]",)
