"""Grammars from schemas (pure functions). Tool-call syntaxes are tested in test_llama_tools.py."""

from __future__ import annotations

import pytest

from lllmsd.core.jobs import ChatJob, ChatMessage, ResponseFormat, ToolSpec
from lllmsd.engines.llama_cpp.grammar import compact_json_prefix, response_grammar, tool_argument_rules
from lllmsd.errors import InvalidRequest


def test_compact_json_prefix_drops_whitespace_outside_strings_and_knows_when_it_is_complete() -> None:
    assert compact_json_prefix('{ "a" : [1, 2] , "b": "x y" }') == ('{"a":[1,2],"b":"x y"}', True)
    assert compact_json_prefix('{"a": "un\\"fin') == ('{"a":"un\\"fin', False)


def test_each_tool_gets_its_own_argument_rule() -> None:
    tools = (ToolSpec("a", parameters={"type": "object", "properties": {"x": {"type": "integer"}}}), ToolSpec("b"))
    rules, text = tool_argument_rules(tools)
    assert rules == ["tool0-args", "tool1-args"]
    assert all(f"{rule} ::=" in text for rule in rules)


def test_a_tool_schema_the_converter_cannot_express_names_the_tool() -> None:
    tools = (ToolSpec("a"), ToolSpec("b", parameters={"type": "object", "properties": {"x": {"$ref": "#/nowhere"}}}))
    with pytest.raises(InvalidRequest) as error:
        tool_argument_rules(tools)
    assert error.value.param == "tools[1].function.parameters.properties.x.$ref"  # the part, by its path


def test_json_schema_response_format_needs_a_schema() -> None:
    job = ChatJob((ChatMessage("user", "x"),), response_format=ResponseFormat("json_schema", None))
    with pytest.raises(InvalidRequest) as error:
        response_grammar(job)
    assert error.value.param == "response_format"
    assert response_grammar(ChatJob((ChatMessage("user", "x"),), response_format=ResponseFormat("text"))) is None
