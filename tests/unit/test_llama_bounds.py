"""Bounds on grammars and JSON Schemas, as pure functions (no weights): the GBNF checker (gbnf.py), the
converter's bounded repetition (converter.py), the API's JSON Schema limits (api/schemas/json_schema.py)
and which checks the llama-cpp engine asks admission to run off the event loop. That llama.cpp itself
accepts what passes here, and enforces it, is tested against libllama in tests/engines/test_llama_bounds.py.
"""

from __future__ import annotations

import json
import random
import time
from types import CodeType
from typing import Any

import pytest
from llama_cpp.llama_grammar import JSON_GBNF, LIST_GBNF, SchemaConverter

from lllmsd.api.schemas.json_schema import SchemaBudget
from lllmsd.config import parse_config
from lllmsd.core.jobs import ChatJob, ChatMessage, CompletionJob, ResponseFormat, ToolSpec
from lllmsd.engines.llama_cpp.converter import RepetitionBoundError, bounded_repetition
from lllmsd.engines.llama_cpp.gbnf import MAX_GRAMMAR_CHARS, check_gbnf, gbnf_tokens
from lllmsd.engines.llama_cpp.grammar import schema_grammar, tool_argument_rules
from lllmsd.engines.llama_cpp.text import LlamaCppTextEngine
from lllmsd.errors import InvalidRequest

# ------------------------------------------------------------------------------------- GBNF grammars

ACCEPTED = [
    JSON_GBNF,
    LIST_GBNF,
    'root ::= "a"',
    'root ::= [a-z]+ "x"?',
    'root ::= ("a" | "b"){2,5}',
    'root ::= x\nx ::= "a" x | "b"',
    'root ::= (\n "a"\n | "b"\n)  # a comment',
    'root ::= "\\u00e9" [\\x00-\\x1F] [^"\\\\]*',
    "root ::= <[12]> !<[13]> <|im_end|>",
    'root ::= "a"{0,2000}',
    'root ::= ("a" "b"{0,4}){0,400}',  # a group of 5 rules x 400: llama.cpp's limit exactly
    "root ::= " + "(" * 64 + '"a"' + ")" * 64,
    "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x" | r{i + 1} "y"\n' for i in range(12)) + 'r12 ::= "z"',
    "root ::= " + " | ".join(f'"w{i}"' for i in range(3000)),
]

REFUSED = [
    ('root ::= "' + "a" * MAX_GRAMMAR_CHARS + '"', "at most 65536"),
    ("root ::= " + "(" * 20_000 + '"a"' + ")" * 20_000, "nested deeper than 64"),
    ("root ::= " + "(" * 65 + '"a"' + ")" * 65, "nested deeper than 64"),
    ("root ::= r0\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(65)) + 'r65 ::= "z"', "64 levels"),
    (
        "root ::= r0\n" + "".join(f'r{i} ::= r{i + 1} "x" | r{i + 1} "y"\n' for i in range(13)) + 'r13 ::= "z"',
        "ambiguous",
    ),
    ('root ::= "a"{5,3}', "maximum below its minimum"),  # llama.cpp: rules until memory runs out
    ('root ::= "a"{2001}', "2000"),
    ('root ::= "a"{0,2001}', "2000"),  # llama.cpp would quietly make it unbounded
    ('root ::= ("a" "b"{0,4}){0,401}', "limit of 2000 rules"),
    ('root ::= root x | x\nx ::= "a"', "left recursion"),
    ('root ::= x "a"\nx ::= y\ny ::= root | "c"', "left recursion"),
    ('root ::= ("a"?)*', "left recursion"),
    ('root ::= x "a"', "not defined"),
    ('x ::= "a"', "no root"),
    ('root ::= "a', "unexpected end"),
    ("root ::= [a-", "unexpected end"),
    ('root ::= "\\q"', "unknown escape"),
    ("root ::= *", "needs an item"),
    ("root ::= (", "expecting ')'"),
    ('root ::= "a"\x00', "NUL"),
    ("root ::= <[99999999999]>", "too large"),
    ('root ::= "a" # comment\n  | "b"', "expecting a rule name"),  # a top-level rule ends at the newline
]


@pytest.mark.parametrize("grammar", ACCEPTED, ids=range(len(ACCEPTED)))
def test_grammars_llama_cpp_can_take_pass(grammar: str) -> None:
    check_gbnf(grammar)


@pytest.mark.parametrize(("grammar", "words"), REFUSED, ids=[w for _, w in REFUSED])
def test_grammars_past_a_bound_or_malformed_are_400_naming_grammar(grammar: str, words: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as error:
        check_gbnf(grammar)
    assert error.value.param == "grammar"
    assert error.value.code == "invalid_value"
    assert words in error.value.message
    assert time.perf_counter() - started < 1


def test_grammar_tokens_are_listed_for_the_vocabulary_check() -> None:
    assert gbnf_tokens('root ::= <think> "<notatoken>" !<[5]> [<] <|im_end|>') == ["<think>", "<|im_end|>"]
    assert gbnf_tokens('root ::= "a"') == []


def test_named_grammars_are_checked_at_config_load() -> None:
    model = {
        "task": "text-completion",
        "engine": "llama-cpp",
        "location": "/models/m.gguf",
        "grammars": {"deep": "root ::= " + "(" * 100 + ")" * 100, "schema": '{"type": "string", "maxLength": 200000}'},
    }
    with pytest.raises(Exception, match="deep: parentheses nested deeper") as error:
        parse_config({"models": {"m": model}})
    assert "schema: cannot turn the JSON Schema into a grammar" in str(error.value)


# ------------------------------------------------------------------------------------- the converter


def library_grammar(schema: dict[str, Any]) -> str:
    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(schema, "schema"), "")
    return converter.format_grammar()


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([{"type": "string"}, {"type": "integer"}, {"enum": ["a", 1]}, {"type": "boolean"}])
    if roll < 0.8:
        names = [rng.choice(["a", "b", "x-y", "a b"]) + str(i) for i in range(rng.randint(0, 6))]
        props = {name: random_schema(rng, depth + 1) for name in names}
        schema = {"type": "object", "properties": props, "required": rng.sample(names, rng.randint(0, len(names)))}
        if rng.random() < 0.3:
            schema["additionalProperties"] = rng.choice([True, {"type": "integer"}])
        return schema
    return {"type": "array", "items": random_schema(rng, depth + 1)}


def test_the_converter_writes_what_the_library_writes_when_nothing_is_bounded() -> None:
    rng = random.Random(7)
    for _ in range(300):
        schema = random_schema(rng)
        assert schema_grammar(schema) == library_grammar(schema), json.dumps(schema)
    many = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(150)}, "required": ["p3"]}
    assert schema_grammar(many) == library_grammar(many)


