"""llama-cpp-python's JSON-Schema-to-GBNF converter, with bounded repetition llama.cpp can parse.

llama-cpp-python 0.3.x's ``SchemaConverter`` writes ``"maxLength": n`` (and ``maxItems``, and ``{m,n}`` in a
``pattern``) as n nested optional groups, ``(c (c (c ...)?)?)?``. llama.cpp's grammar parser recurses once
per group and counts every group's rules against its repetition threshold: from about 2,000 it refuses the
grammar (a 400 that blamed ``grammar``), at 20,000 it overflows its stack and the process dies (SIGSEGV).
Agent frameworks write such bounds routinely.

``BoundedSchemaConverter`` is that converter with two changes, and otherwise the library's own code:

- **Bounded repetition is GBNF's ``x{m,n}``** (``bounded_repetition``, as upstream llama.cpp's converter now
  writes it): flat, so the parser does not recurse. llama.cpp enforces a count up to 2,000 only (it
  refuses a larger minimum and silently drops a larger maximum), and less for a repeated group (an
  array's ``("," space item)``), so a count above 500 is written in blocks of 500: ``x{0,1200}`` becomes
  ``((x{500}){0,1} x{0,499} | (x{500}){2} x{0,200})``, exactly 0 to 1,200. Each bound may be at most
  ``REPEAT_CAP`` (100,000); the API refuses larger ones first, naming the keyword
  (api/schemas/json_schema.py).
- **Optional properties cost linear time.** The library builds the "rest" rules of an object's optional
  properties again for every starting property (900 optional properties: 4 s); here each is built once,
  in the same order, so the grammar is the same text.

- **Patterns are read as the ECMA 262 regexes JSON Schema means** (pattern.py): escapes such as ``\\d``
  and ``\\.``, and unanchored patterns, which the library's ``_visit_pattern`` copies into GBNF that
  llama.cpp refuses (or asserts on).

The library's ``visit`` calls the module-level ``_build_repetition``; this class runs the library's
function with that one name bound to ``bounded_repetition`` instead (``tests/unit/test_llama_bounds.py``
fails if a new llama-cpp-python stops using it).
"""

from __future__ import annotations

import json
import re
import types
from collections.abc import Callable
from typing import Any

from llama_cpp.llama_grammar import PRIMITIVE_RULES, SchemaConverter

from lllmsd.engines.llama_cpp.pattern import pattern_gbnf

REPEAT_CAP = 100_000  # the largest count a schema's length, item or pattern bound may give
# llama.cpp refuses a repetition of a group when the rules the group brings (itself, groups in it, and
# each rule name first seen inside it) times the count exceed 2,000 (MAX_REPETITION_THRESHOLD). The
# groups written here bring at most 4 (an array's ("," space item), a block of them): 4 x 500 fits.
REPEAT_BLOCK = 500
_RULE_NAME_JUNK = re.compile(r"[^a-zA-Z0-9-]+")
_VALUE_KEYWORDS = frozenset({"const", "enum", "default", "examples"})  # JSON values in a schema, not subschemas


class RepetitionBoundError(ValueError):
    """A bound the grammar cannot hold: not a count, above ``REPEAT_CAP``, or a minimum above the maximum."""


def bounded_repetition(
    item_rule: str,
    min_items: Any,
    max_items: Any,
    separator_rule: str | None = None,
    item_rule_is_literal: bool = False,
) -> str:
    """GBNF for ``min_items`` to ``max_items`` (None: no limit) of ``item_rule``, separated by
    ``separator_rule``; the library's ``_build_repetition`` signature (``item_rule_is_literal`` is not
    needed: ``"abc"{3}`` repeats the whole literal)."""
    del item_rule_is_literal
    low, high = _count(min_items), None if max_items is None else _count(max_items)
    if high is not None and high < low:
        raise RepetitionBoundError(f"a minimum of {low} is above the maximum of {high}")
    if separator_rule:
        if high == 0:
            return ""
        rest = _repeat(f"({separator_rule} {item_rule})", max(low - 1, 0), None if high is None else high - 1)
        body = f"{item_rule} {rest}" if rest else item_rule
        return body if low > 0 else f"({body})?"
    return _repeat(item_rule, low, high)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RepetitionBoundError(f"a length or item bound must be a non-negative integer, got {value!r}")
    if value > REPEAT_CAP:
        raise RepetitionBoundError(f"a length or item bound of {value} is above the limit of {REPEAT_CAP:,}")
    return value


