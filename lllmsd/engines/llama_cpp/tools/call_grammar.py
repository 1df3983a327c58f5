"""The GBNF grammar that constrains tool calls to a family's syntax, the offered functions and each
function's argument schema. Built from the same ``CallSyntax`` the parser reads (parse.py).

The argument rules (the JSON Schema conversion, the costly part) do not depend on the family: they can be
built once, before the model is known (``tool_argument_rules``), and given here as ``arguments``."""

from __future__ import annotations

import json

from lllmsd.core.jobs import ToolSpec
from lllmsd.engines.llama_cpp.grammar import tool_argument_rules
from lllmsd.engines.llama_cpp.tools.syntax import CallSyntax


def _literal(text: str) -> str:
    return json.dumps(text)


def call_grammar(
    tools: tuple[ToolSpec, ...],
    syntax: CallSyntax,
    parallel: bool,
    arguments: tuple[list[str], str] | None = None,
) -> str:
    """GBNF that accepts only well-formed calls of ``tools`` in ``syntax``: one, or (``parallel``) several.
    ``arguments``: ``tool_argument_rules(tools)``, if already built."""
    argument_rules, rules = arguments if arguments is not None else tool_argument_rules(tools)
    alternatives = []
    for tool, rule in zip(tools, argument_rules, strict=True):
        head = tool.name + '", "' + syntax.args_key + '": '
        alternatives.append(f"{_literal(head)} {rule}")
    call_head = _literal(syntax.call_open + '{"name": "')
    call_tail = _literal("}" + syntax.call_close)
    call = f"{call_head} ( {' | '.join(alternatives)} ) {call_tail}"
    calls = f"call ( {_literal(syntax.separator)} call )*" if parallel else "call"
    parts = [_literal(syntax.open)] if syntax.open else []
    parts.append(calls)
    if syntax.close:
        parts.append(_literal(syntax.close))
    return "\n".join((f"root ::= {' '.join(parts)}", f"call ::= {call}", rules))
