"""Bounds on the JSON Schemas a request brings (response_format, each tool's parameters), checked before any
engine work.

An engine turns these schemas into something it runs (llama-cpp: a GBNF grammar whose size follows the
schema's); unbounded, a schema made the converter and the grammar parser recurse until the process died,
build grammars of 200,000 alternatives (150 s for 5 tokens), or stall the event loop. Each bound is a 400
whose ``param`` is the path of the offending keyword, e.g.
``response_format.json_schema.schema.properties.name.maxLength``, and whose code is ``invalid_value``.

OpenAI's own Structured Outputs limits are the reference (platform docs, "Supported schemas"): 5,000
object properties in total, 10 levels of nesting, 1,000 enum values in total, 15,000 characters for the
values of one string enum with more than 250 of them, 120,000 characters for all property names,
definition names, enum and const values. Differences, and why:

- **Nesting: 32 levels, counted per subschema** (a property's schema, ``items``, an ``anyOf`` branch, a
  ``$ref``'s target, ...). OpenAI counts objects in objects; pydantic and zod write an optional list of
  objects as anyOf → array → items → object, three of these levels for one of OpenAI's, so 32 admits
  what OpenAI's 10 admits. It also bounds the converter's recursion (about three Python frames a level).
- **Subschemas: 10,000 in total** (OpenAI has no such count; its property count bounds the same).
- **Alternatives at one point: 1,000.** An ``anyOf``/``oneOf`` (its branches, those of unions directly in
  it counted through), and an object's optional properties (not in ``required``), each open that many
  parse stacks that llama.cpp follows at every token, as an enum's values do: 5,000 anyOf branches cost
  4.5 s a token, 5,000 optional properties 1.5 s, 1,000 of either about 0.4 s (SmolLM2, one core).
  OpenAI's strict mode has no optional properties at all.
- **Patterns count towards the 120,000 characters**, and their parentheses may nest 32 deep.
- **Length and item bounds** (``minLength``, ``maxLength``, ``minItems``, ``maxItems``, ``minProperties``,
  ``maxProperties``, and ``{m,n}`` in a ``pattern``) must be integers from 0 to 100,000 (the minimum not
  above the maximum), and the length and item bounds of one request together at most 200,000, each
  counted up to 2,000. OpenAI does not publish caps for them; llama.cpp enforces repetition counts up to
  2,000 and the llama-cpp engine writes larger ones in blocks (engines/llama_cpp/converter.py), where a
  bound costs grammar rules up to about 2,000 and the total keeps the grammar to about 200,000 rules
  (llama.cpp parses 1,000,000 in about a second and 220 MB, for every choice).

The walk itself is bounded: it stops at the first bound exceeded, never recurses deeper than the nesting
limit, and looks at each subschema once, so a 26 MB schema costs no more than the limits allow.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

from lllmsd.errors import InvalidRequest

MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 10_000
MAX_SCHEMA_PROPERTIES = 5_000
MAX_ENUM_VALUES = 1_000
LARGE_ENUM = 250
MAX_LARGE_ENUM_CHARS = 15_000
MAX_SCHEMA_CHARS = 120_000
MAX_ALTERNATIVES = 1_000
MAX_PATTERN_DEPTH = 32
MAX_BOUND = 100_000
MAX_BOUNDS_TOTAL = 200_000
BOUND_COUNTED_UP_TO = 2_000

_COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")
_REPEATED = frozenset({"minLength", "maxLength", "minItems", "maxItems"})  # the ones a grammar spells out
_PAIRS = (("minLength", "maxLength"), ("minItems", "maxItems"), ("minProperties", "maxProperties"))
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = (
    "items",
    "additionalProperties",
    "additionalItems",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "propertyNames",
    "unevaluatedItems",
    "unevaluatedProperties",
)
_QUANTIFIER = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


class SchemaBudget:
    """What the schemas of one request have used so far: they become one grammar, so they share limits."""

    def __init__(self) -> None:
        self.nodes = 0
        self.properties = 0
        self.enum_values = 0
        self.chars = 0
        self.bounds = 0

    def check(self, schema: Any, param: str) -> None:
        """Raise InvalidRequest (400, ``param`` + the keyword's path) if ``schema`` exceeds a limit."""
        if isinstance(schema, dict):
            _Walk(self, schema).visit(schema, param, 0)


def _fail(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: {message}", param=param, code="invalid_value")


def _name(key: str) -> str:
    """A property name as a path segment: clipped, so a long name does not make a long param."""
    return key if len(key) <= 64 else f"{key[:64]}..."


class _Walk:
    def __init__(self, budget: SchemaBudget, root: dict[str, Any]) -> None:
        self.budget = budget
        self.root = root
        self.below: dict[int, int] = {}  # id(subschema) -> the longest chain of subschemas from it
        self.active: set[int] = set()
        self.choices: dict[int, int] = {}  # id(subschema) -> the alternatives it opens (memo)

    def visit(self, node: dict[str, Any], path: str, level: int) -> int:
        """The number of subschemas on the longest chain from ``node`` (``$ref`` followed, recursion not)."""
        key = id(node)
        if key in self.active:
            return 0  # a recursive schema: generation, not the schema, bounds how deep it goes
        if key in self.below:
            chain = self.below[key]
        else:
            if level >= MAX_SCHEMA_DEPTH:
                raise _fail(path, f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
            self.active.add(key)
            self.count(node, path)
            longest = 0
            for child, child_path in _children(node, path):
                longest = max(longest, self.visit(child, child_path, level + 1))
            target = self.ref_target(node["$ref"]) if "$ref" in node else None
            if target is not None:
                longest = max(longest, self.visit(target, f"{path}.$ref", level + 1))
            self.active.discard(key)
            chain = self.below[key] = 1 + longest
        if level + chain > MAX_SCHEMA_DEPTH:
            raise _fail(path, f"the schema is nested more than {MAX_SCHEMA_DEPTH} levels deep")
        return chain

    def ref_target(self, ref: Any) -> dict[str, Any] | None:
        if not isinstance(ref, str) or not ref.startswith("#"):
            return None  # not a local reference: the engine refuses what it cannot resolve
        target: Any = self.root
        for part in ref[1:].split("/")[1:]:
            target = target.get(part) if isinstance(target, dict) else None
        return target if isinstance(target, dict) else None

    def count(self, node: dict[str, Any], path: str) -> None:
        budget = self.budget
        budget.nodes += 1
        if budget.nodes > MAX_SCHEMA_NODES:
            raise _fail(path, f"the schemas of this request have more than {MAX_SCHEMA_NODES} subschemas")
        if node.keys().isdisjoint(_COUNTED):
            return  # most subschemas: {"type": "string"} and the like
        for key in ("properties", "$defs", "definitions"):
            names = node.get(key)
            if isinstance(names, dict):
                if len(names) > MAX_SCHEMA_NODES:  # each is a subschema: refused before its names are summed
                    raise _fail(
                        f"{path}.{key}", f"the schemas of this request have more than {MAX_SCHEMA_NODES} subschemas"
                    )
                if key == "properties":
                    budget.properties += len(names)
                    if budget.properties > MAX_SCHEMA_PROPERTIES:
                        raise _fail(
                            f"{path}.properties",
                            f"the schemas of this request have more than {MAX_SCHEMA_PROPERTIES} properties",
                        )
                self.add_chars(sum(len(str(name)) for name in names), f"{path}.{key}")
        self.check_alternatives(node, path)
        self.check_enum(node.get("enum"), f"{path}.enum")
        if "const" in node:
            self.add_chars(_chars(node["const"]), f"{path}.const")
        pattern = node.get("pattern")
        if isinstance(pattern, str):
            self.add_chars(len(pattern), f"{path}.pattern")
            self.check_pattern(pattern, f"{path}.pattern")
        self.check_counts(node, path)

    def check_alternatives(self, node: dict[str, Any], path: str) -> None:
        for key in ("anyOf", "oneOf"):
            if isinstance(node.get(key), list) and self.alternatives(node, 0) > MAX_ALTERNATIVES:
                raise _fail(
                    f"{path}.{key}", f"it opens more than {MAX_ALTERNATIVES} alternatives (with the unions in it)"
                )
        properties = node.get("properties")
        if isinstance(properties, dict) and len(properties) > MAX_ALTERNATIVES:
            required = node.get("required")
            given = (
                set(required) & properties.keys() if isinstance(required, list) and _all_strings(required) else set()
            )
            optional = len(properties) - len(given)
            if optional > MAX_ALTERNATIVES:
                raise _fail(
                    f"{path}.properties",
                    f"the object has {optional} optional properties (not in required); at most {MAX_ALTERNATIVES}",
                )

    def alternatives(self, node: dict[str, Any], level: int) -> int:
        """How many alternatives the grammar of ``node`` opens where it starts: a union's branches, those
        of the unions in it (and behind a $ref) counted through, as the converter writes them."""
        key = id(node)
        if key in self.choices:
            return self.choices[key]
        if level >= MAX_SCHEMA_DEPTH:
            return 1  # deeper than the nesting limit, which refuses the schema anyway
        self.choices[key] = 1  # a union that contains itself
        target = self.ref_target(node.get("$ref"))
        branches = node.get("anyOf") or node.get("oneOf")
        if target is not None:
            count = self.alternatives(target, level + 1)
        elif isinstance(branches, list):
            count = 0
            for branch in branches:
                count += self.alternatives(branch, level + 1) if isinstance(branch, dict) else 1
                if count > MAX_ALTERNATIVES:
                    break
        elif isinstance(node.get("type"), list):
            count = len(node["type"])
        elif isinstance(node.get("enum"), list) and "const" not in node:
            count = len(node["enum"])
        else:
            count = 1
        self.choices[key] = count
        return count

    def add_chars(self, chars: int, path: str) -> None:
        self.budget.chars += chars
        if self.budget.chars > MAX_SCHEMA_CHARS:
            raise _fail(
                path,
                f"the schemas of this request have more than {MAX_SCHEMA_CHARS:,} characters of property and "
                "definition names, enum and const values and patterns",
            )

    def check_enum(self, values: Any, path: str) -> None:
        if not isinstance(values, list):
            return
        self.budget.enum_values += len(values)
        if self.budget.enum_values > MAX_ENUM_VALUES:
            raise _fail(path, f"the schemas of this request have more than {MAX_ENUM_VALUES} enum values")
        chars = sum(_chars(value) for value in values)
        if len(values) > LARGE_ENUM and chars > MAX_LARGE_ENUM_CHARS and all(isinstance(v, str) for v in values):
            raise _fail(
                path,
                f"an enum of more than {LARGE_ENUM} strings may have at most {MAX_LARGE_ENUM_CHARS:,} characters "
                f"in all; this one has {chars:,}",
            )
        self.add_chars(chars, path)

    def check_counts(self, node: dict[str, Any], path: str) -> None:
        for keyword in _COUNT_KEYWORDS:
            if keyword in node:
                self.bound(node[keyword], f"{path}.{keyword}", keyword in _REPEATED)
        for low, high in _PAIRS:
            if isinstance(node.get(low), int) and isinstance(node.get(high), int) and node[low] > node[high]:
                raise _fail(f"{path}.{high}", f"{high} ({node[high]}) is below {low} ({node[low]})")

    def bound(self, value: Any, path: str, repeated: bool) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _fail(path, f"must be a non-negative integer, got {json.dumps(value)[:40]}")
        if value > MAX_BOUND:
            raise _fail(path, f"is {value}; length and item bounds may be at most {MAX_BOUND:,}")
        if repeated:
            self.budget.bounds += min(value, BOUND_COUNTED_UP_TO)
            if self.budget.bounds > MAX_BOUNDS_TOTAL:
                raise _fail(
                    path,
                    f"the length and item bounds of this request add up to more than {MAX_BOUNDS_TOTAL:,} (each "
                    f"counted up to {BOUND_COUNTED_UP_TO:,})",
                )

    def check_pattern(self, pattern: str, path: str) -> None:
        depth = deepest = 0
        escaped = in_class = False
        for char in pattern:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif in_class:
                in_class = char != "]"
            elif char == "[":
                in_class = True
            elif char == "(":
                depth += 1
                deepest = max(deepest, depth)
            elif char == ")":
                depth -= 1
        if deepest > MAX_PATTERN_DEPTH:
            raise _fail(path, f"its groups are nested more than {MAX_PATTERN_DEPTH} deep")
        for match in _QUANTIFIER.finditer(pattern):
            low, high = int(match.group(1)), match.group(2)
            self.bound(low, path, True)
            if high:
                self.bound(int(high), path, True)
                if int(high) < low:
                    raise _fail(path, f"the quantifier {match.group(0)} has its maximum below its minimum")


_COUNTED = frozenset({"properties", "$defs", "definitions", "anyOf", "oneOf", "enum", "const", "pattern"})
_COUNTED |= frozenset(_COUNT_KEYWORDS)
_MAP_KEYS = frozenset(_SCHEMA_MAPS)
_LIST_KEYS = frozenset(_SCHEMA_LISTS)
_CHILD_KEYS = _MAP_KEYS | _LIST_KEYS | frozenset(_SCHEMA_VALUES)


def _children(node: dict[str, Any], path: str) -> Iterator[tuple[dict[str, Any], str]]:
    """The subschemas of ``node`` in its own key order, lazily: a list of a million branches stops at the
    node limit."""
    for key in [key for key in node if key in _CHILD_KEYS]:
        value = node[key]
        if key in _MAP_KEYS:
            if isinstance(value, dict):
                for name, sub in value.items():
                    if isinstance(sub, dict):
                        yield sub, f"{path}.{key}.{_name(str(name))}"
        elif isinstance(value, dict):
            yield value, f"{path}.{key}"
        elif isinstance(value, list) and (key in _LIST_KEYS or key == "items"):
            for index, sub in enumerate(value):
                if isinstance(sub, dict):
                    yield sub, f"{path}.{key}[{index}]"


def _all_strings(values: list[Any]) -> bool:
    return all(isinstance(value, str) for value in values)


def _chars(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return MAX_SCHEMA_CHARS + 1
