"""Structured output on llama.cpp: GBNF grammars from JSON Schemas (response_format, named grammars) and
from tool definitions, and the one tool-call text format every model is taught and constrained to.

Tool calls are written as ``<tool_call>\n{"name": "...", "arguments": {...}}\n</tool_call>``; the grammar
only admits calls of the offered tools with arguments valid for their schemas, and ``parse_tool_calls``
reads calls (and argument fragments, while they stream) back out of that text.

Choices made here, and why:
- Structured output is constrained, never hoped for: json_object / json_schema and tool calls become GBNF
  grammars (llama-cpp-python's JSON-schema converter, with bounded repetition llama.cpp can parse:
  converter.py) that llama.cpp's grammar sampler enforces.
- Every grammar that reaches llama.cpp is bounded first: a GBNF one (inline or named) by gbnf.py, one from
  a JSON Schema by the schema's limits (checked by the API, api/schemas/json_schema.py, and by the
  converter's own cap on bounds). A schema the converter cannot express, or nested so deeply that its
  recursion runs out, is a 400 naming the parameter, never a 500.
- Tool calls use one format for every model, described in the system prompt (``tool_instructions``),
  rather than each chat template's own: one grammar and one parser serve every model. How ``tool_choice``
  uses the grammar is in generate.py.
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

TOOL_OPEN = "<tool_call>"
TOOL_HEAD = '<tool_call>\n{"name": "'
TOOL_ARGS = '", "arguments": '
TOOL_TAIL = "}\n</tool_call>"


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


def tool_grammar(tools: tuple[ToolSpec, ...], parallel: bool) -> str:
    """GBNF that accepts only well-formed calls of the given tools, one (or several, if parallel)."""
    converter = BoundedSchemaConverter()
    alternatives = []
    for i, tool in enumerate(tools):
        schema = tool.parameters or {"type": "object"}
        try:
            args_rule = converter.visit(converter.resolve_refs(schema, f"tool{i}"), f"tool{i}-args")
        except SCHEMA_ERRORS as exc:
            raise _schema_error(f"tools[{i}].function.parameters", exc) from None
        head = json.dumps(f"{tool.name}{TOOL_ARGS}")
        alternatives.append(f"{head} {args_rule}")
    call = f"{json.dumps(TOOL_HEAD)} ( {' | '.join(alternatives)} ) {json.dumps(TOOL_TAIL)}"
    root = 'root ::= call ( "\\n" call )*' if parallel else "root ::= call"
    return "\n".join((root, f"call ::= {call}", converter.format_grammar()))


def tool_instructions(tools: tuple[ToolSpec, ...]) -> str:
    """The system-prompt text that tells a model which functions exist and how to call them."""
    lines = ["You can call these functions (their arguments are JSON Schemas):"]
    for tool in tools:
        spec = {"name": tool.name, "description": tool.description or "", "parameters": tool.parameters or {}}
        lines.append(json.dumps(spec, ensure_ascii=False))
    lines.append(
        "To call a function, answer with only\n"
        f"{TOOL_HEAD}<function name>{TOOL_ARGS}<arguments as a JSON object>{TOOL_TAIL}"
    )
    return "\n".join(lines)


def tool_call_text(name: str, arguments: str) -> str:
    return f"{TOOL_HEAD}{name}{TOOL_ARGS}{arguments}{TOOL_TAIL}"


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


def parse_tool_calls(text: str) -> list[tuple[str, str, bool]]:
    """(name, compact arguments so far, complete) of each call in text the tool grammar produced."""
    calls = []
    for chunk in text.split(TOOL_HEAD)[1:]:
        name, sep, rest = chunk.partition(TOOL_ARGS)
        if not sep:
            break  # the name is still being generated
        arguments, complete = compact_json_prefix(rest)
        calls.append((name, arguments, complete))
    return calls
