"""Responses API requests (POST /v1/responses): validation, refusals, and conversion to the core ChatJob.

``ResponseCreateRequest`` is what api/responses.py validates a body with. A Responses request is a chat
request in other words: ``instructions`` is the system message, ``input`` items are messages, function
calls and their outputs, and a ``previous_response_id`` prepends the stored conversation. ``turn()``
turns the request and the stored history into a ``ResponseTurn``: the ``ChatJob`` every text engine
already runs (so the pool's context affinity routes a chained request to the instance that holds the
conversation, and every engine refuses what it cannot honour exactly as for chat), plus the input items
as they are stored and listed. The input items are in response_items.py, rendering the answer in
responses_output.py.

What lllmsd does not offer is refused before anything runs, with a 400 that names the parameter and says
so (``UNOFFERED``, hosted tools, image and file inputs): nothing a client asked for is silently ignored.
Unknown fields are refused like every wire request's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from lllmsd.api.schemas.common import WireRequest
from lllmsd.api.schemas.json_schema import SchemaBudget
from lllmsd.api.schemas.response_items import InputItem, MessageItem, input_item_record, items_to_messages
from lllmsd.api.schemas.text import (
    MAX_INT32,
    MAX_TOOLS,
    SamplingWire,
    _check_count,
    _check_max_tokens,
    _check_prompt_chars,
)
from lllmsd.core.jobs import ChatJob, ChatMessage, ResponseFormat, ToolSpec
from lllmsd.errors import InvalidRequest, LllmsdError

# Known Responses parameters that lllmsd does not offer, and why (a 400 naming them when they are set).
UNOFFERED: Mapping[str, str] = {
    "background": "background responses are not offered: send the request and wait, or stream it",
    "background_options": "background responses are not offered",
    "conversation": "server-side conversations are not offered: chain with previous_response_id",
    "prompt": "stored prompt templates are not offered: send instructions and input",
    "context_management": "server-side context compaction is not offered: use truncation: auto",
    "moderation": "moderation is not offered",
    "image": "image generation is not offered",
    "prompt_cache_options": "prompt caching is automatic here (context affinity); it takes no options",
    "access_programs": "OpenAI access programs do not apply to a local daemon",
    "max_tool_calls": "a cap on built-in tool calls does not apply: lllmsd runs no tools itself",
}
# Input content parts that carry what a text model cannot read.
UNOFFERED_PARTS = {"input_image": "image inputs", "input_file": "file inputs", "input_audio": "audio inputs"}
# The input item types this endpoint reads (others are hosted-tool items: web_search_call, ...).
INPUT_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")
INCLUDABLE = {
    "message.output_text.logprobs",  # logprobs on the output_text parts
    "reasoning.encrypted_content",  # nothing is encrypted here: reasoning, where produced, is sent in clear
}
MAX_METADATA = 16  # OpenAI's limits: 16 pairs, keys of 64 and values of 512 characters


# ------------------------------------------------------------------------------ tools, text, reasoning


class FunctionToolWire(WireRequest):
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(WireRequest):
    type: Literal["function"]
    name: str


class TextFormatText(WireRequest):
    type: Literal["text"]


class TextFormatJsonObject(WireRequest):
    type: Literal["json_object"]


class TextFormatJsonSchema(WireRequest):
    type: Literal["json_schema"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(WireRequest):
    format: (
        Annotated[TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")] | None
    ) = None
    verbosity: None = Field(None, description="Not offered: only null is accepted.")


class ReasoningConfig(WireRequest):
    """Accepted; a summary is produced only where the model family reasons (docs/responses.md)."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesStreamOptions(WireRequest):
    include_obfuscation: bool | None = None  # accepted for SDK compatibility; there is nothing to obfuscate


# ------------------------------------------------------------------------------------------ request


