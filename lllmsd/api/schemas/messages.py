"""The parts of a chat request: messages, tools, tool choice and response format, as they come on the wire.

These are the nested models of ``ChatCompletionRequest`` (text.py), kept apart from the request itself
so that the request module holds only the request-level fields and their conversion to a job. A
message converts itself to the core ``ChatMessage``; the others are read by
``ChatCompletionRequest.to_job``. Their JSON-Schema additions for /openapi.json come from rules.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.api.schemas.rules import add_rules, present, when
from lllmsd.core.jobs import ChatMessage, ToolCall


class TextPart(WireRequest):
    type: Literal["text"]
    text: str


class FunctionCallWire(WireRequest):
    name: str
    arguments: str
    parsed_arguments: Any = None  # what the SDK's .parse() adds to a call it returned: ignored when sent back


class ToolCallWire(WireRequest):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallWire


# fields of an assistant message as the SDK returns it, which no other role has
_ASSISTANT_ONLY = ("annotations", "audio", "function_call", "parsed")


class MessageWire(WireRequest):
    model_config = ConfigDict(
        json_schema_extra=add_rules(
            {
                "if": {"properties": {"role": {"const": "assistant"}}},
                "else": present("content", {"not": {"type": "null"}}),
            },
            when(
                {"properties": {"role": {"const": "tool"}}},
                present("tool_call_id", {"type": "string", "minLength": 1}),
            ),
            {
                "if": {"properties": {"role": {"const": "assistant"}}},
                "else": {"properties": {name: {"type": "null"} for name in _ASSISTANT_ONLY}},
            },
        )
    )

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallWire] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None
    # The other fields of an assistant message as OpenAI's SDK returns it (``message.model_dump()``), so
    # that it can be sent back as it came; none of them is prompt text: accepted and ignored, but only on
    # assistant messages. A legacy ``function_call`` is read as a tool call (below).
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: FunctionCallWire | None = None
    parsed: Any = None

    @model_validator(mode="after")
    def _content_present(self) -> MessageWire:
        if self.role != "assistant":
            for name in _ASSISTANT_ONLY:
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} is only accepted on assistant messages")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def prompt_chars(self) -> int:
        """Characters this message adds to the prompt (for ``max_prompt_chars``)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or ())
        calls = sum(len(c.function.name) + len(c.function.arguments) for c in self.tool_calls or ())
        legacy = len(self.function_call.name) + len(self.function_call.arguments) if self.function_call else 0
        return len(content) + calls + legacy

    def to_message(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())
        if not calls and self.function_call is not None:
            calls = (ToolCall("function_call", self.function_call.name, self.function_call.arguments),)
        role = "system" if self.role == "developer" else self.role
        return ChatMessage(role=role, content=content, name=self.name, tool_calls=calls, tool_call_id=self.tool_call_id)


class FunctionWire(WireRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolWire(WireRequest):
    type: Literal["function"]
    function: FunctionWire


class NamedFunction(WireRequest):
    name: str


class NamedToolChoice(WireRequest):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(WireRequest):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormatText(WireRequest):
    type: Literal["text"]


class ResponseFormatJsonObject(WireRequest):
    type: Literal["json_object"]
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # llama-cpp-python's extension


class ResponseFormatJsonSchema(WireRequest):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormatWire = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]