def _repeat(item: str, low: int, high: int | None) -> str:
    if high is None:
        if low <= 1:
            return f"{item}{'*' if low == 0 else '+'}"
        return f"{_exactly(item, low - 1)} {item}+"
    return " ".join(part for part in (_exactly(item, low), _up_to(item, high - low)) if part)


def _exactly(item: str, count: int) -> str:
    if count <= 1:
        return item if count == 1 else ""
    if count <= REPEAT_BLOCK:
        return f"{item}{{{count}}}"
    blocks, rest = divmod(count, REPEAT_BLOCK)
    block = f"({item}{{{REPEAT_BLOCK}}})"
    return " ".join(part for part in (_exactly(block, blocks), _exactly(item, rest)) if part)


def _up_to(item: str, count: int) -> str:
    """0 to ``count`` items."""
    if count <= 1:
        return f"{item}?" if count == 1 else ""
    if count <= REPEAT_BLOCK:
        return f"{item}{{0,{count}}}"
    blocks, rest = divmod(count, REPEAT_BLOCK)
    block = f"({item}{{{REPEAT_BLOCK}}})"
    # below blocks * BLOCK: fewer whole blocks, then up to BLOCK - 1 more; from there: all blocks, then the rest
    below = " ".join(part for part in (_up_to(block, blocks - 1), _up_to(item, REPEAT_BLOCK - 1)) if part)
    above = " ".join(part for part in (_exactly(block, blocks), _up_to(item, rest)) if part)
    return f"({below} | {above})"


def _with_bounded_repetition(function: Callable[..., Any]) -> Callable[..., Any]:
    """The library function, reading ``_build_repetition`` as ``bounded_repetition``."""
    namespace = {**function.__globals__, "_build_repetition": bounded_repetition}
    rebound = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    rebound.__kwdefaults__ = function.__kwdefaults__
    return rebound


