"""JSON Schemas as OpenAI clients send them, turned into llama.cpp grammars (engines/llama_cpp/grammar.py,
converter.py, pattern.py): $ref/$defs from nested pydantic models, patterns as ECMA regexes, and a 400
naming the schema path of what cannot be expressed, decided by check_job before the request queues."""

from __future__ import annotations

import copy
import enum
import re
from typing import Any

import pytest
from pydantic import BaseModel, Field

from lllmsd.config import parse_config
from lllmsd.core.jobs import ChatJob, ChatMessage, ResponseFormat, ToolSpec
from lllmsd.engines.llama_cpp import grammar as grammar_module
from lllmsd.engines.llama_cpp.converter import bounded_repetition
from lllmsd.engines.llama_cpp.grammar import schema_grammar, tool_argument_rules
from lllmsd.engines.llama_cpp.pattern import PatternError, pattern_gbnf
from lllmsd.engines.llama_cpp.text import LlamaCppTextEngine
from lllmsd.errors import InvalidRequest


class Role(str, enum.Enum):
    ADMIN = "admin"
    USER = "user"


class Address(BaseModel):
    city: str
    zip_code: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str
    role: Role
    address: Address
    friends: list[Person] = []  # recursive: its $ref points back at its own definition


CONFIG = parse_config({"models": {"m": {"task": "text-completion", "engine": "llama-cpp", "location": "/x.gguf"}}})
MODEL = CONFIG.models["m"]


def chat_job(**extra: Any) -> ChatJob:
    return ChatJob((ChatMessage("user", "hi"),), **extra)


def rules(grammar: str) -> dict[str, str]:
    return dict(line.split(" ::= ", 1) for line in grammar.splitlines())


def test_a_nested_recursive_model_converts_and_its_schema_is_left_as_sent() -> None:
    schema = Person.model_json_schema()
    sent = copy.deepcopy(schema)
    first = schema_grammar(schema, "response_format.json_schema.schema")
    assert schema == sent  # the library rewrote refs in place: a second conversion then failed
    assert schema_grammar(schema, "response_format.json_schema.schema") == first
    got = rules(first)
    assert got["root"] == "schema-defs-Person"
    assert got["schema-defs-Role"] == '"\\"admin\\"" | "\\"user\\""'
    assert got["schema-defs-Address-zip-code"] == '"\\"" [0-9]{5} "\\"" space'
    assert got["schema-defs-Person-friends-item"] == "schema-defs-Person"  # the recursion, as a rule


def test_tools_with_refs_convert_each_with_its_own_definitions() -> None:
    first = {"$defs": {"Role": {"enum": ["a"]}}, "properties": {"r": {"$ref": "#/$defs/Role"}}, "type": "object"}
    second = {"$defs": {"Role": {"enum": ["b"]}}, "properties": {"r": {"$ref": "#/$defs/Role"}}, "type": "object"}
    names, text = tool_argument_rules((ToolSpec("one", None, first), ToolSpec("two", None, second)))
    assert names == ["tool0-args", "tool1-args"]
    got = rules(text)
    assert got["tool0-defs-Role"] == '"\\"a\\""'
    assert got["tool1-defs-Role"] == '"\\"b\\""'  # not the first tool's Role