class ResponseCreateRequest(SamplingWire):
    """POST /v1/responses. The sampling fields chat takes (seed, top_k, min_p, repeat_penalty, ...) come
    from ``SamplingWire``; ``n`` is fixed at 1 (a Response has one answer)."""

    model: str
    input: str | list[InputItem] = ""
    instructions: str | None = None
    previous_response_id: str | None = Field(None, min_length=1)
    store: bool | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    n: Literal[1] = 1
    top_logprobs: int | None = Field(None, ge=0, le=20)
    include: list[str] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=MAX_METADATA)
    tools: list[FunctionToolWire] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: ReasoningConfig | None = None
    stream_options: ResponsesStreamOptions | None = None  # type: ignore[assignment]
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None  # one tier here
    prompt_cache_key: str | None = None  # accepted: the cache is routed by content here
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None  # accepted: see prompt_cache_key
    safety_identifier: str | None = None
    # the parameters of UNOFFERED, typed loosely so the before-check's clear message is what a client sees
    background: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unoffered(cls, data: Any) -> Any:
        if isinstance(data, dict):
            refuse_unoffered(data)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ResponseCreateRequest:
        if isinstance(self.tool_choice, ToolChoiceFunction):
            if self.tool_choice.name not in {t.name for t in self.tools or ()}:
                raise ValueError(f"tool_choice names '{self.tool_choice.name}', which is not in tools")
        elif self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice 'required' needs tools")
        for key in self.metadata or {}:
            if len(key) > 64:
                raise ValueError("metadata keys are at most 64 characters")
        return self

    @field_validator("include")
    @classmethod
    def _includable(cls, value: list[str] | None) -> list[str] | None:
        for name in value or ():
            if name not in INCLUDABLE:
                raise ValueError(f"'{name[:100]}' is not offered by lllmsd (offered: {', '.join(sorted(INCLUDABLE))})")
        return value

    # --------------------------------------------------------------------------------- conversion

    @property
    def wants_logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ()) or bool(self.top_logprobs)

    def turn(self, history: tuple[ChatMessage, ...] = ()) -> ResponseTurn:
        """This request after ``history`` (the stored chain of ``previous_response_id``, if any)."""
        items = [input_item_record(item) for item in self._input_items()]
        new_messages = items_to_messages(self._input_items(), history)
        return ResponseTurn(request=self, history=history, new_messages=new_messages, input_items=items)

    def _input_items(self) -> list[Any]:
        if isinstance(self.input, str):
            return [MessageItem(role="user", content=self.input)] if self.input else []
        return list(self.input)

    def check_schemas(self) -> None:
        budget = SchemaBudget()
        fmt = self.text.format if self.text else None
        if isinstance(fmt, TextFormatJsonSchema):
            budget.check(fmt.schema_, "text.format.schema")
        for index, tool in enumerate(self.tools or ()):
            budget.check(tool.parameters, f"tools[{index}].parameters")

    def response_format(self) -> ResponseFormat | None:
        fmt = self.text.format if self.text else None
        if isinstance(fmt, TextFormatJsonSchema):
            return ResponseFormat("json_schema", fmt.schema_, fmt.name, fmt.strict)
        if isinstance(fmt, TextFormatJsonObject):
            return ResponseFormat("json_object")
        if isinstance(fmt, TextFormatText):
            return ResponseFormat("text")
        return None


def refuse_unoffered(data: Mapping[str, Any]) -> None:
    """A 400 naming the first parameter, tool or input part that lllmsd does not offer."""
    for name, why in UNOFFERED.items():
        value = data.get(name)
        if value is not None and value is not False:
            raise _unoffered(name, f"'{name}' is not offered by lllmsd: {why}")
    tools = data.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" and isinstance(kind, str):
            raise _unoffered(
                f"tools[{index}].type",
                f"tool type '{kind}' is a hosted tool that OpenAI runs itself; lllmsd does not offer it "
                "(give function tools and run them in the client)",
            )
    choice = data.get("tool_choice")
    if isinstance(choice, dict) and isinstance(choice.get("type"), str) and choice["type"] != "function":
        raise _unoffered("tool_choice", f"tool_choice of type '{choice['type']}' is not offered by lllmsd")
    items = data.get("input")
    for index, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if isinstance(kind, str) and kind not in INPUT_ITEM_TYPES:
            raise _unoffered(
                f"input[{index}].type",
                f"input items of type '{kind}' are not offered by lllmsd (it reads messages, function_call "
                "and function_call_output items)",
            )
        for key in ("content", "output"):
            parts = item.get(key)
            for p_index, part in enumerate(parts if isinstance(parts, list) else ()):
                part_type = part.get("type") if isinstance(part, dict) else None
                if part_type in UNOFFERED_PARTS:
                    raise _unoffered(
                        f"input[{index}].{key}[{p_index}]",
                        f"{UNOFFERED_PARTS[part_type]} ({part_type}) are not offered by lllmsd: its models read text",
                    )