class BoundedSchemaConverter(SchemaConverter):
    visit = _with_bounded_repetition(SchemaConverter.visit)

    def __init__(self) -> None:
        super().__init__(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
        self.patterns: dict[str, str] = {}  # pattern -> its GBNF, when the caller read it already

    def _visit_pattern(self, pattern: str, name: str) -> str:
        body = self.patterns.get(pattern)
        if body is None:
            body = self.patterns[pattern] = pattern_gbnf(pattern, bounded_repetition)
        return self._add_rule(name, f'"\\"" {body} "\\"" space')

    def resolve_refs(self, schema: dict[str, Any], url: str) -> dict[str, Any]:
        """Prefix every local ``$ref`` of ``schema`` with ``url`` (in place: give it a copy) and note its
        target. The library's method stops at a node with a ``$ref``, so a schema whose root is a ``$ref``
        (pydantic's recursive models) kept the references in its ``$defs`` unresolved; and it fetches
        remote references, which are refused here (only local ones: api and grammar.py say so first)."""

        def visit(node: Any) -> None:
            if isinstance(node, list):
                for item in node:
                    visit(item)
                return
            if not isinstance(node, dict):
                return
            ref = node.get("$ref")
            if isinstance(ref, str) and not ref.startswith(f"{url}#"):  # a dict met twice is done already
                if not ref.startswith("#"):
                    raise ValueError(f"only local references are supported, not {ref[:100]!r}")
                target: Any = schema
                for escaped in ref[1:].split("/")[1:]:
                    part = escaped.replace("~1", "/").replace("~0", "~")  # JSON Pointer escapes
                    if not isinstance(target, dict) or part not in target:
                        raise ValueError(f"the reference {ref[:100]!r} points at nothing in the schema")
                    target = target[part]
                node["$ref"] = f"{url}{ref}"
                self._refs[node["$ref"]] = target
            for key, value in node.items():
                if key not in _VALUE_KEYWORDS:
                    visit(value)

        visit(schema)
        return schema

    def _resolve_ref(self, ref: str) -> str:
        # The library names a definition's rule by the reference's last part alone, so two tools that both
        # define a different "Role" would share the first one's rule; here the whole reference names it
        # (``tool0#/$defs/Role``: ``tool0-defs-Role``). Otherwise the library's method.
        ref_name = _RULE_NAME_JUNK.sub("-", ref.replace("#/", "-").replace("$", "")).strip("-")
        if ref_name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            ref_name = self.visit(self._refs[ref], ref_name)
            self._refs_being_resolved.remove(ref)
        return ref_name

    def _build_object_rule(
        self,
        properties: list[tuple[str, Any]],
        required: set[str],
        name: str,
        additional_properties: Any,
    ) -> str:
        # the library's method (llama_cpp/llama_grammar.py, 0.3.x), with _optional_chains for its recursion
        prefix = f"{name}{'-' if name else ''}"
        prop_order = self._prop_order
        sorted_props = [
            kv[0]
            for _, kv in sorted(
                enumerate(properties), key=lambda ikv: (prop_order.get(ikv[1][0], len(prop_order)), ikv[0])
            )
        ]
        kv_rules = {}
        for prop_name, prop_schema in properties:
            prop_rule_name = self.visit(prop_schema, f"{prefix}{prop_name}")
            kv_rules[prop_name] = self._add_rule(
                f"{prefix}{prop_name}-kv",
                rf'{self._format_literal(json.dumps(prop_name))} space ":" space {prop_rule_name}',
            )
        required_props = [k for k in sorted_props if k in required]
        optional_props = [k for k in sorted_props if k not in required]
        if additional_properties is True or isinstance(additional_properties, dict):
            sub_name = f"{prefix}additional"
            value_rule = self.visit({} if additional_properties is True else additional_properties, f"{sub_name}-value")
            kv_rules["*"] = self._add_rule(
                f"{sub_name}-kv", self._add_primitive("string", PRIMITIVE_RULES["string"]) + f' ":" space {value_rule}'
            )
            optional_props.append("*")

        rule = '"{" space '
        rule += ' "," space '.join(kv_rules[k] for k in required_props)
        if optional_props:
            rule += " ("
            if required_props:
                rule += ' "," space ( '
            rule += " | ".join(self._optional_chains(optional_props, kv_rules, prefix))
            if required_props:
                rule += " )"
            rule += " )?"
        rule += ' "}" space'
        return rule

    def _optional_chains(self, keys: list[str], kv_rules: dict[str, str], prefix: str) -> list[str]:
        """One alternative per optional property it may start with: that property, then the "rest" rule
        of those after it. Rest rules are added from the last back, as the library's recursion adds them."""

        def head(index: int, optional: bool) -> str:
            key = keys[index]
            kv = kv_rules[key]
            if key == "*":
                return self._add_rule(f"{prefix}additional-kvs", f'{kv} ( "," space ' + kv + " )*")
            return f'( "," space {kv} )?' if optional else kv

        rest = [""] * (len(keys) + 1)  # rest[i]: the rule for keys[i:], the first of them optional
        for index in range(len(keys) - 1, 0, -1):
            body = head(index, True) + (f" {rest[index + 1]}" if index + 1 < len(keys) else "")
            rest[index] = self._add_rule(f"{prefix}{keys[index - 1]}-rest", body)
        return [
            head(index, False) + (f" {rest[index + 1]}" if index + 1 < len(keys) else "") for index in range(len(keys))
        ]
