"""The input items of a Responses request, as they come on the wire, and what they are to the model.

Messages (content a string or ``input_text`` / ``output_text`` / ``refusal`` parts), ``function_call``
and ``function_call_output`` items, and earlier ``reasoning`` items sent back as they came. Output items
the daemon rendered (responses_output.py) parse as these too, which is how a stored turn's output joins
the conversation. ``items_to_messages`` turns them into core chat messages; ``input_item_record`` into
what GET /v1/responses/{id}/input_items lists. Item and part types lllmsd does not read are refused
before these models see them (responses.py: ``refuse_unoffered``).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag

from lllmsd.api.schemas.common import WireRequest
from lllmsd.core.jobs import ChatMessage, ToolCall


def new_id(prefix: str) -> str:
    """``resp_...``, ``msg_...``, ``fc_...``: OpenAI's id shapes (a prefix and 48 hex digits)."""
    return f"{prefix}_{secrets.token_hex(24)}"


# --------------------------------------------------------------------------------------- input items


class InputText(WireRequest):
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # accepted: caching here is automatic


class OutputText(WireRequest):
    type: Literal["output_text"]
    text: str
    annotations: list[dict[str, Any]] = Field(default_factory=list)
    logprobs: list[dict[str, Any]] | None = None


class Refusal(WireRequest):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[InputText | OutputText | Refusal, Field(discriminator="type")]
Status = Literal["in_progress", "completed", "incomplete"]


class MessageItem(WireRequest):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[ContentPart]
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.content)


class FunctionCallItem(WireRequest):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str
    id: str | None = None
    status: Status | None = None
    namespace: str | None = None


class FunctionCallOutputItem(WireRequest):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputText]
    id: str | None = None
    status: Status | None = None
    name: str | None = None

    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


class ReasoningItem(WireRequest):
    """An earlier reasoning item sent back as it came. Not shown to the model again (as OpenAI drops
    reasoning from the context of later turns); kept in the stored input items."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[dict[str, Any]] = Field(default_factory=list)
    content: list[dict[str, Any]] | None = None
    encrypted_content: str | None = None
    status: Status | None = None


def _item_type(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("type", "message")
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_type),
]


def items_to_messages(items: Iterable[Any], before: tuple[ChatMessage, ...] = ()) -> tuple[ChatMessage, ...]:
    """Input (or output) items as chat messages, after the messages ``before`` them. Function calls join
    the assistant message they follow (one assistant turn with its text and its calls, as chat templates
    render it); a function's output is a tool message. Reasoning items are not shown to the model."""
    messages: list[ChatMessage] = []
    names = {c.id: c.name for m in before for c in m.tool_calls}
    for item in items:
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            messages.append(ChatMessage(role=role, content=item.text()))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            names[item.call_id] = item.name
            last = messages[-1] if messages else None
            if last is not None and last.role == "assistant":
                messages[-1] = ChatMessage("assistant", last.content or None, tool_calls=(*last.tool_calls, call))
            else:
                messages.append(ChatMessage("assistant", None, tool_calls=(call,)))
        elif isinstance(item, FunctionCallOutputItem):
            name = item.name or names.get(item.call_id)
            messages.append(ChatMessage("tool", item.text(), name=name, tool_call_id=item.call_id))
    return tuple(messages)


def input_item_record(item: Any) -> dict[str, Any]:
    """An input item as GET .../input_items lists it: with an id and status, message content as parts."""
    if isinstance(item, MessageItem):
        part_type = "output_text" if item.role == "assistant" else "input_text"
        parts = (
            [{"type": part_type, "text": item.content, **({"annotations": []} if item.role == "assistant" else {})}]
            if isinstance(item.content, str)
            else [p.model_dump(exclude_none=True) for p in item.content]
        )
        return {
            "id": item.id or new_id("msg"),
            "type": "message",
            "role": item.role,
            "content": parts,
            "status": item.status or "completed",
        }
    record = item.model_dump(exclude_none=True, by_alias=True)
    record.setdefault("id", item.id or new_id({"function_call": "fc", "reasoning": "rs"}.get(item.type, "fco")))
    record.setdefault("status", "completed")
    return record
