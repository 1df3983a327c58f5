"""The tool-call text format read back while it streams, and grammars from schemas (pure functions)."""

from __future__ import annotations

import json

import pytest

from lllmsd.core.jobs import ChatJob, ChatMessage, ResponseFormat, ToolSpec
from lllmsd.engines.llama_cpp.grammar import (
    compact_json_prefix,
    parse_tool_calls,
    response_grammar,
    tool_call_text,
    tool_grammar,
)
from lllmsd.errors import InvalidRequest


def test_compact_json_prefix_drops_whitespace_outside_strings_and_knows_when_it_is_complete() -> None:
    assert compact_json_prefix('{ "a" : [1, 2] , "b": "x y" }') == ('{"a":[1,2],"b":"x y"}', True)
    assert compact_json_prefix('{"a": "un\\"fin') == ('{"a":"un\\"fin', False)


def test_tool_calls_are_parsed_as_they_stream() -> None:
    text = tool_call_text("get_weather", '{"city": "Paris"}') + "\n" + tool_call_text("add", '{"a": 1')[:-14]
    calls = parse_tool_calls(text)
    assert calls[0] == ("get_weather", '{"city":"Paris"}', True)
    assert calls[1][0] == "add"
    assert calls[1][2] is False
    assert json.loads(calls[0][1]) == {"city": "Paris"}


def test_tool_grammar_names_every_tool_and_allows_several_only_when_parallel() -> None:
    tools = (ToolSpec("a", parameters={"type": "object"}), ToolSpec("b"))
    single, parallel = tool_grammar(tools, parallel=False), tool_grammar(tools, parallel=True)
    assert "root ::= call\n" in single
    assert '"\\n" call' in parallel
    assert all('a\\", \\"arguments' in g and 'b\\", \\"arguments' in g for g in (single, parallel))


def test_json_schema_response_format_needs_a_schema() -> None:
    job = ChatJob((ChatMessage("user", "x"),), response_format=ResponseFormat("json_schema", None))
    with pytest.raises(InvalidRequest) as error:
        response_grammar(job)
    assert error.value.param == "response_format"
    assert response_grammar(ChatJob((ChatMessage("user", "x"),), response_format=ResponseFormat("text"))) is None
