"""Which chat_format names the llama-cpp engine accepts, checked at config load without any weights."""

from __future__ import annotations

import pytest

from lllmsd.config import ConfigError, parse_config
from lllmsd.engines.llama_cpp.prompt import _registered_formatter, chat_format_problems


@pytest.mark.parametrize(
    "name", [None, "chatml", "llama-3", "vicuna", "alpaca", "chat_template.tool_use", "chat_template.default"]
)
def test_the_gguf_template_and_registered_prompt_formats_are_fine(name: str | None) -> None:
    # chat_template.* names are checked against the GGUF when the model loads: only the file knows them
    assert chat_format_problems(name) == []


def test_vicuna_renders_its_documented_turns() -> None:
    # its formatter is not named format_*: what the handler wraps is found by the wrapper, not the name
    formatter = _registered_formatter("vicuna")
    assert callable(formatter)
    prompt = formatter(messages=[{"role": "user", "content": "Hello"}]).prompt
    assert prompt.endswith("USER: Hello ASSISTANT:")


def test_an_unknown_format_is_a_problem() -> None:
    assert chat_format_problems("no-such-format") == ["'no-such-format' is not a llama-cpp-python chat format"]


@pytest.mark.parametrize("name", ["functionary", "chatml-function-calling"])
def test_a_full_chat_handler_is_a_problem(name: str) -> None:
    # these drive generation themselves (function calling), so they cannot only render a prompt
    assert chat_format_problems(name) == [f"{name!r} is a full chat handler, not a prompt format"]


def test_a_bad_chat_format_fails_the_config_load() -> None:
    model = {"task": "text-completion", "engine": "llama-cpp", "location": "/m.gguf", "chat_format": "functionary"}
    with pytest.raises(ConfigError) as error:
        parse_config({"models": {"chat": model}})
    assert error.value.lines() == ["models.chat.chat_format: 'functionary' is a full chat handler, not a prompt format"]
