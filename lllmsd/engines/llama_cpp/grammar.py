"""Structured output on llama.cpp: GBNF grammars from JSON Schemas (response_format, named grammars) and
the argument rules of tool definitions (the call syntax around them is the model family's: tools/).

Choices made here, and why:
- Structured output is constrained, never hoped for: json_object / json_schema and tool calls become GBNF
  grammars (llama-cpp-python's JSON-schema converter, with bounded repetition llama.cpp can parse:
  converter.py) that llama.cpp's grammar sampler enforces.
- Every grammar that reaches llama.cpp is bounded first: a GBNF one (inline or named) by gbnf.py, one from
  a JSON Schema by the schema's limits (checked by the API, api/schemas/json_schema.py, and by the
  converter's own cap on bounds). A schema the converter cannot express, or nested so deeply that its
  recursion runs out, is a 400 naming the parameter, never a 500.
- Tool calls are written in the model family's own syntax (tools/): the grammar admits only calls of the
  offered tools with arguments valid for their schemas. How ``tool_choice`` uses it is in generate.py.
"""

from __future__ import annotations

import json
from typing import Any

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.jobs import ChatJob, ToolSpec
from lllmsd.engines.llama_cpp.converter import BoundedSchemaConverter
from lllmsd.engines.llama_cpp.gbnf import check_gbnf
from lllmsd.errors import InvalidRequest, UnsupportedParameter

ENGINE = "llama-cpp"

# What the converter raises on a schema it cannot express (it asserts, indexes and iterates what it is
# given), or one nested so deeply through $ref that Python's recursion limit stops it.
SCHEMA_ERRORS = (ValueError, KeyError, TypeError, AssertionError, AttributeError, IndexError, RecursionError)


def schema_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    """GBNF for a JSON Schema; a schema the converter cannot express is a 400 naming ``param``."""
    converter = BoundedSchemaConverter()
    try:
        converter.visit(converter.resolve_refs(schema, "schema"), "")
    except SCHEMA_ERRORS as exc:
        raise _schema_error(param, exc) from None
    return converter.format_grammar()


def tool_argument_rules(tools: tuple[ToolSpec, ...]) -> tuple[list[str], str]:
    """The GBNF rule of each tool's arguments (by its JSON Schema), and the rules' text: the parts of a
    tool-call grammar that do not depend on the model family's call syntax (tools/call_grammar.py)."""
    converter = BoundedSchemaConverter()
    rules = []
    for i, tool in enumerate(tools):
        schema = tool.parameters or {"type": "object"}
        try:
            rules.append(converter.visit(converter.resolve_refs(schema, f"tool{i}"), f"tool{i}-args"))
        except SCHEMA_ERRORS as exc:
            raise _schema_error(f"tools[{i}].function.parameters", exc) from None
    return rules, converter.format_grammar()


def _schema_error(param: str, exc: BaseException) -> InvalidRequest:
    if isinstance(exc, RecursionError):
        detail = "it is nested too deeply (through $ref) to convert"
    else:
        detail = str(exc)[:300] or type(exc).__name__
    return InvalidRequest(
        f"{param}: cannot turn the JSON Schema into a grammar: {detail}", param=param, code="invalid_value"
    )


def resolve_grammar(config: LlamaCppModelConfig, grammar: str | None) -> str | None:
    """Inline GBNF, or a name from the config's ``grammars:`` (GBNF, or a JSON Schema as JSON text), checked
    so that llama.cpp can take it (gbnf.py)."""
    if grammar is None:
        return None
    text = config.grammars.get(grammar, grammar)
    if not text.strip():
        raise InvalidRequest("grammar is empty", param="grammar", code="invalid_value")
    if text.lstrip().startswith("{"):
        try:
            schema = json.loads(text)
        except ValueError as exc:
            message = f"grammar: not a usable JSON Schema: {exc}"
            raise InvalidRequest(message, param="grammar", code="invalid_value") from None
        except RecursionError:
            message = "grammar: the JSON Schema is nested too deeply"
            raise InvalidRequest(message, param="grammar", code="invalid_value") from None
        if not isinstance(schema, dict):
            raise InvalidRequest("grammar: a JSON Schema must be an object", param="grammar", code="invalid_value")
        return schema_grammar(schema, "grammar")
    check_gbnf(text)
    return text


def response_grammar(job: ChatJob) -> str | None:
    """The grammar a chat request's response_format asks for, if any."""
    fmt = job.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return schema_grammar(fmt.schema or {"type": "object"}, "response_format.schema")
    if fmt.type == "json_schema":
        if fmt.schema is None:
            raise InvalidRequest(
                "response_format json_schema needs a schema", param="response_format", code="invalid_value"
            )
        return schema_grammar(fmt.schema, "response_format.json_schema.schema")
    raise UnsupportedParameter("response_format", ENGINE, f"type {fmt.type!r}")


def compact_json_prefix(raw: str) -> tuple[str, bool]:
    """The JSON value at the start of ``raw`` without insignificant whitespace, and whether it is complete."""
    out: list[str] = []
    depth = 0
    in_string = escaped = False
    for char in raw:
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
            continue
        if char.isspace():
            continue
        out.append(char)
        if char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return "".join(out), True
    return "".join(out), False
