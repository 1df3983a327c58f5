"""JSON-Schema rules that restate request validators in GET /openapi.json.

Some model validators check things a type cannot say (a field needed when another has some value, the
array option of a ``str | list[...]`` field, token-id maps). These helpers build the matching JSON
Schema additions for ``json_schema_extra``, so the document describes what is accepted and generated
requests (fuzzing, client code generators) are not refused for reasons the document hides. They only
describe; validation is the validators' own. Both the message parts (messages.py) and the chat and
completions requests (text.py) use them, hence a module of their own.
"""

from __future__ import annotations

from typing import Any

JsonSchema = dict[str, Any]


def when(condition: JsonSchema, then: JsonSchema) -> JsonSchema:
    return {"if": condition, "then": then}


def present(name: str, schema: JsonSchema) -> JsonSchema:
    return {"required": [name], "properties": {name: schema}}


def add_rules(*rules: JsonSchema) -> Any:
    def extra(schema: JsonSchema) -> None:
        schema.setdefault("allOf", []).extend(rules)

    return extra


def array_branch(*, min_items: int | None = None, max_items: int | None = None, item: JsonSchema | None = None) -> Any:
    """Constraints for the array option of a ``str | list[...]`` field."""

    def extra(schema: JsonSchema) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") == "array":
                option.update({k: v for k, v in (("minItems", min_items), ("maxItems", max_items)) if v is not None})
                option["items"] = {**option.get("items", {}), **(item or {})}
            elif option.get("type") == "string" and item:
                option.update(item)

    return extra


def token_map(schema: JsonSchema) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "object":
            option["propertyNames"] = {"pattern": r"^[0-9]{1,9}$"}
            option["additionalProperties"] = {"type": "number", "minimum": -100, "maximum": 100}