def test_check_job_converts_once_and_the_job_carries_the_grammars(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    convert = grammar_module._convert
    monkeypatch.setattr(grammar_module, "_convert", lambda *args: calls.append(args[2]) or convert(*args))
    schema = Person.model_json_schema()
    job = chat_job(response_format=ResponseFormat("json_schema", schema, "person"))
    checked = LlamaCppTextEngine.check_job(MODEL, job)
    assert calls == ["response_format.json_schema.schema"]
    assert checked.compiled.output == schema_grammar(schema, "x")
    assert checked.compiled.output_param == "response_format"
    tools = (ToolSpec("person", None, schema), ToolSpec("address", None, Address.model_json_schema()))
    checked = LlamaCppTextEngine.check_job(MODEL, chat_job(tools=tools, tool_choice="auto"))
    assert "tools[0].function.parameters" in calls
    names, text = tool_argument_rules(tools)
    assert checked.compiled.tool_arguments == (tuple(names), text)
    assert checked.compiled.output is None


@pytest.mark.parametrize(
    ("schema", "param", "words"),
    [
        (
            {"type": "object", "properties": {"code": {"type": "string", "pattern": "(?=x)y"}}},
            "response_format.json_schema.schema.properties.code.pattern",
            ["lookahead"],
        ),
        (
            {"type": "object", "properties": {"w": {"type": "string", "pattern": r"\bword\b"}}},
            "response_format.json_schema.schema.properties.w.pattern",
            ["word boundaries"],
        ),
        (
            {"type": "object", "properties": {"p": {"$ref": "https://example.com/s.json"}}},
            "response_format.json_schema.schema.properties.p.$ref",
            ["local reference"],
        ),
        (
            {"$defs": {}, "type": "array", "items": {"$ref": "#/$defs/Missing"}},
            "response_format.json_schema.schema.items.$ref",
            ["local reference"],
        ),
    ],
)
def test_what_cannot_be_expressed_is_a_400_naming_the_schema_path(schema: Any, param: str, words: list[str]) -> None:
    job = chat_job(response_format=ResponseFormat("json_schema", schema, "s"))
    with pytest.raises(InvalidRequest) as caught:
        LlamaCppTextEngine.check_job(MODEL, job)
    assert caught.value.param == param
    assert caught.value.code == "invalid_value"
    assert all(word in caught.value.message for word in words), caught.value.message


def test_a_tool_schema_error_names_the_tool_even_when_another_is_chosen() -> None:
    bad = ToolSpec("bad", None, {"type": "object", "properties": {"x": {"type": "string", "pattern": "a(?!b)"}}})
    job = chat_job(tools=(ToolSpec("good", None, {"type": "object"}), bad), tool_choice="good")
    with pytest.raises(InvalidRequest) as caught:
        LlamaCppTextEngine.check_job(MODEL, job)
    assert caught.value.param == "tools[1].function.parameters.properties.x.pattern"


# ----------------------------------------------------------------------------------------- patterns


def content(pattern: str) -> str:
    return pattern_gbnf(pattern, bounded_repetition)


def test_escapes_become_classes_and_literals() -> None:
    assert content(r"^\d{3}$") == "[0-9]{3}"
    assert content(r"^a\.b$") == '"a" "\\x2E" "b"'
    assert content(r"^\w+$") == "[0-9A-Z\\x5Fa-z]+"
    assert content(r"^[\d.-]+$") == "[\\x2D-\\x2E0-9]+"
    assert content(r"^\u00e9\x41$") == '"\\xE9" "A"'


def test_characters_json_escapes_are_written_escaped() -> None:
    # a '"' or '\' the value must contain is written as JSON writes it: \" and \\
    assert content(r'^"\\$') == '"\\x5C\\x22" "\\x5C\\x5C"'
    assert content(r"^\n$") == '"\\x5Cn"'


def test_an_unanchored_pattern_allows_text_around_the_match() -> None:
    from lllmsd.engines.llama_cpp.pattern import ANY_CHAR

    assert content(r"\d") == f"{ANY_CHAR}* [0-9] {ANY_CHAR}*"
    assert content(r"^\d") == f"[0-9] {ANY_CHAR}*"
    assert content(r"\d$") == f"{ANY_CHAR}* [0-9]"
    assert content("^a$|^b$") == '("a" | "b")'


def test_groups_alternation_and_quantifiers() -> None:
    assert content("^(?:ab|cd)*$") == '(("a" "b" | "c" "d"))*'
    assert content("^(?<year>[0-9]{4})-x?$") == '([0-9]{4}) "\\x2D" "x"?'
    assert content("^(a|)$") == '(("a")?)'
    assert content("^a{2,}?$") == '"a" "a"+'  # lazy: the same strings
    assert content("^a{,3}$") == '"a" "\\x7B" "\\x2C" "3" "\\x7D"'  # not a quantifier: literal text


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("(?=a)", "lookahead"),
        ("(?<!a)b", "lookahead"),
        (r"\bfoo", "word boundaries"),
        (r"(a)\1", "backreferences"),
        (r"\p{L}", "Unicode property"),
        ("(a", "unbalanced '('"),
        ("a)", "unbalanced ')'"),
        ("a$b", "'$'"),
        ("a^", "'^'"),
        ("*a", "nothing to repeat"),
        ("a**", "cannot follow a quantifier"),
        ("a{3,2}", "maximum below its minimum"),
        ("[a", "unterminated"),
        ("[z-a]", "out of order"),
        ("[^\\x00-\\U0010FFFF]", "unknown escape"),
    ],
)
def test_what_a_grammar_cannot_express_is_refused(pattern: str, words: str) -> None:
    with pytest.raises(PatternError, match=re.escape(words)):
        content(pattern)