def _unoffered(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="unsupported_parameter")


@dataclass(frozen=True)
class ResponseTurn:
    """One request after its stored chain: what the engine runs and what the store keeps."""

    request: ResponseCreateRequest
    history: tuple[ChatMessage, ...]  # the chain before this turn (no instructions)
    new_messages: tuple[ChatMessage, ...]
    input_items: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0  # oldest history messages left out to fit the context (truncation: auto)

    @property
    def conversation(self) -> tuple[ChatMessage, ...]:
        """The chain including this turn's input, without instructions: what the store keeps."""
        return (*self.history, *self.new_messages)

    def messages(self) -> tuple[ChatMessage, ...]:
        """What the model sees: instructions, then the conversation (less what truncation dropped)."""
        system = (ChatMessage("system", self.request.instructions),) if self.request.instructions else ()
        return (*system, *self.conversation[self.dropped :])

    def truncated(self, count: int = 1) -> ResponseTurn | None:
        """This turn with ``count`` more of the oldest conversation messages dropped, or None when only
        this turn's own input is left (dropping that would answer a different question)."""
        if self.dropped >= len(self.history):
            return None
        dropped = min(len(self.history), self.dropped + max(count, 1))
        return ResponseTurn(self.request, self.history, self.new_messages, self.input_items, dropped)

    @property
    def kept_history(self) -> int:
        """Messages of the stored chain still shown to the model."""
        return len(self.history) - self.dropped

    def to_job(self, config: Any) -> ChatJob:
        body = self.request
        messages = self.messages()
        if not any(m.role != "system" for m in messages):
            raise InvalidRequest("input is empty: give a message to answer", param="input", code="invalid_value")
        _check_count("input", len(messages), getattr(config, "max_messages", None), "max_messages")
        chars = sum(len(m.content or "") + sum(len(c.arguments) for c in m.tool_calls) for m in messages)
        _check_prompt_chars(config, "input", chars)
        _check_max_tokens(config, "max_output_tokens", body.max_output_tokens)
        body.check_schemas()
        tool_choice = body.tool_choice.name if isinstance(body.tool_choice, ToolChoiceFunction) else body.tool_choice
        return ChatJob(
            messages=messages,
            sampling=body.sampling(
                body.max_output_tokens, getattr(config, "completion_defaults", None), requested=True
            ),
            tools=tuple(ToolSpec(t.name, t.description, t.parameters) for t in body.tools or ()),
            tool_choice=tool_choice,
            parallel_tool_calls=body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
            response_format=body.response_format(),
            logprobs=body.wants_logprobs,
            top_logprobs=body.top_logprobs or 0,
            grammar=body.resolve_grammar(config),
            stream=body.stream,
            reasoning_effort=body.reasoning.effort if body.reasoning is not None else None,
        )


# The chat job's parameter names, as a Responses client wrote them (for errors raised below the API).
_PARAMS_IN_RESPONSES_TERMS = {
    "messages": "input",
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "logprobs": "include",
    "reasoning_effort": "reasoning.effort",
}


def in_responses_terms(exc: LllmsdError) -> LllmsdError:
    """``exc`` with a chat parameter name (messages, response_format, ...) put the way this request said it."""
    renamed = _PARAMS_IN_RESPONSES_TERMS.get(exc.param or "")
    if renamed is None:
        return exc
    exc.message = exc.message.replace(f"'{exc.param}'", f"'{renamed}'")
    exc.args = (exc.message,)
    exc.param = renamed
    return exc
