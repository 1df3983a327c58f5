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

import copy
import json
from typing import Any

from lllmsd.config import LlamaCppModelConfig
from lllmsd.core.jobs import ChatJob, ToolSpec
from lllmsd.engines.llama_cpp.converter import BoundedSchemaConverter, bounded_repetition
from lllmsd.engines.llama_cpp.gbnf import check_gbnf
from lllmsd.engines.llama_cpp.pattern import PatternError, pattern_gbnf
from lllmsd.errors import InvalidRequest, UnsupportedParameter

ENGINE = "llama-cpp"

# What the converter raises on a schema it cannot express (it asserts, indexes and iterates what it is
# given), or one nested so deeply through $ref that Python's recursion limit stops it.
SCHEMA_ERRORS = (ValueError, KeyError, TypeError, AssertionError, AttributeError, IndexError, RecursionError)


def schema_grammar(schema: dict[str, Any], param: str = "response_format") -> str:
    """GBNF for a JSON Schema; a schema the converter cannot express is a 400 naming ``param`` (or the path
    below it of the part it cannot express). ``schema`` itself is not changed."""
    converter = BoundedSchemaConverter()
    _convert(converter, schema, param, "schema", "")
    return converter.format_grammar()


def tool_argument_rules(tools: tuple[ToolSpec, ...]) -> tuple[list[str], str]:
    """The GBNF rule of each tool's arguments (by its JSON Schema), and the rules' text: the parts of a
    tool-call grammar that do not depend on the model family's call syntax (tools/call_grammar.py)."""
    converter = BoundedSchemaConverter()
    rules = []
    for i, tool in enumerate(tools):
        schema = tool.parameters or {"type": "object"}
        rules.append(_convert(converter, schema, f"tools[{i}].function.parameters", f"tool{i}", f"tool{i}-args"))
    return rules, converter.format_grammar()


def _convert(converter: BoundedSchemaConverter, schema: dict[str, Any], param: str, url: str, name: str) -> str:
    """Add the rules of one schema to ``converter``; the name of its rule.

    The library's ``resolve_refs`` rewrites every local ``$ref`` in place (``#/$defs/A`` becomes
    ``tool0#/$defs/A``), and a second conversion of the same dict then fails on the rewritten reference:
    it converts a copy, so the job's schema stays as the client sent it."""
    converter.patterns.update(check_schema_parts(schema, param))
    try:
        return converter.visit(converter.resolve_refs(copy.deepcopy(schema), url), name)
    except SCHEMA_ERRORS as exc:
        raise _schema_error(param, exc) from None


_NOT_SCHEMAS = frozenset({"const", "enum", "default", "examples"})  # values, not subschemas


def check_schema_parts(schema: Any, param: str) -> dict[str, str]:
    """Refuse, naming its path (``param.properties.code.pattern``), a part of a schema that no grammar can
    express: a pattern the regex reader cannot turn into GBNF (pattern.py), a ``$ref`` that is not a local
    reference to a part of the same schema. Walks the schema once; the API bounded its size and depth.
    Returns each pattern's GBNF, for the converter to reuse."""
    patterns: dict[str, str] = {}
    stack: list[tuple[Any, str]] = [(schema, param)]
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((item, f"{path}[{index}]") for index, item in enumerate(node))
            continue
        if not isinstance(node, dict):
            continue
        pattern = node.get("pattern")
        if isinstance(pattern, str) and pattern not in patterns:
            try:
                patterns[pattern] = pattern_gbnf(pattern, bounded_repetition)
            except PatternError as exc:
                raise _part_error(f"{path}.pattern", f"cannot turn the pattern into a grammar: {exc}") from None
        ref = node.get("$ref")
        if ref is not None and not isinstance(ref, dict) and not _resolves(schema, ref):
            raise _part_error(
                f"{path}.$ref", f"{str(ref)[:100]!r} is not a local reference (#/$defs/...) to a part of this schema"
            )
        stack.extend((value, f"{path}.{key}") for key, value in node.items() if key not in _NOT_SCHEMAS)
    return patterns


def _resolves(root: Any, ref: Any) -> bool:
    if not isinstance(ref, str) or not ref.startswith("#"):
        return False
    target = root
    for part in ref[1:].split("/")[1:] if ref != "#" else ():
        if not isinstance(target, dict) or part not in target:
            return False
        target = target[part]
    return isinstance(target, dict)


def _part_error(path: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{path}: {message}", param=path, code="invalid_value")


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