def test_optional_properties_cost_linear_time() -> None:
    schema = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(5000)}}
    started = time.perf_counter()
    schema_grammar(schema)
    assert time.perf_counter() - started < 5  # the library's recursion: 900 properties took 4 s


def names_used(code: CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            names |= names_used(const)
    return names


def root_rule(schema: dict[str, Any]) -> str:
    return next(line for line in schema_grammar(schema).splitlines() if line.startswith("root ::="))


def test_bounds_are_written_as_flat_repetition_in_blocks() -> None:
    # the library's converter reads _build_repetition from its module: the rebinding must reach it
    assert "_build_repetition" in names_used(SchemaConverter.visit.__code__)
    assert root_rule({"type": "string", "maxLength": 5}) == 'root ::= "\\"" char{0,5} "\\"" space'
    rule = root_rule({"type": "string", "maxLength": 20_000})
    assert rule == 'root ::= "\\"" ((char{500}){0,39} char{0,499} | (char{500}){40}) "\\"" space'
    assert "(" * 10 not in schema_grammar({"type": "array", "items": {"type": "integer"}, "maxItems": 20_000})
    assert "{0,3}" in root_rule({"type": "string", "pattern": "^a{2,5}$"})


@pytest.mark.parametrize(
    ("low", "high", "separator", "expected"),
    [
        (0, 1, None, "x?"),
        (1, None, None, "x+"),
        (0, None, None, "x*"),
        (3, None, None, "x{2} x+"),
        (2, 2, None, "x{2}"),
        (0, 0, None, ""),
        (0, 1200, None, "((x{500})? x{0,499} | (x{500}){2} x{0,200})"),
        (1200, 1200, None, "(x{500}){2} x{200}"),
        (0, None, "s", "(x (s x)*)?"),
        (2, 4, "s", "x (s x) (s x){0,2}"),
        (0, 0, "s", ""),
    ],
)
def test_bounded_repetition(low: int, high: int | None, separator: str | None, expected: str) -> None:
    assert bounded_repetition("x", low, high, separator) == expected


@pytest.mark.parametrize(("low", "high"), [(0, 100_001), (5, 4), (-1, 3), (1.5, 3), (True, 3)])
def test_bounds_the_grammar_cannot_hold_are_refused(low: Any, high: Any) -> None:
    with pytest.raises(RepetitionBoundError):
        bounded_repetition("x", low, high)


def test_a_schema_the_converter_cannot_express_is_400_naming_it() -> None:
    chain = {f"d{i}": {"type": "array", "items": {"$ref": f"#/$defs/d{i + 1}"}} for i in range(1000)}
    chain["d1000"] = {"type": "string"}
    for schema in (
        {"$defs": chain, "$ref": "#/$defs/d0"},  # the converter recurses once per link
        {"type": "object", "properties": []},
        {"type": 5},
        {"type": "string", "maxLength": 10**9},
    ):
        job = ChatJob((ChatMessage("user", "x"),), response_format=ResponseFormat("json_schema", schema))
        with pytest.raises(InvalidRequest) as error:
            LlamaCppTextEngine.check_job(parse_model(), job)
        assert error.value.param == "response_format.json_schema.schema"
        assert error.value.code == "invalid_value"
    with pytest.raises(InvalidRequest) as error:
        tool_argument_rules((ToolSpec("ok"), ToolSpec("bad", parameters={"type": 5})))
    assert error.value.param == "tools[1].function.parameters"


def parse_model(**options: Any) -> Any:
    model = {"task": "text-completion", "engine": "llama-cpp", "location": "/models/m.gguf", **options}
    return parse_config({"models": {"m": model}}).models["m"]


def test_checks_that_convert_schemas_or_grammars_are_heavy() -> None:
    config = parse_model()
    user = (ChatMessage("user", "x"),)
    heavy = [
        ChatJob(user, response_format=ResponseFormat("json_object")),
        ChatJob(user, tools=(ToolSpec("f"),), tool_choice="auto"),
        ChatJob(user, grammar='root ::= "a"'),
        CompletionJob("x", grammar='root ::= "a"'),
    ]
    light = [
        ChatJob(user),
        ChatJob(user, response_format=ResponseFormat("text")),
        ChatJob(user, tools=(ToolSpec("f"),), tool_choice="none"),
        CompletionJob("x"),
    ]
    assert all(LlamaCppTextEngine.heavy_check(config, job) for job in heavy)
    assert not any(LlamaCppTextEngine.heavy_check(config, job) for job in light)


# ------------------------------------------------------------------------------------- the API's limits


def refused(schema: Any, param: str = "s") -> InvalidRequest:
    with pytest.raises(InvalidRequest) as error:
        SchemaBudget().check(schema, param)
    assert error.value.code == "invalid_value"
    return error.value


def test_schema_limits_name_the_keyword() -> None:
    assert refused({"properties": {"a": {"items": {"maxItems": 10**6}}}}).param == "s.properties.a.items.maxItems"
    assert refused({"anyOf": [{}, {"minLength": -3}]}).param == "s.anyOf[1].minLength"
    assert refused({"$defs": {"x": {"enum": list(range(1001))}}}).param == "s.$defs.x.enum"
    long_name = "n" * 500
    error = refused({"properties": {long_name: {"maxLength": 2**40}}})
    assert error.param == f"s.properties.{'n' * 64}....maxLength"  # a long name is clipped in the path


def test_alternatives_at_one_point_are_bounded() -> None:
    required = [f"p{i}" for i in range(3000)]
    SchemaBudget().check({"properties": {name: {} for name in required}, "required": required}, "s")
    assert refused({"properties": {name: {} for name in required}, "required": required[:1999]}).param == "s.properties"
    # unions inside unions, and behind $ref, count through; a union that contains itself does not loop
    inner = {"anyOf": [{"type": "integer"} for _ in range(600)]}
    schema = {"$defs": {"inner": inner}, "anyOf": [{"$ref": "#/$defs/inner"}, {"$ref": "#/$defs/inner"}]}
    assert refused(schema).param == "s.anyOf"
    SchemaBudget().check({"$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a"}, {}]}}, "$ref": "#/$defs/a"}, "s")


def test_schema_depth_follows_refs_and_stops_at_recursion() -> None:
    SchemaBudget().check({"properties": {"kids": {"type": "array", "items": {"$ref": "#"}}}}, "s")
    deep = {"type": "string"}
    for _ in range(31):
        deep = {"items": deep}
    SchemaBudget().check(deep, "s")  # 32 levels
    assert "32 levels" in refused({"items": deep}).message
    # a diamond of refs is walked once per subschema, not once per path (2**12 paths here)
    defs = {
        f"d{i}": {"properties": {"a": {"$ref": f"#/$defs/d{i + 1}"}, "b": {"$ref": f"#/$defs/d{i + 1}"}}}
        for i in range(12)
    }
    defs["d12"] = {"type": "string"}
    started = time.perf_counter()
    SchemaBudget().check({"$defs": defs, "$ref": "#/$defs/d0"}, "s")
    assert time.perf_counter() - started < 1


def test_the_walk_stops_at_the_first_bound_whatever_the_size() -> None:
    huge = {"allOf": [{"type": "string"} for _ in range(2_000_000)]}  # as json.loads builds it: each its own
    started = time.perf_counter()
    assert "10000 subschemas" in refused(huge).message
    assert time.perf_counter() - started < 1


def test_a_request_shares_one_budget_between_its_schemas() -> None:
    budget = SchemaBudget()
    names = [f"p{i}" for i in range(2500)]
    wide = {"properties": {name: {} for name in names}, "required": names}
    budget.check(wide, "tools[0].function.parameters")
    budget.check(wide, "tools[1].function.parameters")
    with pytest.raises(InvalidRequest) as error:
        budget.check({"properties": {"one": {}}}, "tools[2].function.parameters")
    assert error.value.param == "tools[2].function.parameters.properties"
